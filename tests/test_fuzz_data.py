"""Property-based fuzzing of every reader (issue 16): generated and mutated IDX directories, CIFAR-10
batches (including random pickle programs), image folders and .npy/.npz files must each give a typed
error (DataError/ConfigError) or a valid dataset, with bounded memory (traced peak under a small
multiple of a small ``max_bytes``) and no change to numpy's, pickle's or Pillow's module state.

Seeded (``derandomize=True``: the same examples on every run, no example database) and bounded: about
half a minute in all on two CPU cores.
"""

import gzip
import io
import pickle
import struct
import tempfile
import tracemalloc
import warnings
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

import hostile as h
from localdiff.data import ImageDataset, load_dataset
from localdiff.errors import ConfigError, DataError
from test_data import Py2Pickler

CAP = 4 << 20  # max_bytes while fuzzing: a file may not make a load allocate much more than this
PEAK = 8 * CAP  # traced peak allowed per example (decoded arrays, their conversions, the file's bytes)
FUZZ = settings(derandomize=True, database=None, deadline=None, max_examples=120, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much])
INTERESTING = st.sampled_from([0, 1, 2, 3, 255, 256, 3072, 65535, 65536, 2**31 - 1, 2**31, 2**32 - 1])
U32 = INTERESTING | st.integers(0, 2**32 - 1)


def module_state():
    from numpy._core import numeric

    f = numeric._frombuffer
    return (sorted(vars(f)), f.__doc__, f.__defaults__, f.__kwdefaults__, f.__name__, sorted(vars(pickle)),
            sorted(vars(np.lib.format)), Image.MAX_IMAGE_PIXELS, len(warnings.filters))


@pytest.fixture(scope="module")
def traced():
    tracemalloc.start()
    yield
    tracemalloc.stop()


def mutate(draw, blob: bytes) -> bytes:
    """0-3 random edits: bit flips, truncation, insertion, overwrites with interesting 32-bit values."""
    b = bytearray(blob)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "truncate", "insert", "u32be", "u32le", "bytes"]))
        pos = draw(st.integers(0, max(len(b) - 1, 0)))
        if kind == "flip" and b:
            b[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "truncate":
            del b[pos:]
        elif kind == "insert":
            b[pos:pos] = draw(st.binary(min_size=1, max_size=16))
        elif kind in ("u32be", "u32le"):
            b[pos:pos + 4] = struct.pack(">I" if kind == "u32be" else "<I", draw(U32))
        else:
            b[pos:pos + 8] = draw(st.binary(min_size=1, max_size=8))
    return bytes(b)


def check(path: Path, **kw) -> None:
    """The property: a typed error or a valid dataset; bounded memory; no module state changed."""
    before = module_state()
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]  # what hypothesis and earlier examples hold
    try:
        ds = load_dataset(path, max_bytes=CAP, **kw)
    except (DataError, ConfigError) as e:
        assert str(e).strip()
    else:
        assert isinstance(ds, ImageDataset)
        x = ds.raw
        assert x.ndim == 4 and min(x.shape) >= 1 and x.shape[1] in (1, 3) and x.flags.c_contiguous
        assert x.dtype in (np.uint8, np.float32) and all(s > 0 for s, k in zip(x.strides, x.shape) if k > 1)
        if x.dtype == np.float32:
            assert np.isfinite(x).all() and x.min() >= -1 and x.max() <= 1
        if ds.labels is not None:
            assert ds.labels.dtype == np.int64 and ds.labels.shape == (len(ds),) and ds.labels.min() >= 0
        assert ds[0].shape == x.shape[1:] and x.nbytes <= CAP
    peak = tracemalloc.get_traced_memory()[1] - base
    assert peak < PEAK, f"{peak / 2**20:.1f} MiB traced for a {h.file_size(path)}-byte input"
    assert module_state() == before


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------


