"""Data loading: round trips through the real on-disk formats, useful errors on bad input, built-ins."""

import gzip
import os
import pickle
import struct

import numpy as np
import pytest
from PIL import Image

from localdiff.data import BUILTIN_DATASETS, ImageDataset, load_dataset
from localdiff.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC, subset_indices
from localdiff.errors import ConfigError, DataError


def as_float(ds: ImageDataset) -> np.ndarray:
    return ds.tensor().numpy()


def expected_float(u8: np.ndarray) -> np.ndarray:
    """The documented uint8 -> [-1, 1] map, x / 127.5 - 1, in float32 arithmetic."""
    return u8.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


# ------------------------------------------------------------------------------------------------
# writers of the real formats
# ------------------------------------------------------------------------------------------------


def write_idx(path, array: np.ndarray, magic: int, gz: bool) -> None:
    """IDX: big-endian magic (0x0000 08 ndim), big-endian uint32 dims, then the uint8 payload."""
    data = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape) + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(data) if gz else data)


class Py2Pickler(pickle._Pickler):
    """Writes str and bytes as Python 2 str (BINSTRING), as the cPickle'd CIFAR-10 batches do."""

    dispatch = pickle._Pickler.dispatch.copy()

    def save_py2_str(self, obj):
        if isinstance(obj, str):
            obj = obj.encode("latin-1")
        n = len(obj)
        self.write(pickle.SHORT_BINSTRING + bytes([n]) + obj if n < 256
                   else pickle.BINSTRING + struct.pack("<i", n) + obj)
        self.memoize(obj)

    dispatch[bytes] = save_py2_str
    dispatch[str] = save_py2_str


def write_cifar_batch(path, data: np.ndarray, labels, py2: bool = True) -> None:
    batch = {b"batch_label": b"a batch", b"labels": list(labels), b"data": data, b"filenames": [b"x.png"] * len(labels)}
    with open(path, "wb") as f:
        if py2:
            Py2Pickler(f, protocol=2).dump(batch)
        else:
            pickle.dump(batch, f)


class Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


# ------------------------------------------------------------------------------------------------
# IDX
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def idx_dir(tmp_path):
    rng = np.random.default_rng(0)
    xtr = rng.integers(0, 256, (7, 5, 4), dtype=np.uint8)
    xtr[0, 0, 0], xtr[0, 0, 1] = 0, 255
    ytr = rng.integers(0, 10, 7).astype(np.uint8)
    xte = rng.integers(0, 256, (3, 5, 4), dtype=np.uint8)
    yte = rng.integers(0, 10, 3).astype(np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte.gz", xtr, IDX_IMAGES_MAGIC, gz=True)
    write_idx(tmp_path / "train-labels-idx1-ubyte.gz", ytr, IDX_LABELS_MAGIC, gz=True)
    write_idx(tmp_path / "t10k-images.idx3-ubyte", xte, IDX_IMAGES_MAGIC, gz=False)  # dotted variant, plain
    write_idx(tmp_path / "t10k-labels.idx1-ubyte", yte, IDX_LABELS_MAGIC, gz=False)
    return tmp_path, (xtr, ytr, xte, yte)


def test_idx_round_trip(idx_dir):
    d, (xtr, ytr, xte, yte) = idx_dir
    tr = load_dataset(d)
    assert tr.raw.dtype == np.uint8 and tr.raw.shape == (7, 1, 5, 4)
    np.testing.assert_array_equal(tr.raw[:, 0], xtr)
    np.testing.assert_array_equal(tr.labels, ytr)
    np.testing.assert_array_equal(as_float(tr)[:, 0], expected_float(xtr))
    assert as_float(tr)[0, 0, 0, 0] == -1.0 and as_float(tr)[0, 0, 0, 1] == 1.0
    te = load_dataset(str(d), split="test")
    np.testing.assert_array_equal(te.raw[:, 0], xte)
    np.testing.assert_array_equal(te.labels, yte)
    al = load_dataset(d, split="all")
    np.testing.assert_array_equal(al.raw[:, 0], np.concatenate([xtr, xte]))
    assert al.meta["format"] == "idx" and al.meta["split"] == "all"


def test_idx_truncated_payload(idx_dir):
    d, (xtr, *_) = idx_dir
    bad = d / "t10k-images.idx3-ubyte"
    bad.write_bytes(bad.read_bytes()[:-5])
    with pytest.raises(DataError) as e:
        load_dataset(d, split="test")
    msg = str(e.value)
    assert "t10k-images.idx3-ubyte" in msg and "60" in msg and "55" in msg and "re-download" in msg


def test_idx_truncated_gzip(idx_dir):
    d, _ = idx_dir
    bad = d / "train-images-idx3-ubyte.gz"
    bad.write_bytes(bad.read_bytes()[:30])
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte\.gz.*(truncated|corrupt)"):
        load_dataset(d)


def test_idx_wrong_magic(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((2, 3, 3), np.uint8), 0x00000D03, gz=False)
    with pytest.raises(DataError, match=r"train-images-idx3-ubyte: IDX magic number 0x00000D03, expected 0x00000803"):
        load_dataset(tmp_path)


def test_idx_label_count_mismatch(tmp_path):
    write_idx(tmp_path / "train-images-idx3-ubyte", np.zeros((4, 3, 3), np.uint8), IDX_IMAGES_MAGIC, gz=False)
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(3, np.uint8), IDX_LABELS_MAGIC, gz=False)
    with pytest.raises(DataError, match=r"4 images but labels of shape \(3,\)"):
        load_dataset(tmp_path)


