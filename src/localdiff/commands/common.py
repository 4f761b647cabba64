"""Argument helpers shared by the sub-commands: data selection, model options, run directories.

In a torchrun job (:mod:`localdiff.distributed`) every rank runs the same command: the training set is
loaded as this rank's shard (:func:`load_data_from_args`), rank 0 alone writes the run directory (the
other ranks write into a scratch directory that is removed at the end, so the commands' code is the
same on every rank), and rank 0's verdict on ``--out`` stops every rank alike."""

from __future__ import annotations

import os
import platform
import re
import shutil
import signal
import sys
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path

from ..distributed import is_main, main_decides, world
from ..errors import ConfigError, DataError
from ..fileio import normal_mode, owner_tag, remove_entry, stale_entries


def add_data_args(p) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--dataset", metavar="NAME", help="a built-in dataset (mnist, fashion-mnist, digits, ...)")
    g.add_argument("--data", metavar="PATH", help="your own data: IDX or CIFAR-10 directory, image folder, .npy/.npz")
    p.add_argument("--split", default="train", help="train, test or all (default: train)")
    p.add_argument("--resolution", type=int, default=None, help="resize images to RESOLUTION x RESOLUTION")
    p.add_argument("--channels", type=int, choices=(1, 3), default=None, help="convert to 1 or 3 channels")
    p.add_argument("--subset", type=int, default=None, help="use a seeded random subset of this many images")
    p.add_argument("--data-seed", type=int, default=0, help="seed of the subset (default 0)")
    p.add_argument("--max-data-bytes", metavar="SIZE", default=None,
                   help="memory cap for the decoded images of --data, e.g. 8G (default: $LOCALDIFF_MAX_DATA_BYTES, "
                        "else half of the machine's memory)")


def load_data_from_args(args, split: str | None = None, *, shard: bool | None = None):
    """The dataset the arguments name: the training split (``split`` None), or ``split``.

    In a torchrun job the training split is this rank's shard (``shard`` None or True; the whole set is
    read, then only the shard is kept); other splits (held-out images) are whole on every rank.
    """
    from ..data import load_dataset
    from ..data.shards import shard_dataset

    data = load_dataset(args.dataset or args.data, split=split or args.split, resolution=args.resolution,
                        channels=args.channels, subset=args.subset, seed=args.data_seed,
                        max_bytes=getattr(args, "max_data_bytes", None))
    data = of_class(data, getattr(args, "class_label", None))
    if shard is None:
        shard = split is None
    return shard_dataset(data) if shard else data


def of_class(data, label: int | None):
    """The images of class ``label`` (``--class-label``; all of them when None)."""
    import numpy as np

    if label is None:
        return data
    if data.labels is None:
        raise ConfigError(f"--class-label {label}: the data '{data.name}' have no labels, so the training images of one "
                          "class cannot be chosen; use labelled data or drop --class-label")
    idx = np.nonzero(data.labels == int(label))[0]
    if len(idx) == 0:
        raise ConfigError(f"--class-label {label}: no image of '{data.name}' has that label (labels "
                          f"{int(data.labels.min())}..{int(data.labels.max())})")
    return data.select(idx, note=f"class {int(label)}")


def run_record(data=None) -> dict:
    """What a run record says about the processes: the world size and, for a sharded training set,
    every rank's ``[start, stop)``."""
    shard = getattr(data, "shard", None)
    return {**world().record(), "shards": shard.record()["bounds"] if shard is not None else None}


def parse_opts(pairs: list[str] | None) -> dict[str, str]:
    """``["tau=0.005", "temperature=1"]`` -> dict; values stay strings and are typed by the model."""
    out: dict[str, str] = {}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--opt expects key=value, got '{pair}'")
        out[key.strip()] = value.strip()
    return out


def name_list(text: str, what: str) -> list[str]:
    """``"a, b,c"`` -> ``["a", "b", "c"]``; an empty list is an error naming the flag ``what``."""
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise ConfigError(f"{what} is empty")
    return names


