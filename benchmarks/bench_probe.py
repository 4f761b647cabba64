"""Wall time of ``localdiff probe`` as a user runs it: MNIST (1x28x28, 60,000 images) and a CIFAR-shaped set
(3x32x32, 50,000 random crops of the bundled photos: ``natural-patches`` with ``num=50000``), each in its own
process with a cold statistics cache (a first run), default settings (10 DDIM levels, 200 held-out images,
training sets N/8, N/4, N/2, N). Targets (issue 24): MNIST under 60 s, CIFAR-shaped under 5 minutes, on
2 CPU cores.

The machine may be shared, so each case also records the load average before and after, the child's CPU
time (user + system: what the run cost, whatever else ran) and the stage times from probe.json.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_probe.py --out runs/bench-probe.json
    python benchmarks/bench_probe.py --cases mnist --warm   # also a second run on the warm cache
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

CASES = {
    "mnist": ["mnist"],
    "cifar-shaped": ["natural-patches", "--data-opt", "natural-patches.num=50000"],
    "mnist+fashion+permuted": ["mnist", "fashion-mnist", "mnist-permuted"],
}


def loadavg() -> list[float]:
    try:
        return [float(v) for v in Path("/proc/loadavg").read_text().split()[:3]]
    except OSError:
        return []


def run_case(name: str, args: list[str], cache: Path, work: Path, threads: int) -> dict:
    out = work / f"probe-{name}-{time.time_ns()}"
    env = {**os.environ, "LOCALDIFF_CACHE": str(cache), "OMP_WAIT_POLICY": "PASSIVE",
           "OMP_NUM_THREADS": str(threads), "PYTHONPATH": os.pathsep.join(
               [str(Path(__file__).resolve().parent.parent / "src"), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "localdiff.cli", "probe", *args, "--no-progress", "--out", str(out)]
    before, t0 = loadavg(), time.perf_counter()
    usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    r = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - t0
    usage1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    if r.returncode != 0:
        raise SystemExit(f"{name} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rec = json.loads((out / "probe.json").read_text())
    return {"case": name, "command": "localdiff probe " + " ".join(args), "wall_s": wall,
            "cpu_s": (usage1.ru_utime - usage0.ru_utime) + (usage1.ru_stime - usage0.ru_stime),
            "loadavg_before": before, "loadavg_after": loadavg(), "threads": threads,
            "stages_s": {k: v for k, v in rec["seconds"].items() if k not in ("total", "command")},
            "in_command_s": rec["seconds"].get("command"), "html_mib": (out / "probe.html").stat().st_size / 2**20,
            "summary": r.stdout.strip().splitlines()[:-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="mnist,cifar-shaped", help=f"comma-separated, of {', '.join(CASES)}")
    ap.add_argument("--threads", type=int, default=2, help="OMP/torch threads of the run (default 2)")
    ap.add_argument("--warm", action="store_true", help="also time a second run on the warm statistics cache")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-probe-") as tmp:
        for name in [c.strip() for c in args.cases.split(",") if c.strip()]:
            if name not in CASES:
                raise SystemExit(f"unknown case {name}: choose from {', '.join(CASES)}")
            cache = Path(tmp) / f"cache-{name}"
            for label in (("cold", "warm") if args.warm else ("cold",)):
                res = {**run_case(name, CASES[name], cache, Path(tmp), args.threads), "cache": label}
                print(json.dumps(res), flush=True)
                results.append(res)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"cpu_count": os.cpu_count(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