def test_idx_missing_split_lists_expected_files(idx_dir):
    d, _ = idx_dir
    for p in d.glob("t10k*"):
        p.unlink()
    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte"):
        load_dataset(d, split="test")


# ------------------------------------------------------------------------------------------------
# CIFAR-10 python batches
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def cifar_dir(tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    batches = []
    for name, n, py2 in (("data_batch_1", 3, True), ("data_batch_2", 2, False), ("test_batch", 2, True)):
        x = rng.integers(0, 256, (n, 3072), dtype=np.uint8)
        y = rng.integers(0, 10, n).tolist()
        write_cifar_batch(root / name, x, y, py2=py2)
        batches.append((x, y))
    return tmp_path, root, batches


def test_cifar_round_trip(cifar_dir):
    parent, root, batches = cifar_dir
    tr = load_dataset(root)
    x = np.concatenate([batches[0][0], batches[1][0]])
    assert tr.raw.shape == (5, 3, 32, 32)
    # each row holds the 1024 R values, then G, then B, each row-major over the 32 x 32 image
    np.testing.assert_array_equal(tr.raw[1, 0, 0, :], x[1, :32])
    np.testing.assert_array_equal(tr.raw[1, 1, 2, 5], x[1, 1024 + 2 * 32 + 5])
    np.testing.assert_array_equal(tr.raw[4, 2, 31, 31], x[4, 3071])
    np.testing.assert_array_equal(as_float(tr).reshape(5, -1), expected_float(x))
    np.testing.assert_array_equal(tr.labels, batches[0][1] + batches[1][1])
    te = load_dataset(parent, split="test")  # the archive's parent folder works too
    np.testing.assert_array_equal(te.raw.reshape(2, -1), batches[2][0])
    assert te.meta["files"] == ["test_batch"]


def test_cifar_pickle_payload_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    with open(tmp_path / "data_batch_1", "wb") as f:
        pickle.dump({b"data": Evil(marker), b"labels": [0]}, f, protocol=2)
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path)
    msg = str(e.value)
    assert "data_batch_1" in msg and "system" in msg and "refusing to load it" in msg
    assert not marker.exists()


def test_cifar_wrong_row_length(tmp_path):
    write_cifar_batch(tmp_path / "data_batch_1", np.zeros((2, 3000), np.uint8), [0, 1])
    with pytest.raises(DataError, match=r"data_batch_1.*\[N, 3072\].*\(2, 3000\)"):
        load_dataset(tmp_path)


def test_cifar_label_count_mismatch(tmp_path):
    write_cifar_batch(tmp_path / "test_batch", np.zeros((2, 3072), np.uint8), [0, 1, 2])
    with pytest.raises(DataError, match=r"test_batch: 2 images but labels of shape \(3,\)"):
        load_dataset(tmp_path, split="test")


