"""Readers for images in standard on-disk formats: MNIST-style IDX, CIFAR-10 python batches, Downsampled
ImageNet batches, image folders and ``.npy``/``.npz`` arrays.

Every reader returns a :class:`RawData` (images ``[N, C, H, W]`` as uint8 0..255, or float32 already
on the [-1, 1] data scale, optional int64 labels, and a ``meta`` record of what was read) and raises
:class:`~localdiff.errors.DataError` naming the offending file, the problem and the fix. Sizes a file
declares are checked against its size and the memory cap (:mod:`.limits`) before anything is
allocated or decompressed. Nothing here downloads.
"""

from __future__ import annotations

import math
import os
import re
import struct
from pathlib import Path

import numpy as np

from ..errors import DataError
from .arrays import image_array, read_npy, read_npz
from .images import IMAGE_EXTENSIONS, IMAGE_FORMATS, read_image_folder
from .limits import ReadLimits, expect_end, format_bytes, open_maybe_gzip, read_into
from .raw import (ACCEPTED_PATHS as _READER_PATHS, MAX_LABEL, RESIZE_METHOD, SPLIT_RULE, SPLITS, RawData, check_images, check_labels,
                  fit_square, resize_images, split_indices, split_record, subset_indices)
from .safe_pickle import load_pickle

ACCEPTED_PATHS = _READER_PATHS + (
    "\n  - a directory of Downsampled ImageNet batches: train_data_batch_1 .. 10 and val_data (pickled dicts, "
    "from Imagenet64_train_part1/2.zip and Imagenet64_val.zip; the 32 and 16 px sets alike); labels 0-based\n"
    "  - a store written by `localdiff pack SOURCE OUT` (read block by block, never held whole)")

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


def read_idx(path: str | Path, magic: int, limits: ReadLimits | None = None) -> np.ndarray:
    """Read one IDX file (gzipped or not) whose magic number must be ``magic``; returns uint8 ``dims``.

    The header is read first (a gzipped file is decompressed as a stream): its dims must match the
    file's size (plain file) or pass the expansion rule (gzip) and the memory cap before the data are
    allocated, and the data are read into that allocation, never more.
    """
    path = Path(path)
    limits = limits or ReadLimits.resolve()
    kind = {IDX_IMAGES_MAGIC: "images (uint8, [N, H, W])", IDX_LABELS_MAGIC: "labels (uint8, [N])"}[magic]
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    with open_maybe_gzip(path) as (f, stored):
        head = f.read(header)
        if len(head) < 4:
            raise DataError(f"{path}: {len(head)} bytes, too short for an IDX header; the file is truncated: "
                            "re-download or re-extract it")
        (found,) = struct.unpack(">I", head[:4])
        if found != magic:
            raise DataError(f"{path}: IDX magic number 0x{found:08X}, expected 0x{magic:08X} for {kind}; this is "
                            "not an MNIST-style IDX file of that kind (or it is corrupt): re-download it")
        if len(head) < header:
            raise DataError(f"{path}: {len(head)} bytes, too short for the {header}-byte IDX header; the file is "
                            "truncated: re-download or re-extract it")
        dims = struct.unpack(f">{ndim}I", head[4:header])
        expected = math.prod(dims)  # Python integers: no int64 wrap-around
        if min(dims) == 0:
            raise DataError(f"{path}: the IDX header gives dims {list(dims)}: no {'images' if ndim == 3 else 'labels'}"
                            f"{' of at least 1 x 1 pixels' if ndim == 3 and dims[0] else ''}; the file is corrupt or "
                            "empty: re-download or re-extract it")
        what = f"the IDX {kind.split()[0]} of dims {list(dims)}"
        if stored is None:
            actual = os.fstat(f.fileno()).st_size - header
            if actual != expected:
                raise DataError(f"{path}: the IDX header gives dims {list(dims)}, i.e. {expected} data bytes, but the "
                                f"file holds {actual}; it is truncated or corrupt: re-download or re-extract it")
            limits.check_cap(expected, path, what)
        else:
            limits.check_expansion(expected + header, stored, path, what,
                                   "if the file is genuine, gunzip it and pass the uncompressed file")
        out = read_into(f, np.empty(expected, np.uint8), path, "the IDX data")
        expect_end(f, path, "the IDX header")
    return out.reshape(dims)


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


