"""Noise levels and the schedules that produce them (docs/DESIGN.md §1, §10).

A noise level is the pair ``(a, b2)`` of the forward process ``x_t = a x0 + sqrt(b2) eps``; its
noise-to-signal ratio ``sigma = sqrt(b2) / a`` is the one key shared by every family: the unscaled
state ``y = x_t / a = x0 + sigma eps`` does not depend on the family. Every analytical model is a
function of ``(a, b2)`` alone and gives the same ``x0_hat`` at matched levels whatever the family:
``x0_hat(a y, (a, a^2 s^2)) = x0_hat(y, (1, s^2))``.

Families:

* discrete DDPM tables of ``T`` timesteps (:class:`Schedule`): ``ddpm-linear`` (betas 1e-4 .. 0.02,
  the default, as before), ``ddpm-cosine`` (iDDPM's, diffusers' ``squaredcos_cap_v2``: the clipped-beta
  table) and ``ddpm-scaled-linear`` (diffusers' ``scaled_linear``); ``a = sqrt(alpha_bar_t)``,
  ``b2 = 1 - alpha_bar_t`` from float64 tables, and the integer timestep is kept on the level;
* continuous sigma families (:class:`ContinuousSchedule`): ``edm`` and ``ve`` (``x = y + sigma n``:
  ``a = 1``, ``b2 = sigma^2``) and ``vp`` (``a = 1 / sqrt(1 + sigma^2)``, ``b2 = sigma^2 a^2``).

A level is validated once, where it enters (:meth:`NoiseSchedule.at`): an integer timestep of a
discrete schedule by the one timestep rule, or a :class:`NoiseLevel`, which checks itself when made.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import cached_property
from typing import Literal

import numpy as np
import torch

from .errors import ConfigError


@dataclass(frozen=True)
class NoiseLevel:
    """One noise level: ``x_t = a x0 + sqrt(b2) eps`` (``a > 0``, ``b2 > 0``), with the timestep ``t`` of
    the discrete schedule it comes from (None for a continuous level) and that schedule's name."""

    a: float
    b2: float
    t: int | None = None
    schedule: str = ""

    def __post_init__(self):
        a, b2 = self.a, self.b2
        if isinstance(a, bool) or isinstance(b2, bool) or not isinstance(a, (int, float)) \
                or not isinstance(b2, (int, float)):
            raise ConfigError(f"a noise level needs numbers a and b2, got a={a!r}, b2={b2!r}")
        if not (math.isfinite(a) and math.isfinite(b2) and a > 0 and b2 > 0):
            raise ConfigError(f"a noise level needs a > 0 and b2 > 0 (x_t = a x0 + sqrt(b2) eps), got a={a}, b2={b2}")
        object.__setattr__(self, "a", float(a))
        object.__setattr__(self, "b2", float(b2))

    @property
    def sigma(self) -> float:
        """The noise-to-signal ratio ``sqrt(b2) / a``."""
        return math.sqrt(self.b2) / self.a

    @property
    def snr(self) -> float:
        """The signal-to-noise variance ratio ``a^2 / b2 = 1 / sigma^2``."""
        return self.a * self.a / self.b2

    @property
    def key(self) -> tuple[float, float]:
        """``(a, b2)``: what every analytical model depends on (a cache key)."""
        return (self.a, self.b2)

    @property
    def label(self) -> str:
        """``t=500`` for a timestep, else ``sigma=1.234``: for messages and records."""
        return f"t={self.t}" if self.t is not None else f"sigma={self.sigma:.6g}"

    def record(self) -> dict:
        return {"t": self.t, "sigma": self.sigma, "a": self.a, "b2": self.b2, "schedule": self.schedule}

    @classmethod
    def ve(cls, sigma: float, schedule: str = "ve") -> "NoiseLevel":
        """``x = y + sigma n``: ``a = 1``, ``b2 = sigma^2``."""
        return cls(1.0, float(sigma) ** 2, None, schedule)

    @classmethod
    def vp(cls, sigma: float, schedule: str = "vp") -> "NoiseLevel":
        """Variance preserving at noise-to-signal ``sigma``: ``a = 1 / sqrt(1 + sigma^2)``, ``b2 = a^2 sigma^2``."""
        a = 1.0 / math.sqrt(1.0 + float(sigma) ** 2)
        return cls(a, (a * float(sigma)) ** 2, None, schedule)


