"""``load_dataset``: one entry point for built-in sets and users' files, with the shared preprocessing
(split, square resize, channel conversion, seeded subset), every choice recorded in ``meta``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import ConfigError, DataError
from .builtin import BUILTINS
from .dataset import DEFAULT_CHUNK, ImageDataset
from .formats import ACCEPTED_PATHS, RESIZE_METHOD, SPLITS, RawData, read_path, resize_images
from .limits import ReadLimits
from .raw import HELD_OUT_EVERY, split_indices, split_record
from .store import is_store

BUILTIN_DATASETS: dict[str, str] = {name: b.description for name, b in BUILTINS.items()}

LUMA_601 = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma weights for R, G, B


def load_dataset(
    name_or_path: str | os.PathLike,
    *,
    split: str = "train",
    resolution: int | None = None,
    channels: int | None = None,
    subset: int | None = None,
    seed: int = 0,
    max_bytes: int | str | None = None,
    **options,
) -> ImageDataset:
    """Load a built-in set (a name in ``BUILTIN_DATASETS``), the images at a path, or images held in memory.

    One value convention for files and arrays: uint8 0..255, or floats in [0, 1] (mapped to the data
    scale [-1, 1] by ``2 x - 1``); a numpy array or torch tensor ``[N, H, W]``, ``[N, C, H, W]`` or
    ``[N, H, W, C]`` is read exactly as a ``.npy`` file holding it: without a split of its own, "test" is every
    10th image and "train" the rest (a model given an array, :func:`as_dataset`, takes every image).

    A path may be an MNIST-style IDX directory, a CIFAR-10 python directory, a directory of ImageNet-64
    pickled batches, an image folder, a ``.npy``/``.npz`` file (format detected; see
    ``formats.ACCEPTED_PATHS``) or a store written by ``localdiff pack`` (:mod:`.store`), which returns a
    :class:`~.store_dataset.StoreDataset`: the same API, its images read block by block on demand. Names
    take precedence: write "./mnist" for a local folder called "mnist".

    split: "train", "test" or "all" (train followed by test).
    resolution: resize every image to ``resolution x resolution`` (non-square images are
        center-cropped to a square first; box filter when shrinking, bilinear when enlarging; uint8
        stays uint8). For natural-patches it is the crop size instead (default 32).
    channels: 1 or 3; RGB -> gray by ITU-R BT.601 luma (rounded), gray -> RGB by repetition.
    subset: keep ``subset`` images chosen by ``ImageDataset.subset(subset, seed)``.
    seed: seeds the subset and the random built-ins (natural-patches).
    max_bytes: memory cap for the decoded images of a path (an int, or "8G", "512M"); default
        ``$LOCALDIFF_MAX_DATA_BYTES``, else half of the machine's memory. A file that declares more, or
        compressed data that would expand more than 200-fold (above 64 MiB), is refused with a
        DataError before anything is allocated. It does not enter the fingerprint.
    options: built-in specific (natural-patches: ``num``, crops per split).

    The returned dataset's ``meta`` records the source and every choice, so its fingerprint changes
    with any of them.
    """
    split = check_options(split, resolution, channels, subset, seed)
    limits = ReadLimits.resolve(max_bytes)
    if _is_array(name_or_path):
        if options:
            raise ConfigError(f"option(s) {', '.join(sorted(options))} apply only to built-in datasets")
        data = _array_data(name_or_path, limits)  # split as a .npy file holding it: every 10th image is "test"
        idx = split_indices(len(data.images), split)
        if len(idx) == 0:
            raise ConfigError(f"an array of {len(data.images)} images has no held-out part: 'test' is every "
                              f"{HELD_OUT_EVERY}th image; pass at least {HELD_OUT_EVERY} images, or held-out images as "
                              "a second array")
        if split != "all":
            data = RawData(images=data.images[idx], meta={**data.meta, **split_record(len(data.images), split)},
                           labels=None if data.labels is None else data.labels[idx])
        return _finish(data, name="array", source="array", split=split, resolution=resolution, channels=channels,
                       subset=subset, seed=seed, seeded=False)
    builtin = _builtin_name(name_or_path)
    if builtin is not None:
        spec = BUILTINS[builtin]
        unknown = sorted(set(options) - set(spec.options))
        if unknown:
            raise ConfigError(f"built-in dataset '{builtin}' takes no option(s) {', '.join(unknown)}; it accepts "
                              f"{', '.join(spec.options) or 'none beyond split, resolution, channels, subset, seed'}")
        data = spec.load(split, seed, resolution, **options)
        name, source, seeded = builtin, f"builtin:{builtin}", spec.random
    else:
        if options:
            raise ConfigError(f"option(s) {', '.join(sorted(options))} apply only to built-in datasets; loading "
                              f"from a path accepts split, resolution, channels, subset and seed")
        path = Path(name_or_path).expanduser()
        if not path.exists():
            raise DataError(f"'{name_or_path}' is neither a built-in dataset ({', '.join(BUILTIN_DATASETS)}) nor an "
                            f"existing file or directory.\n{ACCEPTED_PATHS}")
        path = path.resolve()
        if path.is_file() and is_store(path):  # a store: read on demand, never held whole (data/store.py)
            from .store_dataset import open_store

            return open_store(path, split=split, resolution=resolution, channels=channels, subset=subset, seed=seed)
        data = read_path(path, split, resolution=resolution, subset=subset, seed=seed, limits=limits)
        name, source, seeded = path.stem if path.is_file() else path.name, str(path), False
    return _finish(data, name=name, source=source, split=split, resolution=resolution, channels=channels,
                   subset=subset, seed=seed, seeded=seeded)


def _is_array(obj) -> bool:
    import torch

    return isinstance(obj, (np.ndarray, torch.Tensor))


def _array_data(x, limits: ReadLimits) -> RawData:
    """Images held in memory, read by the convention of files: uint8 0..255 or floats in [0, 1]."""
    import torch

    from .arrays import image_array

    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    limits.check_cap(int(x.nbytes), "the array", f"an array of shape {tuple(x.shape)}")
    return RawData(images=image_array(np.asarray(x), "the array"), meta={"format": "array"})


def as_dataset(data, *, what: str = "data") -> ImageDataset:
    """``data`` as an :class:`ImageDataset`: a dataset, a built-in name or path (:func:`load_dataset`), or
    images held in memory, a numpy array or torch tensor ``[N, C, H, W]`` / ``[N, H, W]`` read by the
    convention of files (uint8 0..255, or floats in [0, 1])."""
    if isinstance(data, ImageDataset):
        return data
    if _is_array(data):  # images given to a model are its training set as given: every one of them
        return load_dataset(data, split="all")
    if isinstance(data, (str, os.PathLike)):
        return load_dataset(data)
    raise ConfigError(f"{what} must be an ImageDataset (load_dataset(...)), a built-in name or path, or images as "
                      f"a numpy array or torch tensor [N, C, H, W] (uint8 0..255 or floats in [0, 1]); got "
                      f"{type(data).__name__}")


def _builtin_name(name_or_path) -> str | None:
    if not isinstance(name_or_path, str):
        return None
    key = name_or_path.strip().lower().replace("_", "-")
    return key if key in BUILTINS else None


def check_options(split, resolution, channels, subset, seed) -> str:
    """Validate load_dataset's options (also for `localdiff pack`); returns the split, ConfigError otherwise."""
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    for what, v in (("resolution", resolution), ("subset", subset)):
        if v is not None and (isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1):
            raise ConfigError(f"{what} must be a positive integer or None, got {v!r}")
    if channels not in (None, 1, 3):
        raise ConfigError(f"channels must be 1 (gray), 3 (RGB) or None (keep), got {channels!r}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed must be a non-negative integer, got {seed!r}")
    return split