def read_idx_dir(directory: str | Path, split: str, limits: ReadLimits | None = None) -> RawData:
    """Read an MNIST-style IDX directory (train-* / t10k-* images idx3 and labels idx1, .gz or not)."""
    directory = Path(directory)
    limits = limits or ReadLimits.resolve()
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
        x = read_idx(img_path, IDX_IMAGES_MAGIC, limits)[:, None]  # [N, 1, H, W]
        names.append(img_path.name)
        lab_path = files.get((part, "labels"))
        if lab_path is not None:
            y = read_idx(lab_path, IDX_LABELS_MAGIC, limits)
            labels.append(check_labels(y, x.shape[0], f"{img_path} with {lab_path.name}"))
            names.append(lab_path.name)
        else:
            labels.append(None)
        images.append(x)
    if len({x.shape[1:] for x in images}) > 1:
        raise DataError(f"{directory}: train and test images differ in size "
                        f"({' vs '.join(str(x.shape[2:]) for x in images)}); they do not belong together")
    y = None if any(v is None for v in labels) else np.concatenate(labels)
    if len(images) > 1:
        limits.check_cap(2 * sum(x.nbytes for x in images), directory, "the train and test images, joined,")
    x = images[0] if len(images) == 1 else np.concatenate(images)
    return RawData(images=x, labels=y, meta={"format": "idx", "files": names})


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


def _pickled_batch(path: Path, limits: ReadLimits | None, what: str, keys: str, hint: str) -> dict:
    """A pickled batch (CIFAR-10, Downsampled ImageNet): a dict with 'data' and 'labels' (bytes keys decoded)."""
    d = load_pickle(path, encoding="bytes", hint=hint, limits=limits)
    if not isinstance(d, dict):
        raise DataError(f"{path}: {what} is a dict with {keys}, found {type(d).__name__}; {hint}")
    d = {k.decode("latin-1") if isinstance(k, bytes) else k: v for k, v in d.items()}
    if "data" not in d or "labels" not in d:
        found = sorted(repr(k)[:40] for k in d)
        raise DataError(f"{path}: {what} has keys {keys}, found "
                        f"[{', '.join(found[:20])}{', ...' if len(found) > 20 else ''}]; {hint}")
    return d


