"""Noise levels of a probe: the one place where a level's coefficients ``(a, b2)`` are looked up.

Everything else in :mod:`localdiff.probe` takes :class:`Level` values, so changing how noise levels are
named (DDPM timesteps today) touches this file only. Conventions (docs/DESIGN.md §1): ``x_t = a x0 +
sqrt(b2) eps`` with ``a = sqrt(alpha_bar_t)`` and ``b2 = 1 - alpha_bar_t``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

from ..diffusion import DEFAULT_SCHEDULE, Schedule, timesteps_for
from ..errors import ConfigError


@dataclass(frozen=True)
class Level:
    """One noise level: DDPM timestep ``t``, signal scale ``a`` and noise variance ``b2`` (float64 values)."""

    t: int
    a: float
    b2: float

    @property
    def sigma(self) -> float:
        """Noise standard deviation in units of the clean image, ``sqrt(b2) / a`` (x_t / a = x0 + sigma eps)."""
        return math.sqrt(self.b2) / self.a

    @property
    def snr(self) -> float:
        """Signal-to-noise variance ratio ``a^2 / b2``."""
        return self.a * self.a / self.b2

    @property
    def label(self) -> str:
        return f"t = {self.t}"

    def record(self) -> dict:
        return {"t": self.t, "a": self.a, "b2": self.b2, "sigma": self.sigma, "snr": self.snr}


DEFAULT_STEPS = 10  # the default levels are the timesteps a 10-step DDIM run visits: 900, 800, ..., 0


def noise_levels(timesteps: Sequence[int] | None = None, schedule: Schedule = DEFAULT_SCHEDULE) -> list[Level]:
    """``Level`` s for ``timesteps`` (default: the 10 DDIM timesteps), highest noise first, duplicates removed.

    Every timestep is checked by the toolkit's one rule (``Schedule.check_t``)."""
    ts = timesteps_for(DEFAULT_STEPS, "ddim", schedule) if timesteps is None else list(timesteps)
    if not ts:
        raise ConfigError("no noise levels given: pass timesteps such as 900,500,100 (or none for the 10 DDIM ones)")
    checked = sorted({schedule.check_t(t) for t in ts}, reverse=True)
    return [Level(t, schedule.a(t), schedule.b2(t)) for t in checked]


__all__ = ["Level", "noise_levels", "DEFAULT_STEPS"]
