"""Hostile files (issue 16): one regression test per failure class, each a typed DataError that names
the file and the problem, with no memory blow-up, no leaked file handle and no state change; plus
the legitimate inputs next to those limits, the memory cap option and the plain-data unpickler."""

import gc
import io
import pickle
import struct
import tracemalloc
import warnings

import numpy as np
import pytest
from PIL import Image

import hostile
from hostile import BUILDERS
from localdiff.data import load_dataset
from localdiff.data.safe_pickle import loads_plain
from localdiff.errors import ConfigError, DataError

EXPECTED = {
    "idx-dims-wrap": r"train-images-idx3-ubyte: the IDX header gives dims \[4194304, 4194304, 1048576\], i\.e\. "
                     r"18446744073709551616 data bytes, but the file holds 0",
    "idx-empty": r"train-images-idx3-ubyte: the IDX header gives dims \[0, 28, 28\]: no images",
    "idx-zero-width": r"train-images-idx3-ubyte: the IDX header gives dims \[5, 28, 0\]: no images of at least 1 x 1",
    "idx-gzip-bomb": r"train-images-idx3-ubyte\.gz: the IDX images .* more than 200 times its size \(a decompression "
                     r"bomb.*gunzip it",
    "npy-huge-shape": r"huge\.npy: the array declares shape \(1000000, 1, 1000, 1000\) of uint8, i\.e\. 1000000000000 "
                      r"data bytes, but holds 16",
    "npz-huge-shape": r"huge\.npz: member 'images\.npy' declares shape \(1000000, 1, 1000, 1000\)",
    "npy-corrupt-header": r"bad\.npy: the \.npy header is corrupt \(TokenError",
    "npy-empty-float": r"empty\.npy: images of shape \(0, 1, 4, 4\) hold no pixels",
    "npy-zero-width": r"thin\.npy: images of shape \(5, 1, 4, 0\) hold no pixels",
    "npz-unknown-compression": r"method\.npz: member 'images\.npy' uses zip compression method 99; only stored",
    "npz-corrupt-deflate": r"deflate\.npz: cannot read this \.npz \(error: .*decompressing",
    "npz-truncated": r"cut\.npz: cannot read this \.npz \(BadZipFile",
    "npz-negative-labels": r"neg\.npz: labels must be class indices 0\.\.2147483647, found -1",
    "cifar-length-opcode": r"data_batch_1: cannot unpickle the file \(an argument of 1099511627776 bytes .* runs past "
                           r"the end of the file\)",
    "cifar-huge-reconstruct": r"data_batch_1: pickle holds an array that is never given its data",
    "cifar-ragged-labels": r"data_batch_1: labels must be a flat list of integers, but label 0 is a list",
    "cifar-nested-labels": r"data_batch_1: pickle holds containers nested more than 32 levels deep",
    "cifar-negative-labels": r"data_batch_1: labels must be class indices 0\.\.2147483647, found -1",
    "cifar-zero-stride": r"data_batch_1: pickle holds numpy\.ndarray called with 5 arguments, which is not plain",
    "cifar-mutate-frombuffer": r"data_batch_1: pickle holds a state change \(BUILD\) of "
                               r"numpy\.core\.numeric\._frombuffer",
    "jpeg-dimension-bomb": r"a\.jpg: .*144000000 pixels.*Pillow's decompression-bomb limit",
    "png16-bomb": r"a\.png: the 6000 x 6000 I;16 image would take 446\.3 MiB decoded from .* more than 200 times",
    "eps-as-png": r"a\.png: cannot read this image: its content is not PNG",
    "gif-as-png": r"a\.png: cannot read this image: its content is not PNG",
}
SMALLER = {"idx-gzip-bomb": {"gib": 0.1}, "png16-bomb": {"side": 6000}}


def module_state():
    """What a hostile pickle or image could change for the whole process."""
    from numpy._core import multiarray, numeric

    f = numeric._frombuffer
    return (sorted(vars(f)), f.__doc__, f.__defaults__, f.__kwdefaults__, f.__name__, f.__qualname__,
            sorted(vars(pickle)), Image.MAX_IMAGE_PIXELS, len(warnings.filters), multiarray._reconstruct.__doc__)


