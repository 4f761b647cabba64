"""How much memory a reader may spend, checked against what a file *declares* before anything is
allocated or decompressed, and bounded reads that never take more than was declared.

Two rules (:class:`ReadLimits`):

* the memory cap: the decoded arrays of one load may take at most ``max_bytes`` (default: the
  environment variable ``LOCALDIFF_MAX_DATA_BYTES``, else half of the machine's memory);
* the expansion rule: compressed data (gzip, zip members, PNG/JPEG/...) may expand to at most
  ``max(64 MiB, 200 x its size on disk)``, so no small file makes the program allocate gigabytes.
  Real image data compresses by 2-20x; decompression bombs by about 1000x.

Uncompressed formats are checked more strictly by their readers: the declared size must equal what
the file holds.
"""

from __future__ import annotations

import gzip
import io
import math
import os
import re
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator

import numpy as np

from ..errors import ConfigError, DataError

MAX_BYTES_ENV = "LOCALDIFF_MAX_DATA_BYTES"
EXPANSION = 200  # decoded bytes per compressed byte, above the floor
EXPANSION_FLOOR = 64 << 20  # any compressed file may decode to this much
_UNITS = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def format_bytes(n: int) -> str:
    """``1536 -> '1.5 KiB'`` (never prints a huge integer in full)."""
    n = int(n) if n < 1 << 80 else 1 << 80
    for unit in ("B", "KiB", "MiB", "GiB", "TiB", "PiB"):
        if n < 1024 or unit == "PiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} PiB"  # pragma: no cover


def parse_bytes(text: str | int, what: str = "max_bytes") -> int:
    """``"8G"``, ``"512M"``, ``"1000000"`` or an int -> bytes (binary units: 1 G = 2^30)."""
    if isinstance(text, (int, np.integer)) and not isinstance(text, bool):
        value = int(text)
    else:
        m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)i?B?\s*", str(text), re.IGNORECASE)
        if m is None:
            raise ConfigError(f"{what} must be a number of bytes such as 8G, 512M or 1000000, got {text!r}")
        value = int(float(m[1]) * _UNITS[m[2].upper()])
    if value < 1:
        raise ConfigError(f"{what} must be a positive number of bytes, got {text!r}")
    return value


