"""Every command that runs under torchrun, plainly and on P processes, compared number by number.

On a generated set (``--images`` structured 1x8x8 images in an .npz, read with ``--data``) it runs
``localdiff sample --trajectory`` (wiener, optimal, masked; float32 and float64), ``fields``, ``evaluate`` and ``study``
once plainly and once as ``torchrun --standalone --nproc-per-node P --no-python -- localdiff ...``, each
with its own empty statistics cache, and prints the largest difference between the two runs' outputs
(every array of samples.npy, trajectory.npz, fields.npz, samples.npz; every number of the JSON records
except timings), by command and arithmetic.

    python benchmarks/compare_distributed.py [--procs 2] [--images 101] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

SKIP = ("seconds", "timings_s", "step_seconds", "command", "versions", "settings", "distributed", "world_size",
        "shards", "device", "files", "out", "source", "platform", "started")


def numbers(doc, prefix="") -> dict[str, float]:
    """Every number in a JSON document, keyed by its path (timings and run details left out)."""
    out: dict[str, float] = {}
    if isinstance(doc, dict):
        for k, v in doc.items():
            if not any(s in str(k) for s in SKIP):
                out.update(numbers(v, f"{prefix}/{k}"))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out.update(numbers(v, f"{prefix}[{i}]"))
    elif isinstance(doc, (int, float)) and not isinstance(doc, bool):
        out[prefix] = float(doc)
    return out


def arrays(path: Path) -> dict[str, np.ndarray]:
    if path.suffix == ".npy":
        return {path.name: np.load(path)}
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def run(cmd: list[str], env: dict) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{done.stderr[-3000:]}")


def compare(plain: Path, dist: Path, files: list[str]) -> tuple[float, float]:
    """Largest absolute difference over the arrays and over the JSON numbers of ``files``."""
    arr = num = 0.0
    for name in files:
        a, b = plain / name, dist / name
        if name.endswith(".json"):
            x, y = numbers(json.loads(a.read_text())), numbers(json.loads(b.read_text()))
            assert x.keys() == y.keys(), set(x) ^ set(y)
            num = max([num] + [abs(x[k] - y[k]) for k in x if np.isfinite(x[k]) or x[k] != y[k]])
        else:
            x, y = arrays(a), arrays(b)
            arr = max([arr] + [float(np.abs(x[k].astype(np.float64) - y[k].astype(np.float64)).max())
                               for k in x if x[k].size])
    return arr, num


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--procs", type=int, default=2)
    p.add_argument("--images", type=int, default=101)
    p.add_argument("--json", default=None)
    args = p.parse_args()
    localdiff = shutil.which("localdiff")
    if localdiff is None:
        sys.exit("the localdiff console script is not on PATH")
    tmp = Path(tempfile.mkdtemp(prefix="compare-distributed-"))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 200, size=(args.images, 1, 8, 8))
    x[: args.images // 2, :, 2:6, 2:6] += 55
    np.savez(tmp / "data.npz", x.astype(np.uint8))
    np.save(tmp / "noise.npy", rng.standard_normal((4, 1, 8, 8)).astype(np.float32))
    data = ["--data", str(tmp / "data.npz")]
    jobs = {}
    for model in ("wiener", "optimal", "masked"):
        for dt in ("float32", "float64"):
            opts = [] if model == "wiener" else ["--opt", f"dtype={dt}"]
            if model == "wiener" and dt == "float32":
                continue  # wiener computes in float64 only
            jobs[f"sample {model} {dt}"] = (["sample", *data, "--model", model, *opts, "--trajectory",
                                             "--init-noise", str(tmp / "noise.npy")], ["samples.npy", "trajectory.npz"])
    common = ["--held-out-split", "train"]
    for dt in ("float32", "float64"):
        o = ["--opt", f"optimal.dtype={dt}", "--opt", f"masked.dtype={dt}"]
        jobs[f"fields {dt}"] = (["fields", *data, *common, "--models", "wiener,optimal,masked,scfdm", *o,
                                 "--timesteps", "100,500,900", "--draws", "4"], ["fields.npz", "locality.json"])
        jobs[f"evaluate {dt}"] = (["evaluate", *data, *common, "--models", "wiener,optimal,nearest,masked", *o,
                                   "--timesteps", "100,500,900", "--num", "16", "--samples", "4",
                                   "--sample-steps", "10"], ["evaluate.json"])
        jobs[f"study {dt}"] = (["study", *data, *common, "--no-unet", "--models", "wiener,optimal,nearest,masked,ls",
                                *o, "--num", "4", "--field-draws", "2", "--held-out", "8", "--no-progress"],
                               ["samples.npz", "fields.npz", "metrics.json"])
    results = {}
    for name, (cmd, files) in jobs.items():
        outs = {}
        for mode in ("plain", "torchrun"):
            out = tmp / f"{name.replace(' ', '-')}-{mode}"
            env = dict(os.environ, LOCALDIFF_CACHE=str(out) + "-cache", OMP_WAIT_POLICY="PASSIVE",
                       OMP_NUM_THREADS="1")
            launcher = [] if mode == "plain" else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                   "--nproc-per-node", str(args.procs), "--no-python", "--"]
            run([*launcher, localdiff, *cmd, "--out", str(out)], env)
            outs[mode] = out
        arr, num = compare(outs["plain"], outs["torchrun"], files)
        results[name] = {"arrays": arr, "numbers": num}
        print(f"{name:22s} max |plain - {args.procs} processes|: arrays {arr:.2e}, JSON numbers {num:.2e}", flush=True)
    shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
