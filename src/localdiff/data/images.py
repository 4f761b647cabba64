"""Image folders (CelebA-HQ, AFHQ, FFHQ layouts): files found recursively, each decoded by the one
format its extension names (PNG, JPEG, BMP, TIFF, WebP), with every header checked against Pillow's
decompression-bomb limit, the expansion rule and the memory cap before anything is decoded."""

from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

from ..errors import DataError
from .limits import ReadLimits
from .raw import (ACCEPTED_PATHS, RESIZE_METHOD, SPLIT_RULE, RawData, resize_images, split_indices, split_record,
                  subset_indices)

# The decoder is chosen by the extension, from this allow-list only, and must accept the content.
IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".bmp": "BMP", ".tif": "TIFF", ".tiff": "TIFF",
                 ".webp": "WEBP"}
IMAGE_EXTENSIONS = tuple(IMAGE_FORMATS)
_GRAY_MODES = {"1", "L", "LA", "La", "I", "I;16", "I;16B", "I;16L", "I;16N", "F"}
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
    return DataError(f"{path}: cannot read this image ({type(e).__name__}: {str(e)[:160]}); the file is corrupt or "
                     "truncated: re-download it or delete it from the folder")


def _work_per_pixel(mode: str, bands: int) -> int:
    """Bytes per pixel of decoding and converting one image: Pillow's decoded image, the 8-bit RGB or
    gray copy, and the float32 planes of a resize."""
    return bands * (2 if ";16" in mode else 4 if mode in ("I", "F") else 1) + 3 + 8


@contextmanager
def open_image(path: Path, limits: ReadLimits) -> Iterator[Image.Image]:
    """Open ``path`` with the one decoder its extension names (PNG, JPEG, BMP, TIFF, WebP); its header
    must pass Pillow's decompression-bomb limit (as an error), the expansion rule and the memory cap."""
    fmt = IMAGE_FORMATS[path.suffix.lower()]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(path, formats=[fmt])
    except Image.UnidentifiedImageError:
        raise DataError(f"{path}: cannot read this image: its content is not {fmt} (the decoder is chosen by the "
                        f"file's extension and must agree with the content); the file is corrupt, or rename it with "
                        f"its real extension ({', '.join(IMAGE_EXTENSIONS)}), or delete it from the folder") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise DataError(f"{path}: {e} The image is larger than Pillow's decompression-bomb limit "
                        f"(PIL.Image.MAX_IMAGE_PIXELS = {Image.MAX_IMAGE_PIXELS}); shrink it first, or raise that "
                        "limit if you trust the file") from None
    except Exception as e:  # noqa: BLE001 - Pillow raises many types (OSError, SyntaxError, struct.error...)
        raise _open_error(path, e) from None
    with im:
        w, h = im.size
        if w < 1 or h < 1:
            raise DataError(f"{path}: the image is {w} x {h} pixels; the file is corrupt: re-download it or delete "
                            "it from the folder")
        work = w * h * _work_per_pixel(im.mode, len(im.getbands()))
        limits.check_expansion(work, path.stat().st_size, path, f"the {w} x {h} {im.mode} image",
                               "shrink or re-encode it, or delete it from the folder")
        yield im


