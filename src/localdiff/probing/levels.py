"""Noise levels of a probe: the levels of the schedule (:class:`localdiff.schedules.NoiseLevel`, its one place
for a level's coefficients), highest noise first. Conventions (docs/DESIGN.md §1, §10): ``x_t = a x0 +
sqrt(b2) eps``; for the default DDPM table ``a = sqrt(alpha_bar_t)`` and ``b2 = 1 - alpha_bar_t``.
"""

from __future__ import annotations

from typing import Sequence

from ..errors import ConfigError
from ..samplers import timesteps_for
from ..schedules import DEFAULT_SCHEDULE, NoiseLevel, Schedule

DEFAULT_STEPS = 10  # the default levels are the timesteps a 10-step DDIM run visits: 900, 800, ..., 0


def noise_levels(timesteps: Sequence[int] | None = None, schedule: Schedule = DEFAULT_SCHEDULE) -> list[NoiseLevel]:
    """The schedule's levels at ``timesteps`` (default: the 10 DDIM timesteps), highest noise first, duplicates
    removed; every timestep checked by the toolkit's one rule."""
    ts = timesteps_for(DEFAULT_STEPS, "ddim", schedule) if timesteps is None else list(timesteps)
    if not ts:
        raise ConfigError("no noise levels given: pass timesteps such as 900,500,100 (or none for the 10 DDIM ones)")
    return [schedule.at(t) for t in sorted({schedule.check_t(t) for t in ts}, reverse=True)]


__all__ = ["noise_levels", "DEFAULT_STEPS"]
