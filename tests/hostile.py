"""Builders of hostile input files, one per failure class of issue 16 (shared by the regression tests
and ``benchmarks/bench_hostile.py``).

Each builder writes its file(s) into a fresh directory and returns the path to pass to
``load_dataset``. Files are small; what they *declare* is large or malformed.
"""

from __future__ import annotations

import gzip
import io
import pickle
import struct
import zipfile
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801


# ------------------------------------------------------------------------------------------------
# raw pickle assembly (protocol 2 opcodes, as the Python 2 CIFAR-10 batches use)
# ------------------------------------------------------------------------------------------------


def op_global(module: str, name: str) -> bytes:
    return pickle.GLOBAL + f"{module}\n{name}\n".encode()


def op_str(s: bytes) -> bytes:
    """A Python 2 str (SHORT_BINSTRING / BINSTRING)."""
    return (pickle.SHORT_BINSTRING + bytes([len(s)]) + s if len(s) < 256
            else pickle.BINSTRING + struct.pack("<i", len(s)) + s)


def op_unicode(s: str) -> bytes:
    raw = s.encode()
    return pickle.SHORT_BINUNICODE + bytes([len(raw)]) + raw


def op_int(v: int) -> bytes:
    if 0 <= v < 256:
        return pickle.BININT1 + bytes([v])
    if -(2**31) <= v < 2**31:
        return pickle.BININT + struct.pack("<i", v)
    raw = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return pickle.LONG1 + bytes([len(raw)]) + raw


def op_tuple(*items: bytes) -> bytes:
    return pickle.MARK + b"".join(items) + pickle.TUPLE


def op_list(items: list[bytes]) -> bytes:
    return pickle.EMPTY_LIST + (pickle.MARK + b"".join(items) + pickle.APPENDS if items else b"")


def op_dtype(code: bytes) -> bytes:
    """numpy.dtype(code, False, True) with the state numpy writes (little-endian)."""
    endian = b"|" if code.endswith(b"1") else b"<"
    state = op_tuple(op_int(3), op_str(endian), pickle.NONE, pickle.NONE, pickle.NONE,
                     op_int(-1), op_int(-1), op_int(0))
    return (op_global("numpy", "dtype") + op_tuple(op_str(code), pickle.NEWFALSE, pickle.NEWTRUE)
            + pickle.REDUCE + state + pickle.BUILD)


def op_array(shape: tuple[int, ...], code: bytes, raw: bytes) -> bytes:
    """``_reconstruct(ndarray, (0,), b'b')`` + BUILD ``(1, shape, dtype, False, raw)``: numpy's protocol 2 form."""
    head = (op_global("numpy.core.multiarray", "_reconstruct")
            + op_tuple(op_global("numpy", "ndarray"), op_tuple(op_int(0)), op_str(b"b")) + pickle.REDUCE)
    state = op_tuple(op_int(1), op_tuple(*[op_int(s) for s in shape]), op_dtype(code), pickle.NEWFALSE, op_str(raw))
    return head + state + pickle.BUILD


def cifar_pickle(data: bytes, labels: bytes) -> bytes:
    """A CIFAR-10 batch dict ``{b'data': <data opcodes>, b'labels': <labels opcodes>}``."""
    return (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK + op_str(b"data") + data
            + op_str(b"labels") + labels + pickle.SETITEMS + pickle.STOP)


def _cifar(d: Path, blob: bytes) -> Path:
    (d / "data_batch_1").write_bytes(blob)
    return d


def good_cifar_data(n: int = 2) -> bytes:
    return op_array((n, 3072), b"u1", bytes(range(256)) * (12 * n))


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------


def idx_bytes(dims: tuple[int, ...], payload: bytes, magic: int = IDX_IMAGES_MAGIC) -> bytes:
    return struct.pack(">I", magic) + struct.pack(f">{len(dims)}I", *dims) + payload


def idx_dims_wrap(d: Path) -> Path:
    """IDX dims whose product is 2^64: wraps to 0 in int64, matching the empty payload."""
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes((2**22, 2**22, 2**20), b""))
    return d


def idx_empty(d: Path) -> Path:
    """An IDX file of 0 images."""
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes((0, 28, 28), b""))
    return d


def idx_zero_width(d: Path) -> Path:
    """An IDX file of 5 images of 28 x 0 pixels."""
    (d / "train-images-idx3-ubyte").write_bytes(idx_bytes((5, 28, 0), b""))
    return d


def idx_gzip_bomb(d: Path, gib: float = 1.0) -> Path:
    """A gzipped IDX file (about 1 MB per GiB) whose header and payload declare ``gib`` GiB of zeros."""
    n = int(gib * 2**30) // (1024 * 1024)
    comp = zlib.compressobj(9, zlib.DEFLATED, 31)
    out = [comp.compress(idx_bytes((n, 1024, 1024), b""))]
    zeros = bytes(1 << 24)
    left = n * 1024 * 1024
    while left:
        k = min(left, len(zeros))
        out.append(comp.compress(zeros[:k]))
        left -= k
    out.append(comp.flush())
    (d / "train-images-idx3-ubyte.gz").write_bytes(b"".join(out))
    return d


