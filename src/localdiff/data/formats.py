"""Readers for images in standard on-disk formats: MNIST-style IDX, CIFAR-10 python batches, image
folders and ``.npy``/``.npz`` arrays.

Every reader returns a :class:`RawData` (images ``[N, C, H, W]`` as uint8 0..255, or float32 already
on the [-1, 1] data scale, optional int64 labels, and a ``meta`` record of what was read) and raises
:class:`~localdiff.errors.DataError` naming the offending file and the fix. Nothing here downloads.
"""

from __future__ import annotations

import gzip
import importlib
import pickle
import re
import struct
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from PIL import Image

from ..errors import DataError

SPLITS = ("train", "test", "all")

ACCEPTED_PATHS = (
    "Accepted paths:\n"
    "  - an MNIST-style IDX directory holding train-images-idx3-ubyte, train-labels-idx1-ubyte, "
    "t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte (each optionally .gz; as distributed on the "
    "MNIST / Fashion-MNIST / EMNIST download pages)\n"
    "  - a CIFAR-10 python directory holding data_batch_1 .. data_batch_5 and test_batch "
    "(extract cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html)\n"
    "  - an image folder of .png/.jpg/.jpeg/.bmp/.webp files, searched recursively, optionally split "
    "into train/ and test/ (or val/) subfolders (CelebA-HQ, AFHQ, FFHQ layouts)\n"
    "  - a .npy or .npz file holding images [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3), "
    "uint8 0..255 or float 0..1; an .npz may add labels under 'labels' or 'y'"
)


@dataclass
class RawData:
    """What a reader returns: images, labels and a record of the files read."""

    images: np.ndarray  # [N, C, H, W] uint8 0..255, or float32 on [-1, 1]
    labels: np.ndarray | None = None  # [N] int64
    meta: dict = field(default_factory=dict)
    resized: bool = False  # the reader already applied ``resolution``
    subset_done: bool = False  # the reader already applied ``subset`` (decoding only what was chosen)


# ------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------


def subset_indices(n: int, num: int, seed: int, what: str) -> np.ndarray:
    """Indices chosen exactly as ``ImageDataset.subset(num, seed)`` chooses them (sorted)."""
    if not 0 < num <= n:
        raise DataError(f"subset size must be in 1..{n} for dataset '{what}', got {num}")
    return np.sort(np.random.default_rng(seed).permutation(n)[:num])


def fit_square(im: Image.Image, size: int) -> Image.Image:
    """Center-crop ``im`` to a square on its shorter side, then resize to ``size x size``.

    Resampling is antialiased: a box (area) filter when shrinking, bilinear when enlarging.
    """
    w, h = im.size
    side = min(w, h)
    if (w, h) != (side, side):
        left, top = (w - side) // 2, (h - side) // 2
        im = im.crop((left, top, left + side, top + side))
    if side == size:
        return im
    method = Image.Resampling.BOX if size < side else Image.Resampling.BILINEAR
    return im.resize((size, size), method)


RESIZE_METHOD = ("center-crop to square, then PIL box filter (shrink) / bilinear (enlarge) in float32, "
                 "rounded once to uint8")


def resize_images(raw: np.ndarray, size: int) -> np.ndarray:
    """``[N, C, H, W]`` uint8 or float32 -> ``[N, C, size, size]`` of the same dtype (see ``fit_square``).

    Each plane is resampled in float32 (PIL mode "F") and uint8 results are rounded once at the end:
    PIL's own 8-bit path rounds after each of its two 1-D passes, which brightens images by up to one
    level on average.
    """
    n, c = raw.shape[:2]
    out = np.empty((n, c, size, size), dtype=np.float32)
    for i in range(n):
        for j in range(c):
            plane = Image.fromarray(np.ascontiguousarray(raw[i, j], dtype=np.float32), "F")
            out[i, j] = np.asarray(fit_square(plane, size))
    if raw.dtype == np.uint8:
        return np.clip(np.rint(out), 0, 255).astype(np.uint8)
    return np.clip(out, -1.0, 1.0)