def test_cifar_truncated_pickle(cifar_dir):
    _, root, _ = cifar_dir
    p = root / "data_batch_2"
    p.write_bytes(p.read_bytes()[:200])
    with pytest.raises(DataError, match=r"data_batch_2: cannot unpickle.*truncated or corrupt"):
        load_dataset(root)


# ------------------------------------------------------------------------------------------------
# image folders
# ------------------------------------------------------------------------------------------------


def save_png(path, a: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(a).save(path)


@pytest.fixture
def afhq_like(tmp_path):
    """root/train/{cat,dog}/*.png and root/test/cat/*.png, RGB 6x6."""
    rng = np.random.default_rng(2)
    imgs = {}
    for rel in ("train/cat/b.png", "train/cat/a.png", "train/dog/c.png", "test/cat/d.png"):
        a = rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)
        save_png(tmp_path / rel, a)
        imgs[rel] = a
    (tmp_path / "train" / "cat" / "notes.txt").write_text("ignored")
    return tmp_path, imgs


def test_image_folder_round_trip(afhq_like):
    root, imgs = afhq_like
    tr = load_dataset(root)
    order = ["train/cat/a.png", "train/cat/b.png", "train/dog/c.png"]  # sorted paths
    want = np.stack([imgs[k].transpose(2, 0, 1) for k in order])
    np.testing.assert_array_equal(tr.raw, want)
    np.testing.assert_array_equal(as_float(tr), expected_float(want))
    np.testing.assert_array_equal(tr.labels, [0, 0, 1])
    assert tr.meta["classes"] == ["cat", "dog"]
    te = load_dataset(root, split="test")
    np.testing.assert_array_equal(te.raw[0], imgs["test/cat/d.png"].transpose(2, 0, 1))
    assert len(load_dataset(root, split="all")) == 4


def test_image_folder_gray_mixed_and_alpha(tmp_path):
    g = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10
    save_png(tmp_path / "gray" / "a.png", g)
    ds = load_dataset(tmp_path / "gray")
    assert ds.shape == (1, 4, 4)
    np.testing.assert_array_equal(ds.raw[0, 0], g)
    rgba = np.random.default_rng(3).integers(0, 256, (4, 4, 4), dtype=np.uint8)
    save_png(tmp_path / "gray" / "b.png", rgba)
    mixed = load_dataset(tmp_path / "gray")
    assert mixed.shape == (3, 4, 4)
    np.testing.assert_array_equal(mixed.raw[0], np.stack([g, g, g]))  # gray repeated
    np.testing.assert_array_equal(mixed.raw[1], rgba[..., :3].transpose(2, 0, 1))  # alpha dropped


def test_image_folder_sizes_crop_and_split_errors(tmp_path):
    a = np.random.default_rng(4).integers(0, 256, (4, 6), dtype=np.uint8)  # 4 rows, 6 columns
    save_png(tmp_path / "a.png", a)
    save_png(tmp_path / "b.png", np.zeros((8, 8), np.uint8))
    with pytest.raises(DataError, match=r"different sizes.*resolution="):
        load_dataset(tmp_path)
    ds = load_dataset(tmp_path, resolution=4)
    np.testing.assert_array_equal(ds.raw[0, 0], a[:, 1:5])  # center crop, no resampling needed
    assert ds.meta["resolution"] == 4 and "center-crop" in ds.meta["resize"]
    with pytest.raises(DataError, match=r"2 image\(s\) leave none for split 'test'.*every 10th image"):
        load_dataset(tmp_path, split="test", resolution=4)  # too few images to hold any out


def test_sources_without_a_split_hold_out_every_tenth_image(tmp_path):
    """A plain folder and an .npz: disjoint, deterministic train/test, recorded in meta; 'all' is everything."""
    x = np.random.default_rng(0).integers(0, 256, (25, 4, 4)).astype(np.uint8)
    x[:, 0, 0] = np.arange(25)  # image k is identifiable by its first pixel
    np.savez(tmp_path / "x.npz", images=x)
    folder = tmp_path / "imgs"
    folder.mkdir()
    for k in range(25):
        save_png(folder / f"{k:02d}.png", x[k])
    for src in (tmp_path / "x.npz", folder):
        train, test, every = (load_dataset(src, split=s) for s in ("train", "test", "all"))
        assert [int(v) for v in test.raw[:, 0, 0, 0]] == [x[k, 0, 0] for k in (9, 19)]
        assert len(train) == 23 and len(every) == 25
        assert not set(train.raw[:, 0, 0, 0].tolist()) & set(test.raw[:, 0, 0, 0].tolist())
        assert test.meta["held_out_share"] == pytest.approx(2 / 25) and "every 10th" in test.meta["split_rule"]
        assert train.fingerprint != test.fingerprint != every.fingerprint


