"""Stores for data larger than memory (data/store.py, `localdiff pack`): every reader's data round-trips
exactly, damage is a DataError naming the block, the fingerprint costs one header read, a set larger
than the process's address-space limit is denoised by streaming, and torchrun ranks read only their
own blocks.

Run as a script (``torchrun ... tests/test_store.py shards STORE OUT``) it is the torchrun worker of
``test_torchrun_ranks_read_only_their_blocks``.
"""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


if __name__ != "__main__":
    from test_data import save_png, write_cifar_batch, write_idx

    from localdiff import make_denoiser
    from localdiff.cli import main
    from localdiff.data import load_dataset
    from localdiff.data.formats import IDX_IMAGES_MAGIC, IDX_LABELS_MAGIC
    from localdiff.data.shards import block_shard_bounds, shard_bounds
    from localdiff.data.store import DATA_START, PREAMBLE, StoreFile
    from localdiff.data.store_dataset import StoreDataset
    from localdiff.data.store_pack import pack
    from localdiff.data.store_write import StoreWriter, default_block_images
    from localdiff.diffusion import DEFAULT_SCHEDULE
    from localdiff.errors import ConfigError, DataError
    from localdiff.stats import data_spectrum


# ------------------------------------------------------------------------------------------------
# sources in every format a reader accepts
# ------------------------------------------------------------------------------------------------

def write_imagenet_batch(path, x: np.ndarray, labels, protocol: int = pickle.DEFAULT_PROTOCOL, mean=True) -> None:
    """The Downsampled ImageNet layout: a pickled dict, 'data' uint8 [N, 3 S S] (R, G, B planes), 'labels'
    1-based class numbers (a list of ints), 'mean' float64 [3 S S] in the train batches."""
    d = {"data": x.reshape(len(x), -1), "labels": [int(v) for v in labels]}
    if mean:
        d["mean"] = x.reshape(len(x), -1).mean(axis=0)
    with open(path, "wb") as f:
        pickle.dump(d, f, protocol=protocol)


def make_source(kind: str, root: Path) -> Path:
    rng = np.random.default_rng(abs(hash(kind)) % 1000)
    if kind == "idx":
        d = root / "idx"
        d.mkdir()
        write_idx(d / "train-images-idx3-ubyte.gz", rng.integers(0, 256, (23, 5, 4), dtype=np.uint8),
                  IDX_IMAGES_MAGIC, gz=True)
        write_idx(d / "train-labels-idx1-ubyte.gz", rng.integers(0, 10, 23), IDX_LABELS_MAGIC, gz=True)
        write_idx(d / "t10k-images-idx3-ubyte", rng.integers(0, 256, (6, 5, 4), dtype=np.uint8), IDX_IMAGES_MAGIC,
                  gz=False)
        write_idx(d / "t10k-labels-idx1-ubyte", rng.integers(0, 10, 6), IDX_LABELS_MAGIC, gz=False)
        return d
    if kind == "cifar":
        d = root / "cifar-10-batches-py"
        d.mkdir()
        for name, n in (("data_batch_1", 9), ("data_batch_2", 8), ("test_batch", 5)):
            write_cifar_batch(d / name, rng.integers(0, 256, (n, 3072), dtype=np.uint8), rng.integers(0, 10, n).tolist())
        return d
    if kind == "imagenet":
        d = root / "imagenet64"
        d.mkdir()
        for name, n, proto in (("train_data_batch_1", 11, 4), ("train_data_batch_2", 6, 2), ("val_data", 4, 5)):
            x = rng.integers(0, 256, (n, 3, 8, 8), dtype=np.uint8)
            write_imagenet_batch(d / name, x, rng.integers(1, 1001, n), protocol=proto, mean=name != "val_data")
        return d
    if kind == "folder":
        d = root / "faces"
        for split, n in (("train", 9), ("test", 3)):
            for i in range(n):
                save_png(d / split / ("cat" if i % 3 else "dog") / f"{i:02d}.png",
                         rng.integers(0, 256, (6, 7, 3), dtype=np.uint8))
        return d
    if kind == "npy":  # [N, H, W, C] uint8, streamed
        p = root / "hwc.npy"
        np.save(p, rng.integers(0, 256, (37, 6, 6, 3), dtype=np.uint8))
        return p
    if kind == "npy-float":  # floats in [0, 1]: the store keeps float32 on [-1, 1]
        p = root / "float.npy"
        np.save(p, rng.random((21, 1, 5, 5)))
        return p
    if kind == "npz":
        p = root / "labelled.npz"
        np.savez(p, images=rng.integers(0, 256, (25, 1, 4, 4), dtype=np.uint8), labels=rng.integers(0, 7, 25))
        return p
    raise ValueError(kind)