def int_list(text: str, what: str) -> list[int]:
    """``"900,500,100"`` -> ``[900, 500, 100]``, with an error naming the flag ``what``."""
    try:
        return [int(v) for v in name_list(text, what)]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated integers, e.g. 900,500,100; got '{text}'") from exc


def float_list(text: str, what: str) -> list[float]:
    """``"0.005,0.02"`` -> ``[0.005, 0.02]``, with an error naming the flag ``what``."""
    try:
        return [float(v) for v in name_list(text, what)]
    except ValueError as exc:
        raise ConfigError(f"{what} must be comma-separated numbers, e.g. 0.005,0.02; got '{text}'") from exc


def timestep_list(text: str, what: str) -> list[int]:
    """``"900,500,100"`` -> ``[900, 500, 100]``, each t checked by the one timestep rule
    (``Schedule.check_t``), with an error naming the flag ``what``."""
    from ..schedules import DEFAULT_SCHEDULE

    return _checked_timesteps(DEFAULT_SCHEDULE, text, what)


def _checked_timesteps(schedule, text: str, what: str) -> list[int]:
    out = []
    for t in int_list(text, what):
        try:
            out.append(schedule.check_t(t))
        except ConfigError as exc:
            raise ConfigError(f"{what}: {exc}") from None
    return out


def add_sampling_args(p, *, defaults: bool = True) -> None:
    """--sampler, --schedule and the Euler/Heun settings (docs/DESIGN.md §10); ``defaults`` False leaves
    them None (a preset decides)."""
    from ..samplers import SAMPLERS
    from ..schedules import SCHEDULES

    p.add_argument("--sampler", choices=SAMPLERS, default="ddim" if defaults else None,
                   help="ddim (default; diffusers' DDIMScheduler), ddpm, euler or heun (EDM's deterministic "
                        "2nd-order sampler on the Karras grid)")
    p.add_argument("--schedule", choices=list(SCHEDULES), default=None,
                   help="the noise levels' family (default: the network's own when a network is sampled, else "
                        "ddpm-linear); ddim/ddpm need a ddpm-* table")
    p.add_argument("--sigma-min", type=float, default=None, help="euler/heun: lowest sigma (default 0.002, clipped "
                                                                 "to the schedule's and the network's range)")
    p.add_argument("--sigma-max", type=float, default=None, help="euler/heun: highest sigma (default 80, clipped)")
    p.add_argument("--s-churn", type=float, default=0.0, help="euler/heun: EDM's stochastic churn (default 0)")


def sampler_from_args(args, steps: int):
    """The :class:`~localdiff.samplers.SamplerConfig` of the arguments."""
    from ..samplers import SamplerConfig

    return SamplerConfig(name=args.sampler or "ddim", steps=steps, sigma_min=args.sigma_min,
                         sigma_max=args.sigma_max, s_churn=args.s_churn)


def schedule_from_args(args):
    """The schedule --schedule names, or None (the network's own, else the default table)."""
    from ..schedules import schedule_named

    return schedule_named(args.schedule) if getattr(args, "schedule", None) else None


def add_network_args(p) -> None:
    """--unet and --class-label."""
    p.add_argument("--unet", metavar="PATH", default=None,
                   help="the network: a diffusers UNet2DModel directory, the paper's .pt checkpoint, an EDM .pkl "
                        "snapshot or a convert-network .safetensors (default: the one shipped for the dataset)")
    p.add_argument("--class-label", type=int, default=None, metavar="K",
                   help="for a class-conditional network: sample class K; the analytical models are then fitted "
                        "on the training images of class K")


def levels_list(timesteps: str | None, sigmas: str | None, schedule, what: str = "--timesteps"):
    """The levels of --timesteps (integers of ``schedule``) or --sigmas (any family): ints, or NoiseLevels."""
    from ..schedules import DEFAULT_SCHEDULE

    schedule = schedule or DEFAULT_SCHEDULE
    if sigmas:
        values = float_list(sigmas, "--sigmas")
        if any(not (v > 0) for v in values):
            raise ConfigError(f"--sigmas must be positive numbers, got {sigmas}")
        return [schedule.level(v) for v in values]
    if not getattr(schedule, "discrete", False):
        raise ConfigError(f"the {schedule.name} schedule is continuous: give noise levels with --sigmas, e.g. "
                          "--sigmas 80,10,1,0.1")
    return _checked_timesteps(schedule, timesteps, what)


