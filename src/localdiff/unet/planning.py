"""The plan of a ``train-unet`` run, made before it trains: which configuration, how many steps and epochs,
how many images per second, and how much memory at the peak.

**Default configuration** (a new run without ``--config``): ``paper`` where it is fast enough to learn
something in the budget, ``small`` elsewhere. Precisely: a throwaway ``paper`` network is timed on this
device (:func:`probe`), and ``paper`` is the default when, at that speed, it would make at least
``MIN_STEPS`` (200) optimisation steps within the budget (``--minutes``; with ``--steps`` alone, within
``REFERENCE_BUDGET_S``, ten minutes, that is where it trains at 200 x 128 / 600 = 43 images/s or more).
On a GPU ``paper`` makes thousands of steps in minutes; on two CPU cores it trains at about 5 images/s,
25 steps in ten minutes, so the CPU default is ``small``. Images whose size ``paper``'s three levels do
not divide take ``small`` too. Why 200 steps: the shipped ``small`` MNIST network's loss log
(``weights/mnist/localdiff_unet.json``) reads 0.53 at step 50, 0.25 at 100, 0.21 at 200 and 0.168 at
7,000; by step 200 a run has made most of its drop.

**Checks** (every new run, default configuration or not): a plan under ``WARN_EPOCHS`` (one epoch) is
warned about (some training images are never seen), and so is one under ``MIN_STEPS`` steps; a plan under
``REFUSE_EPOCHS`` (a quarter of an epoch) is refused without ``--force``. The quarter: the models a U-Net
is compared with (Wiener, optimal, masked) are built from every training image, and a network that has
seen at most a quarter of them, once, is a reference for another, smaller data set. The message says
what one epoch needs (``--minutes``, ``--steps`` or ``--subset``).

**Speed** is measured, not assumed: whole training steps (forward, backward, clipping, AdamW) of a
throwaway network on random images, after one warm-up step per batch size. On a GPU at the run's batch
size; on a CPU at batch sizes up to ``CPU_PROBE_BATCH`` (a ``paper`` step of 128 takes 20 s on two
cores), fitted by ``seconds = fixed + per_image x batch`` and read at the run's batch size.

**Peak memory.** On a GPU, measured: torch's peak allocation during a probe step at the run's batch size,
plus the EMA copy and the training images the trainer keeps on the device. On a CPU, measured and scaled:
the process's resident memory before the probes (data loaded, diffusers imported), plus ``STATE_COPIES``
float32 copies of the parameters (weights, gradients, AdamW's two moments, EMA), plus the rise of the
kernel's resident peak over one probe step (``/proc/self/clear_refs`` resets the peak; gradients,
activations, transients) scaled to the run's batch size and by ``RSS_GROWTH``: over its first steps a
real run's peak grew 1.17 (``paper``, batch 128) to 1.36 (``small``, 64) times the probe's rise on two
CPU cores. Whole MNIST runs: ``small`` at 64 estimated 1.17 GB, measured 1.14 GB; ``paper`` at 128
estimated 4.0 GB, measured 3.5 GB (tests/test_train_defaults.py checks a small run within -20%/+30%). Where
the peak cannot be reset, ``ACTIVATION_PEAK_FACTOR`` times the bytes autograd saves for backward (counted
by saved-tensor hooks) stands in for the rise. Resetting the peak also resets what ``getrusage`` reports
as this process's ``ru_maxrss`` to the value at that moment.
"""

from __future__ import annotations

import dataclasses
import math
import os
import resource
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .configs import TRAIN_RECIPES, UNetConfig, build_unet, unet_config

MIN_STEPS = 200  # steps for a run to learn something (the small MNIST loss log, above)
REFERENCE_BUDGET_S = 600.0  # the budget the default assumes for a --steps run (no --minutes)
WARN_EPOCHS = 1.0  # under this, a warning: some images are never seen
REFUSE_EPOCHS = 0.25  # under this, refused without --force
RSS_GROWTH = 1.25  # the trainer's resident peak / the probe's scaled rise (CPU; measured 1.17-1.36)
ACTIVATION_PEAK_FACTOR = 1.6  # the same peak / autograd's saved bytes, where the rise cannot be read (1.42-1.84)
STATE_COPIES = 5  # float32 copies of the parameters: weights, gradients, AdamW m and v, EMA
CPU_PROBE_BATCH = 16  # largest batch timed on a CPU
STEP_SHARE = 0.95  # share of a budget left after start-up that goes to steps (checkpoints, margins)


