"""Sampling any denoiser ``(x_t, level) -> x0_hat``: DDIM and DDPM through diffusers' schedulers, Euler and
Heun on EDM's sigma grid (:mod:`localdiff.samplers`), with the noise levels of :mod:`localdiff.schedules`.

Conventions (docs/DESIGN.md §1): the default is DDIM with 10 steps on the DDPM linear schedule (T = 1000,
betas 1e-4 -> 0.02; "leading" spacing: 900, 800, ..., 0) and the result of a run is the ``x0_hat`` of its
last step. Every model of a comparison starts from the same initial noise and steps on the same grid.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from .distributed import tqdm
from .errors import ConfigError
from .samplers import Grid, SamplerConfig, make_grid, make_scheduler, ode_loop, timesteps_for  # noqa: F401
from .schedules import DEFAULT_SCHEDULE, NoiseLevel, NoiseSchedule, Schedule, add_noise, level_key  # noqa: F401

DenoiserFn = Callable[[torch.Tensor, int], torch.Tensor]


@dataclass
class Trajectory:
    """A sampling run: ``samples`` [N,C,H,W] is the result (the last step's x0_hat; for euler/heun the state
    at sigma 0, equal to it up to round-off); per-step tensors are [S,N,C,H,W]: ``xt`` the denoiser's input
    and ``x0_hat`` its output at each step's first evaluation, at the levels ``levels``."""

    samples: torch.Tensor
    timesteps: list
    xt: torch.Tensor | None = None
    x0_hat: torch.Tensor | None = None
    step_seconds: list[float] = field(default_factory=list)
    levels: list[NoiseLevel] = field(default_factory=list)
    grid: Grid | None = None

    @property
    def keys(self) -> list[str]:
        """Each step's key in records (:func:`localdiff.schedules.level_key`): ``"900"``, or ``"s=1.23"``."""
        return [level_key(lv) for lv in self.levels] if self.levels else [str(t) for t in self.timesteps]

    @property
    def steps(self) -> list:
        """What to call a denoiser with at each step: the levels (the timesteps of an older record)."""
        return list(self.levels) if self.levels else list(self.timesteps)


def grid_for(denoiser, sampler: str | SamplerConfig = "ddim", steps: int | None = None,
             schedule: NoiseSchedule | None = None) -> Grid:
    """The grid ``denoiser`` samples on: the schedule's (default: the denoiser's own) for ``sampler``, rounded
    to the denoiser's trained levels where it has discrete ones (a network on integer timesteps)."""
    schedule = schedule if schedule is not None else getattr(denoiser, "schedule", DEFAULT_SCHEDULE)
    snap = getattr(denoiser, "snap_sigma", None) if getattr(denoiser, "discrete_levels", False) else None
    rng = denoiser.sigma_range() if hasattr(denoiser, "sigma_range") else None
    return make_grid(sampler, schedule, steps=steps, snap=snap, sigma_range=rng)


def initial_noise(num: int, shape: tuple[int, int, int], *, seed: int = 0,
                  generator: torch.Generator | None = None) -> torch.Tensor:
    """Standard normal latents [num, C, H, W], drawn on the CPU so every device sees the same noise."""
    gen = generator if generator is not None else torch.Generator().manual_seed(int(seed))
    return torch.randn((num, *shape), generator=gen, dtype=torch.float32)


def check_grid(denoiser, grid: Grid) -> None:
    """ConfigError, before any step, when ``grid`` visits a level that a network trained at discrete levels
    cannot be evaluated at (a DDIM/DDPM table other than its own)."""
    if not getattr(denoiser, "discrete_levels", False):
        return
    off = [lv for lv in grid.levels if abs(denoiser.snap_sigma(lv.sigma) / lv.sigma - 1.0) > 1e-6]
    if off:
        raise ConfigError(f"{getattr(denoiser, 'name', 'the denoiser')}: the {grid.sampler.name} grid on the "
                          f"{grid.schedule.name} schedule visits {len(off)} level(s) the network was not trained at "
                          f"({off[0].label}: none of them); sample on the network's own schedule, or with --sampler "
                          "euler or heun, whose grid is rounded to its levels")


def _call(denoiser, level: NoiseLevel):
    """The argument that names ``level`` to ``denoiser``: the level for a localdiff model (it reads its
    ``schedule``), the integer timestep for a plain function ``(x_t, t)`` when the level has one."""
    if hasattr(denoiser, "schedule") or level.t is None:
        return level
    return level.t