def test_image_folder_corrupt_files(tmp_path):
    save_png(tmp_path / "ok.png", np.zeros((4, 4), np.uint8))
    (tmp_path / "bad.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match=r"bad\.png: cannot read this image"):
        load_dataset(tmp_path)
    (tmp_path / "bad.png").unlink()
    save_png(tmp_path / "cut.png", np.random.default_rng(5).integers(0, 256, (64, 64), dtype=np.uint8))
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:-200])
    with pytest.raises(DataError, match=r"cut\.png: cannot read this image.*re-download"):
        load_dataset(tmp_path, resolution=4)


def test_image_folder_subset_matches_dataset_subset(afhq_like):
    root, _ = afhq_like
    full = load_dataset(root, split="all")
    sub = load_dataset(root, split="all", subset=2, seed=7)
    np.testing.assert_array_equal(sub.raw, full.subset(2, seed=7).raw)
    ids = ImageDataset(np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1), "ids")
    np.testing.assert_array_equal(subset_indices(10, 4, 3, "ids"), ids.subset(4, seed=3).raw.ravel())


# ------------------------------------------------------------------------------------------------
# .npy / .npz
# ------------------------------------------------------------------------------------------------


def test_npy_uint8_and_npz_float_round_trip(tmp_path):
    x = np.random.default_rng(6).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    np.save(tmp_path / "x.npy", x)
    ds = load_dataset(tmp_path / "x.npy")
    assert ds.raw.dtype == np.uint8 and ds.shape == (1, 3, 4)
    np.testing.assert_array_equal(as_float(ds)[:, 0], expected_float(x))

    k = np.random.default_rng(7).integers(0, 257, (4, 3, 2, 2))
    f = (k / 256.0).astype(np.float32)  # dyadic values: 2 f - 1 is exact
    np.savez(tmp_path / "f.npz", images=f, labels=np.arange(4))
    fs = load_dataset(tmp_path / "f.npz")
    assert fs.raw.dtype == np.float32 and fs.shape == (3, 2, 2)
    np.testing.assert_array_equal(as_float(fs), (k / 128.0 - 1.0).astype(np.float32))
    np.testing.assert_array_equal(fs.labels, np.arange(4))

    nhwc = np.random.default_rng(8).integers(0, 256, (2, 5, 5, 3), dtype=np.uint8)
    np.savez(tmp_path / "h.npz", nhwc)  # the only array, channels last
    np.testing.assert_array_equal(load_dataset(tmp_path / "h.npz").raw, nhwc.transpose(0, 3, 1, 2))


@pytest.mark.parametrize("case,pattern", [
    ("nan", r"bad\.npy: 1 NaN or Inf"),
    ("range", r"bad\.npy: float images must lie in the range \[0, 1\], found \[-0\.5, 1\]"),
    ("object", r"bad\.npy: holds an object array.*refusing"),
    ("shape", r"bad\.npy: images of shape \(2, 5, 5, 5\)"),
])
def test_npy_bad_inputs(tmp_path, case, pattern):
    x = np.linspace(0, 1, 50, dtype=np.float32).reshape(2, 5, 5)
    if case == "nan":
        x[1, 2, 3] = np.nan
    elif case == "range":
        x[0, 0, 0] = -0.5
    elif case == "object":
        x = np.array([[1, "a"]], dtype=object)
    elif case == "shape":
        x = np.zeros((2, 5, 5, 5), np.uint8)
    np.save(tmp_path / "bad.npy", x, allow_pickle=True)
    with pytest.raises(DataError, match=pattern):
        load_dataset(tmp_path / "bad.npy")


def test_npz_label_count_mismatch(tmp_path):
    np.savez(tmp_path / "d.npz", x=np.zeros((3, 4, 4), np.uint8), y=np.zeros(2, np.int64))
    with pytest.raises(DataError, match=r"d\.npz: 3 images but labels of shape \(2,\)"):
        load_dataset(tmp_path / "d.npz")