SOURCES = ["idx", "cifar", "imagenet", "folder", "npy", "npy-float", "npz"]


def assert_same(store, mem) -> None:
    """The store dataset holds exactly the in-memory dataset's images, labels and shape."""
    assert isinstance(store, StoreDataset) and len(store) == len(mem) and store.shape == mem.shape
    np.testing.assert_array_equal(np.asarray(store.raw), mem.raw)
    assert store.raw.dtype == mem.raw.dtype
    if mem.labels is None:
        assert store.labels is None
    else:
        np.testing.assert_array_equal(store.labels, mem.labels)
    for size in (1, 4, 1000):
        assert torch.equal(torch.cat(list(store.chunks(size, flat=True))), torch.cat(list(mem.chunks(size, flat=True))))
    assert torch.equal(store.tensor(dtype=torch.float64), mem.tensor(dtype=torch.float64))


@pytest.mark.parametrize("kind", SOURCES)
def test_every_reader_round_trips_exactly(tmp_path, kind):
    src = make_source(kind, tmp_path)
    out = tmp_path / "out.ldstore"
    result = pack(src, out, block_images=4, progress=False)
    assert result.streamed == (kind in ("npy", "npy-float", "imagenet"))
    for split in ("train", "test", "all"):
        mem, store = load_dataset(src, split=split), load_dataset(out, split=split)
        assert_same(store, mem)
        packed = store.meta["packed"]
        assert packed == (mem.meta if split != "all" else {
            "train": load_dataset(src, split="train").meta, "test": load_dataset(src, split="test").meta})
        assert store.meta["split"] == split and store.describe()["num_images"] == len(mem)
        sub_s, sub_m = store.subset(len(mem) - 1, seed=2), mem.subset(len(mem) - 1, seed=2)
        np.testing.assert_array_equal(np.asarray(sub_s.raw), sub_m.raw)
        assert sub_s.fingerprint != store.fingerprint
    if kind == "imagenet":  # the file's 1-based class numbers, 0-based
        raw = pickle.loads((src / "val_data").read_bytes())
        np.testing.assert_array_equal(load_dataset(out, split="test").labels, np.array(raw["labels"]) - 1)
    assert len({load_dataset(out, split=s).fingerprint for s in ("train", "test", "all")}) == 3


@pytest.mark.parametrize("kind", ["npy", "cifar"])  # streamed, and read whole by load_dataset
def test_resolution_and_channels_are_applied_as_load_dataset_applies_them(tmp_path, kind):
    src = make_source(kind, tmp_path)
    pack(src, tmp_path / "s.ldstore", resolution=4, channels=1, block_images=3, progress=False)
    for split in ("train", "test"):
        mem = load_dataset(src, split=split, resolution=4, channels=1)
        store = load_dataset(tmp_path / "s.ldstore", split=split)
        assert_same(store, mem)
        assert store.meta["packed"] == mem.meta and mem.meta["resize"] and mem.meta["channel_conversion"]
        # a store does not resize when read: asking for what it holds is fine, anything else is refused
        assert load_dataset(tmp_path / "s.ldstore", split=split, resolution=4, channels=1).fingerprint == store.fingerprint
    with pytest.raises(ConfigError, match=r"--resolution 8"):
        load_dataset(tmp_path / "s.ldstore", resolution=8)
    with pytest.raises(ConfigError, match=r"--channels 3"):
        load_dataset(tmp_path / "s.ldstore", channels=3)


