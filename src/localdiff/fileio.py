"""Atomic file writes: a reader never sees a half-written file, and a failure leaves the old one."""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import numpy as np


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it into place."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def write_bytes(path, data: bytes) -> Path:
    return atomic_write(path, lambda f: f.write(data))


def write_json(path, obj: Any) -> Path:
    text = json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"
    return write_bytes(path, text.encode())


def write_npy(path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def write_npz(path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def _json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