def sample_loop(
    denoiser: DenoiserFn,
    init_noise: torch.Tensor,
    *,
    steps: int = 10,
    sampler: str | SamplerConfig = "ddim",
    generator: torch.Generator | None = None,
    schedule: NoiseSchedule | None = None,
    grid: Grid | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
    desc: str = "sampling",
) -> Trajectory:
    """Sample from ``init_noise`` [N,C,H,W] (standard normal) on ``grid`` (default: :func:`grid_for`).

    DDIM (eta=0) and DDPM call ``denoiser(x_t, t)`` once per step and return the last step's x0_hat (as
    in the paper's code); DDPM draws its step noise from ``generator``. Euler and Heun start at
    ``y = sigma_0 z`` and integrate to sigma 0 in float64 (module :mod:`localdiff.samplers`).
    """
    if init_noise.ndim != 4:
        raise ConfigError(f"initial noise must have shape [N, C, H, W], got {tuple(init_noise.shape)}")
    if grid is None:
        grid = grid_for(denoiser, sampler, steps, schedule)
    gen = generator if generator is not None else torch.Generator().manual_seed(0)
    if grid.sampler.ode:
        return _ode_trajectory(denoiser, init_noise, grid, gen, return_trajectory, progress, desc)
    scheduler = make_scheduler(grid.sampler.name, grid.schedule)
    scheduler.set_timesteps(grid.sampler.steps)
    x = init_noise * scheduler.init_noise_sigma
    timesteps = [int(t) for t in scheduler.timesteps]
    xts, x0s, seconds = [], [], []
    x0_hat = None
    for t, level in zip(tqdm(timesteps, desc=desc, unit="step", disable=not progress, leave=False), grid.levels):
        start = time.perf_counter()
        x0_hat = denoiser(x, _call(denoiser, level))
        if x0_hat.shape != x.shape:
            raise ConfigError(f"denoiser returned shape {tuple(x0_hat.shape)} for input {tuple(x.shape)}")
        x0_hat = x0_hat.to(x.dtype)
        if return_trajectory:
            xts.append(x.detach().cpu())
            x0s.append(x0_hat.detach().cpu())
        if grid.sampler.name == "ddim":
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
        levels=list(grid.levels),
        grid=grid,
    )


def _ode_trajectory(denoiser, init_noise, grid: Grid, gen, return_trajectory: bool, progress: bool,
                    desc: str) -> Trajectory:
    """Euler/Heun from ``y = sigma_0 z`` (float64); the denoiser sees ``x_t = a y`` at each level."""
    xts, x0s, seconds = [], [], []
    bar = tqdm(total=len(grid.levels), desc=desc, unit="step", disable=not progress, leave=False)
    clock = [time.perf_counter()]

    def call(y: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        x = y if level.a == 1.0 else level.a * y
        out = denoiser(x, _call(denoiser, level))
        if out.shape != y.shape:
            raise ConfigError(f"denoiser returned shape {tuple(out.shape)} for input {tuple(y.shape)}")
        return out.to(torch.float64)

    def on_step(i, level, y_hat, d):
        if return_trajectory:
            xts.append((y_hat if level.a == 1.0 else level.a * y_hat).detach().to("cpu", torch.float32))
            x0s.append(d.detach().to("cpu", torch.float32))
        if i:
            now = time.perf_counter()
            seconds.append(now - clock[0])
            clock[0] = now
            bar.update()

    y0 = init_noise.to(torch.float64) * grid.levels[0].sigma
    y = ode_loop(call, y0, grid, generator=gen, snap=None, on_step=on_step)
    seconds.append(time.perf_counter() - clock[0])
    bar.update()
    bar.close()
    return Trajectory(
        samples=y.detach().to("cpu", torch.float32),
        timesteps=grid.timesteps,
        xt=torch.stack(xts) if return_trajectory else None,
        x0_hat=torch.stack(x0s) if return_trajectory else None,
        step_seconds=seconds,
        levels=list(grid.levels),
        grid=grid,
    )


def sample(
    denoiser,
    num: int = 16,
    steps: int = 10,
    seed: int = 0,
    *,
    init_noise: torch.Tensor | None = None,
    sampler: str | SamplerConfig = "ddim",
    schedule: NoiseSchedule | None = None,
    grid: Grid | None = None,
    generator: torch.Generator | None = None,
    batch_size: int | None = None,
    return_trajectory: bool = False,
    progress: bool = True,
):
    """Generate samples with any denoiser; returns the result [N,C,H,W] float32 on the CPU.

    The initial latents are ``init_noise`` or standard normal noise from ``seed`` (or ``generator``),
    so runs of different denoisers start from the same noise. ``sampler`` is ddim (default), ddpm, euler,
    heun or a :class:`~localdiff.samplers.SamplerConfig`; ``schedule`` the family of levels (default: the
    denoiser's); ``grid`` a grid made once for several models (``grid_for(reference, ...)``), which then
    replaces sampler, steps and schedule. ``batch_size`` splits the run without changing its result
    (deterministic samplers); with ``return_trajectory`` a :class:`Trajectory` is returned instead.
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
    if grid is None:
        grid = grid_for(denoiser, sampler, steps, schedule)
    check_grid(denoiser, grid)
    device = getattr(denoiser, "device", torch.device("cpu"))
    bs = init_noise.shape[0] if batch_size is None else int(batch_size)
    if bs < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    parts = []
    for start in range(0, init_noise.shape[0], bs):
        parts.append(sample_loop(denoiser, init_noise[start:start + bs].to(device), grid=grid, generator=gen,
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
            levels=parts[0].levels,
            grid=grid,
        )
    return traj if return_trajectory else traj.samples