def model_options(pairs, models) -> dict[str, dict[str, str]]:
    """``["masked.tau=0.005"]`` -> ``{"masked": {"tau": "0.005"}, ...}`` for every model in ``models``."""
    opts: dict[str, dict[str, str]] = {m: {} for m in models}
    for pair in pairs or []:
        key, sep, value = pair.partition("=")
        model, dot, field = key.partition(".")
        if not sep or not dot or not field:
            raise ConfigError(f"--opt expects MODEL.KEY=VALUE, got '{pair}'")
        if model not in opts:
            raise ConfigError(f"--opt names model '{model}', which is not in --models ({', '.join(models)})")
        opts[model][field.strip()] = value.strip()
    return opts


def network_options(args, opts: dict[str, dict[str, str]]) -> None:
    """--unet and --class-label into the options of model ``unet`` (an error if it is not among the models)."""
    if "unet" in opts:
        if args.unet is not None:
            opts["unet"]["path"] = args.unet
        if args.class_label is not None:
            opts["unet"]["class_label"] = args.class_label
    elif args.unet is not None:
        raise ConfigError("--unet names the network of model unet, which is not among --models")


def load_held_out(load_split, split: str, purpose: str):
    """``load_split(split)``, with a DataError that says what the held-out images are for."""
    try:
        return load_split(split)
    except DataError as exc:
        raise DataError(f"{exc}\n(held-out images {purpose}; choose another --held-out-split)") from exc


def versions() -> dict:
    import diffusers
    import numpy
    import torch

    from .. import __version__

    return {"localdiff": __version__, "python": platform.python_version(), "torch": torch.__version__,
            "diffusers": diffusers.__version__, "numpy": numpy.__version__,
            "cuda": torch.version.cuda, "platform": platform.platform()}


def command_line() -> str:
    return " ".join(["localdiff", *sys.argv[1:]])


class Terminated(BaseException):
    """SIGTERM, raised like Ctrl-C's KeyboardInterrupt so every clean-up on the way out runs."""


