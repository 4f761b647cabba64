"""Per-timestep mask threshold and temperature of the masked models (``masked``, ``masked-soft``,
``masked-equivariant``), as written by ``localdiff calibrate-masked`` (:mod:`localdiff.calibrate_masked`).

The paper sets one threshold ``tau`` for every timestep by hand (0.005 on MNIST). A schedule maps
timesteps to ``(tau, T)``; a timestep between the listed ones uses the nearest listed one (ties go to
the larger, noisier timestep, as for patch-size schedules). The models read it through their option
``tau_schedule=FILE``, which then overrides ``tau`` and ``temperature``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from ...errors import ConfigError
from ..schedule_files import nearest_listed, read_schedule_doc

SCHEDULE_FORMAT = "localdiff.masked-schedule"


def check_tau(tau: float, where: str = "tau") -> float:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (0.0 <= float(tau) <= 1.0):
        raise ConfigError(f"{where} must lie in [0, 1] (a fraction of the largest normalised gain), got {tau!r}")
    return float(tau)


def check_temperature(temperature: float, where: str = "temperature") -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) \
            or not (math.isfinite(float(temperature)) and float(temperature) > 0):
        raise ConfigError(f"{where} must be a positive number, got {temperature!r}")
    return float(temperature)


@dataclass(frozen=True)
class MaskedSchedule:
    """``tau`` and temperature per listed timestep: ``params[t] = (tau, temperature)``."""

    params: dict[int, tuple[float, float]]

    def at(self, t) -> tuple[float, float]:
        """``(tau, temperature)`` of the listed timestep nearest to the level ``t`` (ties: the larger one)."""
        return self.params[nearest_listed(self.params, t)]

    def to_dict(self) -> dict:
        return {str(t): {"tau": tau, "temperature": temp} for t, (tau, temp) in sorted(self.params.items())}


class PerLevelTau:
    """``tau_at`` / ``temperature_at`` for a model with ``tau``, ``config.temperature``, ``tau_schedule`` (a
    :class:`MaskedSchedule` or None) and ``schedule`` (the masked model and its equivariant variant)."""

    def tau_at(self, t) -> float:
        """The mask threshold used at the level ``t``: from ``tau_schedule`` (nearest listed level) or ``tau``."""
        return self.tau_schedule.at(self.schedule.at(t))[0] if self.tau_schedule is not None else self.tau

    def temperature_at(self, t) -> float:
        """The softmax temperature used at the level ``t``: from ``tau_schedule`` or ``temperature``."""
        return self.tau_schedule.at(self.schedule.at(t))[1] if self.tau_schedule is not None else \
            self.config.temperature


def schedule_from_mapping(doc: dict, where: str) -> MaskedSchedule:
    """``{"900": {"tau": 0.05, "temperature": 1.0}, ...}`` (a missing temperature means 1) -> schedule."""
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{where} must map timesteps to {{\"tau\": ..., \"temperature\": ...}}")
    params = {}
    for key, value in doc.items():
        try:
            t = int(key)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"{where}: {key!r} is not a timestep") from exc
        if t < 0 or str(t) != str(key).strip():
            raise ConfigError(f"{where}: {key!r} is not a timestep >= 0")
        if not isinstance(value, dict) or "tau" not in value or set(value) - {"tau", "temperature"}:
            raise ConfigError(f"{where}: entry {key!r} must be {{\"tau\": ..., \"temperature\": ...}}, got {value!r}")
        params[t] = (check_tau(value["tau"], f"{where}: tau at t={t}"),
                     check_temperature(value.get("temperature", 1.0), f"{where}: temperature at t={t}"))
    return MaskedSchedule(params)


def read_masked_schedule(path: str | Path) -> MaskedSchedule:
    """Read a schedule JSON: ``{"format": "localdiff.masked-schedule", "params": {"900": {"tau": ...,
    "temperature": ...}, ...}, ...}`` or the bare ``params`` mapping (so schedules can be written by hand)."""
    doc = read_schedule_doc(path, "tau schedule", SCHEDULE_FORMAT, "params", "calibrate-masked")
    return schedule_from_mapping(doc, f"tau schedule {Path(path)}")


__all__ = ["SCHEDULE_FORMAT", "MaskedSchedule", "PerLevelTau", "read_masked_schedule", "schedule_from_mapping", "check_tau",
           "check_temperature"]
