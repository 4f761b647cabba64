""".npy / .npz image arrays, read without pickle and without trusting their headers.

numpy's own ``np.load`` allocates what a header declares before reading (a 144-byte file can ask for
931 GiB), parses corrupt headers into untyped errors and leaks the file handle of a corrupt .npz.
Here the header is parsed first, its dtype must be a plain number type, its declared size must equal
the bytes the file (or zip member) holds and fit the memory cap, and only then is the array allocated
and filled by bounded reads. Files are closed on every path; every failure is a DataError.
"""

from __future__ import annotations

import io
import os
import struct
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import DataError
from .limits import ReadLimits, expect_end, nbytes_of, read_exactly, read_into

NPY_MAGIC = b"\x93NUMPY"
MAX_HEADER = 10000  # numpy's own default max_header_size
NPZ_IMAGE_KEYS = ("images", "x")
NPZ_LABEL_KEYS = ("labels", "y")
_CHUNK_BYTES = 16 << 20
_REWRITE = "write it again with np.save / np.savez"
_ZIP_ERRORS = (zipfile.BadZipFile, zipfile.LargeZipFile, OSError, EOFError, ValueError, struct.error, zlib.error,
               NotImplementedError, RuntimeError, KeyError, IndexError, OverflowError)


def _dtype_error(path, dtype: np.dtype) -> DataError:
    if dtype.hasobject:
        return DataError(f"{path}: holds an object array (Python objects stored with pickle); refusing to load it. "
                         "Save plain numeric arrays instead, e.g. np.save(path, images.astype(np.uint8))")
    return DataError(f"{path}: holds an array of dtype {dtype}; expected uint8 0..255 or floats in [0, 1] "
                     "(integers 0..255 and integer labels are accepted too)")


def read_npy_header(f: BinaryIO, path, available: int) -> tuple[tuple[int, ...], bool, np.dtype, int]:
    """Parse a .npy header from ``f`` -> (shape, fortran_order, dtype, header bytes); at most
    ``available`` bytes may be read. Plain numeric dtypes only."""
    pre = read_exactly(f, min(8, available), path, "the .npy magic string")
    if len(pre) < 8 or pre[:6] != NPY_MAGIC:
        raise DataError(f"{path}: not a .npy array (no \\x93NUMPY magic string); it is corrupt or another kind of "
                        f"file: {_REWRITE}")
    major = pre[6]
    if major not in (1, 2, 3):
        raise DataError(f"{path}: .npy format version {major}.{pre[7]} is not supported (1.0-3.0); {_REWRITE}")
    fmt = "<H" if major == 1 else "<I"
    size_field = read_exactly(f, struct.calcsize(fmt), path, "the .npy header length")
    hlen = struct.unpack(fmt, size_field)[0]
    start = 8 + len(size_field)
    if hlen > MAX_HEADER or start + hlen > available:
        raise DataError(f"{path}: the .npy header claims {hlen} bytes (at most {min(MAX_HEADER, available - start)} "
                        f"possible here); the file is corrupt: {_REWRITE}")
    header = read_exactly(f, hlen, path, "the .npy header")
    reader = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    try:
        # numpy parses the header text with ast.literal_eval and validates the dtype; on a corrupt header it
        # raises ValueError, SyntaxError, tokenize.TokenError, TypeError... whichever its parser hits first
        shape, fortran, dtype = reader(io.BytesIO(size_field + header), max_header_size=MAX_HEADER)
    except Exception as e:  # noqa: BLE001 - a parser of untrusted text: every failure means "corrupt header"
        raise DataError(f"{path}: the .npy header is corrupt ({type(e).__name__}: {str(e)[:120]}); "
                        f"{_REWRITE}") from None
    if not all(type(s) is int and 0 <= s < 2**63 for s in shape):
        raise DataError(f"{path}: the .npy header gives shape {shape!r:.80}; the file is corrupt: {_REWRITE}")
    if dtype.kind not in "biuf" or dtype.names is not None or dtype.subdtype is not None:
        raise _dtype_error(path, dtype)
    return tuple(shape), bool(fortran), dtype, start + hlen


def _read_npy(f: BinaryIO, path, available: int, limits: ReadLimits, what: str) -> np.ndarray:
    """One .npy stream of exactly ``available`` bytes -> its array (checked before it is allocated)."""
    shape, fortran, dtype, header = read_npy_header(f, path, available)
    need = nbytes_of(shape, dtype.itemsize)
    if need != available - header:
        raise DataError(f"{path}: {what} declares shape {shape!r:.80} of {dtype}, i.e. {need} data bytes, but holds "
                        f"{available - header}; the file is truncated or corrupt: {_REWRITE}")
    limits.check_cap(need, path, what)
    out = read_into(f, np.empty(need // dtype.itemsize, dtype), path, what)
    expect_end(f, path, f"the header of {what}")
    return out.reshape(shape, order="F" if fortran else "C")


def read_npy(path: Path, limits: ReadLimits) -> np.ndarray:
    try:
        with open(path, "rb") as f:
            return _read_npy(f, path, os.fstat(f.fileno()).st_size, limits, "the array")
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e})") from e