# ------------------------------------------------------------------------------------------------
# .npy / .npz
# ------------------------------------------------------------------------------------------------


def npy_header(shape: tuple[int, ...], descr: str = "|u1", fortran: bool = False) -> bytes:
    text = f"{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}"
    text += " " * ((64 - (10 + len(text) + 1) % 64) % 64) + "\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text.encode("latin-1")


def npy_huge_shape(d: Path) -> Path:
    """A 144-byte .npy declaring 1,000,000 images of 1000 x 1000 uint8 (931 GiB)."""
    p = d / "huge.npy"
    p.write_bytes(npy_header((1000000, 1, 1000, 1000)) + bytes(16))
    return p


def npz_huge_shape(d: Path) -> Path:
    """The same declaration inside an .npz (stored member)."""
    p = d / "huge.npz"
    with zipfile.ZipFile(p, "w") as z:
        z.writestr("images.npy", npy_header((1000000, 1, 1000, 1000)) + bytes(16))
    return p


def npy_corrupt_header(d: Path) -> Path:
    """A .npy whose header dictionary is cut off (numpy's parser raises tokenize.TokenError)."""
    text = b"{'descr': '|u1', 'fortran_order': False, 'shape': (2, 4, 4"
    text += b" " * (117 - len(text)) + b"\n"
    p = d / "bad.npy"
    p.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(text)) + text + bytes(32))
    return p


def npy_empty_float(d: Path) -> Path:
    p = d / "empty.npy"
    np.save(p, np.zeros((0, 1, 4, 4), np.float32))
    return p


def npy_zero_width(d: Path) -> Path:
    p = d / "thin.npy"
    np.save(p, np.zeros((5, 1, 4, 0), np.uint8))
    return p


def _patch_zip_method(blob: bytes, method: int) -> bytes:
    """Rewrite the compression method in every local and central header of a one-member zip."""
    b = bytearray(blob)
    i = b.find(b"PK\x03\x04")
    b[i + 8:i + 10] = struct.pack("<H", method)
    j = b.find(b"PK\x01\x02")
    b[j + 10:j + 12] = struct.pack("<H", method)
    return bytes(b)


def npz_unknown_compression(d: Path) -> Path:
    """An .npz whose member claims compression method 99 (zipfile raises NotImplementedError)."""
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 4, 4), np.uint8))
    p = d / "method.npz"
    p.write_bytes(_patch_zip_method(buf.getvalue(), 99))
    return p


def npz_corrupt_deflate(d: Path) -> Path:
    """An np.savez_compressed file with its deflate stream damaged (zlib.error)."""
    buf = io.BytesIO()
    np.savez_compressed(buf, images=np.arange(2 * 16 * 16, dtype=np.uint8).reshape(2, 16, 16))
    b = bytearray(buf.getvalue())
    start = b.find(b"PK\x03\x04") + 30 + len("images.npy")
    for k in range(start + 2, start + 40):
        b[k] = 0xFF
    p = d / "deflate.npz"
    p.write_bytes(bytes(b))
    return p


def npz_not_a_zip(d: Path) -> Path:
    """A truncated .npz (numpy leaks the file handle on main)."""
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 4, 4), np.uint8))
    p = d / "cut.npz"
    p.write_bytes(buf.getvalue()[:-30])
    return p


def npz_negative_labels(d: Path) -> Path:
    p = d / "neg.npz"
    np.savez(p, images=np.zeros((3, 4, 4), np.uint8), labels=np.array([0, -1, 2]))
    return p


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches (restricted unpickler)
# ------------------------------------------------------------------------------------------------


def cifar_length_opcode(d: Path) -> Path:
    """A pickle whose BINBYTES8 declares 2^40 bytes."""
    blob = (pickle.PROTO + b"\x04" + pickle.EMPTY_DICT + op_str(b"data")
            + pickle.BINBYTES8 + struct.pack("<Q", 2**40) + b"x" * 64)
    return _cifar(d, blob)


def cifar_huge_reconstruct(d: Path) -> Path:
    """numpy's allow-listed ``_reconstruct(ndarray, (2^40,), b'b')``: a 1 TiB allocation."""
    data = (op_global("numpy.core.multiarray", "_reconstruct")
            + op_tuple(op_global("numpy", "ndarray"), op_tuple(op_int(2**40)), op_str(b"b")) + pickle.REDUCE)
    return _cifar(d, cifar_pickle(data, op_list([op_int(0)])))


def cifar_ragged_labels(d: Path) -> Path:
    labels = op_list([op_list([op_int(0), op_int(1)]), op_list([op_int(2)])])
    return _cifar(d, cifar_pickle(good_cifar_data(2), labels))