@st.composite
def idx_dirs(draw):
    n, rows, cols = draw(st.integers(1, 4)), draw(st.integers(1, 5)), draw(st.integers(1, 5))
    files = {"train-images-idx3-ubyte": h.idx_bytes((n, rows, cols), draw(st.binary(min_size=n * rows * cols,
                                                                                     max_size=n * rows * cols)))}
    if draw(st.booleans()):
        files["train-labels-idx1-ubyte"] = h.idx_bytes((n,), bytes(draw(st.lists(st.integers(0, 9), min_size=n,
                                                                                  max_size=n))), h.IDX_LABELS_MAGIC)
    out = {}
    for name, blob in files.items():
        if draw(st.booleans()):  # declare other dims, keep the payload
            blob = blob[:4] + b"".join(struct.pack(">I", draw(U32)) for _ in range((len(blob[4:16]) // 4))) + blob[16:]
        if draw(st.booleans()):
            blob, name = gzip.compress(blob, compresslevel=1), name + ".gz"
        out[name] = mutate(draw, blob)
    return out


@FUZZ
@given(files=idx_dirs())
def test_fuzz_idx(traced, files):
    with tempfile.TemporaryDirectory() as d:
        for name, blob in files.items():
            (Path(d) / name).write_bytes(blob)
        check(Path(d))


def test_fuzz_idx_gzip_bomb_under_a_small_cap(traced, tmp_path):
    """A genuine-looking gzip that expands past the cap is refused while streaming, never decompressed whole."""
    check(h.idx_gzip_bomb(tmp_path, gib=0.05))


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ------------------------------------------------------------------------------------------------

_GLOBALS = [("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
            ("numpy", "ndarray"), ("numpy", "dtype"), ("numpy._core.numeric", "_frombuffer"),
            ("numpy.core.multiarray", "scalar"), ("_codecs", "encode"), ("builtins", "bytes"),
            ("numpy.lib.format", "read_magic"), ("builtins", "setattr"), ("os", "system")]


@st.composite
def pickle_ops(draw):
    """One opcode with its argument, from a vocabulary that reaches every branch of the unpickler."""
    P = pickle
    simple = [P.MARK, P.POP, P.POP_MARK, P.DUP, P.EMPTY_LIST, P.APPEND, P.APPENDS, P.LIST, P.EMPTY_DICT, P.SETITEM,
              P.SETITEMS, P.DICT, P.EMPTY_TUPLE, P.TUPLE, P.TUPLE1, P.TUPLE2, P.TUPLE3, P.NONE, P.NEWTRUE, P.NEWFALSE,
              P.REDUCE, P.BUILD, P.MEMOIZE, P.STACK_GLOBAL, P.EMPTY_SET, P.NEWOBJ, P.OBJ, P.ADDITEMS]
    kind = draw(st.integers(0, 9))
    if kind <= 3:
        return draw(st.sampled_from(simple))
    if kind == 4:
        return h.op_int(draw(st.integers(-(2**40), 2**40) | INTERESTING))
    if kind == 5:
        return h.op_str(draw(st.binary(max_size=40) | st.sampled_from([b"u1", b"f4", b"i8", b"<", b"|", b"b", b"C",
                                                                       b"latin1", b"data", b"labels", b"O", b"V8"])))
    if kind == 6:
        return h.op_global(*draw(st.sampled_from(_GLOBALS)))
    if kind == 7:
        op = draw(st.sampled_from([P.BINPUT, P.BINGET]))
        return op + bytes([draw(st.integers(0, 5))])
    if kind == 8:
        op, fmt = draw(st.sampled_from([(P.BINBYTES8, "<Q"), (P.BINUNICODE, "<I"), (P.BINBYTES, "<I"),
                                        (P.LONG4, "<i"), (P.FRAME, "<Q"), (P.BYTEARRAY8, "<Q")]))
        n = draw(st.integers(0, 12) | INTERESTING)
        return op + struct.pack(fmt, n if fmt != "<i" else min(n, 2**31 - 1)) + draw(st.binary(max_size=12))
    return draw(st.sampled_from([h.op_dtype(b"u1"), h.op_array((1, 3072), b"u1", bytes(3072)),
                                 h.op_array((2,), b"i8", bytes(16)), h.op_list([h.op_int(1)])]))


@st.composite
def cifar_batches(draw):
    way = draw(st.integers(0, 2))
    n = draw(st.integers(1, 3))
    if way == 0:  # a real batch, pickled by Python 3 (any protocol) or as Python 2 wrote them, then mutated
        batch = {b"data": np.frombuffer(draw(st.binary(min_size=n * 3072, max_size=n * 3072)), np.uint8).reshape(n, 3072),
                 b"labels": draw(st.lists(st.integers(-2, 12), min_size=n, max_size=n + 1)), b"batch_label": b"x"}
        if draw(st.booleans()):
            buf = io.BytesIO()
            Py2Pickler(buf, protocol=2).dump(batch)
            blob = buf.getvalue()
        else:
            blob = pickle.dumps(batch, protocol=draw(st.integers(0, pickle.HIGHEST_PROTOCOL)))
        return mutate(draw, blob)
    program = b"".join(draw(st.lists(pickle_ops(), max_size=25)))
    if way == 1:  # random opcodes as the data or the labels of a batch
        data = h.good_cifar_data(1) if draw(st.booleans()) else program
        labels = h.op_list([h.op_int(0)]) if data is program else program
        return h.cifar_pickle(data, labels)
    return pickle.PROTO + b"\x02" + program + pickle.STOP


@FUZZ
@given(blob=cifar_batches())
def test_fuzz_cifar(traced, blob):
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "data_batch_1").write_bytes(blob)
        check(Path(d))


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------

_MODES = ["L", "RGB", "RGBA", "P", "1", "LA", "I;16", "I", "F", "CMYK"]
_FORMATS = {"PNG": ".png", "JPEG": ".jpg", "BMP": ".bmp", "TIFF": ".tif", "WEBP": ".webp", "GIF": ".gif",
            "PPM": ".ppm", "EPS": ".eps"}


@st.composite
def image_files(draw):
    w, hgt = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    mode, fmt = draw(st.sampled_from(_MODES)), draw(st.sampled_from(list(_FORMATS)))
    a = np.frombuffer(draw(st.binary(min_size=w * hgt * 4, max_size=w * hgt * 4)), np.uint8)
    im = Image.fromarray(a[: w * hgt * 3].reshape(hgt, w, 3), "RGB")
    try:
        im = im.convert(mode) if mode not in ("I;16",) else Image.fromarray(a[: w * hgt * 2].view("<u2").reshape(hgt, w))
        buf = io.BytesIO()
        im.save(buf, format=fmt)
    except (OSError, ValueError, KeyError):
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        fmt = "PNG"
    ext = draw(st.sampled_from([_FORMATS[fmt]] * 3 + [".png", ".jpg", ".bmp", ".tiff", ".webp"]))
    return ext, mutate(draw, buf.getvalue())


@FUZZ
@given(files=st.lists(image_files(), min_size=1, max_size=3), resolution=st.sampled_from([None, 4]))
def test_fuzz_image_folder(traced, files, resolution):
    with tempfile.TemporaryDirectory() as d:
        for k, (ext, blob) in enumerate(files):
            sub = Path(d) / ("a" if k % 2 else "b")
            sub.mkdir(exist_ok=True)
            (sub / f"{k}{ext}").write_bytes(blob)
        check(Path(d), resolution=resolution)


# ------------------------------------------------------------------------------------------------
# .npy / .npz
# ------------------------------------------------------------------------------------------------

_DTYPES = ["u1", "i8", "f4", "f8", ">f4", "?", "c8", "u2", "O", "S3"]


@st.composite
def arrays(draw, labels: bool = False):
    dtype = np.dtype(draw(st.sampled_from(["i8", "u1", "f4", "i2"] if labels else _DTYPES)))
    shape = tuple(draw(st.lists(st.integers(0, 5), min_size=1, max_size=5)))
    n = int(np.prod(shape))
    if dtype.kind == "O":
        return np.array([None] * n, dtype=object).reshape(shape)
    raw = draw(st.binary(min_size=n * dtype.itemsize, max_size=n * dtype.itemsize))
    x = np.frombuffer(raw, dtype).reshape(shape)
    if dtype.kind == "f" and draw(st.booleans()):
        x = np.nan_to_num(np.abs(x.astype(np.float64)) % 1.0).astype(dtype)  # often in range: reaches the end
    return x


@st.composite
def array_files(draw):
    x = draw(arrays())
    kind = draw(st.sampled_from(["npy", "npz", "npz-compressed"]))
    buf = io.BytesIO()
    if kind == "npy":
        np.save(buf, x, allow_pickle=True)
    else:
        arrays_ = {draw(st.sampled_from(["images", "x", "other"])): x}
        if draw(st.booleans()):
            arrays_[draw(st.sampled_from(["labels", "y"]))] = draw(arrays(labels=True))
        (np.savez_compressed if kind == "npz-compressed" else np.savez)(buf, **arrays_)
    blob = buf.getvalue()
    if draw(st.booleans()):  # rewrite the shape in a header: a size the data do not have
        new = repr(tuple(draw(st.lists(st.integers(0, 2**40) | INTERESTING, min_size=1, max_size=4)))).encode()
        blob = blob.replace(b"'shape': (", b"'shape': " + new[:-1] + b", (", 1)
    return (".npy" if kind == "npy" else ".npz"), mutate(draw, blob)


@FUZZ
@given(file=array_files())
def test_fuzz_npy_npz(traced, file):
    ext, blob = file
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / f"a{ext}").write_bytes(blob)
        check(Path(d) / f"a{ext}")
