"""U-Net training throughput: our loop against a plain float32 eager loop, same model, same batch.

Rows, measured one after the other in one process on one device:
  plain        the textbook loop: fp32, NCHW, eager, AdamW, no clipping, no EMA;
  ours-fp32    localdiff's UNetTrainer with autocast/channels-last/compile off (its bookkeeping cost:
               data order, clipping, EMA, seeded dropout);
  ours         UNetTrainer as `localdiff train-unet` runs it: on CUDA bf16 autocast + channels-last;
               on the CPU the same as ours-fp32, so it is skipped;
  ours-compile the same with torch.compile (with --compile).

The untimed warm-up steps of each row are timed too: for ours-compile they hold the compilation. From
them and the rates follows the budget above which compiling pays off: a run of B seconds trains
(B - warm-up) x rate images, so compile wins once B > (w_c r_c - w_e r_e) / (r_c - r_e)
(``compile_break_even_s``; infinite when compiling is not faster per step). ``--budget-s B`` says which
to choose for a run of B seconds.

    python benchmarks/bench_unet_training.py [--device cpu|cuda] [--config small|paper] [--dataset mnist]
        [--batch-size 128] [--steps 20] [--warmup-steps 3] [--rounds 3] [--compile] [--budget-s 180]
        [--threads N] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

from localdiff import load_dataset
from localdiff.device import resolve_device
from localdiff.diffusion import DEFAULT_SCHEDULE
from localdiff.unet import TRAIN_RECIPES, TrainConfig, UNetTrainer, build_unet, unet_config

from _common import sync


def plain_loop(data, cfg, device, batch_size: int, lr: float):
    """A textbook DDPM training step (fp32, eager), as a closure."""
    torch.manual_seed(0)
    model = build_unet(cfg, data.shape).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    images = torch.from_numpy(data.raw).to(device)
    ab = DEFAULT_SCHEDULE.alpha_bar.to(device, torch.float32)
    gen = torch.Generator(device=device).manual_seed(0)

    def step():
        idx = torch.randint(0, images.shape[0], (batch_size,), generator=gen, device=device)
        x0 = images[idx].float() / 127.5 - 1.0
        t = torch.randint(0, 1000, (batch_size,), generator=gen, device=device)
        eps = torch.randn(x0.shape, generator=gen, device=device)
        a = ab[t].view(-1, 1, 1, 1)
        loss = F.mse_loss(model(a.sqrt() * x0 + (1 - a).sqrt() * eps, t).sample, eps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    return step, sum(p.numel() for p in model.parameters())


def measure(rows: dict, device, steps: int, warmup: int, rounds: int, batch_size: int) -> dict:
    """Images/s of every row; rows take turns in ``rounds`` blocks so that drifting load hits all alike.
    The untimed warm-up steps are timed separately (``warmup_s``: compilation, autotuning)."""
    warmup_s = {}
    for name, step in rows.items():
        sync(device)
        start = time.perf_counter()
        for _ in range(warmup):
            step()
        sync(device)
        warmup_s[name] = time.perf_counter() - start
    seconds = dict.fromkeys(rows, 0.0)
    done = dict.fromkeys(rows, 0)
    peak = {}
    for r in range(rounds):
        for name, step in rows.items():
            k = steps // rounds + (1 if r < steps % rounds else 0)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            for _ in range(k):
                loss = step()
            float(loss.detach())
            sync(device)
            seconds[name] += time.perf_counter() - start
            done[name] += k
            if device.type == "cuda":
                peak[name] = max(peak.get(name, 0.0), torch.cuda.max_memory_allocated(device) / 2**30)
    out = {}
    for name in rows:
        out[name] = {"images_per_s": done[name] * batch_size / seconds[name], "s_per_step": seconds[name] / done[name],
                     "warmup_s": warmup_s[name], "warmup_steps": warmup}
        if name in peak:
            out[name]["peak_mem_gib"] = peak[name]  # includes the other rows' resident models
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--config", choices=("small", "paper"), default="small")
    ap.add_argument("--dataset", default="mnist")
    ap.add_argument("--batch-size", type=int, default=None, help="default: the config's recipe (paper 128, small 64)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per row")
    ap.add_argument("--warmup-steps", type=int, default=3, help="untimed steps first (compilation happens here)")
    ap.add_argument("--rounds", type=int, default=3, help="rows take turns in this many timed blocks")
    ap.add_argument("--compile", action="store_true", help="also an 'ours-compile' row (torch.compile)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="say whether compiling pays off within a training budget of this many seconds")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    data = load_dataset(args.dataset)
    cfg = unet_config(args.config, data.shape)
    recipe = TRAIN_RECIPES[args.config]
    bs = args.batch_size or recipe.batch_size
    results = {"device": str(device), "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
               "torch": torch.__version__, "threads": torch.get_num_threads(), "dataset": args.dataset,
               "shape": list(data.shape), "config": args.config, "model": cfg.to_dict(), "batch_size": bs,
               "steps": args.steps, "rows": {}}

    step, n_params = plain_loop(data, cfg, device, bs, recipe.lr)
    results["num_parameters"] = n_params
    rows = {"plain": step}

    def ours(**runtime):
        train_cfg = TrainConfig(**{**recipe.recipe(), "batch_size": bs, "warmup": 0, "device": str(device), **runtime})
        trainer = UNetTrainer(data, cfg, train_cfg)
        return trainer.train_step

    rows["ours-fp32"] = ours(amp=False, channels_last=False, compile=False)
    if device.type == "cuda":
        rows["ours"] = ours(amp=True, channels_last=True, compile=False)
    if args.compile:
        rows["ours-compile"] = ours(amp=True, channels_last=True, compile=True)
    results["rows"] = measure(rows, device, args.steps, args.warmup_steps, max(1, min(args.rounds, args.steps)), bs)
    for name, r in results["rows"].items():
        print(f"{name:>10}: {r['images_per_s']:9.1f} images/s  ({1000 * r['s_per_step']:.1f} ms/step)"
              + (f"  peak {r['peak_mem_gib']:.2f} GiB" if "peak_mem_gib" in r else ""), flush=True)
    base = results["rows"]["plain"]["images_per_s"]
    for r in results["rows"].values():
        r["speedup_vs_plain"] = r["images_per_s"] / base
    print(f"{args.config} ({n_params / 1e6:.2f} M parameters), batch {bs}, {data.shape} on {device}: "
          + ", ".join(f"{k} x{v['speedup_vs_plain']:.2f}" for k, v in results["rows"].items()))
    if "ours-compile" in results["rows"]:
        eager = results["rows"]["ours" if "ours" in results["rows"] else "ours-fp32"]
        comp = results["rows"]["ours-compile"]
        re_, rc = eager["images_per_s"], comp["images_per_s"]
        we, wc = eager["warmup_s"], comp["warmup_s"]
        results["compile_break_even_s"] = (wc * rc - we * re_) / (rc - re_) if rc > re_ else float("inf")
        print(f"compile: {rc / re_:.2f}x the eager rate after {wc:.1f} s of warm-up (eager {we:.1f} s); pays off "
              f"for budgets over {results['compile_break_even_s']:.0f} s")
        if args.budget_s is not None:
            results["compile_pays_off"] = bool(args.budget_s > results["compile_break_even_s"])
            print(f"within {args.budget_s:.0f} s: {'compile' if results['compile_pays_off'] else 'stay eager'}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