def _check_labels(labels: Any, n: int, source: str) -> np.ndarray:
    """Labels as int64 ``[n]``, or a DataError naming ``source``."""
    y = np.asarray(labels)
    if y.ndim != 1 or y.shape[0] != n:
        raise DataError(f"{source}: {n} images but labels of shape {tuple(y.shape)}; the files do not belong "
                        "together or one of them is truncated: re-download or re-extract them")
    if y.dtype.kind not in "iu":
        if y.dtype.kind == "f" and np.isfinite(y).all() and (y == np.round(y)).all():
            y = y.astype(np.int64)
        else:
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    return y.astype(np.int64)


# ------------------------------------------------------------------------------------------------
# MNIST-style IDX files (http://yann.lecun.com/exdb/mnist/: big-endian magic, dims, then the bytes)
# ------------------------------------------------------------------------------------------------

IDX_IMAGES_MAGIC = 0x00000803  # uint8 data, 3 dims [N, H, W]
IDX_LABELS_MAGIC = 0x00000801  # uint8 data, 1 dim [N]
_IDX_NAME = re.compile(
    r"(?:^|[-_.])(?P<split>train|t10k|test)[-_.](?P<kind>images|labels)[-_.]idx(?P<nd>[13])[-_.]ubyte(?:\.gz)?$"
)
_IDX_LAYOUT = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte and "
               "t10k-labels-idx1-ubyte (each optionally .gz)")


def _read_maybe_gzip(path: Path) -> bytes:
    """The file's bytes, gunzipped when it starts with the gzip magic (whatever its name says)."""
    try:
        with open(path, "rb") as f:
            head = f.read(2)
            f.seek(0)
            if head != b"\x1f\x8b":
                return f.read()
            with gzip.GzipFile(fileobj=f) as g:
                return g.read()
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: the gzip data is truncated or corrupt ({type(e).__name__}: {e}); "
                        "re-download the file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e})") from e


def read_idx(path: str | Path, magic: int) -> np.ndarray:
    """Read one IDX file (gzipped or not) whose magic number must be ``magic``; returns uint8 ``dims``."""
    path = Path(path)
    data = _read_maybe_gzip(path)
    kind = {IDX_IMAGES_MAGIC: "images (uint8, [N, H, W])", IDX_LABELS_MAGIC: "labels (uint8, [N])"}[magic]
    if len(data) < 4:
        raise DataError(f"{path}: {len(data)} bytes, too short for an IDX header; the file is truncated: "
                        "re-download or re-extract it")
    (found,) = struct.unpack(">I", data[:4])
    if found != magic:
        raise DataError(f"{path}: IDX magic number 0x{found:08X}, expected 0x{magic:08X} for {kind}; this is "
                        "not an MNIST-style IDX file of that kind (or it is corrupt): re-download it")
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataError(f"{path}: {len(data)} bytes, too short for the {header}-byte IDX header; the file is "
                        "truncated: re-download or re-extract it")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    expected = int(np.prod(dims, dtype=np.int64))
    actual = len(data) - header
    if actual != expected:
        raise DataError(f"{path}: the IDX header gives dims {list(dims)}, i.e. {expected} data bytes, but the "
                        f"file holds {actual}; it is truncated or corrupt: re-download or re-extract it")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims).copy()  # writable