@dataclass(frozen=True)
class Probe:
    """What a training step of one configuration costs on this device, measured on a throwaway network:
    ``seconds(b) = seconds_fixed + seconds_per_image * b`` per step of ``b`` images, and its memory at the
    largest batch measured, ``batches[-1]``."""

    batches: tuple[int, ...]
    seconds: tuple[float, ...]  # measured seconds per step at each batch size
    seconds_fixed: float
    seconds_per_image: float
    parameters: int
    saved_bytes: int  # distinct storages autograd saved for backward (parameters excluded)
    rss_step_bytes: int | None  # CPU: rise of the resident peak over a step (gradients, activations, transients)
    cuda_peak_bytes: int | None  # CUDA: torch's peak allocation during a step, above what was allocated before

    def step_seconds(self, batch: int) -> float:
        return self.seconds_fixed + self.seconds_per_image * batch

    def images_per_s(self, batch: int) -> float:
        return batch / max(self.step_seconds(batch), 1e-9)


def _rss_bytes() -> int:
    """This process's resident memory now (Linux ``/proc``; elsewhere its peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_peak_rss() -> bool:
    """Reset the kernel's record of this process's peak resident memory to its current value (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    """The peak resident memory since the last :func:`_reset_peak_rss` (``VmHWM``)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise OSError("no VmHWM in /proc/self/status")


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the system (glibc keeps it otherwise, so a later rise of the peak
    would not show what a step needs); a no-op without glibc."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def base_rss_bytes() -> int:
    """The process's resident memory with diffusers imported (170 MB of it), before any network exists: what
    a CPU run holds besides its network, its optimiser and its activations. Measure it before any probe."""
    import diffusers.models  # noqa: F401  (the trainer imports it too)

    return _rss_bytes()


def probe(model_config: UNetConfig, shape: tuple[int, int, int], device: torch.device, *,
          batches: tuple[int, ...], amp: bool = True, channels_last: bool = True,
          repeats: int = 2, min_seconds: float = 0.2) -> Probe:
    """Time whole training steps (forward, backward, clipping, AdamW) of a throwaway ``model_config``
    network on ``batches`` random images of ``shape`` (C, H, W) on ``device``, with the trainer's
    autocast/channels-last choices (CUDA only), and measure the memory of a step at the largest batch.

    Each batch size gets one warm-up step, then ``repeats`` timed steps or more until ``min_seconds`` have
    passed; the fastest counts (a busy machine only ever slows a step down). The global random state is
    left as it was; nothing of the run depends on the probe."""
    cuda = device.type == "cuda"
    amp, channels_last = amp and cuda, channels_last and cuda
    batches = tuple(sorted(set(int(b) for b in batches)))
    index = (device.index if device.index is not None else torch.cuda.current_device()) if cuda else None
    base = torch.cuda.memory_allocated(device) if cuda else 0
    with torch.random.fork_rng(devices=[index] if cuda else [], device_type="cuda" if cuda else "cpu"):
        torch.manual_seed(0)
        model = build_unet(model_config, shape).to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        model.train()
        params = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=1e-12)
        saved: dict = {}
        param_ptrs = {p.untyped_storage().data_ptr() for p in params}

        def pack(t: torch.Tensor) -> torch.Tensor:
            """Record each distinct storage autograd keeps, but the parameters' own."""
            s = t.untyped_storage()
            if s.data_ptr() not in param_ptrs:
                saved[(s.data_ptr(), str(t.device))] = s.nbytes()
            return t

        def step(b: int, count: bool = False) -> float:
            x = torch.randn(b, *shape, device=device)
            t = torch.randint(0, 1000, (b,), device=device)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            if cuda:
                torch.cuda.synchronize(device)
            start = time.perf_counter()
            hooks = torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if count else nullcontext()
            with hooks, torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp):
                out = model(x, t, return_dict=False)[0]
            out.float().square().mean().backward()
            del out
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if cuda:
                torch.cuda.synchronize(device)
            return time.perf_counter() - start

        seconds, cuda_peak, rss_step = [], None, None
        for b in batches:
            last = b == batches[-1]
            step(b, count=last)  # warm-up (allocations, kernel choice, AdamW's state); counts saved bytes
            if last and cuda:
                torch.cuda.reset_peak_memory_stats(device)
            elif last:
                _release_freed_memory()  # what the warm-up freed must not hide the next step's needs
                rss0 = _rss_bytes() if _reset_peak_rss() else None
            times = [step(b) for _ in range(max(1, repeats))]
            while sum(times) < min_seconds:
                times.append(step(b))
            seconds.append(min(times))
            if last and cuda:
                cuda_peak = torch.cuda.max_memory_allocated(device) - base
            elif last and rss0 is not None:
                rss_step = max(0, _peak_rss_bytes() - rss0)
        nparams = sum(p.numel() for p in params)
        del model, opt, params
    if cuda:
        torch.cuda.empty_cache()
    else:
        _release_freed_memory()
    fixed, per_image = _fit(batches, seconds)
    return Probe(batches, tuple(seconds), fixed, per_image, nparams, sum(saved.values()), rss_step, cuda_peak)


