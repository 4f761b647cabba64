"""``localdiff sample``: generate images with any denoiser and record everything about the run."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from .common import add_data_args, command_line, load_data_from_args, new_run_dir, parse_opts, run_record, versions


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
    p.add_argument("--sampler", choices=("ddim", "ddpm"), default="ddim", help="default ddim")
    p.add_argument("--batch-size", type=int, default=None, help="denoise this many samples at a time")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--trajectory", action="store_true", help="also write trajectory.npz (x_t and x0_hat per step)")
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.set_defaults(func=run)


def load_init_noise(path: str) -> torch.Tensor:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--init-noise file {p} does not exist; write one with numpy.save (float32 [N,C,H,W])")
    try:
        arr = np.load(p, allow_pickle=False)
    except (ValueError, OSError, EOFError) as exc:
        raise ConfigError(f"--init-noise file {p} is not a readable .npy array ({exc})") from exc
    if arr.ndim != 4 or not np.issubdtype(arr.dtype, np.floating):
        raise ConfigError(f"--init-noise file {p} must hold a float array [N,C,H,W], got {arr.dtype} {arr.shape}")
    return torch.from_numpy(arr.astype(np.float32))


def run(args) -> int:
    from .. import make_denoiser, sample
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
        opts.setdefault("device", args.device)
        den = make_denoiser(args.model, data, **opts)
        t_fit = time.perf_counter() - t0 - t_load
        traj = sample(den, num=args.num, steps=args.steps, seed=args.seed, init_noise=init,
                      sampler=args.sampler, batch_size=args.batch_size, return_trajectory=True)
        t_total = time.perf_counter() - t0
        samples = traj.samples.numpy().astype(np.float32)
        write_npy(tmp / "samples.npy", samples)
        save_grid(traj.samples, tmp / "grid.png")
        if args.trajectory:
            write_npz(tmp / "trajectory.npz", timesteps=np.asarray(traj.timesteps, np.int64),
                      xt=traj.xt.numpy(), x0_hat=traj.x0_hat.numpy())
        processes = run_record(data)
        write_json(tmp / "run.json", {
            "command": command_line(),
            "world_size": processes["world_size"],
            "distributed": processes,
            "settings": {k: v for k, v in vars(args).items() if k != "func"},
            "dataset": data.describe(),
            "model": den.settings(),
            "sampler": {"name": args.sampler, "steps": args.steps, "timesteps": traj.timesteps,
                        "num": int(samples.shape[0]), "seed": args.seed, "init_noise": args.init_noise},
            "timings_s": {"load_data": t_load, "fit": t_fit, "total": t_total,
                          "per_step": traj.step_seconds},
            "versions": versions(),
        })
    print(f"wrote {samples.shape[0]} samples to {args.out} ({t_total:.1f} s)")
    return 0
