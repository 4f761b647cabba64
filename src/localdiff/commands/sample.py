"""``localdiff sample``: generate images with any denoiser and record everything about the run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .common import (add_data_args, add_network_args, add_sampling_args, command_line, load_data_from_args,
                     new_run_dir, parse_opts, run_record, sampler_from_args, schedule_from_args, versions)


def register(subparsers) -> None:
    p = subparsers.add_parser("sample", help="generate samples with a denoiser (DDIM by default)",
                              description="Generate samples with any denoiser, fitted on a dataset.")
    add_data_args(p)
    p.add_argument("--model", required=True, help="denoiser name (wiener, optimal, nearest, masked, ...)")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a model option (repeatable)")
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--num", type=int, default=16, help="number of samples (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    p.add_argument("--init-noise", metavar="FILE.npy", help="initial latents [N,C,H,W] instead of --num/--seed")
    add_sampling_args(p)
    add_network_args(p)
    p.add_argument("--batch-size", type=int, default=None, help="denoise this many samples at a time")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--trajectory", action="store_true", help="also write trajectory.npz (x_t and x0_hat per step)")
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def load_init_noise(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--init-noise file {p} does not exist; write one with `localdiff noise --num N --shape C,H,W "
                          f"--seed S --out {p}` (the latents sample --seed S draws) or numpy.save (float32 [N,C,H,W])")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"--init-noise file {p} is not a readable .npy array ({exc})") from exc
    if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"--init-noise file {p} must hold a float array [N,C,H,W], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32))


def run(args) -> int:
    from .. import DEFAULT_SCHEDULE, make_denoiser, sample
    from ..device import resolve_device
    from ..diffusion import grid_for
    from ..fileio import write_json, write_npy, write_npz
    from ..report import save_grid

    if args.steps < 1 or args.num < 1:
        raise ConfigError("--steps and --num must be positive")
    init = load_init_noise(args.init_noise) if args.init_noise else None
    with new_run_dir(args.out) as tmp:
        t0 = time.perf_counter()
        data = load_data_from_args(args)
        t_load = time.perf_counter() - t0
        opts = parse_opts(args.opt)
        opts.setdefault("device", resolve_device(args.device))
        if args.model == "unet":
            if args.unet is not None:
                opts["path"] = args.unet
            if args.class_label is not None:
                opts["class_label"] = args.class_label
        elif args.unet is not None:
            raise ConfigError("--unet names the network of --model unet; this run samples " + args.model)
        schedule = schedule_from_args(args)
        den = make_denoiser(args.model, data, schedule=schedule or DEFAULT_SCHEDULE, **opts)
        t_fit = time.perf_counter() - t0 - t_load
        grid = grid_for(den, sampler_from_args(args, args.steps), schedule=schedule)
        traj = sample(den, num=args.num, seed=args.seed, init_noise=init, grid=grid, batch_size=args.batch_size,
                      return_trajectory=True, progress=not args.no_progress)
        t_total = time.perf_counter() - t0
        samples = traj.samples.numpy().astype(np.float32)
        write_npy(tmp / "samples.npy", samples)
        save_grid(traj.samples, tmp / "grid.png")
        if args.trajectory:
            write_npz(tmp / "trajectory.npz", sigmas=np.asarray([lv.sigma for lv in traj.levels], np.float64),
                      timesteps=np.asarray([-1 if t is None else t for t in traj.timesteps], np.int64),
                      xt=traj.xt.numpy(), x0_hat=traj.x0_hat.numpy())
        processes = run_record(data)
        write_json(tmp / "run.json", {
            "command": command_line(),
            "world_size": processes["world_size"],
            "distributed": processes,
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            "dataset": data.describe(),
            "model": den.settings(),
            "sampler": {**grid.record(), "num": int(samples.shape[0]), "seed": args.seed,
                        "init_noise": args.init_noise},
            "timings_s": {"load_data": t_load, "fit": t_fit, "total": t_total,
                          "per_step": traj.step_seconds},
            "versions": versions(),
        })
    print(f"wrote {samples.shape[0]} samples to {args.out} ({t_total:.1f} s)")
    return 0
