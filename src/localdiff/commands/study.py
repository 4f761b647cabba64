"""``localdiff study``: the paper's comparison on one dataset, end to end, into one run directory.

Every analytical denoiser and the U-Net sample from the same noise; per step R² and MSE of each
model against the U-Net (own trajectory and single step), the final R² table, sensitivity fields,
nearest-training-image distances, figures and a self-contained ``report.html``.

Defaults depend on the machine (``localdiff.study``: ``StudyConfig``, ``QUICK``, ``GPU``):

* CPU: wiener, optimal, nearest, masked, ls, scfdm and the U-Net; 8 samples; fields at t = 100, 500,
  900 with 8 draws (not for ls: autograd through it takes minutes per timestep on a CPU). On MNIST
  with the two CPU cores shared with one other job: 282 s, 2.4 GiB peak (benchmarks/bench_study.py);
  masked and ls sampling are about 80% of it. els, els-boundary and pspc take 2-10 minutes each
  there, so they are left to ``--models`` or a GPU.
* CUDA: every analytical model, 64 samples, fields of every model at five timesteps with 32 draws.
* ``--quick``: the CPU model set fitted on 5,000 training images, 4 samples, 2 field draws
  (the masked model collapses to one flat image for every seed on 2,000 MNIST images, not on 5,000).
"""

from __future__ import annotations

import dataclasses
import sys
import time
from datetime import datetime
from pathlib import Path