def test_a_large_npy_streams_in_pieces(tmp_path, monkeypatch):
    """A .npy is read a piece at a time (here 1 KiB: 10 pieces), the held-out rows skipped per piece."""
    import localdiff.data.store_pack as sp

    src = tmp_path / "big.npy"
    np.save(src, np.random.default_rng(5).integers(0, 256, (160, 8, 8), dtype=np.uint8))
    monkeypatch.setattr(sp, "PIECE_BYTES", 1024)
    calls = []
    real = sp.image_array
    monkeypatch.setattr(sp, "image_array", lambda x, s: calls.append(len(x)) or real(x, s))
    pack(src, tmp_path / "s.ldstore", block_images=5, progress=False)
    assert len(calls) == 20 and sum(calls) == 160  # 10 pieces of 16 rows per split, each keeping its own rows
    for split in ("train", "test"):
        assert_same(load_dataset(tmp_path / "s.ldstore", split=split), load_dataset(src, split=split))


def test_indexing_rows_like_an_array(tmp_path):
    src = make_source("npy", tmp_path)
    pack(src, tmp_path / "s.ldstore", block_images=5, progress=False)
    store, mem = load_dataset(tmp_path / "s.ldstore"), load_dataset(src)
    raw, ref = store.raw, mem.raw
    for key in (0, -1, 17, slice(None), slice(3, 29), slice(2, 30, 7), slice(30, 2, -3), [4, 4, 0, 31, 9],
                np.array([[1, 2], [30, 0]]), (5, 1), (slice(1, 9), 2, slice(None), 0), ref[:, 0, 0, 0] > 128, ...):
        np.testing.assert_array_equal(raw[key], ref[key], err_msg=str(key))
    for bad in (len(ref), -len(ref) - 1, [0, 99]):
        with pytest.raises(IndexError):
            raw[bad]
    torch.testing.assert_close(store[3], mem[3], rtol=0, atol=0)
    view = store.select([30, 2, 2, 17], note="picked")
    np.testing.assert_array_equal(np.asarray(view.raw), ref[[30, 2, 2, 17]])
    assert view.meta["selections"] == ["picked"]


# ------------------------------------------------------------------------------------------------
# damage, truncation, wrong files, existing outputs
# ------------------------------------------------------------------------------------------------

@pytest.fixture
def packed(tmp_path):
    src = make_source("cifar", tmp_path)
    out = tmp_path / "c.ldstore"
    pack(src, out, block_images=4, progress=False)
    return src, out


def test_a_damaged_block_is_a_data_error_naming_it(packed):
    src, out = packed
    header = StoreFile(out).header
    off = header.splits["train"].offset + 2 * header.block_bytes + 1234  # inside train block 2 (images 8..11)
    blob = bytearray(out.read_bytes())
    blob[off] ^= 0x01
    out.write_bytes(bytes(blob))
    store = load_dataset(out)  # the header is intact: opening works, the fingerprint is the header's
    assert store.fingerprint == load_dataset(out).fingerprint
    np.testing.assert_array_equal(np.asarray(store.raw[:8]), load_dataset(src).raw[:8])  # blocks 0 and 1 read fine
    for read in (lambda: store.raw[9], lambda: store.tensor(), lambda: list(store.chunks(3)),
                 lambda: make_denoiser("optimal", store)(torch.zeros(1, 3, 32, 32), 500)):
        with pytest.raises(DataError) as e:
            read()
        msg = str(e.value)
        assert str(out) in msg and "train block 2 (images 8..11" in msg and "fails its checksum" in msg
        assert "localdiff pack" in msg