def test_missing_path_explains_names_and_layouts(tmp_path):
    with pytest.raises(DataError) as e:
        load_dataset(tmp_path / "nowhere")
    msg = str(e.value)
    assert "nowhere" in msg and all(name in msg for name in BUILTIN_DATASETS)
    assert "train-images-idx3-ubyte" in msg and "data_batch_1" in msg and "cifar-10-python.tar.gz" in msg
    assert ".npz" in msg and ".png" in msg


def test_bad_options():
    with pytest.raises(ConfigError, match="split"):
        load_dataset("digits", split="valid")
    with pytest.raises(ConfigError, match="num"):
        load_dataset("digits", num=3)
    with pytest.raises(ConfigError, match="channels"):
        load_dataset("digits", channels=2)


# ------------------------------------------------------------------------------------------------
# built-in sets
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist"), load_dataset("mnist", split="test")


def _check_full_range(ds):
    lo, hi = int(ds.raw.min()), int(ds.raw.max())
    assert (lo, hi) == (0, 255)
    x = ds.tensor()
    assert float(x.min()) == -1.0 and float(x.max()) == 1.0


def test_mnist(mnist):
    tr, te = mnist
    assert len(tr) == 60000 and len(te) == 10000 and tr.shape == te.shape == (1, 28, 28)
    assert tr.raw.dtype == np.uint8
    _check_full_range(te)
    assert int(tr.raw.min()) == 0 and int(tr.raw.max()) == 255
    # the canonical MNIST order: first training digits 5 0 4 1 9, first test digits 7 2 1 0 4
    np.testing.assert_array_equal(tr.labels[:5], [5, 0, 4, 1, 9])
    np.testing.assert_array_equal(te.labels[:5], [7, 2, 1, 0, 4])
    assert np.bincount(tr.labels).tolist()[:2] == [5923, 6742]
    # a "7" has ink in its top bar: the image is not transposed/garbled
    assert te.raw[0, 0, 5:10].mean() > te.raw[0, 0, 20:25, :5].mean()


def test_fashion_mnist():
    tr, te = load_dataset("fashion-mnist"), load_dataset("fashion-mnist", split="test")
    assert len(tr) == 60000 and len(te) == 10000 and tr.shape == (1, 28, 28)
    _check_full_range(te)
    np.testing.assert_array_equal(tr.labels[:5], [9, 0, 0, 3, 0])
    assert np.bincount(tr.labels).tolist() == [6000] * 10


def test_fashion_mnist_missing_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("LOCALDIFF_FASHION_MNIST_DIR", str(tmp_path / "none"))
    with pytest.raises(DataError, match=r"apt-get install dataset-fashion-mnist"):
        load_dataset("fashion-mnist")


def test_digits_and_lfw():
    from sklearn.datasets import load_digits

    tr, te, al = (load_dataset("digits", split=s) for s in ("train", "test", "all"))
    assert (len(tr), len(te), len(al)) == (1437, 360, 1797) and tr.shape == (1, 8, 8)
    ref = load_digits().images
    np.testing.assert_array_equal(te.raw[1, 0], np.rint(ref[5] * 255 / 16))  # test = index % 5 == 0
    np.testing.assert_array_equal(tr.raw[0, 0], np.rint(ref[1] * 255 / 16))
    _check_full_range(al)
    faces = {s: load_dataset("lfw-faces", split=s) for s in ("train", "test", "all")}
    assert [len(faces[s]) for s in ("train", "test", "all")] == [80, 20, 100] and faces["all"].shape == (1, 25, 25)
    np.testing.assert_array_equal(faces["all"].raw[80:], faces["test"].raw)


