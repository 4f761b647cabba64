"""Held-out denoising MSE per image, one model per run, and paired tables across runs.

`localdiff evaluate` reports each model's mean MSE and standard error; a claim "A beats B" needs the
per-image values of both on the same noisy images (docs/RESULTS.md, STYLE.md principle 9). This draws
exactly the images and noise of `localdiff evaluate --num N --seed S --timesteps ...` (the seeded subset
of the held-out split, one draw per image and timestep from one generator), stores every image's MSE,
and, in table mode, compares every run with a baseline run by paired intervals (`localdiff.paired`).
Runs of different models can be made at different times: the inputs depend only on the seed.

    python benchmarks/heldout_mse.py --dataset mnist --model masked --out runs/heldout/mnist/masked.npz
    python benchmarks/heldout_mse.py --dataset mnist --model masked-soft --opt gamma=1 --out runs/heldout/mnist/masked-soft.npz
    python benchmarks/heldout_mse.py --table runs/heldout/mnist --baseline masked
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np


def measure(args) -> None:
    from localdiff import load_dataset, make_denoiser
    from localdiff.calibrate_masked import held_out_images, noisy_images, per_image_mse
    from localdiff.commands.common import parse_opts, timestep_list

    out = Path(args.out)
    if out.exists():
        sys.exit(f"{out} exists")
    timesteps = timestep_list(args.timesteps, "--timesteps")
    data = load_dataset(args.dataset, split="train")
    held_out = load_dataset(args.dataset, split=args.held_out_split)
    images = held_out_images(held_out, min(args.num, len(held_out)), args.seed)
    x_t = noisy_images(images, timesteps, args.seed)
    t0 = time.perf_counter()
    den = make_denoiser(args.model, data, **{"device": "cpu", **parse_opts(args.opt)})
    build = time.perf_counter() - t0
    mse = np.zeros((len(timesteps), len(images)))
    seconds = []
    for ti, t in enumerate(timesteps):
        t0 = time.perf_counter()
        mse[ti] = per_image_mse(den, x_t[t], images, t, args.batch_size).numpy()
        seconds.append(time.perf_counter() - t0)
        print(f"{args.model} t={t}: mse {mse[ti].mean():.5f} ({seconds[-1]:.0f} s)", flush=True)
    meta = {"command": " ".join(sys.argv), "dataset": args.dataset, "model": args.model,
            "name": args.name or args.model, "settings": den.settings(), "num": len(images), "seed": args.seed,
            "timesteps": timesteps, "build_s": build, "seconds": seconds, "batch_size": args.batch_size}
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, mse=mse, timesteps=np.asarray(timesteps), meta=json.dumps(meta, default=str))


def table(args) -> None:
    from localdiff.paired import compare

    runs = {}
    for p in sorted(Path(args.table).glob("*.npz")):
        z = np.load(p)
        meta = json.loads(str(z["meta"]))
        runs[meta["name"]] = (z["mse"], [int(t) for t in z["timesteps"]], meta)
    if args.baseline not in runs:
        sys.exit(f"no run named {args.baseline} in {args.table}: {', '.join(runs)}")
    base, ts, _ = runs[args.baseline]
    print("| model | " + " | ".join(f"t={t}" for t in ts) + " | s / image |")
    print("| --- |" + " --- |" * (len(ts) + 1))
    for name, (mse, rts, meta) in runs.items():
        assert rts == ts, f"{name}: other timesteps"
        n = mse.shape[1]
        cells = [f"{m:.4f} ± {s:.4f}" for m, s in zip(mse.mean(1), mse.std(1, ddof=1) / np.sqrt(n))]
        print(f"| {name} | " + " | ".join(cells) + f" | {sum(meta['seconds']) / n / len(ts):.3f} |")
    print(f"\nPaired against {args.baseline} (mean difference of per-image MSE, 95% CI, images where the model "
          "is better / n):\n")
    print("| model | " + " | ".join(f"t={t}" for t in ts) + " |")
    print("| --- |" + " --- |" * len(ts))
    for name, (mse, _, _) in runs.items():
        if name == args.baseline:
            continue
        cells = []
        for ti in range(len(ts)):
            c = compare(mse[ti], base[ti], a=name, b=args.baseline, metric="mse", lower_is_better=True)
            mark = " **better**" if c.a_better else (" worse" if c.b_better else "")
            cells.append(f"{c.mean_diff:+.4f} [{c.ci95[0]:+.4f}, {c.ci95[1]:+.4f}] {c.wins_a}/{c.n}{mark}")
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="mnist")
    p.add_argument("--held-out-split", default="test")
    p.add_argument("--model")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE")
    p.add_argument("--name", default=None, help="the run's name in tables (default: the model)")
    p.add_argument("--timesteps", default="100,300,500,700,900")
    p.add_argument("--num", type=int, default=500)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out")
    p.add_argument("--table", metavar="DIR", help="print the tables of every run in DIR instead")
    p.add_argument("--baseline", default="masked")
    args = p.parse_args()
    if args.table:
        table(args)
    elif not (args.model and args.out):
        p.error("--model and --out (or --table)")
    else:
        measure(args)


if __name__ == "__main__":
    main()
