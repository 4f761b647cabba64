"""Benchmarks of the store (issue 25, docs/BENCHMARKS.md "Data larger than memory"). Subcommands:

    hash                    checksum speed per GB on this machine: sha256, zlib.crc32, xxh3-128 (the store's)
    read STORE              one pass over a store, page cache dropped for the file first: os.preadv into a
                            reused buffer (the store's reader: verified, and plain), np.memmap (pages stay
                            mapped), mmap + madvise(MADV_DONTNEED) after each block; GB/s and peak RSS each
    optimal STORE           one `optimal` call (dtype float32, batch 8, t = 500) on 1 and 2 processes
                            (torchrun, gloo): wall time and peak RSS per process, blocks read per rank, against
                            the floor max(store bytes / read bandwidth, 2 B K n / matmul rate), both measured
                            here first
    optimal-parts STORE     where that call's time goes: each stage of its per-chunk loop timed alone on the
                            first images of the store (read cold and warm, convert, norms, the two products,
                            the softmax), scaled to the whole set
    study STORE             `localdiff study --data STORE --no-unet --num 8 --device cpu` end to end

    python benchmarks/store_synthetic.py imagenet64 /work/bigdata/imagenet64-grf.ldstore
    python benchmarks/bench_store.py optimal /work/bigdata/imagenet64-grf.ldstore --json out.json

Every result carries the machine's load average (1, 5, 15 min) when it was taken: the development
machine's two cores are shared with other work.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import mmap
import os
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
from _common import print_and_write_json

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def status(field: str) -> float:
    """``VmRSS`` / ``VmHWM`` (peak) of this process, MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def drop_cache(path: Path) -> None:
    """Evict the file's pages from the page cache (its own pages only: POSIX_FADV_DONTNEED)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------------------------
# checksums
# ------------------------------------------------------------------------------------------------

def cmd_hash(args) -> dict:
    import xxhash

    buf = memoryview(np.random.default_rng(0).integers(0, 256, 256 << 20, dtype=np.uint8)).cast("B")
    fns = {"sha256": lambda b: hashlib.sha256(b).digest(), "zlib.crc32": zlib.crc32,
           "xxh3_128": xxhash.xxh3_128_digest, "xxh3_64": xxhash.xxh3_64_digest}
    out = {"load_before": load(), "bytes": len(buf)}
    for name, fn in fns.items():
        fn(buf[:1 << 20])
        t = time.perf_counter()
        for _ in range(args.repeat):
            fn(buf)
        out[name + "_GBps"] = round(args.repeat * len(buf) / (time.perf_counter() - t) / 1e9, 2)
    out["load_after"] = load()
    return out


# ------------------------------------------------------------------------------------------------
# reading a whole store
# ------------------------------------------------------------------------------------------------

READ_METHODS = ("store", "pread", "mmap", "mmap-dontneed")


def read_one(method: str, path: Path, limit: int | None = None) -> dict:
    """One cold pass over the images of ``path`` (the first ``limit`` bytes of them) with ``method``; run in
    its own process (clean peak RSS)."""
    import xxhash

    sys.path.insert(0, str(ROOT / "src"))
    from localdiff.data import load_dataset
    from localdiff.data.store import StoreFile

    drop_cache(path)
    rss0 = status("VmRSS")
    t0 = time.perf_counter()
    if method == "store":  # the dataset's own path: blocks into a reused buffer, each verified
        ds = load_dataset(path)
        count = len(ds) if limit is None else min(len(ds), limit // ds.raw.image_bytes)
        buf = np.empty((4096, *ds.shape), np.uint8)
        for s in range(0, count, 4096):
            ds.raw.read(s, min(s + 4096, count), out=buf[:min(4096, count - s)])
        nbytes = count * ds.raw.image_bytes
    else:
        f = StoreFile(path)
        split = f.header.splits["train"]
        nbytes, block = split.count * f.header.image_bytes, f.header.block_bytes
        nbytes = nbytes if limit is None else min(nbytes, limit // block * block)
        if method == "pread":
            buf = np.empty(block, np.uint8)
            view = memoryview(buf)
            for off in range(0, nbytes, block):
                k = min(block, nbytes - off)
                os.preadv(f.fd, [view[:k]], split.offset + off)
        else:
            with open(path, "rb") as fh:
                mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
                arr = np.frombuffer(mm, np.uint8)
                for off in range(0, nbytes, block):
                    a = split.offset + off
                    k = min(block, nbytes - off)
                    xxhash.xxh3_128_digest(arr[a:a + k])  # touch every page, as a verified read would
                    if method == "mmap-dontneed":
                        lo = a - a % mmap.PAGESIZE
                        mm.madvise(mmap.MADV_DONTNEED, lo, a + k - lo)
                del arr
                mm.close()
    dt = time.perf_counter() - t0
    return {"method": method, "bytes": nbytes, "seconds": round(dt, 2), "GBps": round(nbytes / dt / 1e9, 2),
            "peak_rss_mib": round(status("VmHWM")), "rss_before_mib": round(rss0)}


def cmd_read(args) -> dict:
    out = {"store": str(args.store), "runs": []}
    for method in args.methods.split(","):
        before = load()
        cmd = [sys.executable, __file__, "read-one", method, str(args.store)]
        if args.limit_gb:
            cmd += ["--limit-gb", str(args.limit_gb)]
        done = subprocess.run(cmd, capture_output=True, text=True, env=_env(2))
        if done.returncode:
            raise SystemExit(done.stderr[-3000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        r.update(load_before=before, load_after=load())
        out["runs"].append(r)
        print(json.dumps(r), file=sys.stderr)
    return out


# ------------------------------------------------------------------------------------------------
# one optimal call on 1 and 2 processes
# ------------------------------------------------------------------------------------------------

def matmul_rates(n: int, threads: int) -> dict:
    """Multiply-adds per second: a square float32 product, and the two products of one `optimal` chunk
    at batch 8 ([8, n] x [n, k] and [8, k] x [k, n], k = 4096 and 256)."""
    import torch

    torch.set_num_threads(threads)

    def rate(f, macs, reps):
        f()
        t = time.perf_counter()
        for _ in range(reps):
            f()
        return macs * reps / (time.perf_counter() - t)

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    out = {"square_2048": rate(lambda: a @ b, 2048 ** 3, 8)}
    x = torch.randn(8, n)
    for k in (4096, 256):
        y, w = torch.randn(k, n), torch.randn(8, k)
        out[f"batch8_k{k}"] = rate(lambda: (x @ y.T, w @ y), 2 * 8 * k * n, max(4, 20 * 256 // k))
    return {k: float(f"{v:.3g}") for k, v in out.items()}


def cold_read_bandwidth(path: Path) -> float:
    r = read_one("pread", path)
    return r["bytes"] / r["seconds"]


def optimal_worker(args) -> None:
    import torch

    from localdiff import distributed, make_denoiser
    from localdiff.data import load_dataset
    from localdiff.data.shards import shard_dataset

    w = distributed.init_from_env()
    torch.set_num_threads(args.threads)
    prof = instrument() if args.profile else None
    if w.rank == 0:
        drop_cache(Path(args.store))
    if w.active:
        distributed.barrier("cache dropped")
    t0 = time.perf_counter()
    data = shard_dataset(load_dataset(args.store))
    opts = {"dtype": "float32"}
    if args.chunk:
        opts["chunk"] = args.chunk
    den = make_denoiser("optimal", data, **opts)
    t1 = time.perf_counter()
    x = torch.randn(8, *data.shape, generator=torch.Generator().manual_seed(0))
    c1, f1 = cpu_seconds(), minor_faults()
    x0 = den(x, args.t)
    t2 = time.perf_counter()
    cpu, faults = cpu_seconds() - c1, minor_faults() - f1
    s = data.read_stats
    blocks = {k: v for k, v in s.blocks.items() if "block" in k}
    rec = {"rank": w.rank, "world_size": w.size, "threads": args.threads, "images": len(data),
           "resident": den.train_set.resident, "chunk": den.train_set.chunk, "load_s": round(t1 - t0, 2),
           "call_s": round(t2 - t1, 2), "call_cpu_s": round(cpu, 1), "call_minor_faults": faults, "peak_rss_mib": round(status("VmHWM")), "bytes_read": s.bytes,
           "blocks": blocks, "x0_sum": float(x0.double().sum()), "x0_first": x0.reshape(-1)[:8].tolist()}
    if prof is not None:
        rec["profile_s"] = {k: round(v, 2) for k, v in prof.items()}
    Path(args.out_dir, f"rank{w.rank}.json").write_text(json.dumps(rec))
    distributed.shutdown()


def instrument() -> dict:
    """Wall seconds spent in each stage of the real `optimal` call (patched in: the store's block reads, in the
    read-ahead thread; the uint8 -> float conversion; the chunk iterator, i.e. waiting for the read-ahead +
    conversion + squared norms; the logits product; the softmax state). Returns the dict that fills up."""
    import localdiff.denoisers.empirical as emp
    from localdiff.data.store_dataset import StoreDataset, StoreRows
    from localdiff.denoisers.stream import SoftmaxState
    from localdiff.denoisers.stream.training_set import TrainingSet

    prof = {"read (read-ahead thread)": 0.0, "convert": 0.0, "next chunk (wait + convert + norms)": 0.0,
            "logits": 0.0, "softmax state": 0.0}

    def wrap(name, fn):
        def inner(*a, **k):
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                prof[name] += time.perf_counter() - t
        return inner

    StoreRows.read = wrap("read (read-ahead thread)", StoreRows.read)
    StoreDataset._convert = wrap("convert", StoreDataset._convert)
    emp.optimal_logits = wrap("logits", emp.optimal_logits)
    of = SoftmaxState.of.__func__
    SoftmaxState.of = classmethod(wrap("softmax state", of))
    it = TrainingSet.__iter__

    def timed_iter(self):
        g = it(self)
        while True:
            t = time.perf_counter()
            try:
                item = next(g)
            except StopIteration:
                return
            finally:
                prof["next chunk (wait + convert + norms)"] += time.perf_counter() - t
            yield item

    TrainingSet.__iter__ = timed_iter
    return prof


def minor_faults() -> int:
    """Minor page faults of this process so far (fresh memory touched: large allocations that the allocator
    took from and gave back to the kernel are faulted in, and zeroed, page by page)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def cpu_seconds() -> float:
    """User + system CPU time of this process (every thread): less sensitive to other work than wall time."""
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _env(threads: int) -> dict:
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE", OMP_NUM_THREADS=str(threads))
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), env.get("PYTHONPATH", "")])
    return env