@pytest.mark.parametrize("damage, pattern", [
    ("truncate-end", r"truncated or damaged"),
    ("truncate-middle", r"truncated or damaged"),
    ("header-byte", r"header fails its checksum"),
    ("labels-byte", r"train labels fail their checksum"),
    ("magic", r"unsupported file type|not a localdiff store"),
    ("version", r"version 7 is not supported"),
    ("forged-count", r"train.*block digests"),
    ("forged-overlap", r"overlap another region"),
])
def test_truncated_or_wrong_files_are_data_errors(packed, damage, pattern):
    _, out = packed
    blob = bytearray(out.read_bytes())
    _, version, _, hoff, hlen, _ = PREAMBLE.unpack(bytes(blob[:PREAMBLE.size]))
    header = json.loads(bytes(blob[hoff:hoff + hlen]))
    if damage == "truncate-end":
        blob = blob[:-10]
    elif damage == "truncate-middle":
        blob = blob[:DATA_START + 5000]
    elif damage == "header-byte":
        blob[hoff + 20] ^= 0x20
    elif damage == "labels-byte":
        blob[header["splits"]["train"]["labels"]["offset"] + 3] ^= 0x01
    elif damage == "magic":
        blob[1] ^= 0xFF
    elif damage == "version":
        blob[8:12] = (7).to_bytes(4, "little")
    else:  # a header rewritten with a valid checksum but impossible contents
        import xxhash

        if damage == "forged-count":
            header["splits"]["train"]["count"] += 5
        else:
            header["splits"]["test"]["offset"] = header["splits"]["train"]["offset"] + 4096
        new = json.dumps(header).encode()
        blob = blob[:hoff] + new
        blob[:PREAMBLE.size] = PREAMBLE.pack(bytes(blob[:8]), version, 0, hoff, len(new), xxhash.xxh3_128_digest(new))
    out.write_bytes(bytes(blob))
    with pytest.raises(DataError, match=pattern):
        load_dataset(out)
    if damage != "labels-byte":  # the labels are read by load_dataset, not by opening the file
        with pytest.raises(DataError, match=pattern.replace("unsupported file type|", "")):
            StoreFile(out)


def test_an_existing_out_is_refused_and_failures_leave_nothing(tmp_path, capsys):
    src = make_source("npy", tmp_path)
    out = tmp_path / "taken.ldstore"
    out.write_text("mine")
    with pytest.raises(ConfigError, match=r"taken.ldstore exists"):
        pack(src, out, progress=False)
    assert out.read_text() == "mine"
    (tmp_path / "dir.ldstore").mkdir()
    assert main(["pack", str(src), str(tmp_path / "dir.ldstore"), "--no-progress"]) == 2
    assert "exists; a store is never written over anything" in capsys.readouterr().err
    # a source that fails half-way (an integer image of 300 in the third piece): no store, no temporary file
    bad = tmp_path / "bad.npy"
    x = np.zeros((50, 4, 4), np.int16)
    x[45, 0, 0] = 300
    np.save(bad, x)
    import localdiff.data.store_pack as sp

    sp.PIECE_BYTES, old = 640, sp.PIECE_BYTES
    try:
        with pytest.raises(DataError, match=r"0..255"):
            pack(bad, tmp_path / "new.ldstore", block_images=2, progress=False)
    finally:
        sp.PIECE_BYTES = old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.npy", "dir.ldstore", "hwc.npy", "taken.ldstore"]


def test_the_cli_writes_with_the_umask_and_the_store_is_deterministic(tmp_path, capsys):
    src = make_source("npz", tmp_path)
    old = os.umask(0o027)
    try:
        assert main(["pack", str(src), str(tmp_path / "a.ldstore"), "--block-images", "6", "--no-progress"]) == 0
    finally:
        os.umask(old)
    assert "train 23 images, test 2 images" in capsys.readouterr().out
    assert (tmp_path / "a.ldstore").stat().st_mode & 0o777 == 0o640
    assert main(["pack", str(src), str(tmp_path / "b.ldstore"), "--block-images", "6", "--no-progress"]) == 0
    assert (tmp_path / "a.ldstore").read_bytes() == (tmp_path / "b.ldstore").read_bytes()
    assert main(["pack", str(src), str(tmp_path / "c.ldstore"), "--split", "test", "--no-progress"]) == 0
    with pytest.raises(DataError, match=r"holds the split\(s\) test, not 'train'.*--split train"):
        load_dataset(tmp_path / "c.ldstore")
    with pytest.raises(DataError, match=r"not 'all'"):
        load_dataset(tmp_path / "c.ldstore", split="all")


