"""``localdiff train-unet``: train the U-Net baseline with resumable checkpoints, export it for diffusers.

Run directory layout (``--out``)::

    OUT/checkpoints/step-NNNNNNN/   the newest complete training state (see localdiff.unet.training)
    OUT/config.json                 \\ the EMA network in diffusers save_pretrained format,
    OUT/diffusion_pytorch_model.safetensors  / written when training ends
    OUT/localdiff_unet.json         manifest: command, data, steps, loss, wall time, sha256, schedule

``--resume OUT`` (or one checkpoint inside it) continues a run exactly where its last checkpoint left it.
``--minutes M`` is a wall-clock budget for the whole command: the trainer measures its throughput in the
first seconds and fixes the number of steps (and the learning-rate schedule) so that training, its
checkpoints and the export end inside it.

Before training a new run prints its plan (:mod:`localdiff.unet.planning`): the configuration (``--config``,
or by default ``paper`` where a timed step shows it makes 200 steps in the budget, as on a GPU, else
``small``, as on a CPU), the steps, the epochs, the measured images/s and the peak memory. A plan under one
epoch or 200 steps is warned about; one under a quarter of an epoch is refused unless ``--force``.

Under ``torchrun`` (more than one process) the network trains with DistributedDataParallel
(:mod:`localdiff.unet.distributed`): ``--batch-size`` is per process, the global batch is P times it;
rank 0 checks ``--out``/``--resume``, writes the checkpoints and exports, and every rank plans the same
steps from rank 0's clock.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

from ..errors import ConfigError
from ..distributed import world
from .common import add_data_args, command_line, load_data_from_args, versions

# CLI flag -> TrainConfig field, for the recipe options (their defaults come from TRAIN_RECIPES)
_RECIPE_FLAGS = {"batch_size": "--batch-size", "lr": "--lr", "warmup": "--warmup", "weight_decay": "--weight-decay",
                 "ema_decay": "--ema-decay", "grad_clip": "--grad-clip", "hflip": "--hflip", "seed": "--seed",
                 "prediction": "--prediction", "lr_decay": "--lr-decay"}
EXPORT_RESERVE_S = 2.0  # seconds kept for the export at the end of a --minutes budget (plus 1% of it)
_RUNTIME_FLAGS = ("device", "amp", "channels_last", "compile")  # may change when a run is resumed


def register(subparsers) -> None:
    from ..unet.configs import CONFIG_NAMES, TRAIN_RECIPES
    from ..unet.planning import MIN_STEPS, REFUSE_EPOCHS

    p = subparsers.add_parser(
        "train-unet", help="train the U-Net baseline (v- or epsilon-prediction, DDPM schedule)",
        description="Train a diffusers UNet2DModel on a dataset for a number of steps or a wall-clock budget, with "
                    "checkpoints every N steps; the EMA weights are exported to --out in diffusers format, ready "
                    "for --model unet --opt path=OUT.")
    add_data_args(p)
    p.add_argument("--config", choices=CONFIG_NAMES, default=None,
                   help="architecture and recipe: paper (the official baseline) or small (CPU-sized). Default: "
                        f"paper where a timed step shows it makes at least {MIN_STEPS} steps in the budget (--minutes; "
                        "without it, 10 minutes), as on a GPU; small elsewhere, as on a CPU")
    p.add_argument("--steps", type=int, default=None,
                   help="train until this many optimisation steps in total (with --minutes: at most this many)")
    p.add_argument("--minutes", type=float, default=None,
                   help="wall-clock budget of the whole command, counted from its start: the number of steps is "
                        "planned from the throughput measured in the first seconds, and the learning-rate schedule "
                        "fitted to it")
    p.add_argument("--out", required=True,
                   help="new run directory (never overwritten; with --resume it may be the run being resumed)")
    g = p.add_argument_group("recipe (defaults depend on --config; fixed once a run has started)")

    def recipe_help(text: str, field: str) -> str:
        return f"{text} (" + ", ".join(f"{k}: {getattr(v, field)}" for k, v in TRAIN_RECIPES.items()) + ")"

    g.add_argument("--batch-size", type=int, default=None, help=recipe_help("images per step", "batch_size"))
    g.add_argument("--lr", type=float, default=None, help=recipe_help("AdamW learning rate after warm-up", "lr"))
    g.add_argument("--warmup", type=int, default=None, help=recipe_help("linear warm-up steps", "warmup"))
    g.add_argument("--weight-decay", type=float, default=None, help=recipe_help("AdamW weight decay", "weight_decay"))
    g.add_argument("--ema-decay", type=float, default=None, help=recipe_help("EMA decay of the weights", "ema_decay"))
    g.add_argument("--grad-clip", type=float, default=None,
                   help=recipe_help("max gradient norm, 0 = off", "grad_clip"))
    g.add_argument("--hflip", action="store_const", const=True, default=None,
                   help="random horizontal flips (natural images only; off by default)")
    g.add_argument("--seed", type=int, default=None,
                   help=recipe_help("seed of weights, data order, noise and dropout", "seed"))
    g.add_argument("--prediction", choices=("v", "epsilon"), default=None,
                   help=recipe_help("what the network predicts: v = a eps - sqrt(b2) x0, or the noise eps",
                                    "prediction"))
    g.add_argument("--lr-decay", choices=("cosine", "constant"), default=None,
                   help=recipe_help("learning rate after warm-up: cosine to zero at the last step, or constant",
                                    "lr_decay"))
    r = p.add_argument_group("running")
    r.add_argument("--checkpoint-every", type=int, default=1000, help="checkpoint every N steps (default 1000)")
    r.add_argument("--keep-checkpoints", type=int, default=1, help="how many newest checkpoints to keep (0 = all)")
    r.add_argument("--resume", metavar="DIR", default=None,
                   help="continue from a run directory (its newest checkpoint) or one checkpoint directory")
    # Runtime flags: None = not given (a new run takes the TrainConfig default, a resumed run its own setting).
    r.add_argument("--device", default=None, help="cpu, cuda or auto (default auto; a resumed run keeps its own)")
    r.add_argument("--compile", action="store_const", const=True, default=None,
                   help="torch.compile the network (CUDA recommended; compiled dropout draws other random masks)")
    r.add_argument("--no-amp", dest="amp", action="store_const", const=False, default=None,
                   help="train in float32 on CUDA instead of bf16 autocast")
    r.add_argument("--no-channels-last", dest="channels_last", action="store_const", const=False, default=None,
                   help="keep NCHW memory format on CUDA")
    r.add_argument("--export-dtype", choices=("fp32", "fp16", "bf16"), default="fp32",
                   help="dtype of the exported weights (default fp32)")
    r.add_argument("--force", action="store_true",
                   help=f"train even when the plan covers under {REFUSE_EPOCHS} of an epoch (refused otherwise)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def _leftover(out: Path) -> bool:
    """True when ``out`` holds nothing but what a killed run leaves before its first checkpoint: an empty
    ``checkpoints/`` folder and partial directories of processes that no longer run."""
    from ..unet.training import MANIFEST_NAME, list_checkpoints, remove_stale_partials

    entries = {p.name for p in out.iterdir()}
    if not entries <= {"checkpoints"} | {n for n in entries if n.endswith(".partial")}:
        return False
    ckpts = out / "checkpoints"
    if (out / MANIFEST_NAME).exists() or list_checkpoints(ckpts):
        return False
    remove_stale_partials(out)
    if ckpts.is_dir():
        remove_stale_partials(ckpts)
        if any(ckpts.iterdir()):
            return False  # a live process is writing there
    return not any(p.name.endswith(".partial") for p in out.iterdir())


def _given(args, names) -> dict:
    return {k: getattr(args, k) for k in names if getattr(args, k) is not None}


def _recipe(args, base):
    """The recipe: ``base`` with the explicitly given recipe and runtime flags replaced."""
    import dataclasses

    return dataclasses.replace(base, **_given(args, _RECIPE_FLAGS), **_given(args, _RUNTIME_FLAGS))


def run(args) -> int:
    import torch

    from ..distributed import broadcast_json, is_main, main_decides
    from ..unet.configs import TRAIN_RECIPES, unet_config
    from ..unet.distributed import trainer_class
    from ..unet.training import TrainingInterrupted, list_checkpoints

    started = getattr(args, "started_at", None) or time.perf_counter()  # where a --minutes budget counts from
    if args.steps is not None and args.steps < 1:
        raise ConfigError(f"--steps must be positive, got {args.steps}")
    if args.minutes is not None and not 0 < args.minutes < 1e6:
        raise ConfigError(f"--minutes must be a positive number of minutes, got {args.minutes}")
    if args.steps is None and args.minutes is None and not args.resume:
        raise ConfigError("give --steps N (a number of optimisation steps), --minutes M (a wall-clock budget), "
                          "or both")
    if args.checkpoint_every < 1:
        raise ConfigError(f"--checkpoint-every must be positive, got {args.checkpoint_every}")
    out = Path(args.out)
    ckpt = main_decides(lambda: _check_out(args, out), "the checks of --out and --resume on rank 0")
    ckpt = Path(ckpt) if ckpt is not None else None

    data = load_data_from_args(args, shard=False)  # every process may draw any image of a global batch
    created = False
    trainer_cls = trainer_class()  # DistributedDataParallel in a torchrun job
    plan = None
    if ckpt is None:
        plan = main_decides(lambda: _plan(args, data, started).to_dict(), "the plan of the run on rank 0")
        name = plan["config"]
        model_cfg = unet_config(name, data.shape)
        train_cfg = _recipe(args, TRAIN_RECIPES[name])
        trainer = trainer_cls(data, model_cfg, train_cfg)
    else:
        trainer = trainer_cls.from_checkpoint(ckpt, data, **_given(args, _RUNTIME_FLAGS))
        _check_resume_flags(args, trainer, data.shape)
        if args.steps is not None and args.steps < trainer.step:
            raise ConfigError(f"the checkpoint is at step {trainer.step}; --steps must be at least that")
        if args.steps is None and args.minutes is None and trainer.total_steps is None:
            raise ConfigError(f"the checkpoint at step {trainer.step} has no planned length; give --steps N")
        if is_main():
            print(_resume_line(trainer, args.steps), flush=True)
    if trainer.device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    if not out.exists() and is_main():
        out.mkdir(parents=True)
        created = True

    ckpt_dir = out / "checkpoints"
    budget_s = None
    if args.minutes is not None:
        budget_s = broadcast_json(_budget_left(args, started), "broadcast of the time budget")  # rank 0's
        if budget_s <= 0:
            raise ConfigError(f"--minutes {args.minutes} leaves no time to train after starting and loading the "
                              f"data ({time.perf_counter() - started:.1f} s); give a larger budget")
    try:
        trainer.fit(args.steps, budget_s=budget_s, checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every,
                    keep_checkpoints=args.keep_checkpoints, progress=not args.no_progress, label=command_line())
    except TrainingInterrupted as exc:
        where = f"checkpoint {exc.checkpoint}" if exc.checkpoint else "no checkpoint"
        if is_main():
            print(f"localdiff train-unet: {exc.signame} at step {exc.step}; wrote {where}. Continue with the same "
                  f"command plus --resume {out}", file=sys.stderr)
        return 143 if exc.signame == "SIGTERM" else 130
    except BaseException as exc:
        saved = list_checkpoints(ckpt_dir)
        if created and not saved:
            shutil.rmtree(out, ignore_errors=True)  # nothing worth keeping under the new name
        if isinstance(exc, KeyboardInterrupt):  # a second Ctrl-C: the last periodic checkpoint survives
            print("localdiff train-unet: aborted; "
                  + (f"the last checkpoint is {saved[-1]}" if saved else "no checkpoint was written"), file=sys.stderr)
            return 130
        raise
    if not is_main():  # rank 0 exports; the state is the same on every rank
        return 0
    trainer.export(out, dtype=args.export_dtype, extra={
        "command": command_line(),
        "commands": [h.get("label") for h in trainer.history],
        "dataset": data.describe(),
        "distributed": {**world().record(), "global_batch": trainer.config.batch_size * trainer.world_size},
        "versions": versions(),
        **({"plan_before_training": plan} if plan is not None else {}),
    })
    loss = f"{trainer.loss_ema:.4f}" if trainer.loss_ema is not None else "n/a"
    rate = f", {trainer.images_per_s:.0f} images/s" if trainer.images_per_s else ""
    early = " (stopped at the time budget before the planned steps)" if trainer.history[-1].get("stopped_early") else ""
    print(f"trained {trainer.step} steps ({trainer.order.epochs:.2f} epochs, {trainer.config.prediction}-prediction, "
          f"loss {loss}, {trainer.total_wall_s:.1f} s{rate}){early}; EMA weights exported to {out}")
    return 0


def _budget_left(args, started: float) -> float | None:
    """Seconds of the --minutes budget left for training now: less start-up so far and the export's share."""
    if args.minutes is None:
        return None
    return args.minutes * 60.0 - (time.perf_counter() - started) - EXPORT_RESERVE_S - 0.6 * args.minutes