def cmd_optimal(args) -> dict:
    sys.path.insert(0, str(ROOT / "src"))
    from localdiff.data import load_dataset

    ds = load_dataset(args.store)
    K, n = len(ds), ds.dim
    out = {"store": str(args.store), "images": K, "n": n, "store_bytes": ds.raw.nbytes, "batch": 8, "t": args.t,
           "load_before": load()}
    macs = 2 * 8 * K * n
    if not args.no_floor:
        bw = cold_read_bandwidth(Path(args.store))
        rates = matmul_rates(n, args.cores)
        out.update(read_GBps=round(bw / 1e9, 2), matmul=rates, macs=macs,
                   floor_read_s=round(ds.raw.nbytes / bw, 2),
                   floor_square_s=round(macs / rates["square_2048"], 2),
                   floor_batch8_s=round(macs / max(rates["batch8_k4096"], rates["batch8_k256"]), 2))
        out["floor_s"] = max(out["floor_read_s"], out["floor_square_s"])
    else:
        out["floor_s"] = float("nan")
    out["runs"] = []
    for p in [int(v) for v in args.procs.split(",")]:
        with tempfile.TemporaryDirectory() as tmp:
            threads = max(1, args.cores // p)
            cmd = [__file__, "optimal-worker", str(args.store), tmp, "--threads", str(threads), "--t", str(args.t)]
            if args.chunk:
                cmd += ["--chunk", str(args.chunk)]
            if args.profile:
                cmd += ["--profile"]
            if p == 1:
                cmd = [sys.executable, *cmd]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(p), *cmd]
            before, t0 = load(), time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True, env=_env(threads), timeout=args.timeout)
            wall = time.perf_counter() - t0
            if done.returncode:
                raise SystemExit(done.stderr[-4000:])
            ranks = [json.loads(Path(tmp, f"rank{r}.json").read_text()) for r in range(p)]
        total: dict = {}  # block name -> reads, summed over the ranks
        for r in ranks:
            blocks = r.pop("blocks")
            r["blocks_read"] = len(blocks)
            r["block_reads"] = sum(blocks.values())
            for k, v in blocks.items():
                total[k] = total.get(k, 0) + v
        run = {"procs": p, "threads_per_proc": threads, "wall_s": round(wall, 1), "load_before": before,
               "load_after": load(), "ranks": ranks, "blocks_in_store": None,
               "blocks_read_once": sum(1 for v in total.values() if v == 1), "blocks_read_more": sum(
                   1 for v in total.values() if v > 1), "blocks_read_total": len(total),
               "max_call_s": max(r["call_s"] for r in ranks), "max_peak_rss_mib": max(r["peak_rss_mib"] for r in ranks)}
        run["vs_floor"] = round(run["max_call_s"] / out["floor_s"], 2)
        out["runs"].append(run)
        print(json.dumps({k: v for k, v in run.items() if k != "ranks"}), file=sys.stderr)
    from localdiff.data.store import StoreFile

    nblocks = len(StoreFile(args.store).header.splits["train"].blocks)
    for run in out["runs"]:
        run["blocks_in_store"] = nblocks
    if len(out["runs"]) > 1:
        ref = out["runs"][0]["ranks"][0]["x0_first"]
        out["max_diff_first_values"] = max(abs(a - b) for run in out["runs"][1:] for r in run["ranks"]
                                           for a, b in zip(r["x0_first"], ref))
    out["load_after"] = load()
    return out


