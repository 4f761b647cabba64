"""``localdiff experiment locality-follows-data``: controlled-statistics test of the paper's causal claim."""

from __future__ import annotations

import dataclasses
import time

from ..errors import ConfigError
from .common import command_line, name_list, new_run_dir, timestep_list, versions

EXPERIMENTS = ("locality-follows-data",)
QUICK = dict(sets=("grf", "grf-aniso"), train_steps=40, subset=2000, timesteps=(300,), draws=2, linear_steps=150,
             smoke=True)


def register(subparsers) -> None:
    from ..experiment import DEFAULT_SETS, ExperimentConfig

    d = ExperimentConfig()
    p = subparsers.add_parser(
        "experiment", help="controlled-statistics experiments (locality-follows-data)",
        description="locality-follows-data: train a U-Net on each dataset with controlled pixel correlations and "
                    "compare its sensitivity fields with the data's Wiener fields and with an isotropic local "
                    "field of matched radius.")
    p.add_argument("name", choices=EXPERIMENTS, help="the experiment to run")
    p.add_argument("--sets", default=",".join(DEFAULT_SETS),
                   help=f"comma-separated datasets (default {','.join(DEFAULT_SETS)})")
    p.add_argument("--config", choices=("small", "paper"), default=d.unet_config,
                   help="U-Net architecture and recipe: small (CPU, default) or paper (GPU)")
    p.add_argument("--train-steps", type=int, default=d.train_steps,
                   help=f"U-Net optimisation steps per set (default {d.train_steps})")
    p.add_argument("--subset", type=int, default=None, help="training images per set (default: all)")
    p.add_argument("--timesteps", default=",".join(map(str, d.timesteps)),
                   help=f"timesteps of the fields (default {','.join(map(str, d.timesteps))})")
    p.add_argument("--pixels", default=d.pixels, help="'center', 'all' or 'r,c;r,c' (default center)")
    p.add_argument("--draws", type=int, default=d.draws, help=f"noisy held-out images per timestep (default {d.draws})")
    p.add_argument("--no-linear", action="store_true", help="skip the trained linear denoiser")
    p.add_argument("--linear-steps", type=int, default=None, help="linear model's steps per timestep")
    p.add_argument("--unet", action="append", metavar="SET=DIR",
                   help="use an already trained U-Net for SET instead of training one (repeatable)")
    p.add_argument("--allow-foreign-unet", action="store_true",
                   help="accept a --unet SET=DIR whose manifest names other training data than the set's")
    p.add_argument("--quick", action="store_true",
                   help="grf and grf-aniso, 2,000 images, 40 training steps, one timestep: a smoke run of a minute")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seed of the training and the field draws (default {d.seed})")
    p.add_argument("--device", default=d.device, help="cpu, cuda or auto (default)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.set_defaults(func=run)


def _unet_dirs(pairs) -> dict[str, str]:
    out = {}
    for pair in pairs or []:
        name, sep, path = pair.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ConfigError(f"--unet expects SET=DIR, got '{pair}'")
        out[name.strip()] = path.strip()
    return out


def config_from_args(args):
    from ..experiment import ExperimentConfig

    timesteps = tuple(timestep_list(args.timesteps, "--timesteps"))
    cfg = ExperimentConfig(
        sets=tuple(name_list(args.sets, "--sets")), unet_config=args.config,
        train_steps=args.train_steps, subset=args.subset, timesteps=timesteps, pixels=args.pixels,
        draws=args.draws, linear=not args.no_linear, linear_steps=args.linear_steps, seed=args.seed,
        device=args.device, allow_foreign_unet=args.allow_foreign_unet)
    if args.quick:
        cfg = dataclasses.replace(cfg, **QUICK)
    cfg.validate()
    return cfg


def run(args) -> int:
    from ..experiment import run_experiment, verdict
    from ..report.experiment_page import write_experiment

    cfg = config_from_args(args)
    unet_dirs = _unet_dirs(args.unet)
    t0 = time.perf_counter()
    with new_run_dir(args.out) as tmp:
        results = run_experiment(cfg, tmp / "unets", unet_dirs=unet_dirs, label=command_line(),
                                 progress=not args.no_progress)
        tables = write_experiment(results, cfg, tmp, name=args.name, unet_dirs=unet_dirs, command=command_line(),
                                  versions=versions(), started=t0)
    print(tables)
    if cfg.smoke:
        print(f"a smoke run (--quick): it checks that everything runs and gives no verdict; wrote {args.out} "
              f"({time.perf_counter() - t0:.0f} s)")
        return 0
    verdicts = {r.name: verdict(r.comparison)["text"] for r in results}
    print(f"U-Net fields closer to (paired, 95% intervals): {'; '.join(f'{k}: {v}' for k, v in verdicts.items())}; "
          f"wrote {args.out} ({time.perf_counter() - t0:.0f} s)")
    return 0
