"""Benchmark of the Wiener-masked local denoiser (`masked`) against the official algorithm.

On the same data, device and batch (default: 8 queries, the full MNIST training set of 60,000, 10 DDIM
steps at timesteps 900..0) it measures, per step:

  * ours: seconds per call of `masked` on the step's x_t: a first call at that t (caches cleared:
    masks, tile plan and the query-independent term Q computed, as a one-batch run sees them) and a
    later call ("warm": all cached, as every later batch of a sampling run sees them), best of --repeat;
  * the official algorithm, re-implemented below exactly as `pca_locality` computes it: per chunk of
    512 images materialise (x_t - a y)^2 as [b, k, n], multiply by the dense float32 [n, n] mask
    (einsum 'bkn,nm->bkm'), softmax within the chunk, chunk means averaged ("reference");
  * the same reference with the exact global softmax instead ("reference-global"; streamed with a
    running max), whose output must equal ours: max |ours - reference-global| is reported;
  * the mask density, the multiply-adds our tiles do per nnz(mask), and the floor
    B*K*nnz(mask) multiply-adds / (this device's float32 matmul rate, measured here with a large
    torch.mm); also a floor that adds B*K*n exponentials at the measured exp2 rate.

Both references use our float64 masks (cast to float32), so the comparison is of the algorithms,
not of mask round-off. Ours and the references run in separate processes on CPU so that the peak
resident memory (getrusage maxrss) of each is its own; on CUDA, torch.cuda.max_memory_allocated.
The x_t of every step come from our own DDIM trajectory and are fed to the references, so every
step compares outputs on identical inputs. Timings on a shared CPU are noisy: ours is the best of
--repeat calls, the references (several times slower) are timed once.

    python benchmarks/bench_masked.py [--device cpu|cuda] [--num-train 60000] [--steps 10]
                                      [--batch 8] [--threads N] [--reference both|local|global|none]
                                      [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import torch

from _common import peak_memory_mib, sync


def matmul_rate(device, size: int = 4096, reps: int = 6) -> float:
    """Best measured float32 multiply-add rate (multiply-adds per second) of a square torch.mm, with
    torch's own threads (a high rate makes the floor low: a noisy slow measurement must not flatter us)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    best = float("inf")
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        a @ b
        sync(device)
        best = min(best, time.perf_counter() - start)
    return size**3 / best


def exp_rate(device, numel: int = 1 << 22, reps: int = 5) -> float:
    """Measured float32 exp2 rate (per second) on a cache-sized tensor, in place."""
    x = -torch.rand(numel, device=device) * 50
    best = float("inf")
    for _ in range(reps):
        y = x.clone()
        sync(device)
        start = time.perf_counter()
        y.exp2_()
        sync(device)
        best = min(best, time.perf_counter() - start)
    return numel / best


def reset_peak_memory(device) -> float:
    """Start a new peak (Linux: /proc/self/clear_refs "5" resets maxrss); returns the current MB."""
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        return torch.cuda.memory_allocated() / 2**20
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024
    except (OSError, StopIteration, ValueError):
        return float("nan")  # the peak then includes loading the data


def load(num_train: int):
    from localdiff import load_dataset

    data = load_dataset("mnist", split="train")
    return data if num_train >= len(data) else data.subset(num_train, seed=0)


# ------------------------------------------------------------------------------------------------
# The official algorithm (pca_locality), re-implemented plainly
# ------------------------------------------------------------------------------------------------

