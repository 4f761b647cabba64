"""DDPM forward process and the sampling loops that drive any denoiser ``(x_t, t) -> x0_hat``.

Conventions (docs/DESIGN.md §1): T = 1000 linear betas 1e-4 -> 0.02, ``alpha_bar[t] = prod(1 - beta)``,
``x_t = sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) eps``. Sampling uses diffusers' schedulers:
DDIM (deterministic, "leading" spacing: 900, 800, ..., 0 for 10 steps) and DDPM ancestral.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Callable, Literal

import numpy as np
import torch

from .distributed import tqdm
from .errors import ConfigError

DenoiserFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass(frozen=True)
class Schedule:
    """The DDPM noise schedule; coefficient tables are float64."""

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02

    @cached_property
    def betas(self) -> torch.Tensor:  # [T] float64
        return torch.linspace(self.beta_start, self.beta_end, self.num_train_timesteps, dtype=torch.float64)

    @cached_property
    def alpha_bar(self) -> torch.Tensor:  # [T] float64
        return torch.cumprod(1.0 - self.betas, dim=0)

    def check_t(self, t) -> int:
        """The one rule for a timestep, used wherever t enters: an integer value in [0, T-1].

        Accepted: a Python int, a numpy integer, or an integer tensor/array holding one element (0-d
        or [1]). Anything else is a ConfigError: bools, floats (even whole ones such as 500.0: a float
        timestep is ambiguous between rounding and truncation), strings, None, several elements.
        """
        last = self.num_train_timesteps - 1
        value = t
        if isinstance(value, (torch.Tensor, np.ndarray)):
            numel = value.numel() if isinstance(value, torch.Tensor) else value.size
            if numel != 1:
                raise ConfigError(f"timestep must be a single integer in [0, {last}], got an array of shape "
                                  f"{tuple(value.shape)}; call the denoiser once per timestep")
            kind = "int" if _integer_dtype(value.dtype) else str(value.dtype).replace("torch.", "")
            if kind != "int":
                raise ConfigError(f"timestep must be an integer in [0, {last}], got a {kind} array; "
                                  "pass an integer tensor or int(t)")
            value = value.reshape(-1)[0].item()
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
            shown = repr(value) if len(repr(value)) <= 40 else repr(value)[:37] + "..."
            hint = "; pass int(t)" if isinstance(value, (float, np.floating)) and float(value).is_integer() else ""
            raise ConfigError(f"timestep must be an integer in [0, {last}] (a Python int, a numpy integer or a "
                              f"one-element integer tensor), got {type(value).__name__} {shown}{hint}")
        value = int(value)
        if not 0 <= value <= last:
            raise ConfigError(f"timestep must be in [0, {last}], got {value}")
        return value

    def a(self, t) -> float:
        """``sqrt(alpha_bar[t])``, the signal scale."""
        return float(self.alpha_bar[self.check_t(t)].sqrt())

    def b2(self, t) -> float:
        """``1 - alpha_bar[t]``, the noise variance."""
        return float(1.0 - self.alpha_bar[self.check_t(t)])

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: ``x_t = a x0 + sqrt(b2) eps``."""
        return self.a(t) * x0 + self.b2(t) ** 0.5 * noise

    def eps_from_x0(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t) -> torch.Tensor:
        """``eps_hat = (x_t - a x0_hat) / sqrt(b2)`` (docs/DESIGN.md §1)."""
        return (x_t - self.a(t) * x0_hat) / self.b2(t) ** 0.5

    def x0_from_eps(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(b2) eps_hat) / a``."""
        return (x_t - self.b2(t) ** 0.5 * eps_hat) / self.a(t)

    def x0_from_v(self, x_t: torch.Tensor, v_hat: torch.Tensor, t) -> torch.Tensor:
        """``x0_hat = a x_t - sqrt(b2) v_hat`` for ``v = a eps - sqrt(b2) x0`` (Salimans & Ho 2022)."""
        return self.a(t) * x_t - self.b2(t) ** 0.5 * v_hat

    def scheduler_kwargs(self) -> dict:
        return dict(num_train_timesteps=self.num_train_timesteps, beta_start=self.beta_start,
                    beta_end=self.beta_end, beta_schedule="linear")


DEFAULT_SCHEDULE = Schedule()


def _integer_dtype(dtype) -> bool:
    """Integer (not bool) torch or numpy dtype."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.dtype(dtype).kind in "iu"


@dataclass
class Trajectory:
    """A sampling run: ``samples`` [N,C,H,W] is the last step's x0_hat; per-step tensors are [S,N,C,H,W]."""

    samples: torch.Tensor
    timesteps: list[int]
    xt: torch.Tensor | None = None
    x0_hat: torch.Tensor | None = None
    step_seconds: list[float] = field(default_factory=list)


def make_scheduler(sampler: str, schedule: Schedule = DEFAULT_SCHEDULE):
    """A diffusers scheduler with the library defaults (DDIM: clip_sample=True, "leading" spacing)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    # The denoisers return x0 directly; prediction_type="sample" lets the scheduler derive eps itself,
    # which is the same formula as eps_from_x0 without a float32 round trip.
    if sampler == "ddim":
        return DDIMScheduler(**schedule.scheduler_kwargs(), prediction_type="sample")
    if sampler == "ddpm":
        return DDPMScheduler(**schedule.scheduler_kwargs(), prediction_type="sample")
    raise ConfigError(f"unknown sampler '{sampler}': choose 'ddim' or 'ddpm'")


def timesteps_for(steps: int, sampler: str = "ddim", schedule: Schedule = DEFAULT_SCHEDULE) -> list[int]:
    """The timesteps a run of ``steps`` steps visits, e.g. [900, 800, ..., 0] for 10 DDIM steps."""
    sch = make_scheduler(sampler, schedule)
    sch.set_timesteps(steps)
    return [int(t) for t in sch.timesteps]


def initial_noise(num: int, shape: tuple[int, int, int], *, seed: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal latents [num, C, H, W], drawn on the CPU so every device sees the same noise."""
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    return torch.randn((num, *shape), generator=gen, dtype=torch.float32)


