"""What every reader returns (:class:`RawData`) and the checks and helpers they share: labels, image
shapes, seeded subsets and the square resize."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
    "  - an image folder of .png/.jpg/.jpeg/.bmp/.tif/.tiff/.webp files, searched recursively, optionally split "
    "into train/ and test/ (or val/) subfolders (CelebA-HQ, AFHQ, FFHQ layouts); without them every 10th "
    "image is held out as 'test'\n"
    "  - a .npy or .npz file holding images [N, H, W], [N, C, H, W] or [N, H, W, C] (C = 1 or 3), "
    "uint8 0..255 or float 0..1; an .npz may add labels under 'labels' or 'y'; every 10th image is 'test'"
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

HELD_OUT_EVERY = 10  # a source without its own split holds out every 10th image (in file / array order)
SPLIT_RULE = (f"a source without its own train/test split: 'test' is every {HELD_OUT_EVERY}th image (the "
              f"{HELD_OUT_EVERY}th, {2 * HELD_OUT_EVERY}th, ... in sorted path or array order), 'train' the rest, "
              "'all' every image")


def split_indices(n: int, split: str) -> np.ndarray:
    """Indices of ``split`` in a source of ``n`` images that has no split of its own (see ``SPLIT_RULE``):
    deterministic, disjoint train and test, so held-out images are never training images."""
    idx = np.arange(n)
    if split == "all":
        return idx
    held = idx % HELD_OUT_EVERY == HELD_OUT_EVERY - 1  # a source of fewer than 10 images keeps all for training
    return idx[held] if split == "test" else idx[~held]


def split_record(n: int, split: str) -> dict:
    """What :func:`split_indices` did, for ``meta`` (it enters the fingerprint)."""
    held = np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return {"split_rule": SPLIT_RULE, "held_out_share": float(held.mean()), "images_in_source": int(n)}


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


MAX_LABEL = 2**31 - 1


def check_labels(labels: Any, n: int, source: str) -> np.ndarray:
    """Labels as int64 ``[n]`` class indices in 0..2^31-1, or a DataError naming ``source``.

    Accepted: a flat list/tuple of Python ints, or a 1-D integer array (or floats that are whole).
    """
    if type(labels) in (list, tuple):
        bad = next((i for i, v in enumerate(labels) if type(v) is not int), None)
        if bad is not None:
            raise DataError(f"{source}: labels must be a flat list of integers, but label {bad} is a "
                            f"{type(labels[bad]).__name__}; the file is corrupt or not of this format")
        y = labels
        size = len(labels)
    elif isinstance(labels, np.ndarray):
        y, size = labels, (labels.shape[0] if labels.ndim == 1 else -1)
        if y.dtype.kind not in "iuf":
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype}")
    else:
        raise DataError(f"{source}: labels must be a list or a 1-D array of integers, found "
                        f"{type(labels).__name__}")
    if size != n:
        shape = (len(labels),) if type(labels) in (list, tuple) else tuple(labels.shape)
        raise DataError(f"{source}: {n} images but labels of shape {shape}; the files do not belong "
                        "together or one of them is truncated: re-download or re-extract them")
    if n == 0:
        return np.zeros(0, np.int64)
    if isinstance(y, np.ndarray) and y.dtype.kind == "f":
        if not (np.isfinite(y).all() and (y == np.round(y)).all()):
            raise DataError(f"{source}: labels must be integers, got dtype {y.dtype} with fractional or "
                            "non-finite values")
    lo, hi = (y.min(), y.max()) if isinstance(y, np.ndarray) else (min(y), max(y))
    if lo < 0 or hi > MAX_LABEL:
        v = int(lo if lo < 0 else hi)
        shown = str(v) if v.bit_length() < 64 else f"a {v.bit_length()}-bit integer"
        raise DataError(f"{source}: labels must be class indices 0..{MAX_LABEL}, found {shown}; the file is "
                        "corrupt, or its labels need mapping to 0, 1, 2, ... first")
    return np.asarray(y).astype(np.int64)


def check_images(x: np.ndarray, source: str) -> np.ndarray:
    """``x`` [N, C, H, W] must hold at least one image of at least 1 x 1 pixels."""
    if x.ndim != 4 or min(x.shape, default=0) < 1:
        raise DataError(f"{source}: images of shape {tuple(x.shape)} hold no pixels; a dataset needs at least one "
                        "image of at least 1 x 1 pixels: the file is empty, truncated or corrupt")
    return x