def test_every_class_has_an_expectation():
    assert set(EXPECTED) == set(BUILDERS)


@pytest.mark.parametrize("name", list(BUILDERS))
def test_hostile_file_is_a_typed_error_without_memory_or_state_damage(name, tmp_path):
    path = BUILDERS[name](tmp_path, **SMALLER.get(name, {}))
    before = module_state()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(DataError, match=EXPECTED[name]):
                load_dataset(path)
            gc.collect()
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    assert peak < 16 << 20, f"{name}: {peak / 2**20:.1f} MiB traced while refusing a {hostile.file_size(path)}-byte file"
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)], "a file handle was left open"
    assert module_state() == before


# ------------------------------------------------------------------------------------------------
# legitimate inputs next to the limits
# ------------------------------------------------------------------------------------------------


def test_sixteen_bit_png_matches_the_float_formula(tmp_path):
    a = np.random.default_rng(0).integers(0, 65536, (37, 23), dtype=np.uint16)
    a[0, :4] = [0, 128, 129, 65535]  # rounding edges of v / 257
    Image.fromarray(a).save(tmp_path / "a.png")
    ds = load_dataset(tmp_path)
    np.testing.assert_array_equal(ds.raw[0, 0], np.clip(np.rint(a / 257.0), 0, 255).astype(np.uint8))


def test_compressible_but_genuine_files_load(tmp_path):
    """A flat 2000 x 2000 PNG (12 MiB decoded from a few KiB) is under the 64 MiB floor of the expansion rule."""
    Image.fromarray(np.full((2000, 2000, 3), 7, np.uint8)).save(tmp_path / "flat.png")
    assert load_dataset(tmp_path, resolution=8).shape == (3, 8, 8)
    x = np.zeros((40, 28, 28), np.uint8)
    raw = struct.pack(">IIII", 0x803, *x.shape) + x.tobytes()
    (tmp_path / "idx").mkdir()
    (tmp_path / "idx" / "train-images-idx3-ubyte.gz").write_bytes(__import__("gzip").compress(raw))
    assert len(load_dataset(tmp_path / "idx")) == 40


@pytest.mark.parametrize("ext,fmt", [(".tif", "TIFF"), (".bmp", "BMP"), (".webp", "WEBP"), (".jpeg", "JPEG")])
def test_allowed_formats_decode_by_extension(tmp_path, ext, fmt):
    a = np.random.default_rng(1).integers(0, 256, (6, 6, 3), dtype=np.uint8)
    Image.fromarray(a).save(tmp_path / f"a{ext}", format=fmt, **({"lossless": True} if fmt == "WEBP" else {}))
    ds = load_dataset(tmp_path)
    assert ds.shape == (3, 6, 6)
    if fmt in ("TIFF", "BMP", "WEBP"):
        np.testing.assert_array_equal(ds.raw[0], a.transpose(2, 0, 1))
    (tmp_path / f"a{ext}").rename(tmp_path / "a.png")  # right content, wrong extension
    with pytest.raises(DataError, match=r"a\.png: cannot read this image: its content is not PNG"):
        load_dataset(tmp_path)


def test_memory_cap_option_and_environment(tmp_path, monkeypatch):
    np.save(tmp_path / "x.npy", np.zeros((100, 32, 32), np.uint8))  # 100 KiB of images
    with pytest.raises(DataError, match=r"x\.npy: the array would take 100\.0 KiB in memory, more than the cap of "
                                        r"50\.0 KiB; .*max_bytes=.*LOCALDIFF_MAX_DATA_BYTES"):
        load_dataset(tmp_path / "x.npy", max_bytes=50 * 1024)
    assert len(load_dataset(tmp_path / "x.npy", max_bytes="1M", split="all")) == 100
    monkeypatch.setenv("LOCALDIFF_MAX_DATA_BYTES", "10K")
    with pytest.raises(DataError, match="cap of 10.0 KiB"):
        load_dataset(tmp_path / "x.npy")
    with pytest.raises(ConfigError, match="max_bytes must be a number of bytes"):
        load_dataset(tmp_path / "x.npy", max_bytes="lots")
    ds = load_dataset(tmp_path / "x.npy", max_bytes=10**6)
    assert "max_bytes" not in ds.meta  # a resource limit, not a preprocessing choice


