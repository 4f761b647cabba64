"""``localdiff evaluate``: denoising error of several models on the same held-out noisy images."""

from __future__ import annotations

import sys
import time

from ..errors import ConfigError
from .common import (add_data_args, add_network_args, add_sampling_args, command_line, levels_list, load_data_from_args,
                     load_held_out, model_options, name_list, network_options, new_run_dir, sampler_from_args,
                     schedule_from_args, versions)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "evaluate", help="denoising MSE of models on held-out images at fixed timesteps",
        description="Noise held-out images to x_t at each timestep (one shared draw) and score every model's "
                    "x0_hat against the clean image: per-pixel MSE and its standard error.")
    add_data_args(p)
    p.add_argument("--models", default="wiener,optimal,unet",
                   help="comma-separated model names (default wiener,optimal,unet)")
    p.add_argument("--opt", action="append", metavar="MODEL.KEY=VALUE",
                   help="a model option, prefixed by the model name, e.g. unet.path=DIR (repeatable)")
    p.add_argument("--timesteps", default="100,300,500,700", help="comma-separated timesteps (default 100,300,500,700)")
    p.add_argument("--sigmas", default=None, help="comma-separated noise levels sigma instead of --timesteps "
                                                  "(any schedule; e.g. 80,10,1,0.1)")
    p.add_argument("--num", type=int, default=500, help="held-out images (default 500)")
    p.add_argument("--held-out-split", default="test", help="split of the held-out images (default test)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out subset and of the noise")
    p.add_argument("--samples", type=int, default=0,
                   help="also generate this many samples per model (DDIM, same noise) and compare their distance to "
                        "the nearest training image with that of as many held-out images (memorisation; default 0)")
    p.add_argument("--sample-steps", type=int, default=50, help="sampling steps of those samples (default 50)")
    add_sampling_args(p)
    add_network_args(p)
    p.add_argument("--allow-foreign-unet", action="store_true",
                   help="use a U-Net whose manifest names other training data (refused otherwise)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def format_table(results: dict, timesteps: list) -> str:
    """A Markdown table: one row per model, MSE ± standard error per level."""
    head = "| model | " + " | ".join(f"t={t}" if isinstance(t, int) else f"σ={t[2:]}" for t in timesteps) + " |"
    rows = [head, "| --- |" + " --- |" * len(timesteps)]
    for name, per_t in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{per_t[t]['mse']:.4f} ± {per_t[t]['se']:.4f}"
                                                 for t in timesteps) + " |")
    return "\n".join(rows)


def format_comparisons(paired: dict) -> str:
    """Per timestep, the lowest-error model against every other on the same noisy images (paired)."""
    rows = ["| t | best | vs | mean MSE difference | 95% interval | images where best is lower | verdict |",
            "| --- | --- | --- | --- | --- | --- | --- |"]
    for t, (comps, head) in paired.items():
        for c in comps:
            ci = f"[{c.ci95[0]:+.5f}, {c.ci95[1]:+.5f}]" if c.ci95 is not None else "–"
            verdict = f"{c.a} lower" if c.a_better else "tied"
            rows.append(f"| {t} | {c.a} | {c.b} | {c.mean_diff:+.5f} | {ci} | {c.wins_a}/{c.n} | {verdict} |")
    return "\n".join(rows)


def memorisation(dens: dict, data, held_out, args) -> tuple[dict, dict]:
    """Nearest-training-image distances of each model's samples and of held-out images (the baseline a
    model that generalises should match; copies of training images sit near 0), and the sampler's record."""
    from .. import sample
    from ..metrics import nearest_training_distances

    from ..diffusion import grid_for

    progress = not args.no_progress
    out = {"held_out": nearest_training_distances(held_out[:args.samples], data, progress=progress).summary()}
    ref = dens.get("unet", next(iter(dens.values())))  # one grid for every model: the network's, if any
    grid = grid_for(ref, sampler_from_args(args, args.sample_steps), schedule=schedule_from_args(args))
    for name, den in dens.items():
        x = sample(den, num=args.samples, seed=args.seed, grid=grid, batch_size=args.batch_size, progress=progress)
        out[name] = nearest_training_distances(x, data, progress=progress).summary()
    return out, grid.record()


def format_memorisation(memo: dict) -> str:
    rows = ["| images | mean distance to nearest training image | median | min | nearest / second nearest |",
            "| --- | --- | --- | --- | --- |"]
    for name, s in memo.items():
        rows.append(f"| {name} | {s['mean']:.3f} | {s['median']:.3f} | {s['min']:.3f} | {s['mean_ratio_to_second']:.3f} |")
    return "\n".join(rows)


