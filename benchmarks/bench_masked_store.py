"""`masked` on a store at 64 px (issue 25, docs/BENCHMARKS.md "Data larger than memory"). Subcommands, each in
its own process so that its peak RSS is its own:

    stats STORE             the statistics (streamed moments, then the eigendecomposition at n = 3 H W),
                            computed and written to the statistics cache as `make_denoiser` does: each
                            part's time and the process's peak RSS
    densities STORE         mask density at each DDIM timestep (from the cached statistics) and the time of
                            the masks and the tile plan at each
    call STORE --t T        `make_denoiser("masked", load_dataset(STORE))` (default options) and calls at t on
                            a batch of 8 held-out images noised to t: the masks and plan (timed alone), a first
                            call and a repeat call, against the floor B K nnz(mask) multiply-adds at this
                            CPU's float32 rate (a square 4096 product, best of 6, before and after, as
                            bench_masked.py measures it); --subset N runs on a seeded subset of N images
                            (for steps too slow for one run; the time scales linearly in K)

    python benchmarks/store_synthetic.py celeba64 /work/bigdata/celeba64-grf.ldstore
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_masked_store.py stats /work/bigdata/celeba64-grf.ldstore
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_masked_store.py densities /work/bigdata/celeba64-grf.ldstore
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_masked_store.py call /work/bigdata/celeba64-grf.ldstore --t 900

Every result carries the machine's load average (1, 5, 15 min) before and after: the development machine's
two cores are shared with other work. The statistics cache is the default one ($LOCALDIFF_CACHE or
~/.cache/localdiff) unless --cache DIR is given.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))
sys.path.insert(0, str(HERE))

import torch  # noqa: E402
from _common import print_and_write_json  # noqa: E402

DDIM_10 = (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)


def load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def cpu_seconds() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def dataset(args):
    from localdiff.data import load_dataset

    return load_dataset(args.store)


def cmd_stats(args) -> dict:
    """Statistics as `make_denoiser` computes them (stats.data_spectrum), with the moments and the
    eigendecomposition timed apart (wrapped in place)."""
    import localdiff.stats as stats

    data = dataset(args)
    parts: dict = {}

    def timed(name, fn):
        def inner(*a, **k):
            t, c = time.perf_counter(), cpu_seconds()
            out = fn(*a, **k)
            parts[name] = {"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(cpu_seconds() - c, 2),
                           "peak_rss_mib_after": peak_rss_mib(), "load_after": load()}
            return out
        return inner

    stats.moments = timed("moments (one streamed pass, float64)", stats.moments)
    stats.eigendecompose = timed("eigendecomposition (float64 eigh)", stats.eigendecompose)
    out = {"store": str(args.store), "images": len(data), "n": data.dim, "load_before": load()}
    t = time.perf_counter()
    spec = stats.data_spectrum(data, device="cpu", cache=args.cache or True, progress=False)
    out.update(total_s=round(time.perf_counter() - t, 1), parts=parts, cached=not parts,
               peak_rss_mib=peak_rss_mib(), load_after=load(), top_eigvals=spec.eigvals[:4].tolist())
    return out


def denoiser(data, args, stats_of=None):
    """`masked` with default options on ``data``, its masks from the statistics of ``stats_of`` (default:
    ``data``; a subset keeps the whole set's masks) read from the cache."""
    from localdiff import make_denoiser
    from localdiff.stats import data_spectrum

    spec = data_spectrum(stats_of if stats_of is not None else data, device="cpu", cache=args.cache or True,
                         progress=False)
    if stats_of is not None and stats_of is not data:  # deliberately another set's statistics: unmark them
        spec = dataclasses.replace(spec, fingerprint="")
    return make_denoiser("masked", data, spectrum=spec)


def cmd_densities(args) -> dict:
    data = dataset(args)
    den = denoiser(data, args)
    out = {"store": str(args.store), "images": len(data), "n": data.dim, "tau": den.tau, "load_before": load(),
           "steps": []}
    for t in [int(v) for v in args.timesteps.split(",")]:
        t0 = time.perf_counter()
        masks = den.masks(t)
        t1 = time.perf_counter()
        plan = den.plan(t, 8)
        t2 = time.perf_counter()
        cols = masks.sum(dim=0).double()  # |S_i| per output pixel
        out["steps"].append({"t": t, "density": float(masks.double().mean()), "mask_s": round(t1 - t0, 1),
                             "plan_s": round(t2 - t1, 1), "mask_pixels_mean": float(cols.mean()),
                             "mask_pixels_min": int(cols.min()), "mask_pixels_max": int(cols.max()),
                             "tiles": len(plan.tiles), "load": load()})
        print(json.dumps(out["steps"][-1]), file=sys.stderr, flush=True)
        den.clear_cache()
    d = [s["density"] for s in out["steps"]]
    out.update(mean_density=sum(d) / len(d), peak_rss_mib=peak_rss_mib(), load_after=load())
    return out


def cmd_call(args) -> dict:
    from bench_masked import matmul_rate

    torch.set_num_threads(args.threads)
    whole = dataset(args)
    full = len(whole)
    rate_before = matmul_rate("cpu")
    data = whole.subset(args.subset, seed=0) if args.subset else whole
    t0 = time.perf_counter()
    den = denoiser(data, args, stats_of=whole)
    build_s = time.perf_counter() - t0
    from localdiff.data import load_dataset

    test = load_dataset(args.store, split="test")
    level = den.schedule.at(args.t)
    y = test.chunk_at(0, args.batch, dtype=torch.float32)  # [B, C, H, W] held-out images
    eps = torch.randn(y.shape, generator=torch.Generator().manual_seed(0))
    x = (level.a * y + level.b2 ** 0.5 * eps).to(torch.float32)
    out = {"store": str(args.store), "images_in_store": full, "images": len(data), "n": data.dim, "t": args.t,
           "batch": args.batch, "threads": args.threads, "workers": den._workers(), "a": level.a, "b2": level.b2,
           "load_before": load(), "build_s": round(build_s, 1)}
    t1 = time.perf_counter()
    plan = den.plan(args.t, args.batch)
    masks = den.masks(args.t)
    out["masks_and_plan_s"] = round(time.perf_counter() - t1, 1)
    nnz = int(masks.sum())
    out.update(density=nnz / data.dim ** 2, nnz=nnz, tiles=len(plan.tiles), load_after_plan=load())
    calls = []
    for i in range(args.repeat):
        c, t = cpu_seconds(), time.perf_counter()
        x0 = den(x, args.t)
        calls.append({"wall_s": round(time.perf_counter() - t, 2), "cpu_s": round(cpu_seconds() - c, 2),
                      "q_cached": bool(den._q), "load_after": load()})
        print(json.dumps(calls[-1]), file=sys.stderr, flush=True)
    rate_after = matmul_rate("cpu")
    rate = max(rate_before, rate_after)
    macs = args.batch * len(data) * nnz
    floor = macs / rate
    out.update(calls=calls, macs=macs, matmul_rate=[round(rate_before / 1e9, 1), round(rate_after / 1e9, 1)],
               floor_s=round(floor, 1), first_vs_floor=round(calls[0]["wall_s"] / floor, 2),
               best_vs_floor=round(min(c["wall_s"] for c in calls) / floor, 2),
               q_cache_needs_mb=round(data.dim * len(data) * 4 / 2**20), cache_mb=den.config.cache_mb,
               mse_to_clean=float(((x0 - y) ** 2).mean()), peak_rss_mib=peak_rss_mib(), load_after=load())
    if args.subset:
        out["scaled_to_store"] = {"factor": full / len(data),
                                  "first_call_s": round(calls[0]["wall_s"] * full / len(data), 1),
                                  "floor_s": round(floor * full / len(data), 1)}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("stats")
    d = sub.add_parser("densities")
    d.add_argument("--timesteps", default=",".join(map(str, DDIM_10)))
    c = sub.add_parser("call")
    c.add_argument("--t", type=int, required=True)
    c.add_argument("--batch", type=int, default=8)
    c.add_argument("--repeat", type=int, default=2, help="calls at t: the first computes Q, the next reuse what "
                   "the cache holds")
    c.add_argument("--subset", type=int, default=None, help="a seeded subset of this many training images")
    c.add_argument("--threads", type=int, default=2)
    for q in (s, d, c):
        q.add_argument("store", type=Path)
        q.add_argument("--cache", default=None, help="statistics cache directory (default: the library's)")
        q.add_argument("--json", default=None)
    args = p.parse_args()
    result = {"stats": cmd_stats, "densities": cmd_densities, "call": cmd_call}[args.cmd](args)
    print_and_write_json(args.json, result)


if __name__ == "__main__":
    main()
