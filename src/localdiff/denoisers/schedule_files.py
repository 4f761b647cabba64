"""What the per-timestep schedule files share (patch sizes: :mod:`.patches`; mask threshold and
temperature: :mod:`.masked_schedule`): reading the JSON and the nearest-timestep rule."""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import ConfigError


def nearest_listed(listed, t: int) -> int:
    """The listed timestep nearest to ``t``; ties go to the larger, noisier one."""
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