def read_npz(path: Path, limits: ReadLimits) -> tuple[np.ndarray, np.ndarray | None, str]:
    """(images, labels or None, images key) from an .npz; see ``read_array_file``."""
    try:
        with open(path, "rb") as fh, zipfile.ZipFile(fh) as z:
            members = {i.filename[:-4]: i for i in z.infolist() if i.filename.endswith(".npy")}
            keys = list(members)
            key = next((k for k in NPZ_IMAGE_KEYS if k in members), None)
            rest = [k for k in keys if k not in NPZ_LABEL_KEYS]
            if key is None and len(rest) == 1:
                key = rest[0]
            if key is None:
                raise DataError(f"{path}: cannot tell which array holds the images (keys: {keys[:20]!r:.300}); store "
                                "them under 'images' (and labels under 'labels')")
            x = _read_member(z, members[key], path, limits)
            lkey = next((k for k in NPZ_LABEL_KEYS if k in members), None)
            labels = None if lkey is None else _read_member(z, members[lkey], path, limits)
            return x, labels, key
    except DataError:
        raise
    except _ZIP_ERRORS as e:
        raise DataError(f"{path}: cannot read this .npz ({type(e).__name__}: {str(e)[:120]}); it is truncated or "
                        f"not a .npy/.npz file: {_REWRITE}") from None


def _read_member(z: zipfile.ZipFile, info: zipfile.ZipInfo, path: Path, limits: ReadLimits) -> np.ndarray:
    what = f"member {info.filename!r:.80}"
    if info.flag_bits & 0x1:
        raise DataError(f"{path}: {what} is encrypted; {_REWRITE}")
    if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        raise DataError(f"{path}: {what} uses zip compression method {info.compress_type}; only stored (np.savez) "
                        f"and deflated (np.savez_compressed) members are read: {_REWRITE}")
    if info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size:
        raise DataError(f"{path}: {what} is stored uncompressed but its sizes disagree ({info.compress_size} vs "
                        f"{info.file_size}); the file is corrupt: {_REWRITE}")
    if info.compress_type == zipfile.ZIP_DEFLATED:
        limits.check_expansion(info.file_size, info.compress_size, path, what,
                               "if the data are genuine, save them with np.savez (uncompressed)")
    with z.open(info) as f:
        return _read_npy(f, path, info.file_size, limits, what)


def image_array(x: np.ndarray, source: str) -> np.ndarray:
    """Bring a user's array to ``[N, C, H, W]`` uint8 0..255 or float32 on [-1, 1].

    Accepts [N, H, W], [N, C, H, W] (C = 1 or 3) and [N, H, W, C] (C = 1 or 3, dim 1 not 1 or 3);
    integers must lie in 0..255, floats in [0, 1] (mapped by ``2 x - 1``). Converted in chunks, so
    the peak memory is the input plus the output.
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
    if x.size == 0:
        raise DataError(f"{source}: images of shape {tuple(x.shape)} hold no pixels; expected at least one image of "
                        "at least 1 x 1 pixels")
    if x.dtype == np.uint8:
        return np.ascontiguousarray(x)
    if x.dtype.kind in "iu":
        lo, hi = int(x.min()), int(x.max())
        if lo < 0 or hi > 255:
            raise DataError(f"{source}: integer images must lie in 0..255, found {lo}..{hi}; rescale them to "
                            "0..255 (uint8) or to floats in [0, 1]")
        return np.ascontiguousarray(x, dtype=np.uint8)
    if x.dtype.kind == "f":
        step = max(1, _CHUNK_BYTES // max(1, x[0].nbytes))
        bad = sum(int((~np.isfinite(x[s:s + step])).sum()) for s in range(0, x.shape[0], step))
        if bad:
            raise DataError(f"{source}: {bad} NaN or Inf values in the images; clean the data (for example "
                            "np.nan_to_num) and save it again")
        lo, hi = float(x.min()), float(x.max())
        if lo < -1e-6 or hi > 1 + 1e-6:
            raise DataError(f"{source}: float images must lie in the range [0, 1], found [{lo:.4g}, {hi:.4g}]; "
                            "if they are on [-1, 1] use (x + 1) / 2, if they are 0..255 use uint8")
        work = np.float32 if x.dtype.itemsize <= 4 else np.float64
        out = np.empty(x.shape, np.float32)
        for s in range(0, x.shape[0], step):
            out[s:s + step] = np.clip(x[s:s + step], 0, 1).astype(work) * 2 - 1
        return out
    raise DataError(f"{source}: images of dtype {x.dtype}; expected uint8 0..255 or floats in [0, 1]")
