"""Wall time of the commands the README shows, run as a user runs them, for the README's time table.

Each command runs in its own process with a cold statistics cache (a fresh ``LOCALDIFF_CACHE``), as a
first run on a new machine does, and writes into a temporary directory. GPU-only commands, commands on
the user's own data and multi-hour trainings are not run (the CPU-default
`experiment`, which trains four U-Nets, only when ``--only`` names it); ``train-unet --minutes`` is run with a short
budget to check that it ends inside it. Results: one JSON line per command on stdout and, with
``--out``, a JSON file and a Markdown table.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/readme_times.py --out runs/readme-times
    python benchmarks/readme_times.py --only "study --quick,sample" --out runs/readme-times-part

Run it on a quiet machine: these are single measurements (what a user sees once), not repeated timings.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# (label, arguments after `localdiff`; "@python"/"@torchrun" start other programs; {noise} is a [16, 1, 28, 28] file)
COMMANDS = [
    ("study --quick", ["study", "--quick"]),
    ("study", ["study"]),
    ("study --dataset fashion-mnist", ["study", "--dataset", "fashion-mnist"]),
    ("sample --model optimal --num 16", ["sample", "--dataset", "mnist", "--model", "optimal", "--num", "16",
                                         "--steps", "10", "--seed", "0"]),
    ("sample --model nearest --init-noise", ["sample", "--dataset", "mnist", "--model", "nearest",
                                             "--init-noise", "{noise}"]),
    ("sample --model masked --num 16", ["sample", "--dataset", "mnist", "--model", "masked", "--num", "16"]),
    ("fields wiener,optimal,masked (5 t, 16 draws)", ["fields", "--dataset", "mnist", "--models",
                                                      "wiener,optimal,masked", "--pixels", "center", "--timesteps",
                                                      "100,300,500,700,900", "--draws", "16"]),
    ("evaluate --num 500 --samples 200", ["evaluate", "--dataset", "mnist", "--models", "wiener,optimal,unet",
                                          "--timesteps", "100,300,500,700", "--num", "500", "--samples", "200"]),
    ("experiment --quick", ["experiment", "locality-follows-data", "--quick"]),
    ("calibrate-patches els", ["calibrate-patches", "--dataset", "mnist", "--model", "els", "--target", "optimal",
                               "--sizes", "3,5,7,9,11"]),
    ("calibrate-masked", ["calibrate-masked", "--dataset", "mnist", "--model", "masked", "--taus",
                          "0.005,0.01,0.02", "--temperatures", "0.7,1", "--timesteps", "100,300,500,700,900",
                          "--num", "32", "--skip", "500"]),
    ("train-unet --subset 2000 --minutes 2 (config small, the CPU default)",
     ["train-unet", "--dataset", "mnist", "--subset", "2000", "--minutes", "2"]),
    ("torchrun 2 processes: sample --model masked", ["@torchrun", "sample", "--dataset", "mnist", "--model",
                                                     "masked", "--init-noise", "{noise}"]),
    ("examples/reproduce_table.py", ["@python", "examples/reproduce_table.py"]),
]
# commands of an hour or more on two cores: run only when --only names them
LONG = [
    ("experiment (CPU defaults)", ["experiment", "locality-follows-data"]),
]


def argv_for(args: list[str], work: Path, noise: Path) -> list[str]:
    args = [a.replace("{noise}", str(noise)) for a in args]
    if args[0] == "@python":
        return [sys.executable, *args[1:]]
    localdiff = shutil.which("localdiff") or sys.exit("the localdiff command is not installed (pip install -e .)")
    if args[0] == "@torchrun":
        torchrun = shutil.which("torchrun") or sys.exit("torchrun is not on PATH")
        return [torchrun, "--standalone", "--nproc-per-node", "2", "--no-python", "--", localdiff, *args[1:],
                "--out", str(work / "out")]
    return [localdiff, *args, "--out", str(work / "out")]


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default=None, help="comma-separated label prefixes to run (default: all)")
    p.add_argument("--out", default=None, help="directory for times.json and times.md (created)")
    a = p.parse_args(argv)
    if a.only is None:
        chosen = COMMANDS
    else:
        chosen = [c for c in COMMANDS + LONG if any(c[0].startswith(s.strip()) for s in a.only.split(","))]
    if not chosen:
        sys.exit(f"--only matched none of: {', '.join(c[0] for c in COMMANDS + LONG)}")
    import numpy as np

    rows = []
    with tempfile.TemporaryDirectory(prefix="readme-times.") as tmp:
        tmp = Path(tmp)
        noise = tmp / "noise.npy"
        np.save(noise, np.random.default_rng(0).standard_normal((16, 1, 28, 28)).astype(np.float32))
        for label, args in chosen:
            work = tmp / f"run{len(rows)}"
            work.mkdir()
            env = {**os.environ, "LOCALDIFF_CACHE": str(work / "cache"), "OMP_WAIT_POLICY": "PASSIVE"}
            cmd = argv_for(args, work, noise)
            t0 = time.perf_counter()
            done = subprocess.run(cmd, env=env, capture_output=True, text=True,
                                  cwd=Path(__file__).resolve().parents[1])
            wall = time.perf_counter() - t0
            row = {"command": label, "argv": " ".join(cmd[cmd.index("--") + 1:] if "--" in cmd else cmd),
                   "wall_s": round(wall, 1), "returncode": done.returncode}
            if done.returncode != 0:
                row["stderr_tail"] = done.stderr[-800:]
            rows.append(row)
            print(json.dumps(row), flush=True)
    load = os.getloadavg()
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "times.json").write_text(json.dumps({"rows": rows, "cpus": os.cpu_count(), "loadavg_end": load},
                                                   indent=1) + "\n")
        lines = ["| command | wall time |", "| --- | --- |"]
        lines += [f"| `{r['command']}` | {r['wall_s']:.0f} s{'' if r['returncode'] == 0 else ' (failed)'} |"
                  for r in rows]
        (out / "times.md").write_text("\n".join(lines) + "\n")
    if any(r["returncode"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
