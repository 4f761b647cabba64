"""Paired comparisons of the models of one or more `localdiff study` runs against a baseline model.

For every model the study stores the per-sample final R² against the U-Net (metrics.json) and each
step's x_t and x0_hat (samples.npz). This reads the final R², recomputes the single-step R² per sample
and step (the U-Net applied to the model's own x_t; the per-step means are checked against
metrics.json), averages it over the steps per sample, and compares every model with ``--baseline`` on
the same initial noise by `localdiff.paired.compare` (mean difference, 95% t-interval, wins). Runs
made separately with the same seed, dataset and U-Net start from the same noise and can be pooled.

    python benchmarks/study_paired.py runs/study/mnist-a runs/study/mnist-b:+cal --unet DIR --baseline masked

``RUN:SUFFIX`` appends SUFFIX to the names of that run's models (the same model with other options).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def single_step_r2(run: Path, name: str, unet, timesteps: list[int]) -> np.ndarray:
    """R² [S, N] of the model's x0_hat against the U-Net applied to the model's x_t at every step."""
    import torch

    from localdiff.metrics import r2_score

    z = np.load(run / "samples.npz")
    xt, x0 = torch.from_numpy(z[f"{name}/xt"]), torch.from_numpy(z[f"{name}/x0_hat"])
    out = []
    with torch.no_grad():
        for s, t in enumerate(timesteps):
            ref = torch.cat([unet(xt[s, i:i + 32], t).float() for i in range(0, xt.shape[1], 32)])
            out.append(r2_score(x0[s].double(), ref.double()).numpy())
    return np.stack(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="study run directories, each optionally RUN:SUFFIX")
    p.add_argument("--unet", default=None, help="the U-Net of the runs (default: the dataset's shipped one)")
    p.add_argument("--baseline", default="masked")
    p.add_argument("--json", type=Path, default=None, help="also write the comparisons here")
    args = p.parse_args()

    from localdiff import load_dataset, make_denoiser
    from localdiff.paired import compare

    final, single, seconds, cosines, noise = {}, {}, {}, {}, None
    unet = None
    for spec in args.runs:
        path, _, suffix = spec.partition(":")
        run = Path(path)
        m = json.loads((run / "metrics.json").read_text())
        z = np.load(run / "samples.npz")
        if noise is None:
            noise = z["init_noise"]
        elif not np.array_equal(noise, z["init_noise"]):
            raise SystemExit(f"{run} starts from other noise than {args.runs[0]}")
        if m["config"]["num"] != len(noise):
            raise SystemExit(f"{run}: {m['config']['num']} samples, the first run {len(noise)}")
        if unet is None:
            data = load_dataset(m["dataset"]["name"], split="train")
            unet = make_denoiser("unet", data, device="cpu", **({"path": args.unet} if args.unet else {}))
        for model, entry in m["models"].items():
            name = model + suffix
            if model == "unet" or "final" not in entry or name in final:
                continue
            final[name] = np.asarray(entry["final"]["r2_per_sample"])
            r2 = single_step_r2(run, model, unet, m["timesteps"])
            stored = [entry["steps"][str(t)]["single_step"]["r2"] for t in m["timesteps"]]
            assert np.allclose(r2.mean(1), stored, atol=1e-4), f"{run}/{model}: single-step R² differs from metrics.json"
            single[name] = r2.mean(0)
            seconds[name] = entry["seconds"].get("sample", float("nan")) / len(final[name])
            if entry.get("fields", {}).get("cosine_to_unet"):
                cosines[name] = entry["fields"]["cosine_to_unet"]
    rows, out = [], {}
    print("| model | final R² (mean ± SE) | single-step R² (mean over steps) | s / sample |")
    print("| --- | --- | --- | --- |")
    for name in final:
        f, s = final[name], single[name]
        print(f"| {name} | {f.mean():.3f} ± {f.std(ddof=1) / np.sqrt(len(f)):.3f} | {s.mean():.3f} ± "
              f"{s.std(ddof=1) / np.sqrt(len(s)):.3f} | {seconds[name]:.1f} |")
    print(f"\nPaired against {args.baseline} (mean difference, 95% CI, samples where the model is better / n):\n")
    print("| model | final R² | single-step R² |")
    print("| --- | --- | --- |")
    for name in final:
        if name == args.baseline:
            continue
        cf = compare(final[name], final[args.baseline], a=name, b=args.baseline, metric="final_r2")
        cs = compare(single[name], single[args.baseline], a=name, b=args.baseline, metric="single_step_r2")
        cells = [f"{c.mean_diff:+.3f} [{c.ci95[0]:+.3f}, {c.ci95[1]:+.3f}] {c.wins_a}/{c.n}"
                 + (" **better**" if c.a_better else " worse" if c.b_better else "") for c in (cf, cs)]
        print(f"| {name} | " + " | ".join(cells) + " |")
        out[name] = {"final_r2": cf.to_dict(), "single_step_r2": cs.to_dict()}
        rows.append(name)
    if cosines:
        ts = list(next(iter(cosines.values())))
        print("\nCosine of each model's sensitivity field with the U-Net's (mean over the field pixels):\n")
        print("| model | " + " | ".join(f"t={t}" for t in ts) + " |")
        print("| --- |" + " --- |" * len(ts))
        for name, c in cosines.items():
            print(f"| {name} | " + " | ".join(f"{c[t]:.3f}" for t in ts) + " |")
    if args.json:
        args.json.write_text(json.dumps({"baseline": args.baseline, "runs": [str(r) for r in args.runs],
                                         "comparisons": out}, indent=1))


if __name__ == "__main__":
    main()
