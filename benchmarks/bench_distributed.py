"""The masked denoiser on P = 1 and P = 2 processes (torchrun, gloo on the CPU; NCCL with --device cuda):
wall time and peak memory per rank, full MNIST training set (60,000), a 10-step DDIM sample of 8 images.

Each P runs as its own ``torchrun --standalone --nproc-per-node P`` job of this file (``--worker``),
with the machine's cores shared out (``--cores``, default all: P = 1 gets them all as torch threads and
masked worker threads, P = 2 half each). Every rank reads MNIST and keeps its shard; the statistics are
merged over the ranks (no cache), the model is built and samples from the same noise. Per rank it
reports the seconds of each phase, the resident memory after the shard is taken and after building,
the peak resident set while reading the data (every rank reads the whole set, then keeps its shard),
and from the moment the shard was taken (Linux VmHWM, reset then). The
samples of every P are compared with P = 1's. On two cores expect the memory that depends on the
training set to halve, not the time: two processes share the same two cores.

    python benchmarks/bench_distributed.py [--procs 1,2] [--num-train 60000] [--cache-mb 1024,0]
                                           [--device cpu|cuda] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch


def rss_mib(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak since the last reset (``VmHWM``), MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def reset_peak() -> bool:
    """Restart the peak (VmHWM) from the current resident set (Linux ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def worker(args) -> None:
    from localdiff import distributed, load_dataset, make_denoiser, sample
    from localdiff.data.shards import shard_dataset
    from localdiff.stats import data_spectrum

    w = distributed.init_from_env()
    torch.set_num_threads(args.threads)
    out: dict = {"rank": w.rank, "world_size": w.size, "threads": args.threads, "rss_start_mib": rss_mib()}
    start = time.perf_counter()
    data = load_dataset("mnist", split="train", subset=args.num_train if args.num_train < 60000 else None)
    data = shard_dataset(data)  # the whole set is dropped here: this rank keeps its shard
    gc.collect()
    out.update(images=len(data), seconds_load=time.perf_counter() - start, rss_after_shard_mib=rss_mib(),
               peak_load_mib=rss_mib("VmHWM"), peak_reset=reset_peak())  # VmHWM: from here, the shard's work
    t0 = time.perf_counter()
    spec = data_spectrum(data, cache=False, progress=False)
    out["seconds_statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    den = make_denoiser("masked", data, spectrum=spec, device=args.device, threads=args.threads,
                        cache_mb=args.cache_mb)
    out.update(seconds_build=time.perf_counter() - t0, rss_after_build_mib=rss_mib())
    distributed.barrier()
    t0 = time.perf_counter()
    traj = sample(den, num=args.samples, steps=args.steps, seed=0, return_trajectory=True, progress=False)
    out.update(seconds_sample=time.perf_counter() - t0, step_seconds=traj.step_seconds,
               seconds_total=time.perf_counter() - start,
               peak_after_shard_mib=rss_mib("VmHWM"))
    out["peak_rss_mib"] = max(out["peak_load_mib"], out["peak_after_shard_mib"])
    if torch.device(args.device).type == "cuda":
        out["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    per_rank = distributed.gather(out)  # every rank's numbers (same keys everywhere)
    if distributed.is_main():
        np.save(args.out + ".npy", traj.samples.numpy())
        Path(args.out).write_text(json.dumps({"ranks": per_rank}, indent=2))
    distributed.shutdown()


def launch(procs: int, args, out: str) -> dict:
    threads = max(1, args.cores // procs)
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs),
           "--", __file__, "--worker", "--out", out, "--threads", str(threads), "--num-train", str(args.num_train),
           "--samples", str(args.samples), "--steps", str(args.steps), "--device", args.device, "--cache-mb",
           str(args.cache_mb_now)]
    start = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        sys.exit(f"P={procs} failed:\n{done.stderr[-3000:]}")
    result = json.loads(Path(out).read_text())
    result["launcher_wall_s"] = time.perf_counter() - start
    result["samples"] = np.load(out + ".npy")
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--out", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--procs", default="1,2", help="process counts to compare (default 1,2)")
    p.add_argument("--cores", type=int, default=os.cpu_count(), help="CPU cores shared out (default: all)")
    p.add_argument("--num-train", type=int, default=60000)
    p.add_argument("--samples", type=int, default=8, help="samples (default 8)")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--cache-mb", default="1024,0", help="masked cache_mb values to run (default 1024,0: "
                                                         "with and without the per-timestep Q cache)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    if args.worker:
        args.cache_mb = int(args.cache_mb)
        worker(args)
        return
    procs = [int(v) for v in args.procs.split(",")]
    report = []
    with tempfile.TemporaryDirectory() as tmp:
        for cache_mb in (int(v) for v in args.cache_mb.split(",")):
            args.cache_mb_now = cache_mb
            runs = {P: launch(P, args, str(Path(tmp) / f"p{P}-{cache_mb}.json")) for P in procs}
            ref = runs[procs[0]]["samples"]
            for P, r in runs.items():
                diff = float(np.abs(r.pop("samples") - ref).max())
                report.append({"procs": P, "cache_mb": cache_mb, "max_abs_diff_vs_first": diff, **r})
                for rk in r["ranks"]:
                    print(f"cache_mb={cache_mb:5d} P={P} rank {rk['rank']}: {rk['images']:6d} images, "
                          f"{rk['threads']} threads | load {rk['seconds_load']:.1f} s, statistics "
                          f"{rk['seconds_statistics']:.1f} s, build {rk['seconds_build']:.1f} s, sample "
                          f"{rk['seconds_sample']:.1f} s | RSS after shard {rk['rss_after_shard_mib']:.0f} MiB, "
                          f"after build {rk['rss_after_build_mib']:.0f} MiB, peak while reading "
                          f"{rk['peak_load_mib']:.0f} MiB, peak after {rk['peak_after_shard_mib']:.0f} MiB")
                print(f"cache_mb={cache_mb:5d} P={P}: max |samples - P={procs[0]}| = {diff:.2e}, "
                      f"launcher wall {r['launcher_wall_s']:.1f} s")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
