"""``localdiff calibrate-patches``: fit a patch model's patch size per timestep to a target denoiser.

Writes the schedule JSON that ``--opt patch_schedule=FILE`` of ls, els, els-boundary and pspc reads.
"""

from __future__ import annotations

import time
from .common import add_data_args, calibration_inputs, int_list, timestep_list, write_calibration


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "calibrate-patches", help="pick the patch size per timestep of a patch model (ls, els, pspc, ...)",
        description="For each timestep, noise held-out images, run the patch model at every candidate patch "
                    "size and keep the size whose x0_hat is closest (MSE) to the target denoiser's. The result "
                    "is a schedule JSON for --opt patch_schedule=FILE.")
    add_data_args(p)
    p.add_argument("--held-out-split", default="test",
                   help="split the held-out images are drawn from (default test)")
    p.add_argument("--model", required=True, help="patch model: ls, els, els-boundary or pspc")
    p.add_argument("--opt", action="append", metavar="KEY=VALUE", help="a patch-model option (repeatable)")
    p.add_argument("--target", required=True, help="denoiser to match: any model name (optimal, unet, ...)")
    p.add_argument("--target-opt", action="append", metavar="KEY=VALUE", help="a target option (repeatable)")
    p.add_argument("--timesteps", default=None, help="comma-separated timesteps (default: the 10 DDIM steps)")
    p.add_argument("--sizes", default=None, help="comma-separated patch sizes (default: 1, 3, 5, ... for the model)")
    p.add_argument("--num", type=int, default=16, help="held-out images (default 16)")
    p.add_argument("--seed", type=int, default=0, help="seed of the held-out subset and of the noise (default 0)")
    p.add_argument("--batch-size", type=int, default=16, help="images per denoiser call (default 16)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    p.add_argument("--out", required=True, metavar="FILE.json", help="new schedule file (never overwritten)")
    p.add_argument("--no-progress", action="store_true", help="no progress lines")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..calibrate import calibrate_patch_sizes

    timesteps = timestep_list(args.timesteps, "--timesteps") if args.timesteps else None
    sizes = int_list(args.sizes, "--sizes") if args.sizes else None
    t0 = time.perf_counter()
    out, data, held_out, model_opts, target = calibration_inputs(args)
    result = calibrate_patch_sizes(args.model, data, target, timesteps=timesteps, sizes=sizes,
                                   num_images=args.num, seed=args.seed, held_out=held_out,
                                   model_options=model_opts, batch_size=args.batch_size, out=None,
                                   progress=None if args.no_progress else (lambda line: print(line, flush=True)))
    write_calibration(result, out, args, held_out, time.perf_counter() - t0)
    print(f"wrote the {args.model} patch-size schedule to {out} ({result['seconds']:.1f} s): "
          + ", ".join(f"t={t}: {s}" for t, s in result["patch_sizes"].items()))
    return 0