from ..errors import ConfigError
from .common import (add_sampling_args, command_line, load_held_out, model_options, name_list, new_run_dir, of_class,
                     timestep_list, versions)


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "study", help="the paper's comparison end to end: every model against the U-Net, with a report",
        description="Sample every analytical denoiser and the U-Net from the same noise, compare each model's "
                    "x0_hat with the U-Net's at every step (R², MSE), compute sensitivity fields and "
                    "nearest-training-image distances, and write metrics.json, figures and report.html into a "
                    "new run directory. Defaults depend on the device; --quick is a smoke run (about 25 s on 2 CPU "
                    "cores) that gives no verdict.")
    g = p.add_argument_group("data")
    src = g.add_mutually_exclusive_group()
    src.add_argument("--dataset", metavar="NAME", default=None, help="a built-in dataset (default mnist)")
    src.add_argument("--data", metavar="PATH", help="your own data: IDX or CIFAR-10 directory, image folder, .npy/.npz")
    g.add_argument("--split", default="train", help="training split (default train)")
    g.add_argument("--held-out-split", default="test", help="split of the held-out images (default test)")
    g.add_argument("--resolution", type=int, default=None, help="resize images to RESOLUTION x RESOLUTION")
    g.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 or 3 channels")
    g.add_argument("--subset", type=int, default=None,
                   help="fit the analytical models on a seeded subset of this many training images "
                        "(default: all; --quick: 5000)")
    g.add_argument("--data-seed", type=int, default=None, help="seed of that subset (default 0)")
    g.add_argument("--max-data-bytes", metavar="SIZE", default=None,
                   help="memory cap for the decoded images of --data, e.g. 8G (default: $LOCALDIFF_MAX_DATA_BYTES, "
                        "else half of the machine's memory)")
    m = p.add_argument_group("models and sampling")
    m.add_argument("--models", default=None,
                   help="comma-separated analytical models, or 'all' (default on a CPU: wiener,optimal,nearest,"
                        "masked,ls,scfdm; on CUDA: all)")
    m.add_argument("--unet", metavar="PATH", default=None,
                   help="the network to compare with: a diffusers UNet2DModel directory, the paper's .pt checkpoint, "
                        "an EDM .pkl snapshot or a convert-network .safetensors (default: the weights shipped for the "
                        "dataset)")
    m.add_argument("--class-label", type=int, default=None, metavar="K",
                   help="for a class-conditional network: study class K (the analytical models are fitted on the "
                        "training images of class K, the fields drawn from its held-out images)")
    m.add_argument("--no-unet", action="store_true", help="no U-Net: skip every comparison with it (no R²)")
    m.add_argument("--allow-foreign-unet", action="store_true",
                   help="compare with a U-Net whose manifest names other training data (refused otherwise)")
    m.add_argument("--reference-check", type=int, default=None, metavar="N",
                   help="held-out images on which the U-Net's denoising MSE is set beside wiener's and optimal's "
                        "(default 64; --quick 16; 0 skips the check)")
    m.add_argument("--opt", action="append", metavar="MODEL.KEY=VALUE",
                   help="a model option, prefixed by the model name, e.g. masked.tau=0.005 (repeatable)")
    m.add_argument("--num", type=int, default=None, help="samples per model (default 8 on a CPU, 64 on CUDA)")
    m.add_argument("--steps", type=int, default=None, help="sampling steps (default 10)")
    m.add_argument("--seed", type=int, default=None, help="seed of the noise (default 0)")
    add_sampling_args(m, defaults=False)
    m.add_argument("--batch-size", type=int, default=None, help="denoise this many samples at a time")
    f = p.add_argument_group("fields and memorisation")
    f.add_argument("--field-models", default=None,
                   help="comma-separated models whose sensitivity fields are computed, or 'none' (default: all "
                        "but nearest; on a CPU also not ls, els, els-boundary, pspc)")
    f.add_argument("--field-timesteps", default=None, help="comma-separated timesteps (default 100,500,900)")
    f.add_argument("--field-draws", type=int, default=None, help="noisy held-out images per field timestep")
    f.add_argument("--pixels", default=None, help="field pixels: 'center' (default), 'all' or 'r,c;r,c'")
    f.add_argument("--held-out", type=int, default=None,
                   help="held-out images whose nearest-training distances are the yardstick (default 64)")
    r = p.add_argument_group("running")
    r.add_argument("--device", default="auto", help="cpu, cuda or auto (default)")
    r.add_argument("--quick", action="store_true",
                   help="a smoke run (about 25 s on 2 CPU cores): data subset, 4 samples, few draws, no verdict")
    r.add_argument("--out", default=None,
                   help="new run directory (never overwritten; default runs/study-<dataset>-<date>-<time>)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=run)


def build_config(args, device):
    """The preset for this device (or --quick), with every option the user gave on top."""
    from ..study import analytical_models, default_config

    base = default_config(device, args.quick)
    given: dict = {}
    if args.models is not None:
        models = tuple(name_list(args.models, "--models"))
        given["models"] = analytical_models() if models == ("all",) else tuple(m for m in models if m != "unet")
        if "unet" in models and args.no_unet:
            raise ConfigError("--models names unet but --no-unet is given")
    for key in ("num", "steps", "seed", "sampler", "batch_size", "subset", "data_seed", "field_draws", "held_out",
                "reference_check", "schedule", "sigma_min", "sigma_max"):
        if getattr(args, key) is not None:
            given[key] = getattr(args, key)
    if args.s_churn:
        given["s_churn"] = args.s_churn
    if args.field_models is not None:
        given["field_models"] = () if args.field_models.strip().lower() == "none" else \
            tuple(name_list(args.field_models, "--field-models"))
    if args.field_timesteps is not None:
        given["field_timesteps"] = tuple(timestep_list(args.field_timesteps, "--field-timesteps"))
    if args.pixels is not None:
        given["field_pixels"] = args.pixels
    given["unet"] = not args.no_unet
    given["device"] = str(device)  # resolved once, here
    config = dataclasses.replace(base, **given)
    config.validate()
    return config


def default_out(dataset: str) -> Path:
    stem = Path("runs") / f"study-{Path(dataset).stem or 'data'}-{datetime.now():%Y%m%d-%H%M%S}"
    out, i = stem, 2
    while out.exists():
        out, i = stem.with_name(f"{stem.name}-{i}"), i + 1
    return out


def summary_line(results, out: Path, seconds: float) -> str:
    """The one line printed at the end: what the paired comparison supports (a model closest to the U-Net
    only where every interval excludes 0, else a tie), and where the report is."""
    where = f"report: {out / 'report.html'} ({seconds:.0f} s)"
    if results.reference is None:
        return f"study: no U-Net (--no-unet), so R² against it was not computed; {where}"
    if results.closest() is None:
        return f"study: no analytical model was compared with the U-Net; {where}"
    line = f"study: {results.headline()} over {results.config.num} samples"
    head = results.metrics_headline()
    if not head.get("withheld") and head.get("closest") is None and len(head.get("tied", [])) > 1:
        n = results.config.num
        line += (f" ({n} samples cannot separate them: rerun with --num {4 * n}; docs/RESULTS.md §2 separates masked "
                 "from wiener on MNIST with 32)")
    return f"{line}; {where}"


def run(args) -> int:
    from ..data import load_dataset
    from ..data.shards import shard_dataset
    from ..device import resolve_device
    from ..report.study_files import write_study
    from ..study import REFERENCE, ReferenceUnavailable, run_study

    device = resolve_device(args.device)
    config = build_config(args, device)
    studied = ([REFERENCE] if config.unet else []) + list(config.models)
    if args.unet is not None and args.no_unet:
        raise ConfigError("--unet and --no-unet contradict each other; give one")
    opts = model_options(args.opt, studied)
    if args.unet is not None:
        opts[REFERENCE]["path"] = args.unet
    if args.allow_foreign_unet:
        if args.no_unet:
            raise ConfigError("--allow-foreign-unet and --no-unet contradict each other; give one")
        opts[REFERENCE]["allow_foreign"] = True
    if args.class_label is not None and not args.no_unet:
        opts[REFERENCE]["class_label"] = args.class_label
    source = args.data or args.dataset or "mnist"
    out = Path(args.out) if args.out else default_out(source)
    t0 = time.perf_counter()
    with new_run_dir(out) as tmp:
        load = {"resolution": args.resolution, "channels": args.channels, "max_bytes": args.max_data_bytes}
        data = shard_dataset(of_class(load_dataset(source, split=args.split, **load), args.class_label))  # a
        # torchrun job: this rank's shard
        held_out = load_held_out(lambda s: of_class(load_dataset(source, split=s, **load), args.class_label),
                                 args.held_out_split, "for the fields and the memorisation yardstick")
        try:
            results = run_study(data, held_out, config, options={k: v for k, v in opts.items() if v},
                                progress=not args.no_progress)
        except ReferenceUnavailable as exc:
            raise ConfigError(
                f"{exc}\nFix: pass a trained network with --unet DIR (train one with `localdiff train-unet "
                f"--dataset {source} --config small --steps 3000 --out runs/unet-{Path(source).name}`), or skip "
                "the U-Net comparisons with --no-unet.") from exc
        write_study(results, data, tmp, command=command_line(), versions=versions())
    for w in results.warnings:
        print(f"localdiff study: warning: {w}", file=sys.stderr)
    print(summary_line(results, out, time.perf_counter() - t0))
    return 0