def test_natural_patches_determinism_and_held_out():
    a = load_dataset("natural-patches", num=50, seed=0)
    b = load_dataset("natural-patches", num=50, seed=0)
    c = load_dataset("natural-patches", num=50, seed=1)
    t = load_dataset("natural-patches", split="test", num=50, seed=0)
    assert a.raw.shape == (50, 3, 32, 32) and a.raw.dtype == np.uint8
    assert a.raw.tobytes() == b.raw.tobytes() and a.fingerprint == b.fingerprint
    assert a.raw.tobytes() != c.raw.tobytes() and a.fingerprint != c.fingerprint
    assert not (a.raw[:, None] == t.raw[None]).all(axis=(2, 3, 4)).any()  # no test crop equals a train crop
    assert len(load_dataset("natural-patches", split="test")) == 2000
    s = load_dataset("natural-patches", num=10, resolution=16)
    assert s.shape == (3, 16, 16) and s.meta["crop_size"] == 16 and s.meta["resize"] is None
    all_ = load_dataset("natural-patches", split="all", num=50)
    np.testing.assert_array_equal(all_.raw, np.concatenate([a.raw, t.raw]))


def test_resize_channels_subset(mnist):
    tr, _ = mnist
    sub = load_dataset("mnist", subset=100, seed=3)
    np.testing.assert_array_equal(sub.raw, tr.subset(100, seed=3).raw)
    np.testing.assert_array_equal(sub.labels, tr.subset(100, seed=3).labels)
    # 28 -> 14 with an area filter is the 2 x 2 block mean, rounded once
    half = load_dataset("mnist", subset=100, seed=3, resolution=14)
    assert half.shape == (1, 14, 14) and half.raw.dtype == np.uint8
    block = sub.raw.astype(np.float64).reshape(100, 1, 14, 2, 14, 2).mean(axis=(3, 5))
    np.testing.assert_array_equal(half.raw, np.rint(block))
    up = load_dataset("mnist", subset=10, resolution=32)
    assert up.shape == (1, 32, 32) and up.raw.dtype == np.uint8 and up.meta["native_shape"] == [1, 28, 28]
    rgb = load_dataset("mnist", subset=10, channels=3)
    assert rgb.shape == (3, 28, 28)
    np.testing.assert_array_equal(rgb.raw, np.repeat(load_dataset("mnist", subset=10).raw, 3, axis=1))
    col = load_dataset("natural-patches", num=20)
    gray = load_dataset("natural-patches", num=20, channels=1)
    r, g, b = col.raw.astype(np.float64).transpose(1, 0, 2, 3)
    np.testing.assert_array_equal(gray.raw[:, 0], np.rint(0.299 * r + 0.587 * g + 0.114 * b))


def test_fingerprint_follows_preprocessing():
    base = load_dataset("digits", subset=50)
    variants = [
        load_dataset("digits", subset=50, seed=1),
        load_dataset("digits", subset=60),
        load_dataset("digits", subset=50, resolution=16),
        load_dataset("digits", subset=50, channels=3),
        load_dataset("digits", subset=50, split="test"),
        load_dataset("digits"),
    ]
    prints = {base.fingerprint} | {v.fingerprint for v in variants}
    assert len(prints) == len(variants) + 1
    assert load_dataset("digits", subset=50).fingerprint == base.fingerprint
    assert base.meta["subset"] == 50 and base.meta["seed"] == 0 and base.meta["source"] == "builtin:digits"
    assert load_dataset("digits").meta["seed"] is None  # the seed changed nothing here


def test_an_array_in_memory_splits_like_a_file_holding_it(tmp_path):
    """load_dataset(array, split=...) follows the every-10th rule of a .npy file, so held-out images of an array
    are never its training images; a model given the array itself takes every image."""
    from localdiff import make_denoiser

    x = np.random.default_rng(3).integers(0, 256, (53, 1, 6, 6)).astype(np.uint8)
    np.save(tmp_path / "x.npy", x)
    for split in ("train", "test", "all"):
        mem, file = load_dataset(x, split=split), load_dataset(tmp_path / "x.npy", split=split)
        assert np.array_equal(mem.raw, file.raw) and mem.meta["split_rule"] == file.meta["split_rule"] \
            if split != "all" else np.array_equal(mem.raw, x)
    train, test = load_dataset(x), load_dataset(x, split="test")
    assert len(train) + len(test) == 53 and len(test) == 5
    assert not ({r.tobytes() for r in train.raw} & {r.tobytes() for r in test.raw})
    assert len(make_denoiser("optimal", x, device="cpu").train_set) == 53
    with pytest.raises(ConfigError, match="no held-out part"):
        load_dataset(x[:9], split="test")
