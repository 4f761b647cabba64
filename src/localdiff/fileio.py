"""Atomic file writes: a reader never sees a half-written file, and a failure leaves the old one.

Written files and directories get the permissions the user's umask gives a normally created one
(0644 / 0755 under umask 022), not the 0600 / 0700 of ``mkstemp`` / ``mkdtemp``. Temporary names
carry an owner tag (host, process id and its start time), so the leftovers of a process that died
(SIGKILL, power loss) are recognised as stale and removed by the next write or run.
"""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import socket
import tempfile
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np

FILE_MODE, DIR_MODE = 0o666, 0o777


def current_umask() -> int:
    """The process umask, read without changing it where Linux allows (``/proc/self/status``)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)  # elsewhere: the classic set-and-restore
    os.umask(mask)
    return mask


def normal_mode(path: str | os.PathLike, *, directory: bool = False) -> None:
    """Give ``path`` the permissions of a normally created file or directory under the current umask."""
    os.chmod(path, (DIR_MODE if directory else FILE_MODE) & ~current_umask())


# -- owner tags of temporary names --------------------------------------------------------------------

_TAG = re.compile(r"\.h(?P<host>[0-9a-f]{8})p(?P<pid>\d+)s(?P<start>\d+)\.")


def _host() -> str:
    return f"{zlib.crc32(socket.gethostname().encode()):08x}"


def _start_time(pid: int) -> str | None:
    """The start time of process ``pid`` (clock ticks since boot, Linux), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[19].decode()
    except (OSError, IndexError):
        return None


def owner_tag() -> str:
    """``h<host>p<pid>s<start>``: who wrote a temporary name, precise enough to tell it is gone."""
    return f"h{_host()}p{os.getpid()}s{_start_time(os.getpid()) or 0}"


def owner_state(name: str) -> str:
    """"alive", "dead", "elsewhere" (another host: cannot tell) or "unknown" (no tag) for a temporary name."""
    m = _TAG.search(name)
    if m is None:
        return "unknown"
    if m["host"] != _host():
        return "elsewhere"
    pid = int(m["pid"])
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return "dead"
    except PermissionError:
        pass  # it exists, under another user
    started = _start_time(pid)
    if started is not None and m["start"] != "0" and started != m["start"]:
        return "dead"  # the id was reused by a newer process
    return "alive"


def stale_entries(directory: Path, pattern: re.Pattern) -> list[tuple[Path, str]]:
    """Entries of ``directory`` whose names match ``pattern`` and whose owner is not alive."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    out = []
    for name in names:
        if pattern.fullmatch(name):
            state = owner_state(name)
            if state != "alive":
                out.append((directory / name, state))
    return out


def remove_entry(path: Path) -> bool:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink()
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


# -- atomic writes -----------------------------------------------------------------------------------


def atomic_write(path: str | os.PathLike, write: Callable[[io.BufferedWriter], None]) -> Path:
    """Call ``write(f)`` on a temporary file next to ``path``, fsync it, then rename it into place.

    The file gets the umask's permissions; temporary files of dead writers of the same name are removed.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    own = re.compile(rf"\.{re.escape(path.name)}\.h[0-9a-f]{{8}}p\d+s\d+\.[^.]+\.tmp")
    for stale, state in stale_entries(path.parent, own):
        if state == "dead":
            remove_entry(stale)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{owner_tag()}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, FILE_MODE & ~current_umask())
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
    text = json.dumps(obj, indent=2, sort_keys=False, default=json_default) + "\n"
    return write_bytes(path, text.encode())


def write_npy(path, array: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.save(f, np.asarray(array), allow_pickle=False))


def write_npz(path, **arrays: np.ndarray) -> Path:
    return atomic_write(path, lambda f: np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def json_default(o: Any):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")