def _fit(batches: tuple[int, ...], seconds: list[float]) -> tuple[float, float]:
    """``(fixed, per_image)`` of ``seconds = fixed + per_image * batch`` through the smallest and largest
    batch; one batch size (or a noisy, non-increasing pair) gives ``per_image = seconds / batch``."""
    if len(batches) >= 2 and seconds[-1] > seconds[0]:
        per_image = (seconds[-1] - seconds[0]) / (batches[-1] - batches[0])
        return max(0.0, seconds[0] - per_image * batches[0]), per_image
    return 0.0, seconds[-1] / batches[-1]


def probe_batches(batch: int, device: torch.device) -> tuple[int, ...]:
    """Batch sizes :func:`plan_run` times: the run's on a GPU, two up to ``CPU_PROBE_BATCH`` on a CPU."""
    if device.type == "cuda":
        return (batch,)
    top = min(batch, CPU_PROBE_BATCH)
    return tuple(sorted({max(1, top // 4), top}))


@dataclass(frozen=True)
class TrainPlan:
    """A new run's plan: configuration and why, steps, epochs, speed and peak memory (all estimates but the
    configuration). ``steps`` is the planned total; ``images_per_s`` counts every process."""

    config: str
    reason: str
    steps: int
    batch_size: int  # per process
    world_size: int
    num_images: int
    images_per_s: float
    peak_bytes: int
    memory: str  # what peak_bytes measures
    budget_s: float | None  # seconds for training (what is left of --minutes after start-up and export)
    minutes: float | None  # the --minutes given
    device: str

    @property
    def epochs(self) -> float:
        return self.steps * self.batch_size * self.world_size / self.num_images

    @property
    def seconds(self) -> float:
        return self.steps * self.batch_size * self.world_size / self.images_per_s

    def line(self) -> str:
        """The plan in one line, as train-unet prints it before training."""
        per = f"{self.batch_size} images" + (f" x {self.world_size} processes" if self.world_size > 1 else "")
        when = "in the budget" if self.budget_s is not None else f"taking about {_duration(self.seconds)}"
        return (f"plan: config {self.config} ({self.reason}); {self.steps:,} steps of {per} {when} = "
                f"{self.epochs:.2f} epochs of {self.num_images:,} images, at about {self.images_per_s:.0f} images/s "
                f"(measured on {self.device}); peak memory about {_size(self.peak_bytes)} ({self.memory})")

    def to_dict(self) -> dict:
        return {**dataclasses.asdict(self), "epochs": self.epochs}

    @classmethod
    def from_dict(cls, d: dict) -> "TrainPlan":
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)})

    def _fixes(self) -> str:
        """What one epoch takes: a budget, a number of steps, or fewer images."""
        one_epoch_steps = math.ceil(self.num_images / (self.batch_size * self.world_size))
        seen = self.steps * self.batch_size * self.world_size
        if self.budget_s is not None and self.minutes is not None:
            more_s = self.num_images / (self.images_per_s * STEP_SHARE) - self.budget_s  # one epoch's extra time
            first = f"--minutes {math.ceil(self.minutes + 1.05 * more_s / 60)} (about one epoch at this speed)"
        else:
            first = f"--steps {one_epoch_steps} (one epoch)"
        return f"{first}, or fewer images (--subset {max(1, seen)} gives one epoch in this plan)"

    def warnings(self) -> list[str]:
        """What is wrong but allowed: under one epoch, or too few steps to learn much."""
        out = []
        if self.epochs < WARN_EPOCHS:
            out.append(f"the plan covers {self.epochs:.2f} epochs: {1 - min(self.epochs, 1):.0%} of the "
                       f"{self.num_images:,} training images will never be seen; for one epoch give {self._fixes()}")
        if self.steps < MIN_STEPS:
            out.append(f"only {self.steps} optimisation steps: a network learns little in fewer than {MIN_STEPS} "
                       "(the small MNIST network's loss: 0.53 at step 50, 0.21 at step 200, 0.17 at step 7,000)")
        return out

    def refusal(self) -> str | None:
        """Why the plan is refused without --force (under a quarter of an epoch), or None."""
        if self.epochs >= REFUSE_EPOCHS:
            return None
        return (f"the plan covers {self.epochs:.2f} epochs of the {self.num_images:,} training images ({self.steps:,} "
                f"steps of {self.batch_size * self.world_size} at about {self.images_per_s:.0f} images/s on "
                f"{self.device}): a network that saw under a quarter of its training images is no reference for "
                f"models built from all of them. Give {self._fixes()}; or --force to train anyway")


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.0f} MB"