def run(args) -> int:
    import torch

    from .. import make_denoiser
    from ..evaluate import denoising_errors, paired_mse_comparisons, summarize_errors
    from ..reference import overlapping
    from ..fileio import write_bytes, write_json
    from ..schedules import level_key

    from .. import DEFAULT_SCHEDULE
    from ..device import resolve_device

    models = name_list(args.models, "--models")
    schedule = schedule_from_args(args)
    timesteps = levels_list(args.timesteps, args.sigmas, schedule)
    if args.num < 1:
        raise ConfigError(f"--num must be positive, got {args.num}")
    if args.samples < 0 or args.samples > args.num or args.sample_steps < 1:
        raise ConfigError(f"--samples must be between 0 and --num ({args.num}) and --sample-steps positive")
    opts = model_options(args.opt, models)
    network_options(args, opts)
    device = resolve_device(args.device)
    if args.allow_foreign_unet:
        if "unet" not in models:
            raise ConfigError("--allow-foreign-unet is given but unet is not among --models")
        opts["unet"]["allow_foreign"] = True
    with new_run_dir(args.out) as tmp:
        t0 = time.perf_counter()
        data = load_data_from_args(args)
        held_out = load_held_out(lambda s: load_data_from_args(args, split=s), args.held_out_split, "to denoise")
        if args.num < len(held_out):
            held_out = held_out.subset(args.num, seed=args.seed)
        images = held_out.tensor()
        warnings = []
        if overlapping(data, held_out):
            warnings.append("the held-out images come from the training split (--held-out-split equals --split): "
                            "a model that copies the training set (optimal, nearest) scores near 0 on them")
        run_schedule = schedule or DEFAULT_SCHEDULE
        dens = {name: make_denoiser(name, data, schedule=run_schedule, **{"device": device, **opts[name]})
                for name in models}
        levels = [run_schedule.at(t) for t in timesteps]  # the run's levels, whatever each model's own schedule
        keys = [t if isinstance(t, int) else level_key(t) for t in timesteps]
        errors = denoising_errors(dens, images, levels, generator=torch.Generator().manual_seed(args.seed),
                                  batch_size=args.batch_size, schedule=run_schedule, progress=not args.no_progress)
        errors = {name: dict(zip(keys, per_t.values())) for name, per_t in errors.items()}
        results = summarize_errors(errors)
        paired = paired_mse_comparisons(errors) if len(models) > 1 else {}
        table = format_table(results, keys)
        if paired:
            table += "\n\nPaired per timestep (same noisy images; 95% Student-t intervals of the mean difference):\n\n" \
                + format_comparisons(paired)
        memo, memo_sampler = memorisation(dens, data, images, args) if args.samples > 0 else (None, None)
        if memo is not None:
            table += "\n\n" + format_memorisation(memo)
        write_json(tmp / "evaluate.json", {
            "command": command_line(), "dataset": data.describe(), "held_out": held_out.describe(),
            "timesteps": [t if isinstance(t, int) else None for t in timesteps],
            "sigmas": [lv.sigma for lv in levels], "schedule": run_schedule.record(), "seed": args.seed,
            "models": {name: den.settings() for name, den in dens.items()},
            "mse": {name: {str(t): v for t, v in per_t.items()} for name, per_t in results.items()},
            "mse_per_image": {name: {str(t): v.tolist() for t, v in per_t.items()} for name, per_t in errors.items()},
            "comparisons": {str(t): [c.to_dict() for c in comps] for t, (comps, _) in paired.items()},
            "lowest": {str(t): {k: head[k] for k in ("best", "closest", "tied")} for t, (_, head) in paired.items()},
            "comparison_method": "paired over held-out images (same noise): mean of per-image MSE differences "
                                 "a - b, 95% Student-t interval, images where a is lower",
            "warnings": warnings,
            "memorisation": memo, "memorisation_sampler": memo_sampler,
            "seconds": time.perf_counter() - t0, "versions": versions(),
        })
        write_bytes(tmp / "mse.md", (table + "\n").encode())
    print(table)
    for w in warnings:
        print(f"localdiff evaluate: warning: {w}", file=sys.stderr)
    print(f"wrote {args.out}/evaluate.json ({time.perf_counter() - t0:.1f} s)")
    return 0