@torch.no_grad()
def reference_denoise(x_t: torch.Tensor, y_all: torch.Tensor, mask: torch.Tensor, a: float, b2: float,
                      temperature: float = 1.0, chunk: int = 512, mode: str = "local") -> torch.Tensor:
    """Official algorithm; ``mode="local"``: its chunk-normalised softmax, averaged over chunks (with its
    1e-8); ``mode="global"``: the same logits with the exact global softmax (running max)."""
    xt = x_t.flatten(1)  # [b, n]
    sum_weighted = sum_weights = m = None
    for start in range(0, y_all.shape[0], chunk):
        x0b = y_all[start:start + chunk]  # [k, n]
        delta = (xt.unsqueeze(1) - a * x0b.unsqueeze(0)) ** 2  # [b, k, n]
        ds = torch.einsum("bkn,nm->bkm", delta, mask)  # [b, k, n]
        logits = -ds / (2 * b2 * temperature)
        lmax = logits.max(dim=1, keepdim=True).values  # [b, 1, n]
        if mode == "local":
            e = torch.exp(logits - lmax)
            w = e / e.sum(dim=1, keepdim=True)
            ws, wsum = torch.einsum("bkn,kn->bn", w, x0b), w.sum(dim=1)
            sum_weighted = ws if sum_weighted is None else sum_weighted + ws
            sum_weights = wsum if sum_weights is None else sum_weights + wsum
        else:
            new_m = lmax.squeeze(1) if m is None else torch.maximum(m, lmax.squeeze(1))
            e = torch.exp(logits - new_m.unsqueeze(1))
            ws, wsum = torch.einsum("bkn,kn->bn", e, x0b), e.sum(dim=1)
            if m is None:
                sum_weighted, sum_weights = ws, wsum
            else:
                f = torch.exp(m - new_m)
                sum_weighted, sum_weights = sum_weighted * f + ws, sum_weights * f + wsum
            m = new_m
    if mode == "local":
        return (sum_weighted / (sum_weights + 1e-8)).view_as(x_t)
    return (sum_weighted / sum_weights).view_as(x_t)


# ------------------------------------------------------------------------------------------------
# The two parts (run in separate processes on CPU)
# ------------------------------------------------------------------------------------------------

def run_ours(args, out_path: str) -> None:
    from localdiff import make_denoiser
    from localdiff.diffusion import initial_noise, sample

    dev = args.device
    data = load(args.num_train)
    rate0 = matmul_rate(dev, args.rate_size)  # the floor's rate: the best of measurements before and after the run
    base_mem = reset_peak_memory(dev)  # the raw uint8 set stays; the rest is ours
    den = make_denoiser("masked", data, device=dev, dtype=args.dtype, threads=args.threads)
    noise = initial_noise(args.batch, data.shape, seed=args.seed)
    sync(dev)
    traj = sample(den, init_noise=noise, steps=args.steps, return_trajectory=True, progress=False)
    first = list(traj.step_seconds)  # the sampling run itself (includes the scheduler step)
    steps = []
    for s, t in enumerate(traj.timesteps):
        x_t = traj.xt[s].to(dev)
        cold = warm = float("inf")
        for _ in range(args.repeat):
            den.clear_cache()  # a first call at t: masks, plan and Q computed again
            sync(dev)
            start = time.perf_counter()
            out = den(x_t, t)
            sync(dev)
            cold = min(cold, time.perf_counter() - start)
            sync(dev)
            start = time.perf_counter()  # a later call at t (the next batch of a run): all cached
            den(x_t, t)
            sync(dev)
            warm = min(warm, time.perf_counter() - start)
        plan = den.plan(t, args.batch)
        steps.append(dict(t=t, ours_s=cold, ours_warm_s=warm, sampling_step_s=first[s], density=plan.density,
                          nnz=plan.nnz, tile=list(plan.tile_shape), dense=plan.dense,
                          macs_per_nnz=plan.macs / plan.nnz if plan.nnz else float("nan"),
                          max_diff_vs_sampling_run=float((out.cpu() - traj.x0_hat[s]).abs().max())))
    rate, erate = max(rate0, matmul_rate(dev, args.rate_size)), exp_rate(dev)
    torch.save(dict(xt=traj.xt, x0=traj.x0_hat, samples=traj.samples, steps=steps, timesteps=traj.timesteps,
                    masks={t: den.masks(t).cpu() for t in traj.timesteps}, matmul_rate=rate, exp_rate=erate,
                    mem_mb=peak_memory_mib(dev), base_mem_mb=base_mem, num_train=len(data), n=data.dim,
                    settings=den.settings()), out_path)