def test_cifar_total_is_capped_across_batches(tmp_path):
    from test_data import write_cifar_batch

    for name in ("data_batch_1", "data_batch_2"):
        write_cifar_batch(tmp_path / name, np.zeros((10, 3072), np.uint8), list(range(10)))
    with pytest.raises(DataError, match=r"the batches up to data_batch_2, joined,"):
        load_dataset(tmp_path, max_bytes=100_000)
    assert len(load_dataset(tmp_path, max_bytes=200_000)) == 20


def test_labels_of_huge_integers_are_described_not_printed():
    from localdiff.data.raw import check_labels

    with pytest.raises(DataError, match=r"x: labels must be class indices 0\.\.2147483647, found a 66439-bit integer"):
        check_labels([0, 10**20000], 2, "x")


def test_labels_rules(tmp_path):
    x = np.zeros((3, 4, 4), np.uint8)
    for labels, ok in [(np.array([0, 1, 2**31 - 1]), True), (np.array([0.0, 1.0, 2.0]), True),
                       (np.array([0.5, 1, 2]), False), (np.array([0, 1, 2**31]), False),
                       (np.array([0, 1, np.nan]), False), (np.array([True, False, True]), False)]:
        np.savez(tmp_path / "d.npz", images=x, labels=labels)
        if ok:
            assert load_dataset(tmp_path / "d.npz").labels.dtype == np.int64
        else:
            with pytest.raises(DataError, match=r"d\.npz: labels must be"):
                load_dataset(tmp_path / "d.npz")


# ------------------------------------------------------------------------------------------------
# the plain-data unpickler
# ------------------------------------------------------------------------------------------------

PLAIN = [
    {b"data": np.arange(12, dtype=np.uint8).reshape(2, 6), b"labels": [1, 2], "s": ["a", b"b", 1.5, None, True]},
    np.asfortranarray(np.arange(6, dtype=np.float32).reshape(2, 3)),
    np.zeros((0, 3), np.int64),
    {"big": 2**100, "neg": -5, "empty": b"", "text": "é\u1234", 3: (1, (2, 3)), "shared": [[1], [1]]},
]


@pytest.mark.parametrize("protocol", range(pickle.HIGHEST_PROTOCOL + 1))
def test_unpickler_reads_plain_data_of_every_protocol(protocol):
    for obj in PLAIN:
        blob = pickle.dumps(obj, protocol=protocol)
        got, want = loads_plain(blob), pickle.loads(blob)
        assert repr(got) == repr(want)
        if isinstance(want, np.ndarray):
            assert got.dtype == want.dtype and got.flags.f_contiguous == want.flags.f_contiguous


def test_unpickler_reads_numpy_scalars_as_numbers():
    assert loads_plain(pickle.dumps([np.int64(3), np.float32(2.5)], protocol=2)) == [3, 2.5]


@pytest.mark.parametrize("blob,pattern", [
    (b"\x80\x02]}b.", r"a state change \(BUILD\) of list"),  # [].__dict__.update({})
    (b"\x80\x02]q\x00h\x00a.", r"contains itself"),  # l = []; l.append(l)
    (b"\x80\x02cbuiltins\neval\n.", r"builtins\.eval"),
    (b"\x80\x02cnumpy\nndarray\n]\x85R.", r"numpy\.ndarray called with 1 arguments"),
    (b"\x80\x02}K\x01K\x02s]q\x00h\x00s.", r"a dict key of type list"),  # {1: 2, [..]: [..]}
])
def test_unpickler_refuses_what_is_not_plain_data(blob, pattern):
    with pytest.raises(Exception, match=pattern):
        loads_plain(blob)


