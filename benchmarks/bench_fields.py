"""Sensitivity-field benchmark: the full Jacobian (all 784 rows) of the MNIST U-Net at one x_t.

The network is the `paper` configuration for 28x28 images (64 channels, multipliers 1,2,2). Its
weights do not change the cost, so a randomly initialised network is used when no trained one is
given (`--unet DIR`). Rows are computed by batched vector-Jacobian products; `--rows-per-pass`
trades memory for fewer backward passes. Also times the closed-form Jacobians of wiener and optimal.

    python benchmarks/bench_fields.py [--device cpu|cuda] [--rows-per-pass 196] [--unet DIR] [--rows N]

``--rows N`` times only the first N rows (a smoke test of the same path); every reported "full
Jacobian" time is for all rows unless ``rows`` in the JSON says otherwise. With ``--repeat R`` the
best of R timed calls is kept (after one untimed warm-up call).
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from localdiff import load_dataset, make_denoiser
from localdiff.diffusion import DEFAULT_SCHEDULE
from localdiff.sensitivity import jacobian_rows

from _common import peak_memory_mib, sync, write_json


def timed(fn, device, repeats=1):
    """Best of ``repeats`` timed calls after one warm-up call (allocator, kernels, autotuning)."""
    out = fn()
    best = float("inf")
    for _ in range(repeats):
        sync(device)
        start = time.perf_counter()
        out = fn()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return best, out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--rows-per-pass", type=int, default=196)
    ap.add_argument("--unet", default=None, help="a trained UNet2DModel directory (default: random paper config)")
    ap.add_argument("--t", type=int, default=500)
    ap.add_argument("--rows", type=int, default=None, help="time only the first N rows (default: all 784)")
    ap.add_argument("--repeat", type=int, default=1, help="timed calls per measurement (best is kept)")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    test = load_dataset("mnist", split="test")
    x0 = test[0][None]
    x_t = DEFAULT_SCHEDULE.q_sample(x0, args.t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(0)))
    pixels = [(r, c) for r in range(28) for c in range(28)][:args.rows]
    results: dict = {"device": dev, "gpu": torch.cuda.get_device_name(dev) if "cuda" in dev else None,
                     "threads": torch.get_num_threads(), "t": args.t, "rows_per_pass": args.rows_per_pass,
                     "rows": len(pixels)}

    def jacobian(den):
        return jacobian_rows(den, x_t.to(dev), args.t, pixels, rows_per_pass=args.rows_per_pass)[0]

    with tempfile.TemporaryDirectory() as tmp:
        path = args.unet
        if path is None:
            from localdiff.unet.configs import build_unet, unet_config

            torch.manual_seed(0)
            build_unet(unet_config("paper", (1, 28, 28)), (1, 28, 28)).save_pretrained(tmp)
            path = tmp
        unet = make_denoiser("unet", test, path=path, device=dev)
        params = sum(p.numel() for p in unet.model.parameters())
        secs, J = timed(lambda: jacobian(unet), dev, args.repeat)
        results["unet_params"] = params
        results["unet_full_jacobian_s"] = secs
        results["unet_jacobian_shape"] = list(J.shape)

    train = load_dataset("mnist", split="train")
    for name in ("wiener", "optimal"):
        den = make_denoiser(name, train, device=dev)
        secs, _ = timed(lambda: jacobian(den), dev, args.repeat)
        results[f"{name}_full_jacobian_s"] = secs
    results["peak_memory_mib"] = peak_memory_mib(dev)

    print(f"device {dev}, {results['threads']} threads, t = {args.t}")
    print(f"U-Net (paper, {params / 1e6:.2f} M params) Jacobian, {len(pixels)} of 784 rows, by autograd: "
          f"{results['unet_full_jacobian_s']:.2f} s ({args.rows_per_pass} rows per backward pass)")
    print(f"wiener closed form: {results['wiener_full_jacobian_s']:.3f} s; "
          f"optimal closed form (60,000 images): {results['optimal_full_jacobian_s']:.2f} s")
    print(f"peak memory {results['peak_memory_mib']:.0f} MiB")
    write_json(args.json, results)


if __name__ == "__main__":
    main()