def run_reference(args, ours_path: str, out_path: str) -> None:
    from localdiff.diffusion import DEFAULT_SCHEDULE as S

    dev = args.device
    data = load(args.num_train)
    ours = torch.load(ours_path, weights_only=False)
    base_mem = reset_peak_memory(dev)
    y_all = data.tensor(device=dev, flat=True)  # [K, n] float32, resident (the official re-reads it per call)
    modes = {"both": ["local", "global"], "local": ["local"], "global": ["global"]}[args.reference]
    res = {m: [] for m in modes}
    for s, t in enumerate(ours["timesteps"]):
        mask = ours["masks"][t].to(dev, torch.float32)
        x_t = ours["xt"][s].to(dev)
        for mode in modes:
            sync(dev)
            start = time.perf_counter()
            out = reference_denoise(x_t, y_all, mask, S.a(t), S.b2(t), chunk=args.ref_chunk, mode=mode)
            sync(dev)
            res[mode].append(dict(seconds=time.perf_counter() - start, out=out.cpu()))
    torch.save(dict(res=res, mem_mb=peak_memory_mib(dev), base_mem_mb=base_mem), out_path)


def child(args, part: str, *paths) -> None:
    cmd = [sys.executable, os.path.abspath(__file__), "--part", part, *paths, "--device", args.device,
           "--num-train", str(args.num_train), "--steps", str(args.steps), "--batch", str(args.batch),
           "--seed", str(args.seed), "--reference", args.reference, "--ref-chunk", str(args.ref_chunk),
           "--repeat", str(args.repeat), "--dtype", args.dtype, "--rate-size", str(args.rate_size)]
    if args.threads:
        cmd += ["--threads", str(args.threads)]
    subprocess.run(cmd, check=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--num-train", type=int, default=60000, help="training images (a seeded subset if fewer)")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--dtype", default="float32", help="dtype option of `masked`")
    ap.add_argument("--threads", type=int, default=None,
                    help="threads option of `masked` (1: one stream, torch's threads inside each product)")
    ap.add_argument("--reference", default="both", choices=["both", "local", "global", "none"])
    ap.add_argument("--ref-chunk", type=int, default=512)
    ap.add_argument("--repeat", type=int, default=3, help="timed calls of ours per step (best is reported)")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--rate-size", type=int, default=4096,
                    help="side of the square product that measures the floor's multiply-add rate")
    ap.add_argument("--part", nargs="+", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.part:
        if args.part[0] == "ours":
            run_ours(args, args.part[1])
        else:
            run_reference(args, args.part[1], args.part[2])
        return

    with tempfile.TemporaryDirectory() as tmp:
        p_ours, p_ref = os.path.join(tmp, "ours.pt"), os.path.join(tmp, "ref.pt")
        if torch.device(args.device).type == "cuda":  # one process; reset the peak between parts
            run_ours(args, p_ours)
            torch.cuda.reset_peak_memory_stats()
            if args.reference != "none":
                run_reference(args, p_ours, p_ref)
        else:
            child(args, "ours", p_ours)
            if args.reference != "none":
                child(args, "reference", p_ours, p_ref)
        ours = torch.load(p_ours, weights_only=False)
        ref = torch.load(p_ref, weights_only=False) if args.reference != "none" else None

    B, K, n = args.batch, ours["num_train"], ours["n"]
    rate, erate = ours["matmul_rate"], ours["exp_rate"]
    rows = []
    for s, st in enumerate(ours["steps"]):
        floor = B * K * st["nnz"] / rate
        floor_exp = floor + B * K * n / erate
        row = dict(st, floor_s=floor, floor_exp_s=floor_exp, ours_over_floor=st["ours_s"] / floor,
                   warm_over_floor=st["ours_warm_s"] / floor, ours_over_floor_exp=st["ours_s"] / floor_exp)
        if ref is not None:
            for mode, r in ref["res"].items():
                row[f"ref_{mode}_s"] = r[s]["seconds"]
                diff = float((r[s]["out"] - ours["x0"][s]).abs().max())
                row[f"max_diff_vs_ref_{mode}"] = diff
            if "local" in ref["res"]:
                row["speedup_vs_ref"] = ref["res"]["local"][s]["seconds"] / st["ours_s"]
        rows.append(row)

    head = f"{'t':>4} {'density':>7} {'tile':>5} {'mac/nnz':>7} {'floor s':>8} {'ours s':>7} {'warm s':>7} " \
           f"{'/floor':>6} {'/fl+exp':>7}"
    if ref is not None:
        head += "".join(f" {'ref-' + m + ' s':>13}" for m in ref["res"]) + f" {'speedup':>7}"
        head += "".join(f" {'|d| ' + m:>11}" for m in ref["res"])
    print(f"masked vs official algorithm: {K} training images, n={n}, batch {B}, {args.steps} DDIM steps, "
          f"device {args.device}, torch threads {torch.get_num_threads()}")
    print(f"measured float32 matmul rate {rate / 1e9:.1f} G multiply-adds/s, exp2 rate {erate / 1e9:.2f} G/s")
    print(head)
    for r in rows:
        line = (f"{r['t']:>4} {r['density']:>7.4f} {'x'.join(map(str, r['tile'])) + ('d' if r['dense'] else ''):>5} "
                f"{r['macs_per_nnz']:>7.2f} {r['floor_s']:>8.3f} {r['ours_s']:>7.3f} {r['ours_warm_s']:>7.3f} "
                f"{r['ours_over_floor']:>6.2f} {r['ours_over_floor_exp']:>7.2f}")
        if ref is not None:
            line += "".join(f" {r[f'ref_{m}_s']:>13.3f}" for m in ref["res"])
            line += f" {r.get('speedup_vs_ref', float('nan')):>7.1f}"
            line += "".join(f" {r[f'max_diff_vs_ref_{m}']:>11.2e}" for m in ref["res"])
        print(line)
    tot = {k: sum(r[k] for r in rows) for k in ("ours_s", "ours_warm_s", "floor_s", "floor_exp_s")}
    print(f"total: ours {tot['ours_s']:.2f} s (warm {tot['ours_warm_s']:.2f} s), floor {tot['floor_s']:.2f} s "
          f"(with exps {tot['floor_exp_s']:.2f} s): ours/floor {tot['ours_s'] / tot['floor_s']:.2f}, "
          f"warm/floor {tot['ours_warm_s'] / tot['floor_s']:.2f}, "
          f"ours/floor+exp {tot['ours_s'] / tot['floor_exp_s']:.2f}")
    summary = dict(ours_total_s=tot["ours_s"], ours_warm_total_s=tot["ours_warm_s"], floor_total_s=tot["floor_s"],
                   floor_exp_total_s=tot["floor_exp_s"], ours_peak_mb=ours["mem_mb"], ours_base_mb=ours["base_mem_mb"])
    if ref is not None:
        for m in ref["res"]:
            summary[f"ref_{m}_total_s"] = sum(r[f"ref_{m}_s"] for r in rows)
            summary[f"max_diff_vs_ref_{m}"] = max(r[f"max_diff_vs_ref_{m}"] for r in rows)
        summary["ref_peak_mb"], summary["ref_base_mb"] = ref["mem_mb"], ref["base_mem_mb"]
        line = ", ".join(f"ref-{m} {summary[f'ref_{m}_total_s']:.2f} s" for m in ref["res"])
        print(f"reference totals: {line}")
    mem = f"peak memory ({'max allocated' if args.device.startswith('cuda') else 'maxrss'}, from after loading " \
          f"the raw data): ours {ours['mem_mb']:.0f} MB (at start: {ours['base_mem_mb']:.0f} MB)"
    if ref is not None:
        mem += f", reference {ref['mem_mb']:.0f} MB (at start: {ref['base_mem_mb']:.0f} MB)"
    print(mem)
    if ref is not None:
        print("max |ours - reference-global| over steps (identical inputs): "
              f"{summary.get('max_diff_vs_ref_global', float('nan')):.2e}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), matmul_rate=rate, exp_rate=erate, steps=rows, summary=summary,
                           settings=ours["settings"]), f, indent=1, default=str)


if __name__ == "__main__":
    main()