def choose_config(shape: tuple[int, int, int], device: torch.device, *, budget_s: float | None,
                  amp: bool = True, channels_last: bool = True) -> tuple[str, str]:
    """The default ``--config`` for images of ``shape`` on ``device`` and the reason, by the rule above:
    ``paper`` where its measured speed gives at least ``MIN_STEPS`` steps of its recipe's batch (128
    images) within ``budget_s`` seconds (``REFERENCE_BUDGET_S`` when None), else ``small``. A speed test of
    the device: a smaller ``--batch-size`` makes steps cheaper, not the network more affordable."""
    _, h, w = shape
    try:
        cfg = unet_config("paper", shape)
    except ConfigError:
        return "small", f"the default: paper's levels do not divide {h}x{w} images"
    batch = TRAIN_RECIPES["paper"].batch_size
    quick = (batch,) if device.type == "cuda" else (min(batch, 2),)  # a CPU only needs to see that it is slow
    p = probe(cfg, shape, device, batches=quick, amp=amp, channels_last=channels_last, repeats=1, min_seconds=0.0)
    budget = REFERENCE_BUDGET_S if budget_s is None else budget_s
    steps = int(STEP_SHARE * budget / p.step_seconds(batch))
    where = "the budget" if budget_s is not None else f"{REFERENCE_BUDGET_S / 60:.0f} minutes"
    if steps >= MIN_STEPS:
        return "paper", f"the default on {device.type}: paper makes about {steps:,} steps in {where}"
    return "small", (f"the default on {device.type}: paper would make about {steps:,} step{'s' * (steps != 1)} in "
                     f"{where}, fewer than {MIN_STEPS}")


def plan_run(name: str, reason: str, shape: tuple[int, int, int], num_images: int, device: torch.device, *,
             batch_size: int, steps: int | None, budget_s: float | None, minutes: float | None = None,
             world_size: int = 1,
             amp: bool = True, channels_last: bool = True, data_bytes: int = 0,
             base_bytes: int | None = None) -> TrainPlan:
    """Plan a new run of configuration ``name``: ``steps`` (a cap with ``budget_s``), or as many as the
    measured speed fits in ``budget_s`` seconds; the peak memory of one process (module docstring).
    ``data_bytes``: the training images a GPU trainer keeps on the device; ``base_bytes``: the process's
    resident memory before any probe (:func:`base_rss_bytes`; measured now when None)."""
    cfg = unet_config(name, shape)
    cuda = device.type == "cuda"
    rss = 0 if cuda else (base_bytes if base_bytes is not None else base_rss_bytes())
    allocated = torch.cuda.memory_allocated(device) if cuda else 0
    p = probe(cfg, shape, device, batches=probe_batches(batch_size, device), amp=amp, channels_last=channels_last)
    ips = p.images_per_s(batch_size) * world_size
    if budget_s is not None:
        fit = int(STEP_SHARE * budget_s / p.step_seconds(batch_size))
        steps = max(1, fit if steps is None else min(steps, fit))
    param_bytes, scale = 4 * p.parameters, batch_size / p.batches[-1]
    if cuda:  # measured at the run's batch: + the EMA copy and the images kept on the device
        peak = allocated + (p.cuda_peak_bytes or 0) + param_bytes + data_bytes
        memory = "GPU, torch's allocations"
    elif p.rss_step_bytes is not None:  # a step's rise (gradients + activations) scaled to the run's batch
        peak = rss + STATE_COPIES * param_bytes + RSS_GROWTH * max(0, p.rss_step_bytes - param_bytes) * scale
        memory = "process RSS"
    else:  # no peak counter: autograd's saved bytes times the factor measured on these networks
        peak = rss + STATE_COPIES * param_bytes + ACTIVATION_PEAK_FACTOR * p.saved_bytes * scale
        memory = "process RSS; from saved activations"
    return TrainPlan(config=name, reason=reason, steps=int(steps), batch_size=batch_size, world_size=world_size,
                     num_images=num_images, images_per_s=ips, peak_bytes=int(peak), memory=memory,
                     budget_s=budget_s, minutes=minutes, device=str(device))


__all__ = ["Probe", "TrainPlan", "probe", "probe_batches", "base_rss_bytes", "choose_config", "plan_run", "MIN_STEPS",
           "REFERENCE_BUDGET_S", "WARN_EPOCHS", "REFUSE_EPOCHS"]