@contextmanager
def sigterm_raises():
    """While the block runs (main thread only), SIGTERM raises :class:`Terminated` instead of killing
    the process on the spot, so half-written outputs are removed as after Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):
        raise Terminated(signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


_PARTIAL = re.compile(r"\..+\.partial")
_UNTAGGED = re.compile(r"\..+\.[a-z0-9_]{8}\.partial")  # what earlier versions wrote (mkdtemp, no owner tag)


def sweep_partials(directory: Path) -> None:
    """Remove the ``.NAME.*.partial`` directories that dead runs on this machine left in ``directory``
    (SIGKILL, power loss); report those whose owner cannot be checked."""
    for path, state in stale_entries(directory, _PARTIAL):
        if not path.is_dir() or (state == "unknown" and not _UNTAGGED.fullmatch(path.name)):
            continue
        if state == "dead":
            if remove_entry(path):
                print(f"localdiff: removed {path}, the unfinished output of a run that is no longer running",
                      file=sys.stderr)
        else:
            where = "a run on another machine" if state == "elsewhere" else "an older localdiff"
            print(f"localdiff: note: {path} is the unfinished output of {where}; delete it if that run is over",
                  file=sys.stderr)


def _unused_sibling(out: Path) -> Path:
    for k in range(1, 10000):
        cand = out.with_name(f"{out.name}-{k}")
        if not cand.exists() and not cand.is_symlink():
            return cand
    raise ConfigError(f"no free name next to {out}")  # pragma: no cover


@contextmanager
def new_run_dir(out: str | os.PathLike):
    """Yield a temporary directory that becomes ``out`` only when the block succeeds.

    ``out`` must not exist: earlier results are never overwritten, and a failed or interrupted run
    (Ctrl-C, SIGTERM) leaves nothing half-written under that name; what a killed run left is removed
    by the next one. The directory and its files get the umask's permissions. If ``out`` appears while
    the run works, the results are kept under ``out-1`` (``-2``, ...) and the error names that path.
    In a torchrun job only rank 0 writes ``out``; the other ranks get a scratch directory, removed after.
    """
    out = Path(out)
    main_decides(lambda: _check_new(out), "the check of --out on rank 0")
    if not is_main():
        scratch = Path(tempfile.mkdtemp(prefix=f"localdiff-rank{world().rank}-"))
        try:
            with sigterm_raises():
                yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    sweep_partials(out.parent)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.{owner_tag()}.", suffix=".partial", dir=out.parent))
    finished = False
    try:
        normal_mode(tmp, directory=True)
        with sigterm_raises():
            yield tmp
            finished = True
            _publish(tmp, out)
    except BaseException:
        if not finished and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        raise


def _check_new(out: Path) -> None:
    if out.exists() or out.is_symlink():
        what = "a directory" if out.is_dir() else "a file" if out.is_file() else "a path"
        raise ConfigError(f"--out {out} already exists (as {what}); choose a new --out (runs are never overwritten)")


def _publish(tmp: Path, out: Path) -> None:
    """Rename the finished ``tmp`` to ``out``; never lose it: if ``out`` appeared meanwhile, or the rename
    fails, the results stay under a name the error gives."""
    try:
        if out.exists() or out.is_symlink():
            raise FileExistsError(out)
        os.rename(tmp, out)  # (an empty directory created in between would be replaced: nothing is lost)
        return
    except OSError as exc:
        if not (out.exists() or out.is_symlink()):
            raise ConfigError(f"cannot rename the finished run {tmp} to {out} ({exc}); its results are in {tmp}") from None
    kept = _unused_sibling(out)
    try:
        os.rename(tmp, kept)
    except OSError:
        kept = tmp
    raise ConfigError(f"output directory {out} appeared while this run was working; its results are in {kept} "
                      "(move them where you want them)")


# -- the calibrate-* commands -----------------------------------------------------------------------

def calibration_inputs(args):
    """What both calibrate commands start from: the new ``--out`` path (an existing one is refused), the
    training and held-out data, the model's options and the target denoiser (``None`` without
    ``--target``), each option set given ``--device``."""
    from .. import make_denoiser

    out = Path(args.out)
    if out.exists():
        raise ConfigError(f"{out} already exists; choose a new --out (schedules are never overwritten)")
    if args.num < 1 or args.batch_size < 1 or getattr(args, "skip", 0) < 0:
        raise ConfigError("--num and --batch-size must be positive (and --skip >= 0)")
    data = load_data_from_args(args)
    held_out = load_data_from_args(args, split=args.held_out_split)
    if args.held_out_split == args.split:
        print(f"note: held-out images come from the training split '{args.split}'")
    model_opts = parse_opts(args.opt)
    model_opts.setdefault("device", args.device)
    target = None
    if args.target is not None:
        target_opts = parse_opts(args.target_opt)
        target_opts.setdefault("device", args.device)
        target = make_denoiser(args.target, data, **target_opts)
    return out, data, held_out, model_opts, target


def write_calibration(result: dict, out: Path, args, held_out, seconds: float) -> None:
    """Stamp a calibration result (command, held-out set, time, versions) and write it atomically; in a
    torchrun job rank 0 alone writes, and a file that appeared meanwhile is never overwritten."""
    from ..fileio import write_json

    result["command"] = command_line()
    result["held_out"] = {"split": args.held_out_split, "dataset": held_out.describe()}
    result["seconds"] = seconds
    result["versions"] = versions()
    if is_main():
        if out.exists():
            raise ConfigError(f"{out} appeared while calibrating; the result was not written")
        write_json(out, result)