def _finish(data: RawData, *, name: str, source: str, split: str, resolution: int | None,
            channels: int | None, subset: int | None, seed: int, seeded: bool) -> ImageDataset:
    """Apply subset, resize and channel conversion (in that order: cheapest first) and record them."""
    native = [int(s) for s in data.images.shape[1:]]  # [C, H, W] as read
    ds = ImageDataset(raw=data.images, name=name, meta={}, labels=data.labels)
    if subset is not None and not data.subset_done:
        ds = ds.subset(int(subset), seed)
    raw, labels = ds.raw, ds.labels
    resized = None
    if resolution is not None and not data.resized and tuple(raw.shape[2:]) != (resolution, resolution):
        raw = resize_images(raw, int(resolution))
        resized = RESIZE_METHOD
    elif data.resized:
        resized = data.meta.get("resize")  # the reader's own record (None: resolution was not a resize)
    raw, conversion = convert_channels(raw, channels)
    meta = load_record(data.meta, source=source, split=split, native=native, shape=raw.shape[1:], resize=resized,
                       conversion=conversion, subset=subset, seed=seed, seeded=seeded)
    return ImageDataset(raw=raw, name=name, meta=meta, labels=labels)


def load_record(reader_meta: dict, *, source: str, split: str, native, shape, resize: str | None,
                conversion: str | None, subset: int | None = None, seed: int = 0, seeded: bool = False) -> dict:
    """The ``meta`` of a loaded dataset: the source, the reader's record and every choice (the images were
    ``native`` [C, H, W] as read and are ``shape`` [C, H, W] now)."""
    c, h, w = (int(v) for v in shape)
    return {
        "source": source,
        **reader_meta,
        "split": split,
        "native_shape": [int(v) for v in native],
        "resolution": h if h == w else [h, w],
        "resize": resize,
        "channels": c,
        "channel_conversion": conversion,
        "subset": None if subset is None else int(subset),
        # the seed is recorded only where it changed the images, so it never splits caches needlessly
        "seed": int(seed) if (subset is not None or seeded) else None,
    }


def convert_channels(raw: np.ndarray, channels: int | None) -> tuple[np.ndarray, str | None]:
    """``[N, C, H, W]`` -> ``[N, channels, H, W]``: RGB -> gray by ITU-R BT.601 luma, gray -> RGB by repetition."""
    c = raw.shape[1]
    if channels is None or channels == c:
        return raw, None
    if c == 1 and channels == 3:
        return np.repeat(raw, 3, axis=1), "gray repeated to RGB"
    if c == 3 and channels == 1:
        w = np.asarray(LUMA_601, dtype=np.float64)[None, :, None, None]
        out = np.empty((raw.shape[0], 1, *raw.shape[2:]), dtype=raw.dtype)
        for s in range(0, raw.shape[0], DEFAULT_CHUNK):
            y = (raw[s : s + DEFAULT_CHUNK].astype(np.float64) * w).sum(axis=1, keepdims=True)  # Y = .299 R + .587 G + .114 B
            out[s : s + DEFAULT_CHUNK] = np.clip(np.rint(y), 0, 255) if raw.dtype == np.uint8 else np.clip(y, -1, 1)
        return out, "ITU-R BT.601 luma (0.299 R + 0.587 G + 0.114 B)"
    raise ConfigError(f"cannot convert {c}-channel images to {channels} channels (only 1 <-> 3)")