def cmd_optimal_parts(args) -> dict:
    """Where one `optimal` call's time goes on the CPU: each stage of the per-chunk loop timed alone over the
    first ``--images`` images of the store (chunks as the model streams them), then scaled to the whole set.
    Stages: the store's read of the chunk (page cache dropped first: cold; then again: warm, i.e. the copy out
    of the page cache and the block checksums), uint8 -> float conversion, squared norms, the logits product
    ``x Y^T``, the softmax state (max, exp, sum and the product ``e Y``). One thread does everything here
    (no read-ahead); the CPU seconds of each stage are what the real call spends on it."""
    import torch

    sys.path.insert(0, str(ROOT / "src"))
    from localdiff.data import load_dataset
    from localdiff.denoisers.empirical import optimal_logits
    from localdiff.denoisers.stream import SoftmaxState, merge
    from localdiff.denoisers.stream.training_set import STREAMED_CHUNK_BYTES

    torch.set_num_threads(args.threads)
    ds = load_dataset(args.store)
    K, n = len(ds), ds.dim
    N = min(args.images, K)
    chunk = args.chunk or max(1, STREAMED_CHUNK_BYTES // (n * 4))
    starts = list(range(0, N, chunk))
    buf = np.empty((chunk, *ds.shape), np.uint8)
    x = torch.randn(8, n, generator=torch.Generator().manual_seed(0))
    a, b2 = 0.5, 0.75
    times: dict = {}

    def timed(name, fn):
        c, t = cpu_seconds(), time.perf_counter()
        out = fn()
        times[name] = {"wall_s": time.perf_counter() - t, "cpu_s": cpu_seconds() - c}
        return out

    def read_all():
        for s in starts:
            ds.raw.read(s, min(s + chunk, N), out=buf[:min(chunk, N - s)])

    before = load()
    drop_cache(Path(args.store))
    timed("read cold (pread + checksums)", read_all)
    timed("read warm (page cache copy + checksums)", read_all)
    raw = ds.raw.read(0, chunk, out=buf)
    y = ds._convert(raw, "cpu", torch.float32, True)
    y_sq = (y * y).sum(dim=1)
    reps = len(starts)

    def repeat(fn):  # each result dropped at once, as in the model's loop
        for _ in range(reps):
            fn()

    timed("convert uint8 -> float32", lambda: repeat(lambda: ds._convert(raw, "cpu", torch.float32, True)))
    timed("squared norms", lambda: repeat(lambda: (y * y).sum(dim=1)))
    timed("logits x Y^T", lambda: repeat(lambda: optimal_logits(x, y, y_sq, a, b2)))
    lg = optimal_logits(x, y, y_sq, a, b2)
    timed("softmax state (exp, e Y)", lambda: repeat(lambda: SoftmaxState.of(lg.clone(), y)))
    st = SoftmaxState.of(lg.clone(), y)
    timed("merge", lambda: repeat(lambda: merge(st, st)))
    scale = K / N
    out = {"store": str(args.store), "images_timed": N, "images_in_store": K, "chunk": chunk, "threads": args.threads,
           "load_before": before, "load_after": load(), "scale_to_store": scale,
           "stages": {k: {"wall_s": round(v["wall_s"] * scale, 2), "cpu_s": round(v["cpu_s"] * scale, 2)}
                      for k, v in times.items()}}
    compute = [k for k in times if not k.startswith("read")]
    out["compute_wall_s"] = round(sum(times[k]["wall_s"] for k in compute) * scale, 2)
    out["compute_cpu_s"] = round(sum(times[k]["cpu_s"] for k in compute) * scale, 2)
    return out


# ------------------------------------------------------------------------------------------------
# the study end to end
# ------------------------------------------------------------------------------------------------

def cmd_study(args) -> dict:
    import resource

    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "localdiff.cli", "study", "--data", str(args.store), "--no-unet", "--num", "8",
               "--device", "cpu", "--out", str(Path(tmp) / "run"), "--no-progress"]
        if args.models:
            cmd += ["--models", args.models]
        env = _env(args.cores)
        env["LOCALDIFF_CACHE"] = str(Path(tmp) / "cache")
        before, t0 = load(), time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if done.returncode:
            raise SystemExit(done.stderr[-4000:])
        metrics = json.loads((Path(tmp) / "run" / "metrics.json").read_text())
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    return {"store": str(args.store), "command": " ".join(cmd[2:]), "wall_s": round(wall, 1),
            "peak_rss_mib": round(peak), "load_before": before, "load_after": load(),
            "models": metrics.get("config", {}).get("models"), "timings_s": metrics.get("timings_s"),
            "model_seconds": {k: v.get("seconds") for k, v in metrics.get("models", {}).items()},
            "stdout_tail": done.stdout[-400:]}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    h = sub.add_parser("hash")
    h.add_argument("--repeat", type=int, default=4)
    r = sub.add_parser("read")
    r.add_argument("store", type=Path)
    r.add_argument("--methods", default=",".join(READ_METHODS))
    r.add_argument("--limit-gb", type=float, default=None, help="read only the first GB of images")
    ro = sub.add_parser("read-one")
    ro.add_argument("method", choices=READ_METHODS)
    ro.add_argument("store", type=Path)
    ro.add_argument("--limit-gb", type=float, default=None)
    o = sub.add_parser("optimal")
    o.add_argument("store", type=Path)
    o.add_argument("--procs", default="1,2")
    o.add_argument("--cores", type=int, default=2)
    o.add_argument("--t", type=int, default=500)
    o.add_argument("--chunk", type=int, default=None, help="the model's chunk option (default: its own, 4096)")
    o.add_argument("--timeout", type=int, default=900)
    o.add_argument("--profile", action="store_true", help="also time the stages of the call (patched in)")
    o.add_argument("--no-floor", action="store_true", help="skip the floor measurements (a repeat run)")
    ow = sub.add_parser("optimal-worker")
    ow.add_argument("store")
    ow.add_argument("out_dir")
    ow.add_argument("--threads", type=int, default=1)
    ow.add_argument("--t", type=int, default=500)
    ow.add_argument("--chunk", type=int, default=None)
    ow.add_argument("--profile", action="store_true")
    op = sub.add_parser("optimal-parts")
    op.add_argument("store", type=Path)
    op.add_argument("--images", type=int, default=100_000, help="images timed (the first ones), scaled to the store")
    op.add_argument("--threads", type=int, default=2)
    op.add_argument("--chunk", type=int, default=None, help="images per chunk (default: the model's, about 16 MB)")
    s = sub.add_parser("study")
    s.add_argument("store", type=Path)
    s.add_argument("--models", default=None)
    s.add_argument("--cores", type=int, default=2)
    s.add_argument("--timeout", type=int, default=900)
    for q in (h, r, o, op, s):
        q.add_argument("--json", default=None)
    args = p.parse_args()
    if args.cmd == "read-one":
        limit = None if args.limit_gb is None else int(args.limit_gb * 1e9)
        print(json.dumps(read_one(args.method, args.store, limit)))
        return
    if args.cmd == "optimal-worker":
        sys.path.insert(0, str(ROOT / "src"))
        optimal_worker(args)
        return
    result = {"hash": cmd_hash, "read": cmd_read, "optimal": cmd_optimal, "optimal-parts": cmd_optimal_parts,
              "study": cmd_study}[args.cmd](args)
    print_and_write_json(args.json, result)


if __name__ == "__main__":
    main()