def read_cifar_batch(path: str | Path, limits: ReadLimits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch: a dict with b'data' uint8 [N, 3072] (R, G, B planes) and b'labels'."""
    path = Path(path)
    d = _pickled_batch(path, limits, "a CIFAR-10 batch", "b'data' and b'labels'", _CIFAR_HINT)
    x = d["data"]
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
        desc = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: b'data' must be a uint8 array [N, 3072] (3 x 32 x 32 per row), found {desc}; "
                        f"{_CIFAR_HINT}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: b'data' holds no images; {_CIFAR_HINT}")
    y = check_labels(d["labels"], x.shape[0], str(path))
    return x.reshape(-1, 3, 32, 32), y  # rows hold the R, G, B planes in turn


def read_cifar_dir(directory: str | Path, split: str, limits: ReadLimits | None = None) -> RawData:
    """Read a CIFAR-10 python directory: train = data_batch_1..5 (those present), test = test_batch."""
    root = cifar_dir(Path(directory))
    limits = limits or ReadLimits.resolve()
    files = []
    if split in ("train", "all"):
        files += _train_batches(root)
        if not files:
            raise DataError(f"{root}: no data_batch_1 .. data_batch_5 for split 'train'; {_CIFAR_HINT}")
    if split in ("test", "all"):
        if not (root / "test_batch").is_file():
            raise DataError(f"{root}: no test_batch for split 'test'; {_CIFAR_HINT}")
        files.append(root / "test_batch")
    xs, ys, total = [], [], 0
    for p in files:
        x, y = read_cifar_batch(p, limits)
        total += x.nbytes
        limits.check_cap(2 * total, root, f"the batches up to {p.name}, joined,")
        xs.append(x)
        ys.append(y)
    return RawData(images=np.concatenate(xs), labels=np.concatenate(ys),
                   meta={"format": "cifar10-python", "files": [p.name for p in files]})


# ------------------------------------------------------------------------------------------------
# Downsampled ImageNet batches (Chrabaszcz et al. 2017, https://image-net.org/download-images.php:
# Imagenet64_train_part1/2.zip hold train_data_batch_1 .. 10, Imagenet64_val.zip val_data; pickled dicts
# with 'data' uint8 [N, 3 S S] (R, G, B planes) and 'labels' 1..1000; the 32 and 16 px sets alike)
# ------------------------------------------------------------------------------------------------

_IMAGENET_TRAIN = re.compile(r"train_data_batch_(\d+)$")
IMAGENET_VAL = "val_data"
_IMAGENET_HINT = ("re-extract it from the Downsampled ImageNet archives (Imagenet64_train_part1.zip, "
                  "Imagenet64_train_part2.zip, Imagenet64_val.zip from https://image-net.org/download-images.php)")


def imagenet_batches(directory: Path) -> dict[str, list[Path]]:
    """``{"train": [train_data_batch_1, ...] (numeric order), "test": [val_data]}`` for the files present."""
    found = [(int(m[1]), p) for p in directory.iterdir() if (m := _IMAGENET_TRAIN.fullmatch(p.name)) and p.is_file()]
    val = directory / IMAGENET_VAL
    return {"train": [p for _, p in sorted(found)], "test": [val] if val.is_file() else []}


def is_imagenet_dir(directory: Path) -> bool:
    return any(imagenet_batches(directory).values())


def imagenet_files(directory: Path, split: str) -> list[Path]:
    """The batch files of ``split`` ("all": train then val), or a DataError naming what is missing."""
    batches = imagenet_batches(directory)
    files = []
    for part in ("train", "test") if split == "all" else (split,):
        if not batches[part]:
            want = "train_data_batch_1 .. train_data_batch_10" if part == "train" else IMAGENET_VAL
            raise DataError(f"{directory}: no {want} for split '{part}' in this ImageNet batch directory; "
                            f"{_IMAGENET_HINT}")
        files += batches[part]
    return files


def read_imagenet_batch(path: str | Path, limits: ReadLimits | None = None) -> tuple[np.ndarray, np.ndarray]:
    """One batch: images uint8 ``[N, 3, S, S]`` and labels int64 ``[N]``, 0-based (the file's 1..1000 minus 1)."""
    path = Path(path)
    d = _pickled_batch(path, limits, "an ImageNet batch", "'data' and 'labels'", _IMAGENET_HINT)
    x = d["data"]
    side = math.isqrt(x.shape[1] // 3) if isinstance(x, np.ndarray) and x.ndim == 2 else 0
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8 or side < 1 or x.shape[1] != 3 * side * side:
        desc = f"{x.dtype} array of shape {x.shape}" if isinstance(x, np.ndarray) else type(x).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array [N, 3 S S] (R, G, B planes of S x S pixels), found "
                        f"{desc}; {_IMAGENET_HINT}")
    if x.shape[0] == 0:
        raise DataError(f"{path}: 'data' holds no images; {_IMAGENET_HINT}")
    y = check_labels(d["labels"], x.shape[0], str(path))
    if y.min() < 1:
        raise DataError(f"{path}: ImageNet batch labels are class numbers 1..1000, found {int(y.min())}; the file is "
                        f"corrupt or not a Downsampled ImageNet batch: {_IMAGENET_HINT}")
    return x.reshape(-1, 3, side, side), y - 1


def read_imagenet_dir(directory: str | Path, split: str, limits: ReadLimits | None = None) -> RawData:
    """Read Downsampled ImageNet batches: train = train_data_batch_*, test = val_data; labels 0-based.
    The whole split is held in memory (15.7 GB for ImageNet-64's train split): pack it into a store
    (``localdiff pack``) to use it without that."""
    root = Path(directory)
    limits = limits or ReadLimits.resolve()
    files = imagenet_files(root, split)
    xs, ys, total = [], [], 0
    for p in files:
        x, y = read_imagenet_batch(p, limits)
        total += x.nbytes
        if 2 * total > limits.max_bytes:
            raise DataError(f"{root}: the batches up to {p.name}, joined, would take {format_bytes(2 * total)} in "
                            f"memory, more than the cap of {format_bytes(limits.max_bytes)}; pack them into a store "
                            "that is read block by block (`localdiff pack DIR OUT`), or raise the cap "
                            "(--max-data-bytes)")
        xs.append(x)
        ys.append(y)
    if len({x.shape[1:] for x in xs}) > 1:
        raise DataError(f"{root}: the batches hold images of different sizes; they do not belong together")
    return RawData(images=np.concatenate(xs), labels=np.concatenate(ys),
                   meta={"format": "imagenet-batches", "files": [p.name for p in files], "labels": "0-based"})


# ------------------------------------------------------------------------------------------------
# .npy / .npz arrays (numpy's own format, read without pickle: see .arrays)
# ------------------------------------------------------------------------------------------------


def read_array_file(path: str | Path, limits: ReadLimits | None = None, split: str = "all") -> RawData:
    """Read images (and labels) from a ``.npy`` or ``.npz`` file, without pickle.

    An ``.npz`` holds images under 'images' or 'x' (or as its only array) and optional labels under
    'labels' or 'y'. ``split`` follows ``SPLIT_RULE`` (every 10th image is "test").
    """
    path = Path(path)
    limits = limits or ReadLimits.resolve()
    labels, key = None, None
    if path.suffix.lower() == ".npy":
        x = read_npy(path, limits)
    else:
        x, labels, key = read_npz(path, limits)
    images = image_array(x, str(path))
    if labels is not None:
        labels = check_labels(labels, images.shape[0], str(path))
    n = images.shape[0]
    keep = split_indices(n, split)
    if keep.size == 0:
        raise DataError(f"{path}: {n} image(s) leave none for split '{split}' ({SPLIT_RULE}); use split='all' or "
                        "add images")
    if keep.size != n:
        images = images[keep]
        labels = None if labels is None else labels[keep]
    return RawData(images=images, labels=labels,
                   meta={"format": path.suffix.lower().lstrip("."), "files": [path.name],
                         **({"key": key} if key else {}), **split_record(n, split)})


# ------------------------------------------------------------------------------------------------
# format detection
# ------------------------------------------------------------------------------------------------


def read_path(path: str | Path, split: str, *, resolution: int | None = None, subset: int | None = None,
              seed: int = 0, limits: ReadLimits | None = None) -> RawData:
    """Detect the format of an existing ``path`` and read it (see ``ACCEPTED_PATHS``)."""
    path = Path(path)
    limits = limits or ReadLimits.resolve()
    data = _read_path(path, split, resolution, subset, seed, limits)
    check_images(data.images, str(path))
    return data


def _read_path(path: Path, split: str, resolution, subset, seed, limits: ReadLimits) -> RawData:
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in (".npy", ".npz"):
            return read_array_file(path, limits, split)
        name = path.name.lower()
        if (_IDX_NAME.search(name) or name in ("test_batch", IMAGENET_VAL) or name.startswith("data_batch_")
                or _IMAGENET_TRAIN.fullmatch(name)):
            raise DataError(f"{path}: pass the directory that holds this file ({path.parent}), not the file")
        if name.endswith((".tar.gz", ".tgz", ".tar", ".zip")):
            raise DataError(f"{path}: is an archive; extract it and pass the extracted directory")
        raise DataError(f"{path}: unsupported file type '{suffix}'. {ACCEPTED_PATHS}")
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory. {ACCEPTED_PATHS}")
    if is_cifar_dir(path):
        return read_cifar_dir(path, split, limits)
    if is_imagenet_dir(path):
        return read_imagenet_dir(path, split, limits)
    if find_idx_files(path):
        return read_idx_dir(path, split, limits)
    return read_image_folder(path, split, resolution=resolution, subset=subset, seed=seed, limits=limits)


__all__ = ["RawData", "ACCEPTED_PATHS", "SPLITS", "RESIZE_METHOD", "MAX_LABEL", "read_path", "read_idx",
           "read_idx_dir", "read_cifar_batch", "read_cifar_dir", "read_imagenet_batch", "read_imagenet_dir",
           "read_image_folder", "read_array_file", "image_array",
           "check_labels", "check_images", "load_pickle", "IMAGE_FORMATS", "IMAGE_EXTENSIONS", "format_bytes",
           "fit_square", "resize_images", "subset_indices"]
