"""Foundation benchmark: statistics + eigendecomposition, and the exact optimal denoiser per step.

Measures, on one device in one run:
  1. streaming mean/covariance (float64) + eigendecomposition of the full MNIST training set
     (60,000 x 784), with the disk cache bypassed;
  2. seconds per DDIM step of `optimal` over the full training set at batch 16 (10 steps,
     timesteps 900..0), in float64 (default, exact) and float32;
  3. the same work's floor: 2 matrix products of [B, n] x [n, K] per step at the measured matmul rate.

    python benchmarks/bench_foundation.py [--device cpu|cuda] [--batch 16] [--json out.json]
"""

from __future__ import annotations

import argparse
import time

import torch

from localdiff import load_dataset, make_denoiser
from localdiff.diffusion import DEFAULT_SCHEDULE, initial_noise, timesteps_for
from localdiff.stats import eigendecompose, moments

from _common import peak_memory_mib, sync, write_json


def matmul_rate(device, dtype, size=2048, reps=5) -> float:
    """Measured multiply-add rate (FLOP/s, 2 per multiply-add) of a square matrix product."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b
    sync(device)
    start = time.perf_counter()
    for _ in range(reps):
        a @ b
    sync(device)
    return 2 * size**3 * reps / (time.perf_counter() - start)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    dev = args.device
    results: dict = {"device": dev, "torch_threads": torch.get_num_threads(), "batch": args.batch}

    t0 = time.perf_counter()
    data = load_dataset("mnist", split="train")
    results["load_s"] = time.perf_counter() - t0
    results["num_train"], results["dim"] = len(data), data.dim

    sync(dev)
    t0 = time.perf_counter()
    state = moments(data, device=dev, progress=False)
    sync(dev)
    t_cov = time.perf_counter() - t0
    spec = eigendecompose(state.mean, state.covariance(), state.count)
    sync(dev)
    results["covariance_s"] = t_cov
    results["eigh_s"] = time.perf_counter() - t0 - t_cov
    results["stats_total_s"] = results["covariance_s"] + results["eigh_s"]
    results["top_eigenvalue"] = float(spec.eigvals[0])

    ts = timesteps_for(args.steps)
    noise = initial_noise(args.batch, data.shape, seed=0).to(dev)
    K, n, B = len(data), data.dim, args.batch
    for dtype in ("float64", "float32"):
        den = make_denoiser("optimal", data, device=dev, dtype=dtype)
        den(noise, ts[0])  # warm-up
        per_step = []
        for t in ts:
            x_t = DEFAULT_SCHEDULE.q_sample(den.train_set.rows(torch.arange(B)).reshape(noise.shape).float(),
                                            t, noise)
            sync(dev)
            start = time.perf_counter()
            den(x_t, t)
            sync(dev)
            per_step.append(time.perf_counter() - start)
        rate = matmul_rate(dev, getattr(torch, dtype))
        floor = 2 * (2 * B * K * n) / rate  # logits product + weighted sum, 2 FLOP per multiply-add
        results[f"optimal_{dtype}"] = {
            "s_per_step_mean": sum(per_step) / len(per_step),
            "s_per_step": per_step,
            "matmul_gflops": rate / 1e9,
            "floor_s": floor,
            "ratio_to_floor": (sum(per_step) / len(per_step)) / floor,
        }
        del den
    results["peak_memory_mib"] = peak_memory_mib(dev)

    print(f"device {dev}, {results['torch_threads']} threads; MNIST {K} x {n}")
    print(f"statistics: covariance {results['covariance_s']:.2f} s + eigh {results['eigh_s']:.2f} s "
          f"= {results['stats_total_s']:.2f} s")
    for dtype in ("float64", "float32"):
        r = results[f"optimal_{dtype}"]
        print(f"optimal ({dtype}), batch {B}: {r['s_per_step_mean']:.3f} s/step; floor {r['floor_s']:.3f} s "
              f"at {r['matmul_gflops']:.1f} GFLOP/s -> {r['ratio_to_floor']:.2f}x floor")
    print(f"peak memory {results['peak_memory_mib']:.0f} MiB")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