def _plan(args, data, started: float):
    """Rank 0's plan of a new run (:mod:`localdiff.unet.planning`): the configuration (``--config`` or the
    default for this device and budget), steps, epochs, speed and peak memory, printed before training;
    warnings for a plan under one epoch or few steps; a ConfigError under a quarter of an epoch without
    ``--force``."""
    import torch

    from ..device import resolve_device
    from ..unet.configs import TRAIN_RECIPES
    from ..unet.planning import base_rss_bytes, choose_config, plan_run

    device = resolve_device(args.device or TRAIN_RECIPES["paper"].device)
    base = base_rss_bytes()  # before any probe
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # time the kernels the run will use
    runtime = {"amp": args.amp is not False, "channels_last": args.channels_last is not False}
    if args.config is not None:
        name, reason = args.config, "--config"
    else:
        name, reason = choose_config(data.shape, device, budget_s=_budget_left(args, started), **runtime)
    batch = args.batch_size or TRAIN_RECIPES[name].batch_size
    w = world()
    plan = plan_run(name, reason, data.shape, len(data), device, batch_size=batch, steps=args.steps,
                    budget_s=_budget_left(args, started), minutes=args.minutes, world_size=w.size,
                    data_bytes=data.raw.nbytes if device.type == "cuda" else 0, base_bytes=base, **runtime)
    print(plan.line(), flush=True)
    problem = plan.refusal()
    if problem is not None and not args.force:
        raise ConfigError(problem)
    for text in plan.warnings():
        print(f"localdiff train-unet: warning: {text}", file=sys.stderr, flush=True)
    return plan


