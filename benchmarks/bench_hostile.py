"""Load each hostile file class of issue 16 in its own process and report what happens.

    python benchmarks/bench_hostile.py                 # every class
    python benchmarks/bench_hostile.py --only cifar-zero-stride,png16-bomb
    PYTHONPATH=/other/checkout/src python benchmarks/bench_hostile.py   # the same corpus on other code

Per class: the file's size, the outcome of ``load_dataset`` (plus first use, ``ds.tensor()``), the peak
memory growth of the child process, file descriptors left open (or closed only by the garbage collector), and whether numpy's or pickle's
module state changed. Children run under an address-space limit (``--limit-gib``) so a bomb cannot
take the machine down.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

CHILD = r"""
import json, os, resource, sys
limit = int(sys.argv[2]) << 30
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
import numpy as np
from numpy._core import numeric
import localdiff
from localdiff import load_dataset
from localdiff.errors import LocaldiffError

def state():
    f = numeric._frombuffer
    return repr((sorted(vars(f)), f.__doc__, f.__defaults__, f.__kwdefaults__, f.__name__))

def fds():
    return len(os.listdir("/proc/self/fd"))

import warnings
warnings.simplefilter("always", ResourceWarning)
caught = warnings.catch_warnings(record=True)
log = caught.__enter__()
before_state, before_fds = state(), fds()
rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    ds = load_dataset(sys.argv[1])
    ds.tensor()
    outcome = f"loads: {len(ds)} images {tuple(ds.shape)}"
except LocaldiffError as e:
    outcome = f"{type(e).__name__}: {str(e).splitlines()[0][:150]}"
except BaseException as e:
    outcome = f"UNTYPED {type(e).__name__}: {str(e).splitlines()[0][:150] if str(e) else ''}"
import gc; gc.collect()
leaks = sum(issubclass(w.category, ResourceWarning) for w in log)
rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"outcome": outcome, "rss_mib": (rss1 - rss0) / 1024, "fds_leaked": fds() - before_fds + leaks,
                  "state_changed": state() != before_state, "localdiff": localdiff.__file__}))
"""


def main() -> int:
    from hostile import BUILDERS, file_size

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=None, help="comma-separated class names")
    p.add_argument("--limit-gib", type=int, default=10, help="address-space limit of each child (GiB)")
    p.add_argument("--timeout", type=int, default=300)
    p.add_argument("--json", default=None, help="also write the rows to this file")
    args = p.parse_args()
    names = args.only.split(",") if args.only else list(BUILDERS)
    rows = []
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            d = Path(tmp) / name
            d.mkdir()
            path = BUILDERS[name](d)
            try:
                r = subprocess.run([sys.executable, "-c", CHILD, str(path), str(args.limit_gib)], capture_output=True,
                                   text=True, timeout=args.timeout, env=env)
                line = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else ""
                row = json.loads(line) if line.startswith("{") else {
                    "outcome": f"CRASH rc={r.returncode}: {r.stderr.strip().splitlines()[-1][:150] if r.stderr else ''}"}
            except subprocess.TimeoutExpired:
                row = {"outcome": f"TIMEOUT after {args.timeout} s"}
            row = {"class": name, "bytes": file_size(path), **row}
            rows.append(row)
            print(f"{name:26s} {row['bytes']:>9d} B  +{row.get('rss_mib', float('nan')):8.1f} MiB  "
                  f"fds {row.get('fds_leaked', '?')}  state {'CHANGED' if row.get('state_changed') else 'same'}  "
                  f"{row['outcome']}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
