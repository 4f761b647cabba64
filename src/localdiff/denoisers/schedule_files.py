"""What the per-timestep schedule files share (patch sizes: :mod:`.patches.common`; mask threshold and
temperature: :mod:`.masked.schedule`): reading the JSON and the nearest-level rule.

The files list timesteps of the default DDPM schedule (``ddpm-linear``, on which they are calibrated).
A level of that schedule uses the nearest listed timestep; a level of any other family the listed one
nearest in log sigma."""

from __future__ import annotations

import json
import math
from pathlib import Path

from ..errors import ConfigError
from ..schedules import DEFAULT_SCHEDULE, NoiseLevel


def nearest_listed(listed, t) -> int:
    """The listed timestep nearest to ``t`` (an int of the default schedule, or a NoiseLevel); ties go to the
    larger, noisier one."""
    if isinstance(t, NoiseLevel):
        if not DEFAULT_SCHEDULE.owns(t):  # a level of another table or family: nearest in log sigma
            log_sigma = math.log(t.sigma)
            return min(listed, key=lambda s: (abs(math.log(float(DEFAULT_SCHEDULE.sigmas[s])) - log_sigma), -s))
        t = t.t
    return min(listed, key=lambda s: (abs(s - t), -s))


def read_schedule_doc(path: str | Path, what: str, fmt: str, key: str, command: str):
    """The mapping of a schedule file: ``doc[key]`` of ``{"format": fmt, key: {...}, ...}``, or the whole
    document when it is a bare mapping (schedules written by hand). ``what`` names the file in errors and
    ``command`` is the one that writes it."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{what} {p} does not exist; write one with `localdiff {command}`")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"{what} {p} is not readable JSON ({exc})") from exc
    if isinstance(doc, dict) and key in doc:
        if doc.get("format", fmt) != fmt:
            raise ConfigError(f"{p} is a '{doc.get('format')}' file, not a {fmt} file")
        doc = doc[key]
    return doc


__all__ = ["nearest_listed", "read_schedule_doc"]
