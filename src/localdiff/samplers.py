"""The samplers and the grid of noise levels they step on (docs/DESIGN.md §1, §10).

* ``ddim`` and ``ddpm`` run diffusers' ``DDIMScheduler`` / ``DDPMScheduler`` on a discrete DDPM
  schedule (the library's defaults: "leading" spacing, ``clip_sample=True``), exactly as before: the
  grid is the scheduler's timesteps, the result the last step's ``x0_hat``.
* ``euler`` and ``heun`` are Karras et al.'s (EDM, 2022) Algorithm 2 on the probability-flow ODE
  ``dy/dsigma = (y - D(y; sigma)) / sigma`` of the unscaled state ``y = x_t / a``, on the grid
  ``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, then 0: Euler steps, and for
  ``heun`` the second-order correction on every step but the last; optional churn (``s_churn``); float64
  coefficients and state. They run on any schedule: the denoiser is called at the schedule's level
  of each sigma (``x_t = a y``).

A network trained at discrete levels (the paper's U-Net and every DDPM network on their integer
timesteps; EDM's iDDPM networks on their table) declares how to round a sigma to one of them
(:meth:`localdiff.denoisers.Denoiser.snap_sigma`); the Karras grid is rounded first, so the sampler,
the network and every analytical model of a comparison see the same levels. Rounding can merge
neighbouring levels at low noise: repeated levels are dropped (a zero-length step changes nothing).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Literal

import torch

from .errors import ConfigError
from .schedules import DEFAULT_SCHEDULE, NoiseLevel, NoiseSchedule, Schedule, level_key

SAMPLERS = ("ddim", "ddpm", "euler", "heun")
SamplerName = Literal["ddim", "ddpm", "euler", "heun"]
EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0  # EDM's sampler defaults


@dataclass(frozen=True)
class SamplerConfig:
    """A sampler and its settings. ``sigma_min``/``sigma_max`` (euler, heun): None takes EDM's 0.002 and 80,
    clipped to the schedule's range (and to the network's, for a network); ``s_churn`` > 0 adds EDM's
    stochastic churn on levels in ``[s_tmin, s_tmax]``."""

    name: SamplerName = "ddim"
    steps: int = 10
    sigma_min: float | None = None
    sigma_max: float | None = None
    rho: float = EDM_RHO
    s_churn: float = 0.0
    s_tmin: float = 0.0
    s_tmax: float = math.inf
    s_noise: float = 1.0

    def __post_init__(self):
        if self.name not in SAMPLERS:
            raise ConfigError(f"unknown sampler '{self.name}': choose one of {', '.join(SAMPLERS)}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be a positive integer, got {self.steps!r}")
        for key in ("sigma_min", "sigma_max"):
            v = getattr(self, key)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ConfigError(f"{key} must be a positive number, got {v}")
        if not (self.rho > 0 and self.s_churn >= 0 and self.s_noise >= 0):
            raise ConfigError("rho must be positive, s_churn and s_noise non-negative")

    @property
    def ode(self) -> bool:
        """Euler or Heun on the sigma grid (else a diffusers scheduler on integer timesteps)."""
        return self.name in ("euler", "heun")

    def record(self) -> dict:
        out = {"name": self.name, "steps": self.steps}
        if self.ode:
            out.update(rho=self.rho, s_churn=self.s_churn, s_tmin=self.s_tmin, s_tmax=self.s_tmax, s_noise=self.s_noise)
        return out


def sampler_config(sampler: str | SamplerConfig, steps: int | None = None) -> SamplerConfig:
    """``sampler`` as a SamplerConfig (a name takes ``steps``)."""
    if isinstance(sampler, SamplerConfig):
        return sampler if steps is None or steps == sampler.steps else \
            SamplerConfig(**{**sampler.__dict__, "steps": steps})
    return SamplerConfig(name=sampler, steps=10 if steps is None else steps)


@dataclass(frozen=True)
class Grid:
    """The levels a run calls the denoiser at, in order (``levels``), and what it was made from."""

    levels: tuple[NoiseLevel, ...]
    sampler: SamplerConfig
    schedule: NoiseSchedule
    snapped: bool = False  # rounded to a network's trained levels

    @property
    def timesteps(self) -> list[int | None]:
        return [lv.t for lv in self.levels]

    @property
    def sigmas(self) -> list[float]:
        return [lv.sigma for lv in self.levels]

    def keys(self) -> list[str]:
        """One label per step for records: the timestep (``"900"``) or the sigma (``"s=1.234"``)."""
        return [level_key(lv) for lv in self.levels]

    def record(self) -> dict:
        return {**self.sampler.record(), "schedule": self.schedule.record(), "snapped": self.snapped,
                "timesteps": self.timesteps, "sigmas": self.sigmas, "steps_taken": len(self.levels)}


def make_scheduler(sampler: str, schedule: Schedule = DEFAULT_SCHEDULE):
    """A diffusers scheduler with the library defaults (DDIM: clip_sample=True, "leading" spacing)."""
    from diffusers import DDIMScheduler, DDPMScheduler

    if not getattr(schedule, "discrete", False):
        raise ConfigError(f"the {sampler} sampler steps on the integer timesteps of a DDPM schedule, and "
                          f"'{schedule.name}' is continuous; use --sampler euler (DDIM's update, unclipped) or heun")
    # The denoisers return x0 directly; prediction_type="sample" lets the scheduler derive eps itself,
    # which is the same formula as eps_from_x0 without a float32 round trip.
    if sampler == "ddim":
        return DDIMScheduler(**schedule.scheduler_kwargs(), prediction_type="sample")
    if sampler == "ddpm":
        return DDPMScheduler(**schedule.scheduler_kwargs(), prediction_type="sample")
    raise ConfigError(f"unknown sampler '{sampler}' for a diffusers scheduler: ddim or ddpm")


def timesteps_for(steps: int, sampler: str = "ddim", schedule: Schedule = DEFAULT_SCHEDULE) -> list[int]:
    """The timesteps a DDIM/DDPM run of ``steps`` steps visits, e.g. [900, 800, ..., 0] for 10 DDIM steps."""
    sch = make_scheduler(sampler, schedule)
    sch.set_timesteps(steps)
    return [int(t) for t in sch.timesteps]


def karras_sigmas(steps: int, sigma_min: float, sigma_max: float, rho: float = EDM_RHO) -> torch.Tensor:
    """``sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho``, i = 0..N-1 [N] float64."""
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / (steps - 1) if steps > 1 else torch.zeros(1, dtype=torch.float64)
    return (sigma_max ** (1 / rho) + frac * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho


def make_grid(sampler: str | SamplerConfig = "ddim", schedule: NoiseSchedule = DEFAULT_SCHEDULE, *,
              steps: int | None = None, snap: Callable[[float], float] | None = None,
              sigma_range: tuple[float, float] | None = None) -> Grid:
    """The levels of a run. ``snap`` rounds a sigma to a network's trained level (euler, heun; the
    DDIM/DDPM grids are the schedule's own timesteps); ``sigma_range`` is the network's range, which
    the default sigma_min/sigma_max are clipped to, as EDM's sampler does."""
    cfg = sampler_config(sampler, steps)
    if not cfg.ode:
        if cfg.steps > getattr(schedule, "num_train_timesteps", cfg.steps):
            raise ConfigError(f"steps must be at most {schedule.num_train_timesteps} for {cfg.name}, got {cfg.steps}")
        return Grid(tuple(schedule.at(t) for t in timesteps_for(cfg.steps, cfg.name, schedule)), cfg, schedule)
    lo, hi = schedule.sigma_min, schedule.sigma_max
    if sigma_range is not None:
        lo, hi = max(lo, sigma_range[0]), min(hi, sigma_range[1])
    smin = cfg.sigma_min if cfg.sigma_min is not None else max(EDM_SIGMA_MIN, lo)
    smax = cfg.sigma_max if cfg.sigma_max is not None else min(EDM_SIGMA_MAX, hi)
    if not smin < smax:
        raise ConfigError(f"the sampler's sigma range is empty: sigma_min {smin:g} >= sigma_max {smax:g}")
    sigmas = [float(s) for s in karras_sigmas(cfg.steps, smin, smax, cfg.rho)]
    if snap is not None:
        sigmas = [float(snap(s)) for s in sigmas]
        sigmas = [s for i, s in enumerate(sigmas) if i == 0 or s != sigmas[i - 1]]  # drop repeats
    return Grid(tuple(level_at(schedule, s) for s in sigmas), cfg, schedule, snapped=snap is not None)