def test_two_arrays_over_one_buffer_are_refused(tmp_path):
    """Two arrays built from one memoised bytes object would repeat its data (an overlapping view)."""
    h = hostile

    def array(raw: bytes) -> bytes:
        return (h.op_global("numpy.core.multiarray", "_reconstruct")
                + h.op_tuple(h.op_global("numpy", "ndarray"), h.op_tuple(h.op_int(0)), h.op_str(b"b")) + pickle.REDUCE
                + h.op_tuple(h.op_int(1), h.op_tuple(h.op_int(1), h.op_int(3072)), h.op_dtype(b"u1"), pickle.NEWFALSE,
                             raw) + pickle.BUILD)

    blob = (pickle.PROTO + b"\x02" + pickle.EMPTY_DICT + pickle.MARK
            + h.op_str(b"data") + array(h.op_str(bytes(3072)) + pickle.BINPUT + b"\xc8")
            + h.op_str(b"labels") + h.op_list([h.op_int(0)])
            + h.op_str(b"extra") + array(pickle.BINGET + b"\xc8") + pickle.SETITEMS + pickle.STOP)
    (tmp_path / "data_batch_1").write_bytes(blob)
    with pytest.raises(DataError, match="two arrays over the same buffer"):
        load_dataset(tmp_path)
    (tmp_path / "data_batch_1").write_bytes(blob.replace(array(pickle.BINGET + b"\xc8"), h.op_int(0)))
    assert len(load_dataset(tmp_path)) == 1


def test_refused_pickle_never_runs_code(tmp_path):
    marker = tmp_path / "ran"
    blob = (pickle.PROTO + b"\x02" + hostile.op_global("os", "system")
            + hostile.op_tuple(hostile.op_str(f"touch {marker}".encode())) + pickle.REDUCE + pickle.STOP)
    (tmp_path / "data_batch_1").write_bytes(blob)
    with pytest.raises(DataError, match=r"pickle holds os\.system, which is not plain"):
        load_dataset(tmp_path)
    assert not marker.exists()


def test_truncated_npz_closes_its_file(tmp_path):
    buf = io.BytesIO()
    np.savez(buf, images=np.zeros((2, 4, 4), np.uint8))
    for cut in (10, 100, len(buf.getvalue()) - 5):
        (tmp_path / "c.npz").write_bytes(buf.getvalue()[:cut])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            with pytest.raises(DataError, match=r"c\.npz"):
                load_dataset(tmp_path / "c.npz")
            gc.collect()
        assert not [w for w in caught if issubclass(w.category, ResourceWarning)]


def test_cli_memory_cap_flag(tmp_path, tmp_cache, capsys):
    from localdiff.cli import main

    np.save(tmp_path / "x.npy", np.zeros((100, 8, 8), np.uint8))
    argv = ["sample", "--data", str(tmp_path / "x.npy"), "--model", "wiener", "--num", "1", "--steps", "1",
            "--device", "cpu"]
    assert main([*argv, "--max-data-bytes", "1K", "--out", str(tmp_path / "a")]) == 2
    assert "x.npy: the array would take 6.2 KiB in memory, more than the cap of 1.0 KiB" in capsys.readouterr().err
    assert main([*argv, "--max-data-bytes", "64K", "--out", str(tmp_path / "b")]) == 0


def test_unpickler_bounds_work_and_numbers():
    from localdiff.data.safe_pickle import MAX_OPS

    with pytest.raises(Exception, match=rf"more than {MAX_OPS} opcodes"):
        loads_plain(b"\x80\x02" + pickle.EMPTY_LIST * (MAX_OPS + 10) + b".")  # 0.5 MB that would be 0.5 M lists
    huge = hostile.op_int(2**64)  # a shape dimension no array can have (its product would be a huge integer)
    blob = (pickle.PROTO + b"\x02" + hostile.op_global("numpy.core.multiarray", "_reconstruct")
            + hostile.op_tuple(hostile.op_global("numpy", "ndarray"), hostile.op_tuple(huge), hostile.op_str(b"b"))
            + pickle.REDUCE + pickle.STOP)
    with pytest.raises(Exception, match="non-negative 64-bit integers"):
        loads_plain(blob)
