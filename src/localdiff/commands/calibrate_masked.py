"""``localdiff calibrate-masked``: choose the mask threshold tau and the temperature of a masked model per
timestep, on held-out denoising MSE (or against a target denoiser).

Writes the schedule JSON that ``--opt tau_schedule=FILE`` of masked, masked-soft and masked-equivariant reads.
"""

from __future__ import annotations

import time
from .common import add_data_args, calibration_inputs, float_list, timestep_list, write_calibration


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-masked", help="pick tau and the temperature per timestep of a masked model",
        description="For each timestep, noise held-out images, denoise them with the masked model at every "
                    "(tau, temperature) of a grid and keep the pair with the smallest MSE against the clean images "
                    "(or against --target's x0_hat). The held-out images are images SKIP..SKIP+NUM-1 of the seeded "
                    "permutation that `localdiff evaluate --seed SEED` draws from, so with --skip 500 they are "
                    "disjoint from `evaluate --num 500`. The result is a schedule JSON for --opt tau_schedule=FILE.")
    add_data_args(p)
    p.add_argument("--held-out-split", default="test", help="split the held-out images are drawn from (default test)")
    p.add_argument("--model", default="masked", help="masked (default), masked-soft or masked-equivariant")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a model option (repeatable)")
    p.add_argument("--taus", default="0.002,0.005,0.02", help="comma-separated thresholds (default 0.002,0.005,0.02)")
    p.add_argument("--temperatures", default="1", help="comma-separated temperatures (default 1)")
    p.add_argument("--timesteps", default=None, help="comma-separated timesteps (default: the 10 DDIM steps)")
    p.add_argument("--target", default=None,
                   help="match this denoiser's x0_hat instead of the clean images (e.g. unet)")
    p.add_argument("--target-opt", action="append", metavar="KEY=VALUE", help="a target option (repeatable)")
    p.add_argument("--num", type=int, default=64, help="held-out images (default 64)")
    p.add_argument("--skip", type=int, default=500,
                   help="leave out the first SKIP images of the permutation (default 500: those `evaluate` scores)")
    p.add_argument("--seed", type=int, default=0, help="seed of the permutation and of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=64, help="images per denoiser call (default 64)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="new schedule file (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibrate_masked import calibrate_masked
    from ..stats import data_spectrum

    timesteps = timestep_list(args.timesteps, "--timesteps") if args.timesteps else None
    taus, temps = float_list(args.taus, "--taus"), float_list(args.temperatures, "--temperatures")
    t0 = time.perf_counter()
    out, data, held_out, model_opts, target = calibration_inputs(args)
    spectrum = data_spectrum(data, device="cpu", cache=str(model_opts.get("cache", "true")).lower() != "false")
    result = calibrate_masked(args.model, data, held_out, timesteps=timesteps, taus=taus, temperatures=temps,
                              num_images=args.num, seed=args.seed, skip=args.skip, target=target,
                              model_options=model_opts, spectrum=spectrum, batch_size=args.batch_size,
                              progress=None if args.no_progress else (lambda line: print(line, flush=True)))
    write_calibration(result, out, args, held_out, time.perf_counter() - t0)
    print(f"wrote the {args.model} tau schedule to {out} ({result['seconds']:.1f} s): "
          + ", ".join(f"t={t}: tau {p['tau']:g}, T {p['temperature']:g}" for t, p in result["params"].items()))
    return 0