class NoiseSchedule:
    """A family of noise levels: ``at`` validates what a caller passes (once) and returns the level."""

    name: str = ""
    discrete: bool = False

    def at(self, t) -> NoiseLevel:  # pragma: no cover - interface
        raise NotImplementedError

    def level(self, sigma: float) -> NoiseLevel:  # pragma: no cover - interface
        """This family's level at noise-to-signal ratio ``sigma`` (not snapped to a table)."""
        raise NotImplementedError

    @property
    def sigma_min(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    @property
    def sigma_max(self) -> float:  # pragma: no cover - interface
        raise NotImplementedError

    # -- the forward process and its conversions, at any level (docs/DESIGN.md §1) --------------
    def a(self, t) -> float:
        """The signal scale ``a`` of the level ``t``."""
        return self.at(t).a

    def b2(self, t) -> float:
        """The noise variance ``b2`` of the level ``t``."""
        return self.at(t).b2

    def q_sample(self, x0: torch.Tensor, t, noise: torch.Tensor) -> torch.Tensor:
        """Forward process: ``x_t = a x0 + sqrt(b2) eps`` (``add_noise``)."""
        lv = self.at(t)
        return lv.a * x0 + lv.b2 ** 0.5 * noise

    def eps_from_x0(self, x_t: torch.Tensor, x0_hat: torch.Tensor, t) -> torch.Tensor:
        """``eps_hat = (x_t - a x0_hat) / sqrt(b2)`` (docs/DESIGN.md §1)."""
        lv = self.at(t)
        return (x_t - lv.a * x0_hat) / lv.b2 ** 0.5

    def x0_from_eps(self, x_t: torch.Tensor, eps_hat: torch.Tensor, t) -> torch.Tensor:
        """``x0_hat = (x_t - sqrt(b2) eps_hat) / a``."""
        lv = self.at(t)
        return (x_t - lv.b2 ** 0.5 * eps_hat) / lv.a

    def x0_from_v(self, x_t: torch.Tensor, v_hat: torch.Tensor, t) -> torch.Tensor:
        """``x0_hat = a x_t - sqrt(b2) v_hat`` for ``v = a eps - sqrt(b2) x0`` (Salimans & Ho 2022; a VP level)."""
        lv = self.at(t)
        return lv.a * x_t - lv.b2 ** 0.5 * v_hat

    def record(self) -> dict:  # pragma: no cover - interface
        raise NotImplementedError


BetaSchedule = Literal["linear", "scaled_linear", "squaredcos_cap_v2"]


@dataclass(frozen=True)
class Schedule(NoiseSchedule):
    """A discrete DDPM table of ``num_train_timesteps`` levels; coefficient tables are float64.

    ``beta_schedule``: ``linear`` (betas evenly from ``beta_start`` to ``beta_end``), ``scaled_linear``
    (their square roots evenly spaced, diffusers' name) or ``squaredcos_cap_v2`` (iDDPM's cosine
    ``alpha_bar(s) = cos^2((s + 0.008) / 1.008 pi / 2)`` as betas clipped at 0.999; beta_start/end unused).
    """

    num_train_timesteps: int = 1000
    beta_start: float = 1e-4
    beta_end: float = 0.02
    beta_schedule: BetaSchedule = "linear"
    discrete: bool = field(default=True, init=False, repr=False)

    @property
    def name(self) -> str:  # type: ignore[override]
        return {"linear": "ddpm-linear", "scaled_linear": "ddpm-scaled-linear",
                "squaredcos_cap_v2": "ddpm-cosine"}[self.beta_schedule]

    @cached_property
    def betas(self) -> torch.Tensor:  # [T] float64
        T = self.num_train_timesteps
        if self.beta_schedule == "linear":
            return torch.linspace(self.beta_start, self.beta_end, T, dtype=torch.float64)
        if self.beta_schedule == "scaled_linear":
            return torch.linspace(self.beta_start ** 0.5, self.beta_end ** 0.5, T, dtype=torch.float64) ** 2
        if self.beta_schedule == "squaredcos_cap_v2":
            f = lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
            return torch.tensor([min(1 - f((i + 1) / T) / f(i / T), 0.999) for i in range(T)], dtype=torch.float64)
        raise ConfigError(f"unknown beta schedule '{self.beta_schedule}': linear, scaled_linear or squaredcos_cap_v2")

    @cached_property
    def alpha_bar(self) -> torch.Tensor:  # [T] float64
        return torch.cumprod(1.0 - self.betas, dim=0)

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """``sigma_t = sqrt((1 - alpha_bar_t) / alpha_bar_t)`` [T] float64, increasing in t."""
        return ((1.0 - self.alpha_bar) / self.alpha_bar).sqrt()

    @cached_property
    def _levels(self) -> list[NoiseLevel]:
        ab = self.alpha_bar
        return [NoiseLevel(float(ab[t].sqrt()), float(1.0 - ab[t]), t, self.name) for t in range(len(ab))]

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

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
                              f"one-element integer tensor), or a localdiff NoiseLevel, got {type(value).__name__} "
                              f"{shown}{hint}")
        value = int(value)
        if not 0 <= value <= last:
            raise ConfigError(f"timestep must be in [0, {last}], got {value}")
        return value

    def at(self, t) -> NoiseLevel:
        """The level of timestep ``t`` (the one timestep rule), or ``t`` itself when it is a NoiseLevel."""
        if isinstance(t, NoiseLevel):
            return t
        return self._levels[self.check_t(t)]

    def level(self, sigma: float) -> NoiseLevel:
        """The variance-preserving level at ``sigma`` (between this table's levels: no timestep)."""
        return NoiseLevel.vp(sigma, self.name)

    def nearest_timestep(self, sigma: float) -> int:
        """The timestep whose sigma is nearest to ``sigma`` in log sigma."""
        logs = self.sigmas.log()
        return int((logs - math.log(sigma)).abs().argmin())

    def owns(self, level: NoiseLevel) -> bool:
        """Whether ``level`` is this table's own entry at its timestep (the same a and b2)."""
        return level.t is not None and 0 <= level.t < self.num_train_timesteps and self._levels[level.t].key == level.key

    def timestep_of(self, level: NoiseLevel, rtol: float = 1e-6) -> int | None:
        """The timestep of this table at ``level``'s sigma (within ``rtol``), else None."""
        if self.owns(level):
            return level.t
        t = self.nearest_timestep(level.sigma)
        return t if abs(float(self.sigmas[t]) / level.sigma - 1.0) <= rtol else None

    def scheduler_kwargs(self) -> dict:
        out = dict(num_train_timesteps=self.num_train_timesteps, beta_schedule=self.beta_schedule)
        if self.beta_schedule != "squaredcos_cap_v2":
            out.update(beta_start=self.beta_start, beta_end=self.beta_end)
        return out

    def record(self) -> dict:
        return {"family": self.name, "discrete": True, **self.scheduler_kwargs(),
                "sigma_min": self.sigma_min, "sigma_max": self.sigma_max}