# ------------------------------------------------------------------------------------------------
# the fingerprint: from the header, never the bytes; changes with any image
# ------------------------------------------------------------------------------------------------

def test_fingerprint_reads_only_the_header_and_changes_with_any_pixel(tmp_path):
    x = np.random.default_rng(3).integers(0, 256, (40, 1, 6, 6), dtype=np.uint8)
    np.savez(tmp_path / "a.npz", images=x)
    x[33, 0, 5, 5] ^= 1
    np.savez(tmp_path / "b.npz", images=x)
    pack(tmp_path / "a.npz", tmp_path / "a.ldstore", block_images=8, progress=False)
    pack(tmp_path / "b.npz", tmp_path / "b.ldstore", block_images=8, progress=False)
    a = load_dataset(tmp_path / "a.ldstore")
    fp = a.fingerprint
    assert a.read_stats.bytes == StoreFile(tmp_path / "a.ldstore").header_bytes and not a.read_stats.blocks
    assert load_dataset(tmp_path / "b.ldstore").fingerprint != fp
    os.rename(tmp_path / "a.ldstore", tmp_path / "moved.ldstore")  # the path is not part of it
    assert load_dataset(tmp_path / "moved.ldstore").fingerprint == fp
    assert load_dataset(tmp_path / "moved.ldstore", subset=10).fingerprint != fp


# ------------------------------------------------------------------------------------------------
# models and statistics stream from the store
# ------------------------------------------------------------------------------------------------

def test_models_and_statistics_equal_the_in_memory_set(tmp_path):
    src = make_source("npy", tmp_path)
    pack(src, tmp_path / "s.ldstore", block_images=5, progress=False)
    store, mem = load_dataset(tmp_path / "s.ldstore"), load_dataset(src)
    s_spec, m_spec = data_spectrum(store, cache=False, progress=False), data_spectrum(mem, cache=False, progress=False)
    torch.testing.assert_close(s_spec.mean, m_spec.mean, rtol=0, atol=1e-15)
    torch.testing.assert_close(s_spec.covariance(), m_spec.covariance(), rtol=0, atol=1e-12)
    x = torch.randn(3, *mem.shape, generator=torch.Generator().manual_seed(0))
    for name, opts in (("optimal", {"chunk": 7}), ("nearest", {}), ("wiener", {"cache": False}),
                       ("masked", {"cache": False})):
        for t in (900, 100):
            a, b = make_denoiser(name, store, **opts)(x, t), make_denoiser(name, mem, **opts)(x, t)
            torch.testing.assert_close(a, b, rtol=0, atol=1e-12, msg=f"{name} t={t}")


def test_the_cli_samples_from_a_store_as_from_its_source(tmp_path, tmp_cache):
    src = make_source("npy", tmp_path)
    pack(src, tmp_path / "s.ldstore", block_images=5, progress=False)
    for data, out in ((src, "plain"), (tmp_path / "s.ldstore", "store")):
        assert main(["sample", "--data", str(data), "--model", "optimal", "--num", "3", "--steps", "4",
                     "--out", str(tmp_path / out)]) == 0
    np.testing.assert_array_equal(np.load(tmp_path / "store" / "samples.npy"), np.load(tmp_path / "plain" / "samples.npy"))
    record = json.loads((tmp_path / "store" / "run.json").read_text())["dataset"]
    assert record["storage"].startswith("uint8 store") and record["packed"]["source"] == str(src)


def test_a_sequential_pass_reads_every_block_once(tmp_path):
    src = make_source("npy", tmp_path)
    pack(src, tmp_path / "s.ldstore", block_images=5, progress=False)
    store = load_dataset(tmp_path / "s.ldstore")
    for chunk in (3, 5, 7, 40):  # chunks that cut blocks: the thread's block buffer serves the second part
        before = dict(store.read_stats.blocks)
        list(store.chunks(chunk))
        reads = {k: v - before.get(k, 0) for k, v in store.read_stats.blocks.items() if "block" in k}
        assert sorted(reads.values()) == [1] * 7, (chunk, reads)  # 34 train images in 7 blocks
        store.raw.file.forget()


