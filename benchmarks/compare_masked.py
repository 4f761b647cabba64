"""Old against new: `masked` from two source trees, timed alternately under the same machine load.

A shared machine's speed drifts by more than a refactor changes it, so two benchmark runs one after the
other do not compare two versions. This starts one persistent process per source tree (each loads full
MNIST, builds `masked` and runs the 10-step DDIM sampling run once, timed), then asks them in turn for the
whole 10-step run again (every cache cleared) and, on the same x_t, for a first call (caches cleared) and a
warm call at every step, for ``--rounds`` rounds, alternating which goes first. It reports the per-step best and the medians, and whether the two sampling
runs are bit-identical.

    git worktree add /tmp/localdiff-old <commit>        # or: git archive <commit> | tar -x -C /tmp/localdiff-old
    python benchmarks/compare_masked.py --old /tmp/localdiff-old/src --new src --rounds 5
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

CHILD = r'''
import json, sys, time
import torch
from localdiff import load_dataset, make_denoiser
from localdiff.diffusion import initial_noise, sample
data = load_dataset("mnist", split="train", subset=int(sys.argv[2]) or None)
den = make_denoiser("masked", data, device="cpu")
t0 = time.perf_counter()
traj = sample(den, init_noise=initial_noise(int(sys.argv[3]), data.shape, seed=0), steps=10, return_trajectory=True,
              progress=False)
total = time.perf_counter() - t0
torch.save(dict(samples=traj.samples, x0=traj.x0_hat), sys.argv[1])
print(json.dumps(dict(sample_s=total, timesteps=traj.timesteps)), flush=True)
xt = {t: traj.xt[s] for s, t in enumerate(traj.timesteps)}
for line in sys.stdin:
    t, mode = line.split()
    if mode in ("first", "sample"):
        den.clear_cache()
    start = time.perf_counter()
    if mode == "sample":  # the whole 10-step run again, every cache cleared first
        again = sample(den, init_noise=initial_noise(int(sys.argv[3]), data.shape, seed=0), steps=10, progress=False)
    else:
        den(xt[int(t)], int(t))
    print(json.dumps(dict(s=time.perf_counter() - start)), flush=True)
'''


def load() -> list[float]:
    """The machine's load average (1, 5, 15 min): timings on a shared machine mean little without it."""
    return [round(v, 2) for v in os.getloadavg()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--old", required=True, help="the old tree's src/ directory")
    ap.add_argument("--new", required=True, help="the new tree's src/ directory")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--num-train", type=int, default=0, help="training images (0: all 60,000)")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--runs-only", action="store_true", help="time only the whole 10-step runs in the rounds")
    ap.add_argument("--json", default=None, help="also write every timing and the load averages here")
    args = ap.parse_args()
    import torch

    res: dict = {"old": {}, "new": {}}
    loads = {"start": load()}
    procs = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in ("old", "new"):  # the sampling runs one after the other, not at the same time
            env = dict(os.environ, PYTHONPATH=os.path.abspath(getattr(args, name)),
                       OMP_WAIT_POLICY=os.environ.get("OMP_WAIT_POLICY", "PASSIVE"))
            p = subprocess.Popen([sys.executable, "-c", CHILD, os.path.join(tmp, f"{name}.pt"), str(args.num_train),
                                  str(args.batch)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env)
            info = json.loads(p.stdout.readline())
            res[name]["sample_s"], timesteps = info["sample_s"], info["timesteps"]
            procs[name] = p
            loads[f"after {name} sampling run"] = load()
        for r in range(args.rounds):
            for name in (("old", "new") if r % 2 == 0 else ("new", "old")):  # the 10-step run, interleaved
                procs[name].stdin.write("-1 sample\n")
                procs[name].stdin.flush()
                res[name].setdefault("samples", []).append(json.loads(procs[name].stdout.readline())["s"])
            for t in ([] if args.runs_only else timesteps):
                for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
                    for mode in ("first", "warm"):
                        procs[name].stdin.write(f"{t} {mode}\n")
                        procs[name].stdin.flush()
                        s = json.loads(procs[name].stdout.readline())["s"]
                        res[name].setdefault(mode, {}).setdefault(t, []).append(s)
            loads[f"after round {r + 1}"] = load()
        for p in procs.values():
            p.stdin.close()
            p.wait()
        a, b = (torch.load(os.path.join(tmp, f"{n}.pt")) for n in ("old", "new"))
    same = torch.equal(a["samples"], b["samples"]) and torch.equal(a["x0"], b["x0"])
    print(f"sampling runs bit-identical: {same}")
    if args.runs_only:
        timesteps = []
    else:
        print(f"{'t':>4} {'old first':>10} {'new first':>10} {'old warm':>9} {'new warm':>9}  (best of {args.rounds})")
    for t in timesteps:
        print(f"{t:>4} " + " ".join(f"{min(res[n][m][t]):>{w}.3f}" for n, m, w in
                                    (("old", "first", 10), ("new", "first", 10), ("old", "warm", 9), ("new", "warm", 9))))

    def total(name, mode, pick):
        return sum(pick(sorted(res[name][mode][t])) for t in timesteps) if timesteps else float("nan")

    for label, pick in (("best", lambda v: v[0]), ("median", lambda v: v[len(v) // 2])) if timesteps else ():
        print(f"sum of per-step {label}: first calls old {total('old', 'first', pick):.2f} s, new "
              f"{total('new', 'first', pick):.2f} s; warm old {total('old', 'warm', pick):.2f} s, new "
              f"{total('new', 'warm', pick):.2f} s")
    print(f"sampling run (10 steps, first calls): old {res['old']['sample_s']:.2f} s, new {res['new']['sample_s']:.2f} s")
    if args.rounds:
        print(f"sampling runs in the rounds (10 steps, caches cleared), best / median of {args.rounds}: " + ", ".join(
            f"{n} {min(res[n]['samples']):.2f} / {sorted(res[n]['samples'])[args.rounds // 2]:.2f} s"
            for n in ("old", "new")))
    if args.rounds:
        d = sorted(b - a for a, b in zip(res["old"]["samples"], res["new"]["samples"]))
        print(f"paired per round, new - old (10-step runs): mean {sum(d) / len(d):+.2f} s, median "
              f"{d[len(d) // 2]:+.2f} s, range [{d[0]:+.2f}, {d[-1]:+.2f}] s over {len(d)} rounds")
    print("load average (1, 5, 15 min): " + "; ".join(f"{k} {v}" for k, v in loads.items()))
    if args.json:
        summary = {f"{n}_{m}_{label}": total(n, m, pick) for n in ("old", "new") for m in ("first", "warm")
                   for label, pick in (("best", lambda v: v[0]), ("median", lambda v: v[len(v) // 2]))}
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), bit_identical=same, timesteps=timesteps, loads=loads, summary=summary,
                           sample_s={n: res[n]["sample_s"] for n in res},
                           sample_rounds_s={n: res[n].get("samples", []) for n in res},
                           calls={n: {m: {str(t): v for t, v in res[n].get(m, {}).items()} for m in ("first", "warm")}
                                  for n in res}), f, indent=1)


if __name__ == "__main__":
    main()