DDPMSchedule = Schedule


@dataclass(frozen=True)
class ContinuousSchedule(NoiseSchedule):
    """A continuous family of levels: ``kind`` "edm"/"ve" (``a = 1``) or "vp" (``a = 1/sqrt(1 + sigma^2)``),
    with the range ``[sigma_lo, sigma_hi]`` a sampler uses by default."""

    kind: Literal["edm", "ve", "vp"] = "edm"
    sigma_lo: float = 0.002
    sigma_hi: float = 80.0
    discrete: bool = field(default=False, init=False, repr=False)

    def __post_init__(self):
        if self.kind not in ("edm", "ve", "vp"):
            raise ConfigError(f"unknown continuous schedule '{self.kind}': edm, ve or vp")
        if not (0 < self.sigma_lo < self.sigma_hi and math.isfinite(self.sigma_hi)):
            raise ConfigError(f"a schedule needs 0 < sigma_min < sigma_max, got {self.sigma_lo}, {self.sigma_hi}")

    @property
    def name(self) -> str:  # type: ignore[override]
        return self.kind

    @property
    def sigma_min(self) -> float:
        return self.sigma_lo

    @property
    def sigma_max(self) -> float:
        return self.sigma_hi

    def at(self, t) -> NoiseLevel:
        if isinstance(t, NoiseLevel):
            return t
        raise ConfigError(f"the {self.kind} schedule is continuous: pass a noise level "
                          f"(schedule.level(sigma)), not the timestep {t!r}")

    def level(self, sigma: float) -> NoiseLevel:
        return NoiseLevel.vp(sigma, self.kind) if self.kind == "vp" else NoiseLevel.ve(sigma, self.kind)

    def record(self) -> dict:
        return {"family": self.kind, "discrete": False, "sigma_min": self.sigma_lo, "sigma_max": self.sigma_hi}