def cifar_nested_labels(d: Path, depth: int = 100_000) -> Path:
    """Labels nested ``depth`` lists deep (RecursionError on main)."""
    labels = pickle.EMPTY_LIST * depth + pickle.APPEND * (depth - 1)
    return _cifar(d, cifar_pickle(good_cifar_data(1), labels))


def cifar_negative_labels(d: Path) -> Path:
    return _cifar(d, cifar_pickle(good_cifar_data(2), op_list([op_int(-1), op_int(3)])))


def cifar_zero_stride(d: Path, n: int = 300_000) -> Path:
    """``numpy.ndarray((n, 3072), uint8, buffer=<3072 bytes>, 0, (0, 1))``: one row seen n times, and
    labels the same way (one int64 seen n times)."""
    data = (op_global("numpy", "ndarray")
            + op_tuple(op_tuple(op_int(n), op_int(3072)), op_dtype(b"u1"), op_str(bytes(3072)), op_int(0),
                       op_tuple(op_int(0), op_int(1)))
            + pickle.REDUCE)
    labels = (op_global("numpy", "ndarray")
              + op_tuple(op_tuple(op_int(n)), op_dtype(b"i8"), op_str(bytes(8)), op_int(0), op_tuple(op_int(0)))
              + pickle.REDUCE)
    return _cifar(d, cifar_pickle(data, labels))


def cifar_mutate_frombuffer(d: Path) -> Path:
    """BUILD on the allow-listed function ``_frombuffer``: sets its ``__doc__`` and adds an attribute."""
    state = op_tuple(pickle.EMPTY_DICT + op_unicode("hostile") + pickle.NEWTRUE + pickle.SETITEM,
                     pickle.EMPTY_DICT + op_unicode("__doc__") + op_unicode("changed by a pickle") + pickle.SETITEM)
    mutate = op_global("numpy.core.numeric", "_frombuffer") + state + pickle.BUILD + pickle.POP
    blob = cifar_pickle(good_cifar_data(1), op_list([op_int(0)]))
    blob = blob[:2] + mutate + blob[2:]
    return _cifar(d, blob)


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------


def jpeg_dimension_bomb(d: Path, side: int = 12000) -> Path:
    """A tiny baseline JPEG whose frame header is rewritten to declare ``side`` x ``side`` pixels."""
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8), 128, np.uint8)).save(buf, "JPEG", quality=50)
    b = bytearray(buf.getvalue())
    i = b.find(b"\xff\xc0")
    b[i + 5:i + 9] = struct.pack(">HH", side, side)
    (d / "a.jpg").write_bytes(bytes(b))
    return d


def png16_bomb(d: Path, side: int = 9000) -> Path:
    """A 16-bit grayscale PNG of ``side`` x ``side`` zeros (about 280 KB for 9000)."""
    Image.fromarray(np.zeros((side, side), np.uint16)).save(d / "a.png")
    return d


def eps_as_png(d: Path) -> Path:
    """An EPS (PostScript, Ghostscript plugin) named a.png."""
    (d / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 8 8\n0 0 moveto 8 8 lineto stroke\n"
                              b"showpage\n%%EOF\n")
    return d


def gif_as_png(d: Path) -> Path:
    """A GIF named a.png (content and extension disagree)."""
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(d / "a.png", format="GIF")
    return d


BUILDERS = {
    "idx-dims-wrap": idx_dims_wrap,
    "idx-empty": idx_empty,
    "idx-zero-width": idx_zero_width,
    "idx-gzip-bomb": idx_gzip_bomb,
    "npy-huge-shape": npy_huge_shape,
    "npz-huge-shape": npz_huge_shape,
    "npy-corrupt-header": npy_corrupt_header,
    "npy-empty-float": npy_empty_float,
    "npy-zero-width": npy_zero_width,
    "npz-unknown-compression": npz_unknown_compression,
    "npz-corrupt-deflate": npz_corrupt_deflate,
    "npz-truncated": npz_not_a_zip,
    "npz-negative-labels": npz_negative_labels,
    "cifar-length-opcode": cifar_length_opcode,
    "cifar-huge-reconstruct": cifar_huge_reconstruct,
    "cifar-ragged-labels": cifar_ragged_labels,
    "cifar-nested-labels": cifar_nested_labels,
    "cifar-negative-labels": cifar_negative_labels,
    "cifar-zero-stride": cifar_zero_stride,
    "cifar-mutate-frombuffer": cifar_mutate_frombuffer,
    "jpeg-dimension-bomb": jpeg_dimension_bomb,
    "png16-bomb": png16_bomb,
    "eps-as-png": eps_as_png,
    "gif-as-png": gif_as_png,
}


def file_size(path: Path) -> int:
    """Total bytes of ``path`` (a file, or every file under a directory)."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


__all__ = ["BUILDERS", "file_size", "gzip"]