def _to_8bit(im: Image.Image) -> Image.Image:
    """16/32-bit grayscale -> "L": 0..65535 scaled to 0..255 by round(v / 257), in integer arithmetic
    and row blocks (no float64 copies of a large image)."""
    a = np.asarray(im)
    out = np.empty(a.shape, np.uint8)
    for r in range(0, a.shape[0], 256):
        out[r:r + 256] = np.clip((a[r:r + 256].astype(np.int64) + 128) // 257, 0, 255)  # = rint(v / 257)
    return Image.fromarray(out, "L")


def _decode(path: Path, colour: bool, resolution: int | None, limits: ReadLimits) -> np.ndarray:
    """One image as uint8 ``[C, H, W]`` (C = 3 if ``colour`` else 1); alpha is dropped."""
    with open_image(path, limits) as im:
        try:
            im.load()
            if im.mode.startswith("I"):
                im = _to_8bit(im)
            a = np.asarray(im.convert("RGB" if colour else "L"))
        except Exception as e:  # noqa: BLE001 - Pillow's decoders raise many types on corrupt data
            raise _open_error(path, e) from None
    a = a.transpose(2, 0, 1) if colour else a[None]  # [C, H, W]
    return a if resolution is None else resize_images(a[None], resolution)[0]


def read_image_folder(root: str | Path, split: str, *, resolution: int | None = None,
                      subset: int | None = None, seed: int = 0, limits: ReadLimits | None = None) -> RawData:
    """Read a folder of png/jpg/jpeg/bmp/tif/tiff/webp images, recursively, in sorted path order.

    Split: with ``train/`` and ``test/`` (or ``val/``) subfolders, "train"/"test" read those and "all"
    reads both; otherwise the folder is split deterministically (``raw.SPLIT_RULE``: every 10th image in
    sorted path order is "test", the rest "train"). Grayscale folders
    give C = 1, colour or mixed folders C = 3 (gray repeated, alpha dropped, palettes expanded).
    Without ``resolution`` all images must have the same size; with it every image is center-cropped
    to a square on its shorter side and resized to ``resolution x resolution`` (see ``fit_square``).
    Labels are the class subfolder (first folder below the split root, ImageFolder convention), when
    every image sits in one. ``subset`` picks images as ``ImageDataset.subset`` would, before decoding.
    Each file is decoded by the format its extension names; headers are checked before any decoding.
    """
    root = Path(root)
    limits = limits or ReadLimits.resolve()
    dirs = image_split_dirs(root)
    if dirs is None:
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
    split_meta = {}
    if dirs is None:  # one set of images: the deterministic split of raw.SPLIT_RULE
        keep = split_indices(len(files), split)
        if keep.size == 0:
            raise DataError(f"{root}: {len(files)} image(s) leave none for split '{split}' ({SPLIT_RULE}); add images "
                            "or give the folder train/ and test/ subfolders")
        split_meta = split_record(len(files), split)
        files, classes = [files[i] for i in keep], [classes[i] for i in keep]

    # pass 1: headers only (fast) -> channel count and size, so a bad folder fails before decoding
    sizes, colour = {}, False
    for p in files:
        with open_image(p, limits) as im:
            sizes.setdefault(im.size, p)
            colour = colour or im.mode not in _GRAY_MODES
    if resolution is None and len(sizes) > 1:
        (s1, p1), (s2, p2) = list(sizes.items())[:2]
        raise DataError(f"{root}: images have {len(sizes)} different sizes (e.g. {p1.name} is {s1[0]}x{s1[1]}, "
                        f"{p2.name} is {s2[0]}x{s2[1]}); give a resolution R (--resolution R on the command "
                        "line, resolution=R in Python) to center-crop them to squares and resize them all to R x R")

    idx = np.arange(len(files)) if subset is None else subset_indices(len(files), subset, seed, str(root))
    w, h = (resolution, resolution) if resolution is not None else next(iter(sizes))
    limits.check_cap(len(idx) * (3 if colour else 1) * w * h, root, f"{len(idx)} images of {w} x {h} pixels")
    first = _decode(files[idx[0]], colour, resolution, limits)
    out = np.empty((len(idx), *first.shape), dtype=np.uint8)  # [N, C, H, W]
    out[0] = first
    for k, i in enumerate(idx[1:], start=1):
        out[k] = _decode(files[i], colour, resolution, limits)

    labels, names = None, None
    if all(c is not None for c in classes):
        names = sorted(set(classes))  # type: ignore[arg-type]
        lookup = {c: j for j, c in enumerate(names)}
        labels = np.array([lookup[classes[i]] for i in idx], dtype=np.int64)
    meta = {"format": "image-folder", "folders": [p.relative_to(root).as_posix() or "." for p in parts],
            "num_files": len(files), "classes": names, "mode": "RGB" if colour else "L",
            "resize": None if resolution is None else RESIZE_METHOD, **split_meta}
    return RawData(images=out, labels=labels, meta=meta, resized=resolution is not None,
                   subset_done=subset is not None)