DEFAULT_SCHEDULE = Schedule()

# The names of the command line's --schedule, with the family each one makes.
SCHEDULES = {
    "ddpm-linear": lambda: DEFAULT_SCHEDULE,
    "ddpm-cosine": lambda: Schedule(beta_schedule="squaredcos_cap_v2"),
    "ddpm-scaled-linear": lambda: Schedule(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear"),
    "edm": lambda: ContinuousSchedule("edm", 0.002, 80.0),
    "ve": lambda: ContinuousSchedule("ve", 0.02, 100.0),
    "vp": lambda: ContinuousSchedule("vp", 0.002, 80.0),
}


def schedule_named(name: str | NoiseSchedule) -> NoiseSchedule:
    """The schedule of a --schedule name (or a schedule itself)."""
    if isinstance(name, NoiseSchedule):
        return name
    if name not in SCHEDULES:
        raise ConfigError(f"unknown noise schedule '{name}': choose one of {', '.join(SCHEDULES)}")
    return SCHEDULES[name]()


def level_key(t) -> str:
    """A step's key in records: ``"500"`` for a timestep (or a level that has one), ``"s=1.234"`` for a
    continuous level."""
    if isinstance(t, NoiseLevel):
        return str(t.t) if t.t is not None else f"s={t.sigma:.6g}"
    return str(int(t))


def add_noise(x0: torch.Tensor, t, noise: torch.Tensor, schedule: NoiseSchedule = DEFAULT_SCHEDULE) -> torch.Tensor:
    """The forward process on clean images ``x0`` [B, C, H, W] (data scale [-1, 1]) at level ``t`` (a timestep
    of ``schedule`` or a :class:`NoiseLevel`): ``x_t = a x0 + sqrt(b2) noise``."""
    return schedule.q_sample(x0, t, noise)


def _integer_dtype(dtype) -> bool:
    """Integer (not bool) torch or numpy dtype."""
    if isinstance(dtype, torch.dtype):
        return not (dtype.is_floating_point or dtype.is_complex or dtype == torch.bool)
    return np.dtype(dtype).kind in "iu"


__all__ = ["NoiseLevel", "NoiseSchedule", "Schedule", "DDPMSchedule", "ContinuousSchedule", "DEFAULT_SCHEDULE",
           "SCHEDULES", "schedule_named", "add_noise", "level_key"]