def find_idx_files(directory: str | Path) -> dict[tuple[str, str], Path]:
    """Map ``(split, kind)`` (split "train"/"test", kind "images"/"labels") to the IDX file found."""
    directory = Path(directory)
    found: dict[tuple[str, str], list[Path]] = {}
    for p in sorted(directory.iterdir()):
        m = _IDX_NAME.search(p.name.lower())
        if m is None or not p.is_file():
            continue
        if (m["kind"] == "images") != (m["nd"] == "3"):
            continue
        split = "train" if m["split"] == "train" else "test"
        found.setdefault((split, m["kind"]), []).append(p)
    out = {}
    for key, paths in found.items():
        plain = [p for p in paths if not p.name.lower().endswith(".gz")]
        zipped = [p for p in paths if p.name.lower().endswith(".gz")]
        # an extracted file next to its .gz is the same data: prefer the extracted one
        bases = {p.name.lower() for p in plain}
        zipped = [p for p in zipped if p.name.lower()[:-3] not in bases]
        paths = plain + zipped
        if len(paths) > 1:
            raise DataError(f"{directory}: several IDX files for {key[0]} {key[1]}: "
                            f"{', '.join(p.name for p in paths)}; keep one set per directory")
        out[key] = paths[0]
    return out


def read_idx_dir(directory: str | Path, split: str) -> RawData:
    """Read an MNIST-style IDX directory (train-* / t10k-* images idx3 and labels idx1, .gz or not)."""
    directory = Path(directory)
    files = find_idx_files(directory)
    parts = ("train", "test") if split == "all" else (split,)
    images, labels, names = [], [], []
    for part in parts:
        img_path = files.get((part, "images"))
        if img_path is None:
            prefix = "train" if part == "train" else "t10k"
            have = ", ".join(p.name for p in files.values()) or "no IDX files"
            raise DataError(f"{directory}: no {prefix}-images-idx3-ubyte[.gz] for split '{part}' (found: {have}); "
                            f"an IDX directory holds {_IDX_LAYOUT}")
        x = read_idx(img_path, IDX_IMAGES_MAGIC)[:, None]  # [N, 1, H, W]
        names.append(img_path.name)
        lab_path = files.get((part, "labels"))
        if lab_path is not None:
            y = read_idx(lab_path, IDX_LABELS_MAGIC)
            labels.append(_check_labels(y, x.shape[0], f"{img_path} with {lab_path.name}"))
            names.append(lab_path.name)
        else:
            labels.append(None)
        images.append(x)
    if len({x.shape[1:] for x in images}) > 1:
        raise DataError(f"{directory}: train and test images differ in size "
                        f"({' vs '.join(str(x.shape[2:]) for x in images)}); they do not belong together")
    y = None if any(v is None for v in labels) else np.concatenate(labels)
    x = images[0] if len(images) == 1 else np.concatenate(images)
    return RawData(images=x, labels=y, meta={"format": "idx", "files": names})


# ------------------------------------------------------------------------------------------------
# restricted pickle (CIFAR-10 python batches, the MNIST pickle)
# ------------------------------------------------------------------------------------------------


def _numpy_attr(name: str, modules: tuple[str, ...]) -> Callable:
    for mod in modules:
        try:
            return getattr(importlib.import_module(mod), name)
        except (ImportError, AttributeError):
            continue
    raise ImportError(f"numpy has no {name} in {modules}")  # pragma: no cover


class _NotPlainData(pickle.UnpicklingError):
    """An allowed global was called with arguments that do not build plain data."""