def _resume_line(trainer, steps: int | None) -> str:
    """What a resumed run will do, from its checkpoint (its speed so far; no new measurement)."""
    target = steps or trainer.total_steps
    per_step = trainer.config.batch_size * trainer.world_size
    ahead = (f"towards step {target:,} ({target * per_step / len(trainer.data):.2f} epochs)" if target
             else "for as many steps as the budget fits")
    rate = f", at about {trainer.images_per_s:.0f} images/s so far" if trainer.images_per_s else ""
    return (f"plan: resume {_config_name(trainer)} at step {trainer.step:,} ({trainer.order.epochs:.2f} epochs) "
            f"{ahead}{rate}")


def _config_name(trainer) -> str:
    """``config paper`` / ``config small`` when the trainer's architecture is a named one."""
    from ..unet.configs import CONFIG_NAMES, unet_config

    for name in CONFIG_NAMES:
        try:
            if unet_config(name, trainer.data.shape) == trainer.model_config:
                return f"config {name}"
        except ConfigError:
            continue
    return "its own configuration"


def _check_out(args, out: Path) -> str | None:
    """Rank 0's checks of ``--out`` and ``--resume`` (a run killed before its first checkpoint is cleared):
    the checkpoint to resume from, or None for a new run."""
    from ..unet.training import find_checkpoint

    if out.is_dir() and not args.resume and _leftover(out):  # a run killed before its first checkpoint
        print(f"localdiff train-unet: {out} holds only the remains of a run killed before its first checkpoint; "
              "starting afresh in it", file=sys.stderr)
        shutil.rmtree(out)
    ckpt = find_checkpoint(args.resume) if args.resume else None
    if ckpt is None and out.exists():
        raise ConfigError(f"output directory {out} already exists; choose a new --out (runs are never overwritten), "
                          f"or continue that run with --resume {out}")
    if ckpt is not None and out.exists() and not (
            ckpt.parent.name == "checkpoints" and ckpt.parent.parent.resolve() == out.resolve()):
        raise ConfigError(f"output directory {out} already exists and is not the run being resumed ({ckpt}); "
                          "choose a new --out to start a new run from that checkpoint")
    return None if ckpt is None else str(ckpt)


def _check_resume_flags(args, trainer, shape) -> None:
    """On resume only runtime flags may change; a recipe flag that disagrees with the checkpoint is an error."""
    from ..unet.configs import unet_config

    if args.config is not None and unet_config(args.config, shape) != trainer.model_config:
        raise ConfigError(f"--config {args.config} differs from the checkpoint's architecture "
                          f"{trainer.model_config.to_dict()}; leave --config out when resuming")
    stored = trainer.config.recipe()
    for field, flag in _RECIPE_FLAGS.items():
        value = getattr(args, field)
        if value is not None and value != stored[field]:
            raise ConfigError(f"{flag} {value} differs from the checkpoint's {field}={stored[field]}; the recipe of a "
                              "run cannot change on resume (start a new run instead)")