def sample_loop(
    denoiser: DenoiserFn,
    init_noise: torch.Tensor,
    *,
    steps: int = 10,
    sampler: Literal["ddim", "ddpm"] = "ddim",
    generator: torch.Generator | None = None,
    schedule: Schedule = DEFAULT_SCHEDULE,
    return_trajectory: bool = False,
    progress: bool = True,
    desc: str = "sampling",
) -> Trajectory:
    """Run DDIM (eta=0) or DDPM ancestral sampling from ``init_noise`` [N,C,H,W].

    Every step calls ``denoiser(x_t, t)`` once on the whole batch. The result is the x0_hat of the
    last step (as in the paper's code). DDPM draws its step noise from ``generator``.
    """
    if not isinstance(steps, int) or not 1 <= steps <= schedule.num_train_timesteps:
        raise ConfigError(f"steps must be an integer in 1..{schedule.num_train_timesteps}, got {steps}")
    if init_noise.ndim != 4:
        raise ConfigError(f"initial noise must have shape [N, C, H, W], got {tuple(init_noise.shape)}")
    scheduler = make_scheduler(sampler, schedule)
    scheduler.set_timesteps(steps)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)

    x = init_noise * scheduler.init_noise_sigma
    timesteps = [int(t) for t in scheduler.timesteps]
    xts, x0s, seconds = [], [], []
    x0_hat = None
    for t in tqdm(timesteps, desc=desc, unit="step", disable=not progress, leave=False):
        start = time.perf_counter()
        x0_hat = denoiser(x, t)
        if x0_hat.shape != x.shape:
            raise ConfigError(f"denoiser returned shape {tuple(x0_hat.shape)} for input {tuple(x.shape)}")
        x0_hat = x0_hat.to(x.dtype)
        if return_trajectory:
            xts.append(x.detach().cpu())
            x0s.append(x0_hat.detach().cpu())
        if sampler == "ddim":
            out = scheduler.step(x0_hat, t, x, eta=0.0)
        else:
            out = scheduler.step(x0_hat, t, x, generator=gen)
        x = out.prev_sample
        seconds.append(time.perf_counter() - start)
    assert x0_hat is not None
    return Trajectory(
        samples=x0_hat.detach().cpu(),
        timesteps=timesteps,
        xt=torch.stack(xts) if return_trajectory else None,
        x0_hat=torch.stack(x0s) if return_trajectory else None,
        step_seconds=seconds,
    )


def sample(
    denoiser,
    num: int = 16,
    steps: int = 10,
    seed: int = 0,
    *,
    init_noise: torch.Tensor | None = None,
    sampler: Literal["ddim", "ddpm"] = "ddim",
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
):
    """Generate samples with any denoiser; returns x0_hat of the last step, [N,C,H,W] float32 on the CPU.

    The initial latents are ``init_noise`` or standard normal noise from ``seed`` (or ``generator``),
    so runs of different denoisers start from the same noise. ``batch_size`` splits the run without
    changing its result (DDIM); with ``return_trajectory`` a :class:`Trajectory` is returned instead.
    """
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    shape = tuple(getattr(denoiser, "shape", ()))
    if init_noise is None:
        if len(shape) != 3:
            raise ConfigError("this denoiser does not declare its image shape; pass init_noise=[N,C,H,W]")
        if not isinstance(num, int) or num < 1:
            raise ConfigError(f"num must be a positive integer, got {num}")
        init_noise = initial_noise(num, shape, generator=gen)  # type: ignore[arg-type]
    else:
        init_noise = torch.as_tensor(init_noise, dtype=torch.float32)
        if init_noise.ndim != 4 or (len(shape) == 3 and tuple(init_noise.shape[1:]) != shape):
            raise ConfigError(
                f"init_noise must have shape [N, {', '.join(map(str, shape)) or 'C, H, W'}], "
                f"got {tuple(init_noise.shape)}"
            )
        if not torch.isfinite(init_noise).all():
            raise ConfigError("init_noise contains NaN or Inf values")
    device = getattr(denoiser, "device", torch.device("cpu"))
    schedule = getattr(denoiser, "schedule", DEFAULT_SCHEDULE)
    bs = init_noise.shape[0] if batch_size is None else int(batch_size)
    if bs < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    parts = []
    for start in range(0, init_noise.shape[0], bs):
        parts.append(sample_loop(denoiser, init_noise[start:start + bs].to(device), steps=steps,
                                 sampler=sampler, generator=gen, schedule=schedule,
                                 return_trajectory=return_trajectory, progress=progress))
    if len(parts) == 1:
        traj = parts[0]
    else:
        traj = Trajectory(
            samples=torch.cat([p.samples for p in parts]),
            timesteps=parts[0].timesteps,
            xt=torch.cat([p.xt for p in parts], dim=1) if return_trajectory else None,
            x0_hat=torch.cat([p.x0_hat for p in parts], dim=1) if return_trajectory else None,
            step_seconds=[sum(s) for s in zip(*[p.step_seconds for p in parts])],
        )
    return traj if return_trajectory else traj.samples