def _latin1_encode(obj, encoding="utf-8", errors="strict"):
    """``_codecs.encode`` as Python 3 protocol-2 pickles use it for bytes (latin-1 only)."""
    if not isinstance(obj, str) or str(encoding).lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise _NotPlainData(f"_codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors)


_RECONSTRUCT = ("numpy._core.multiarray", "numpy.core.multiarray")
_NUMERIC = ("numpy._core.numeric", "numpy.core.numeric")
_SAFE_GLOBALS: dict[tuple[str, str], Callable[[], Any]] = {
    # what numpy needs to rebuild an ndarray (protocols 2-4: _reconstruct + BUILD; 5: _frombuffer)
    **{(m, "_reconstruct"): (lambda: _numpy_attr("_reconstruct", _RECONSTRUCT)) for m in _RECONSTRUCT},
    **{(m, "_frombuffer"): (lambda: _numpy_attr("_frombuffer", _NUMERIC)) for m in _NUMERIC},
    ("numpy", "ndarray"): lambda: np.ndarray,
    ("numpy", "dtype"): lambda: np.dtype,
    # Python 3 writes bytes as _codecs.encode(str, "latin1") under protocol 2
    ("_codecs", "encode"): lambda: _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler that can build only numpy arrays and plain lists/dicts/tuples/str/bytes/numbers.

    Any other global (a function, a class, ``os.system``...) is refused before it is looked up, so
    nothing in the file can run code.
    """

    def __init__(self, file, *, source: str, encoding: str = "ASCII"):
        super().__init__(file, encoding=encoding)
        self.source = source

    def find_class(self, module: str, name: str):
        make = _SAFE_GLOBALS.get((module, name))
        if make is None:
            raise DataError(f"{self.source}: pickle holds {module}.{name}, which is not plain array/list/dict/"
                            "bytes data; refusing to load it (a pickle can run code when loaded). Get the file "
                            "from the original source, or convert the arrays to .npz")
        return make()

    def persistent_load(self, pid):
        raise DataError(f"{self.source}: pickle uses persistent ids, which is not plain data; refusing to load it")


def load_pickle(path: str | Path, *, encoding: str = "bytes", gzipped: bool = False, hint: str = "") -> Any:
    """Unpickle ``path`` through :class:`RestrictedUnpickler`; corrupt or truncated -> DataError."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            f = gzip.GzipFile(fileobj=raw) if gzipped else raw
            with f:
                return RestrictedUnpickler(f, source=str(path), encoding=encoding).load()
    except DataError:
        raise
    except _NotPlainData as e:
        raise DataError(f"{path}: pickle holds {e}, which is not plain array/list/dict/bytes data; refusing to "
                        "load it") from e
    except (pickle.UnpicklingError, EOFError, zlib.error, gzip.BadGzipFile, ValueError, TypeError,
            AttributeError, IndexError, KeyError, struct.error, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot unpickle the file ({type(e).__name__}: {e}); it is truncated or "
                        f"corrupt{': ' + hint if hint else ''}") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e})") from e


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (https://www.cs.toronto.edu/~kriz/cifar.html: pickled dicts, data [N, 3072])
# ------------------------------------------------------------------------------------------------

CIFAR_SUBDIR = "cifar-10-batches-py"
_CIFAR_HINT = "re-extract it from cifar-10-python.tar.gz (https://www.cs.toronto.edu/~kriz/cifar.html)"


def is_cifar_dir(directory: Path) -> bool:
    d = cifar_dir(directory)
    return (d / "test_batch").is_file() or any(d.glob("data_batch_*"))


def cifar_dir(directory: Path) -> Path:
    """``directory`` itself, or its ``cifar-10-batches-py`` subfolder when it is the archive's parent."""
    sub = directory / CIFAR_SUBDIR
    return sub if sub.is_dir() else directory


def _train_batches(directory: Path) -> list[Path]:
    found = [(int(p.name[len("data_batch_"):]), p) for p in directory.glob("data_batch_*")
             if p.name[len("data_batch_"):].isdigit() and p.is_file()]
    return [p for _, p in sorted(found)]


def read_cifar_batch(path: str | Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a dict with b'data' uint8 [N, 3072] (R, G, B planes) and b'labels'."""
    path = Path(path)
    d = load_pickle(path, encoding="bytes", hint=_CIFAR_HINT)
    if not isinstance(d, dict):
        raise DataError(f"{path}: a CIFAR-10 batch is a dict with b'data' and b'labels', found "
                        f"{type(d).__name__}; {_CIFAR_HINT}")
    d = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        raise DataError(f"{path}: a CIFAR-10 batch has keys b'data' and b'labels', found "
                        f"{sorted(map(str, d))}; {_CIFAR_HINT}")
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        desc = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array [N, 3072] (3 x 32 x 32 per row), found {desc}; "
                        f"{_CIFAR_HINT}")
    y = _check_labels(d["labels"], x.shape[0], str(path))
    return x.reshape(-1, 3, 32, 32), y  # rows hold the R, G, B planes in turn


def read_cifar_dir(directory: str | Path, split: str) -> RawData:
    """Read a CIFAR-10 python directory: train = data_batch_1..5 (those present), test = test_batch."""
    root = cifar_dir(Path(directory))
    files = []
    if split in ("train", "all"):
        files += _train_batches(root)
        if not files:
            raise DataError(f"{root}: no data_batch_1 .. data_batch_5 for split 'train'; {_CIFAR_HINT}")
    if split in ("test", "all"):
        if not (root / "test_batch").is_file():
            raise DataError(f"{root}: no test_batch for split 'test'; {_CIFAR_HINT}")
        files.append(root / "test_batch")
    xs, ys = zip(*(read_cifar_batch(p) for p in files))
    return RawData(images=np.concatenate(xs), labels=np.concatenate(ys),
                   meta={"format": "cifar10-python", "files": [p.name for p in files]})


# ------------------------------------------------------------------------------------------------
# image folders (CelebA-HQ, AFHQ train/cat/..., FFHQ: image files found recursively)
# ------------------------------------------------------------------------------------------------

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N"}
_HELD_OUT = ("test", "val")


def list_images(root: Path) -> list[Path]:
    """Image files under ``root``, recursively, sorted by relative path; hidden files/folders skipped."""
    out = []
    for p in root.rglob("*"):
        if p.suffix.lower() in IMAGE_EXTENSIONS and not any(s.startswith(".") for s in p.relative_to(root).parts):
            if p.is_file():
                out.append(p)
    return sorted(out, key=lambda p: p.relative_to(root).as_posix())


def image_split_dirs(root: Path) -> tuple[Path, Path] | None:
    """``(train/, test/ or val/)`` when ``root`` is split into such subfolders, else None."""
    train = root / "train"
    if train.is_dir():
        for name in _HELD_OUT:
            if (root / name).is_dir():
                return train, root / name
    return None


def _open_error(path: Path, e: Exception) -> DataError:
    return DataError(f"{path}: cannot read this image ({type(e).__name__}: {e}); the file is corrupt or "
                     "truncated: re-download it or delete it from the folder")


def _decode(path: Path, colour: bool, resolution: int | None) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` (C = 3 if ``colour`` else 1); alpha is dropped."""
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode.startswith("I"):  # 16/32-bit grayscale: scale 0..65535 to 0..255
                a = np.asarray(im).astype(np.float64)
                im = Image.fromarray(np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8), "L")
            a = np.asarray(im.convert("RGB" if colour else "L"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise _open_error(path, e) from e
    a = a.transpose(2, 0, 1) if colour else a[None]  # [C, H, W]
    return a if resolution is None else resize_images(a[None], resolution)[0]


def read_image_folder(root: str | Path, split: str, *, resolution: int | None = None,
                      subset: int | None = None, seed: int = 0) -> RawData:
    """Read a folder of png/jpg/jpeg/bmp/webp images, recursively, in sorted path order.

    Split: with ``train/`` and ``test/`` (or ``val/``) subfolders, "train"/"test" read those and "all"
    reads both; otherwise "train" and "all" read everything and "test" is an error. Grayscale folders
    give C = 1, colour or mixed folders C = 3 (gray repeated, alpha dropped, palettes expanded).
    Without ``resolution`` all images must have the same size; with it every image is center-cropped
    to a square on its shorter side and resized to ``resolution x resolution`` (see ``fit_square``).
    Labels are the class subfolder (first folder below the split root, ImageFolder convention), when
    every image sits in one. ``subset`` picks images as ``ImageDataset.subset`` would, before decoding.
    """
    root = Path(root)
    dirs = image_split_dirs(root)
    if dirs is None:
        if split == "test":
            raise DataError(f"{root}: split 'test' needs train/ and test/ (or val/) subfolders, and this folder "
                            "has none; use split='train' or 'all' (both read every image), or move held-out "
                            "images into test/ and training images into train/")
        parts = [root]
    else:
        parts = {"train": [dirs[0]], "test": [dirs[1]], "all": list(dirs)}[split]
    files: list[Path] = []
    classes: list[str | None] = []
    for part in parts:
        found = list_images(part)
        files += found
        classes += [p.relative_to(part).parts[0] if len(p.relative_to(part).parts) > 1 else None for p in found]
    if not files:
        where = " and ".join(str(p) for p in parts)
        raise DataError(f"{where}: no {'/'.join(IMAGE_EXTENSIONS)} images found; {ACCEPTED_PATHS}")

    # pass 1: headers only (fast) -> channel count and size, so a bad folder fails before decoding
    sizes, colour = {}, False
    for p in files:
        try:
            with Image.open(p) as im:
                sizes.setdefault(im.size, p)
                colour = colour or im.mode not in _GRAY_MODES
        except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
            raise _open_error(p, e) from e
    if resolution is None and len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(f"{root}: images have {len(sizes)} different sizes (e.g. {p1.name} is {s1[0]}x{s1[1]}, "
                        f"{p2.name} is {s2[0]}x{s2[1]}); pass resolution=R to center-crop them to squares and "
                        "resize them all to R x R")

    idx = np.arange(len(files)) if subset is None else subset_indices(len(files), subset, seed, str(root))
    first = _decode(files[idx[0]], colour, resolution)
    out = np.empty((len(idx), *first.shape), dtype=np.uint8)  # [N, C, H, W]
    out[0] = first
    for k, i in enumerate(idx[1:], start=1):
        out[k] = _decode(files[i], colour, resolution)

    labels, names = None, None
    if all(c is not None for c in classes):
        names = sorted(set(classes))  # type: ignore[arg-type]
        lookup = {c: j for j, c in enumerate(names)}
        labels = np.array([lookup[classes[i]] for i in idx], dtype=np.int64)
    meta = {"format": "image-folder", "folders": [p.relative_to(root).as_posix() or "." for p in parts],
            "num_files": len(files), "classes": names, "mode": "RGB" if colour else "L",
            "resize": None if resolution is None else RESIZE_METHOD}
    return RawData(images=out, labels=labels, meta=meta, resized=resolution is not None,
                   subset_done=subset is not None)


# ------------------------------------------------------------------------------------------------
# .npy / .npz arrays (numpy's own format, read with allow_pickle=False)
# ------------------------------------------------------------------------------------------------

_NPZ_IMAGE_KEYS = ("images", "x")
_NPZ_LABEL_KEYS = ("labels", "y")


def _np_error(path: Path, e: Exception) -> DataError:
    if "allow_pickle" in str(e) or "Object arrays" in str(e):
        return DataError(f"{path}: holds an object array (Python objects stored with pickle); refusing to load "
                         "it. Save plain numeric arrays instead, e.g. np.save(path, images.astype(np.uint8))")
    return DataError(f"{path}: cannot read this numpy file ({type(e).__name__}: {e}); it is truncated or not a "
                     ".npy/.npz file: write it again with np.save / np.savez")


def image_array(x: np.ndarray, source: str) -> np.ndarray:
    """Bring a user's array to ``[N, C, H, W]`` uint8 0..255 or float32 on [-1, 1].

    Accepts [N, H, W], [N, C, H, W] (C = 1 or 3) and [N, H, W, C] (C = 1 or 3, dim 1 not 1 or 3);
    integers must lie in 0..255, floats in [0, 1] (mapped by ``2 x - 1``).
    """
    if x.ndim == 3:
        x = x[:, None]
    elif x.ndim == 4 and x.shape[1] in (1, 3):
        pass
    elif x.ndim == 4 and x.shape[3] in (1, 3):
        x = x.transpose(0, 3, 1, 2)
    else:
        raise DataError(f"{source}: images of shape {tuple(x.shape)}; expected [N, H, W], [N, C, H, W] or "
                        "[N, H, W, C] with C = 1 (gray) or 3 (RGB)")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind in "iu":
        lo, hi = (int(x.min()), int(x.max())) if x.size else (0, 0)
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images must lie in 0..255, found {lo}..{hi}; rescale them to "
                            "0..255 (uint8) or to floats in [0, 1]")
        return np.ascontiguousarray(x, dtype=np.uint8)
    if x.dtype.kind == "f":
        finite = np.isfinite(x)
        if not finite.all():
            raise DataError(f"{source}: {int((~finite).sum())} NaN or Inf values in the images; clean the "
                            "data (for example np.nan_to_num) and save it again")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{source}: float images must lie in the range [0, 1], found [{lo:.4g}, {hi:.4g}]; "
                            "if they are on [-1, 1] save (x + 1) / 2, if they are 0..255 save them as uint8")
        y = np.clip(x, 0, 1).astype(np.float32 if x.dtype.itemsize <= 4 else np.float64) * 2 - 1
        return np.ascontiguousarray(y, dtype=np.float32)
    raise DataError(f"{source}: images of dtype {x.dtype}; expected uint8 0..255 or floats in [0, 1]")


def read_array_file(path: str | Path) -> RawData:
    """Read images (and labels) from a ``.npy`` or ``.npz`` file, with ``allow_pickle=False``.

    An ``.npz`` holds images under 'images' or 'x' (or as its only array) and optional labels under
    'labels' or 'y'.
    """
    path = Path(path)
    labels, key = None, None
    try:
        if path.suffix.lower() == ".npy":
            x = np.load(path, allow_pickle=False)
        else:
            with np.load(path, allow_pickle=False) as z:
                keys = list(z.files)
                key = next((k for k in _NPZ_IMAGE_KEYS if k in keys), None)
                rest = [k for k in keys if k not in _NPZ_LABEL_KEYS]
                if key is None and len(rest) == 1:
                    key = rest[0]
                if key is None:
                    raise DataError(f"{path}: cannot tell which array holds the images (keys: {keys}); store "
                                    "them under 'images' (and labels under 'labels')")
                x = z[key]
                lkey = next((k for k in _NPZ_LABEL_KEYS if k in keys), None)
                labels = None if lkey is None else z[lkey]
    except DataError:
        raise
    except (ValueError, OSError, EOFError, zipfile.BadZipFile, KeyError) as e:
        raise _np_error(path, e) from e
    if not isinstance(x, np.ndarray):  # pragma: no cover (np.load of .npy returns arrays)
        raise DataError(f"{path}: expected an array, found {type(x).__name__}")
    images = image_array(x, str(path))
    if labels is not None:
        labels = _check_labels(labels, images.shape[0], str(path))
    return RawData(images=images, labels=labels,
                   meta={"format": path.suffix.lower().lstrip("."), "files": [path.name],
                         **({"key": key} if key else {})})


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------


def read_path(path: str | Path, split: str, *, resolution: int | None = None, subset: int | None = None,
              seed: int = 0) -> RawData:
    """Detect the format of an existing ``path`` and read it (see ``ACCEPTED_PATHS``)."""
    path = Path(path)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            return read_array_file(path)
        name = path.name.lower()
        if _IDX_NAME.search(name) or name in ("test_batch",) or name.startswith("data_batch_"):
            raise DataError(f"{path}: pass the directory that holds this file ({path.parent}), not the file")
        if name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
            raise DataError(f"{path}: is an archive; extract it and pass the extracted directory")
        raise DataError(f"{path}: unsupported file type '{suffix}'. {ACCEPTED_PATHS}")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory. {ACCEPTED_PATHS}")
    if is_cifar_dir(path):
        return read_cifar_dir(path, split)
    if find_idx_files(path):
        return read_idx_dir(path, split)
    return read_image_folder(path, split, resolution=resolution, subset=subset, seed=seed)
