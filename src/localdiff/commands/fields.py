"""``localdiff fields``: where each denoiser looks — Jacobian rows, locality measures and figures."""

from __future__ import annotations

import time

import numpy as np

from .common import (add_data_args, add_network_args, command_line, levels_list, load_data_from_args, load_held_out,
                     model_options, name_list, network_options, new_run_dir, run_record, schedule_from_args, versions)


def register(subparsers) -> None:
    p = subparsers.add_parser("fields", help="sensitivity fields (Jacobian rows) and locality measures",
                              description="Compute each denoiser's sensitivity fields on held-out noisy images.")
    add_data_args(p)
    p.add_argument("--models", default="wiener,optimal", help="comma-separated model names (default wiener,optimal)")
    p.add_argument("--opt", action="append", metavar="MODEL.KEY=VALUE",
                   help="a model option, prefixed by the model name, e.g. masked.tau=0.005 (repeatable)")
    p.add_argument("--pixels", default="center", help="'center', 'all' or 'r,c;r,c' (default center)")
    p.add_argument("--timesteps", default="100,300,500,700,900",
                   help="comma-separated timesteps of the schedule (default 100,300,500,700,900)")
    p.add_argument("--sigmas", default=None, help="comma-separated noise levels sigma instead of --timesteps "
                                                  "(any schedule; e.g. 80,10,1,0.1)")
    p.add_argument("--schedule", default=None, help="the levels' family (default ddpm-linear; see `localdiff "
                                                    "sample --help`)")
    add_network_args(p)
    p.add_argument("--draws", type=int, default=16, help="noisy held-out images per timestep (default 16)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--held-out-split", default="test", help="split the x_t draws come from (default test)")
    p.add_argument("--method", choices=("auto", "closed", "autograd"), default="auto",
                   help="closed forms where they exist (auto, default) or autograd everywhere")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", required=True, help="new directory for the results (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import make_denoiser
    from ..fileio import write_json, write_npz
    from ..report.figures import plot_fields, save_figure
    from ..sensitivity import field_similarity, locality_measures, parse_pixels, sensitivity_fields

    from .. import DEFAULT_SCHEDULE
    from ..device import resolve_device

    models = name_list(args.models, "--models")
    schedule = schedule_from_args(args)
    timesteps = levels_list(args.timesteps, args.sigmas, schedule)
    opts = model_options(args.opt, models)
    network_options(args, opts)
    device = resolve_device(args.device)
    with new_run_dir(args.out) as tmp:
        t0 = time.perf_counter()
        data = load_data_from_args(args)
        held_out = load_held_out(lambda s: load_data_from_args(args, split=s), args.held_out_split,
                                 "for the x_t draws")
        pixels = parse_pixels(args.pixels, data.shape)
        fields, timings = {}, {}
        for name in models:
            start = time.perf_counter()
            den = make_denoiser(name, data, schedule=schedule or DEFAULT_SCHEDULE, **{"device": device, **opts[name]})
            fields[name] = sensitivity_fields(den, held_out, pixels, timesteps, args.draws, args.seed,
                                              method=args.method, progress=not args.no_progress)
            timings[name] = time.perf_counter() - start
            del den
        first = next(iter(fields.values()))
        arrays = {"timesteps": np.asarray([t if isinstance(t, int) else -1 for t in first.timesteps], np.int64),
                  "sigmas": np.asarray(first.sigmas, np.float64), "pixels": np.asarray(pixels, np.int64)}
        for name, f in fields.items():
            arrays[name] = f.mean.numpy().astype(np.float32)
            arrays[f"{name}_abs"] = f.abs_mean.numpy().astype(np.float32)
        write_npz(tmp / "fields.npz", **arrays)
        write_json(tmp / "locality.json", {
            "command": command_line(),
            "dataset": data.describe(), "held_out": held_out.describe(),
            "pixels": pixels, "timesteps": first.timesteps, "sigmas": first.sigmas,
            "schedule": (schedule or DEFAULT_SCHEDULE).record(), "draws": args.draws, "seed": args.seed,
            "models": {name: {"method": f.method, "measures": locality_measures(f), "seconds": timings[name]}
                       for name, f in fields.items()},
            "cosine_similarity": field_similarity(fields),
            "distributed": run_record(data),
            "versions": versions(),
        })
        save_figure(plot_fields(fields, 0), tmp / "fields.png")
        for pi in range(1, min(len(pixels), 8)):  # one figure per pixel, at most 8
            save_figure(plot_fields(fields, pi), tmp / f"fields_pixel{pi}.png")
    print(f"wrote fields of {', '.join(models)} to {args.out} ({time.perf_counter() - t0:.1f} s)")
    return 0