def level_at(schedule: NoiseSchedule, sigma: float) -> NoiseLevel:
    """The schedule's level at ``sigma``: its own table entry when sigma is one (exactly), else the
    family's level."""
    if getattr(schedule, "discrete", False):
        t = schedule.nearest_timestep(sigma)
        if float(schedule.sigmas[t]) == sigma:
            return schedule.at(t)
    return schedule.level(sigma)


def ode_loop(call: Callable[[torch.Tensor, NoiseLevel], torch.Tensor], y0: torch.Tensor, grid: Grid, *,
             generator: torch.Generator | None = None, snap: Callable[[float], float] | None = None,
             on_step: Callable[[int, NoiseLevel, torch.Tensor, torch.Tensor], None] | None = None) -> torch.Tensor:
    """EDM's Algorithm 2 (Euler or Heun) from ``y0`` [N, C, H, W] (float64, at ``grid.levels[0]``'s sigma)
    to sigma 0. ``call(y, level)`` is the denoiser ``D(y; sigma)`` in unscaled coordinates (float64);
    ``on_step(i, level, y_hat, D)`` sees each step's first evaluation."""
    cfg, schedule = grid.sampler, grid.schedule
    levels = list(grid.levels)
    sigmas = [lv.sigma for lv in levels] + [0.0]
    y = y0
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    for i, level in enumerate(levels):
        s, s_next = sigmas[i], sigmas[i + 1]
        gamma = min(cfg.s_churn / cfg.steps, math.sqrt(2) - 1) if cfg.s_churn > 0 and cfg.s_tmin <= s <= cfg.s_tmax \
            else 0.0
        level_hat, s_hat, y_hat = level, s, y
        if gamma > 0:
            s_hat = s + gamma * s
            if snap is not None:
                s_hat = float(snap(s_hat))
            level_hat = level_at(schedule, s_hat)
            z = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.device)
            y_hat = y + math.sqrt(max(s_hat ** 2 - s ** 2, 0.0)) * cfg.s_noise * z
        d_cur_den = call(y_hat, level_hat)
        if on_step is not None:
            on_step(i, level_hat, y_hat, d_cur_den)
        d_cur = (y_hat - d_cur_den) / s_hat
        y = y_hat + (s_next - s_hat) * d_cur
        if cfg.name == "heun" and i < len(levels) - 1:
            d_prime = (y - call(y, levels[i + 1])) / s_next
            y = y_hat + (s_next - s_hat) * (0.5 * d_cur + 0.5 * d_prime)
    return y


__all__ = ["SAMPLERS", "SamplerConfig", "sampler_config", "Grid", "make_grid", "make_scheduler", "timesteps_for",
           "karras_sigmas", "level_at", "ode_loop"]
