"""Study benchmark: wall time and peak memory of the default `localdiff study` on MNIST.

Runs the command exactly as a user would (a child process, default settings for the device) and
reads its peak resident set size and CPU time from the kernel's accounting of finished children.
Target on the idle 2-core CPU machine: at most 5 minutes and 4 GiB. Other work on the machine stretches
the wall time but not the CPU time, which is printed too (idle, wall time is roughly CPU time / 1.5-2). The U-Net's cost does not depend on its weights, so
without `--unet DIR` (and without shipped weights) a randomly initialised network of the `small`
configuration (the one shipped for MNIST) is used.

    python benchmarks/bench_study.py [--device cpu|cuda] [--quick] [--unet DIR] [--json out.json] [-- extra args]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import write_json

BUDGET_S = 300.0
BUDGET_MIB = 4096.0


def random_unet(directory: Path, config: str = "small") -> Path:
    import torch

    from localdiff.unet.configs import build_unet, unet_config

    torch.manual_seed(0)
    build_unet(unet_config(config, (1, 28, 28)), (1, 28, 28)).save_pretrained(directory)
    return directory


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--quick", action="store_true", help="benchmark --quick instead of the default study")
    ap.add_argument("--unet", default=None, help="a trained UNet2DModel directory (default: shipped weights, else "
                                                 "a random `small` network)")
    ap.add_argument("--unet-config", default="small", help="architecture of the random network (small or paper)")
    ap.add_argument("--keep", default=None, help="keep the run directory here (default: a temporary one)")
    ap.add_argument("--json", default=None)
    ap.add_argument("extra", nargs="*", help="more `localdiff study` arguments (after --)")
    args = ap.parse_args()

    from localdiff.denoisers.unet import shipped_weights_dir

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        unet = args.unet
        source = "given" if unet else None
        if unet is None and (shipped_weights_dir("mnist") / "config.json").is_file():
            source = "shipped"
        elif unet is None:
            unet, source = str(random_unet(tmp / "unet", args.unet_config)), f"random {args.unet_config}"
        out = Path(args.keep) if args.keep else tmp / "run"
        cmd = ["localdiff", "study", "--dataset", "mnist", "--device", args.device, "--out", str(out)]
        cmd += (["--unet", unet] if unet else []) + (["--quick"] if args.quick else []) + list(args.extra)
        env = {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE")}
        print("running:", " ".join(cmd), flush=True)
        start = time.perf_counter()
        proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True, check=False)
        wall = time.perf_counter() - start
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        peak_mib = usage.ru_maxrss / 1024  # KiB on Linux
        cpu_s = usage.ru_utime + usage.ru_stime  # CPU time of the study: what other load on the machine cannot inflate
        if proc.returncode != 0:
            sys.exit(f"localdiff study failed with exit code {proc.returncode}")
        metrics = json.loads((out / "metrics.json").read_text())
        if not args.keep:
            shutil.rmtree(out, ignore_errors=True)

    per_model = {name: {k: round(v, 2) for k, v in e["seconds"].items()} for name, e in metrics["models"].items()}
    results = {
        "command": " ".join(cmd), "unet": source, "device": args.device, "quick": args.quick,
        "cpu_count": os.cpu_count(), "load_average_1min": os.getloadavg()[0], "wall_s": wall, "cpu_s": cpu_s,
        "peak_rss_mib": peak_mib,
        "study_total_s": metrics["timings_s"]["total"], "models": list(metrics["models"]),
        "num": metrics["config"]["num"], "per_model_s": per_model,
        "within_budget": wall <= BUDGET_S and peak_mib <= BUDGET_MIB,
    }
    print(proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else "")
    print(f"wall time {wall:.1f} s (study itself {results['study_total_s']:.1f} s), CPU time {cpu_s:.0f} s "
          f"(load average after the run {results['load_average_1min']:.1f}), peak RSS {peak_mib:.0f} MiB; "
          f"budget {BUDGET_S:.0f} s / {BUDGET_MIB:.0f} MiB: {'met' if results['within_budget'] else 'NOT met'}")
    for name, secs in per_model.items():
        print(f"  {name:14s} " + ", ".join(f"{k} {v:.1f}" for k, v in secs.items()))
    write_json(args.json, results)


if __name__ == "__main__":
    main()