def default_max_bytes() -> int:
    """``$LOCALDIFF_MAX_DATA_BYTES``, else half of the physical memory (at least 1 GiB)."""
    env = os.environ.get(MAX_BYTES_ENV)
    if env:
        return parse_bytes(env, MAX_BYTES_ENV)
    try:
        total = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        total = 16 << 30
    return max(1 << 30, total // 2)


CAP_FIX = (f"if the data are genuine, raise the cap with load_dataset(..., max_bytes=...), --max-data-bytes or "
           f"{MAX_BYTES_ENV}, or load a subset")


@dataclass(frozen=True)
class ReadLimits:
    """The memory a load may spend: ``max_bytes`` for decoded arrays, and the expansion rule."""

    max_bytes: int
    expansion: int = EXPANSION
    floor: int = EXPANSION_FLOOR

    @classmethod
    def resolve(cls, max_bytes: int | str | None = None) -> "ReadLimits":
        return cls(default_max_bytes() if max_bytes is None else parse_bytes(max_bytes))

    def check_cap(self, declared: int, path, what: str) -> None:
        """DataError if ``declared`` bytes exceed the memory cap."""
        if declared > self.max_bytes:
            raise DataError(f"{path}: {what} would take {format_bytes(declared)} in memory, more than the cap of "
                            f"{format_bytes(self.max_bytes)}; {CAP_FIX}")

    def check_expansion(self, declared: int, stored: int, path, what: str, fix: str) -> None:
        """DataError if ``declared`` decoded bytes exceed what ``stored`` compressed bytes may hold."""
        self.check_cap(declared, path, what)
        allowed = max(self.floor, self.expansion * max(int(stored), 0))
        if declared > allowed:
            raise DataError(f"{path}: {what} would take {format_bytes(declared)} decoded from {format_bytes(stored)} "
                            f"of compressed data, more than {self.expansion} times its size (a decompression bomb "
                            f"or a corrupt file); {fix}")


def nbytes_of(shape, itemsize: int) -> int:
    """Exact bytes of an array (Python integers: no int64 wrap-around)."""
    return math.prod(int(s) for s in shape) * int(itemsize)


# ------------------------------------------------------------------------------------------------
# bounded reads
# ------------------------------------------------------------------------------------------------


def read_exactly(f: BinaryIO, n: int, path, what: str) -> bytes:
    """``n`` bytes from ``f`` (read in pieces, so a lying ``n`` never allocates more than is there)."""
    parts, left = [], int(n)
    while left:
        chunk = f.read(min(left, 1 << 24))
        if not chunk:
            raise DataError(f"{path}: the file ends inside {what} ({int(n) - left} of {int(n)} bytes); it is "
                            "truncated or corrupt: re-download or re-create it")
        parts.append(chunk)
        left -= len(chunk)
    return b"".join(parts)


def read_into(f: BinaryIO, out: np.ndarray, path, what: str) -> np.ndarray:
    """Fill the preallocated contiguous ``out`` from ``f``; DataError if the stream ends first."""
    view = memoryview(out).cast("B")
    got = 0
    while got < len(view):
        k = f.readinto(view[got:got + (1 << 24)])
        if not k:
            raise DataError(f"{path}: the file ends inside {what} ({got} of {len(view)} bytes); it is truncated or "
                            "corrupt: re-download or re-create it")
        got += k
    return out


def expect_end(f: BinaryIO, path, what: str) -> None:
    """DataError if ``f`` holds more bytes (the header declared less than the file holds)."""
    if f.read(1):
        raise DataError(f"{path}: the file holds more data than {what} declares; it is corrupt or not what its "
                        "header says: re-download or re-create it")


GZIP_MAGIC = b"\x1f\x8b"


@contextmanager
def open_maybe_gzip(path: Path) -> Iterator[tuple[BinaryIO, int | None]]:
    """``(stream, compressed size)``: the file, gunzipped on the fly when it starts with the gzip magic
    (whatever its name says); the size is None for a plain file. Closed on every path; gzip and I/O
    errors while reading surface as DataError."""
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == GZIP_MAGIC
            raw.seek(0)
            if not gz:
                yield raw, None
                return
            size = os.fstat(raw.fileno()).st_size
            with gzip.GzipFile(fileobj=raw, mode="rb") as g:
                yield g, size
    except (EOFError, zlib.error, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: the gzip data is truncated or corrupt ({type(e).__name__}: {e}); "
                        "re-download the file") from e
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e})") from e


def read_all_bounded(path: Path, limits: ReadLimits, what: str, fix: str) -> bytes:
    """The whole file (gunzipped when it is gzip), never more than the limits allow."""
    with open_maybe_gzip(path) as (f, stored):
        if stored is None:
            size = os.fstat(f.fileno()).st_size
            limits.check_cap(size, path, what)
            return read_exactly(f, size, path, what)
        allowed = min(limits.max_bytes, max(limits.floor, limits.expansion * stored))
        buf = io.BytesIO()
        while True:
            chunk = f.read(1 << 22)
            if not chunk:
                return buf.getvalue()
            buf.write(chunk)
            if buf.tell() > allowed:
                cause = (f"the memory cap of {format_bytes(limits.max_bytes)}; {CAP_FIX}" if allowed == limits.max_bytes
                         else f"{limits.expansion} times its compressed size of {format_bytes(stored)} (a "
                              f"decompression bomb or a corrupt file); {fix}")
                raise DataError(f"{path}: {what} decompresses to more than {format_bytes(allowed)}, over {cause}")