CHILD = textwrap.dedent("""
    import json, os, resource, sys
    import numpy as np, torch
    from localdiff import make_denoiser
    from localdiff.data import load_dataset
    torch.set_num_threads(1)
    x = torch.from_numpy(np.load(sys.argv[2])).double()
    make_denoiser("optimal", load_dataset(sys.argv[1], subset=3), chunk=64)(x[:1], 900)  # warm every code path
    status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
    size = int(status["VmSize"].split()[0]) * 1024
    cap = size + int(sys.argv[3])
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    store = load_dataset(sys.argv[1])
    try:
        np.asarray(store.raw)
        whole = "loaded"
    except MemoryError:
        whole = "MemoryError"
    den = make_denoiser("optimal", store, chunk=1024)
    out = {t: den(x, t).numpy().tolist() for t in (900, 300)}
    print(json.dumps({"cap": cap, "whole": whole, "out": out, "store_bytes": store.raw.nbytes,
                      "resident": den.train_set.resident}))
""")


@pytest.mark.slow
def test_a_set_larger_than_the_address_space_limit_is_denoised_by_streaming(tmp_path):
    """640 MiB of images (218,112 x 3 x 32 x 32) in a child whose address space may grow only 160 MiB past what
    torch and localdiff take at start-up: holding the set fails there (MemoryError), and `optimal` streams it
    and equals a brute-force softmax over every image, computed here in float64."""
    n, k, headroom = 3 * 32 * 32, 2048, 160 << 20
    rng = np.random.default_rng(100)
    images = [rng.integers(0, 256, (k, 3, 32, 32), dtype=np.uint8) for _ in range((640 << 20) // (k * n))]
    store = tmp_path / "big.ldstore"
    with StoreWriter(store, shape=(3, 32, 32), block_images=4096) as w:
        w.begin_split("train")
        for block in images:
            w.write(block)
        w.end_split({"source": "generated"})
        w.commit()
    x = np.random.default_rng(0).standard_normal((2, 3, 32, 32)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    # glibc raises its mmap threshold after each large free, and then serves the chunk temporaries from a heap
    # it keeps (about 175 MB more address space here); a fixed threshold returns them to the system at once
    env = dict(os.environ, PYTHONPATH=str(ROOT / "src"), OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="2",
               MALLOC_MMAP_THRESHOLD_="131072", OMP_WAIT_POLICY="PASSIVE")
    done = subprocess.run([sys.executable, "-c", CHILD, str(store), str(tmp_path / "x.npy"), str(headroom)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    got = json.loads(done.stdout.strip().splitlines()[-1])
    assert got["whole"] == "MemoryError" and not got["resident"]
    assert got["store_bytes"] == len(images) * k * n > 3 * headroom
    # the reference: every logit at once (one softmax over all K images), then the weighted sum
    xs = torch.from_numpy(x).double().reshape(2, n)
    as_float = [lambda i=i: torch.from_numpy(images[i].reshape(k, n)).double() / 127.5 - 1 for i in range(len(images))]
    dots, norms = [], []
    for y in (f() for f in as_float):
        dots.append(xs @ y.T)
        norms.append((y * y).sum(1))
    dots, norms = torch.cat(dots, dim=1), torch.cat(norms)  # [2, K], [K]
    weights = {}
    for t in got["out"]:
        a, b2 = DEFAULT_SCHEDULE.a(int(t)), DEFAULT_SCHEDULE.b2(int(t))
        weights[t] = torch.softmax((a * dots - 0.5 * a * a * norms) / b2, dim=1)
    refs = {t: torch.zeros(2, n, dtype=torch.float64) for t in weights}
    for i, y in enumerate(f() for f in as_float):
        for t, w in weights.items():
            refs[t] += w[:, i * k:(i + 1) * k] @ y
    assert weights["900"].max() < 0.01 and weights["300"].max() > 0.5  # spread over many images, and not
    for t, out in got["out"].items():
        torch.testing.assert_close(torch.tensor(out, dtype=torch.float64).reshape(2, n), refs[t], rtol=0, atol=1e-10)


# ------------------------------------------------------------------------------------------------
# torchrun: each rank reads only its blocks
# ------------------------------------------------------------------------------------------------

def test_block_shard_bounds():
    starts = [0, 4, 8, 12, 16, 20, 22]
    assert block_shard_bounds(starts, 2) == [(0, 12), (12, 22)]
    assert block_shard_bounds(starts, 4) == [(0, 4), (4, 12), (12, 16), (16, 22)]
    assert block_shard_bounds([0, 10], 2) == shard_bounds(10, 2)  # fewer blocks than ranks
    # default blocks: the largest power of two of images in 8 MiB
    assert [default_block_images(b) for b in (12288, 3072, 784, 1 << 24)] == [512, 2048, 8192, 1]


def test_torchrun_ranks_read_only_their_blocks(tmp_path):
    """2 gloo processes on 180 training images of 3 x 64 x 64 in 18 blocks: rank 0 reads blocks 0-8 and rank 1
    blocks 9-17, each once, plus the header (counted by the store and, as a bound, by the kernel's rchar);
    both hold the one-process result."""
    if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
        pytest.skip("this PyTorch has no gloo backend")
    src = tmp_path / "faces.npy"
    np.save(src, np.random.default_rng(7).integers(0, 256, (200, 3, 64, 64), dtype=np.uint8))
    store = tmp_path / "s.ldstore"
    pack(src, store, block_images=10, progress=False)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT / "src"), str(ROOT / "tests")]), OMP_NUM_THREADS="1",
               OMP_WAIT_POLICY="PASSIVE", LOCALDIFF_DIST_TIMEOUT="120", LOCALDIFF_CACHE=str(tmp_path / "cache"))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", __file__, "shards",
           str(store), str(tmp_path)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    file = StoreFile(store)
    whole = load_dataset(store)
    assert [r["shard"] for r in ranks] == [[0, 90], [90, 180]]
    assert ranks[0]["blocks"] == {f"train block {j}": 1 for j in range(9)}
    assert ranks[1]["blocks"] == {f"train block {j}": 1 for j in range(9, 18)}
    shard_bytes = 90 * file.header.image_bytes
    for r in ranks:
        assert r["bytes"] == file.header_bytes + shard_bytes
        assert r["bytes"] <= r["rchar"] < r["bytes"] + shard_bytes // 2  # reading the other shard would double it
    x = torch.from_numpy(np.load(tmp_path / "x.npy"))
    ref = make_denoiser("optimal", whole)(x, 500)
    for r in ranks:
        torch.testing.assert_close(torch.tensor(r["x0"], dtype=torch.float64).float(), ref, rtol=0, atol=1e-6)
        assert r["fingerprint"] == whole.fingerprint and r["describe_images"] == 180


def _rchar() -> int:
    with open("/proc/self/io") as f:
        return int(dict(line.split(": ") for line in f.read().splitlines())["rchar"])


def shards_worker(store: str, out: str) -> None:
    from localdiff import distributed, make_denoiser
    from localdiff.data import load_dataset
    from localdiff.data.shards import shard_dataset

    w = distributed.init_from_env()
    try:
        x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
        if w.rank == 0:
            np.save(Path(out) / "x.npy", x.numpy())
        make_denoiser("optimal", torch.zeros(2, 3, 64, 64))(x, 500)  # every import done before the count starts
        before = _rchar()
        data = shard_dataset(load_dataset(store))
        x0 = make_denoiser("optimal", data)(x, 500)
        rchar = _rchar() - before
        s = data.read_stats
        record = {"shard": [data.shard.start, data.shard.stop], "bytes": s.bytes, "rchar": rchar,
                  "blocks": {k: v for k, v in s.blocks.items() if "block" in k}, "x0": x0.tolist(),
                  "fingerprint": data.fingerprint, "describe_images": data.describe()["num_images"]}
        (Path(out) / f"rank{w.rank}.json").write_text(json.dumps(record))
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    if sys.argv[1] == "shards":
        shards_worker(sys.argv[2], sys.argv[3])
