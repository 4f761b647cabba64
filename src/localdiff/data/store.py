"""The store format for image sets larger than memory: one file, an uint8 (or float32) image array cut
into blocks, each with its own checksum, and a JSON header that describes everything.

Layout (little-endian)::

    0      preamble, 64 bytes: magic b"\\x93LDSTORE", u32 version, u32 0, u64 header offset,
           u64 header length, 16-byte xxh3-128 digest of the header, 16 zero bytes
    4096   the images of the first split, [count, C, H, W] in C order, block after block
           (``block_images`` images each, the last one shorter); the next split starts at the
           next multiple of 4096
    ...    the labels of each split that has them: int64 [count]
    end    the header: UTF-8 JSON (sorted keys), fields below

Header: ``format`` ("localdiff-store"), ``version`` (1), ``dtype`` ("uint8": 0..255 mapped by
``x / 127.5 - 1``, or "float32": already on [-1, 1]), ``shape`` [C, H, W], ``block_images``,
``checksum`` ("xxh3_128"), ``splits`` {name: {``count``, ``offset``, ``blocks`` (one 32-hex-digit
digest per block), ``labels`` (null or {``offset``, ``dtype`` "<i8", ``checksum``}), ``sha256`` (of the
split's image bytes, for an end-to-end check), ``meta`` (what ``load_dataset`` recorded when the split
was read from its source)}}, ``source`` {``path``, ``name``} and ``created_by``. Nothing in it depends
on the time: packing the same data twice gives the same file.

The header is written last and the preamble patched to point at it, so a file cut short anywhere has
no valid header. :class:`StoreFile` reads blocks with ``os.preadv`` into buffers the caller owns (no
page of the file is mapped, so nothing read stays in this process's memory) and checks each block's
digest every time it is read (xxh3-128 runs at about 30 GB/s, far above the disk).
"""

from __future__ import annotations

import json
import math
import os
import struct
import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import xxhash

from ..errors import DataError

MAGIC = b"\x93LDSTORE"
VERSION = 1
FORMAT = "localdiff-store"
CHECKSUM = "xxh3_128"
PREAMBLE = struct.Struct("<8sIIQQ16s16x")  # 64 bytes
DATA_START = 4096
ALIGN = 4096
DTYPES = {"uint8": np.dtype(np.uint8), "float32": np.dtype("<f4")}
SPLIT_NAMES = ("train", "test")
LABEL_DTYPE = "<i8"
MAX_HEADER = 1 << 30
REPACK = "re-create it with `localdiff pack SOURCE OUT` (or restore a copy of the store)"


def digest(buf) -> str:
    """xxh3-128 of a buffer, as 32 hex digits (the store's block checksum)."""
    return xxhash.xxh3_128_hexdigest(buf)


def is_store(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a file that starts with the store's magic bytes."""
    try:
        with open(path, "rb") as f:
            return f.read(len(MAGIC)) == MAGIC
    except OSError:
        return False


def align(offset: int) -> int:
    return -(-int(offset) // ALIGN) * ALIGN


@dataclass(frozen=True)
class Split:
    """One split of a store: ``count`` images at byte ``offset``, in blocks with digests ``blocks``."""

    name: str
    count: int
    offset: int
    blocks: tuple[str, ...]
    labels: dict | None
    sha256: str
    meta: dict


@dataclass(frozen=True)
class StoreHeader:
    """The parsed, checked header of a store file."""

    dtype: np.dtype
    shape: tuple[int, int, int]
    block_images: int
    splits: dict[str, Split]
    source: dict
    created_by: str

    @property
    def image_bytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def block_bytes(self) -> int:
        return self.block_images * self.image_bytes

    def to_json(self) -> dict:
        return {"format": FORMAT, "version": VERSION, "dtype": self.dtype.name, "shape": list(self.shape),
                "block_images": self.block_images, "checksum": CHECKSUM, "created_by": self.created_by,
                "source": self.source,
                "splits": {s.name: {"count": s.count, "offset": s.offset, "blocks": list(s.blocks),
                                    "labels": s.labels, "sha256": s.sha256, "meta": s.meta}
                           for s in self.splits.values()}}


def encode_header(header: StoreHeader) -> bytes:
    return json.dumps(header.to_json(), sort_keys=True, separators=(",", ":")).encode()


def _bad(path, what: str) -> DataError:
    return DataError(f"{path}: {what}; the store is damaged or was not written by localdiff pack: {REPACK}")


def _int(obj, what: str, path, lo: int = 0) -> int:
    if type(obj) is not int or obj < lo:
        raise _bad(path, f"the header's {what} is {obj!r:.60}, not an integer >= {lo}")
    return obj


def _hex(obj, what: str, path, digits: int = 32) -> str:
    if not (isinstance(obj, str) and len(obj) == digits and all(c in "0123456789abcdef" for c in obj)):
        raise _bad(path, f"the header's {what} is {obj!r:.60}, not {digits} hex digits")
    return obj


def parse_header(blob: bytes, path, data_end: int) -> StoreHeader:
    """The header in ``blob`` checked field by field; every region must end before ``data_end``."""
    try:
        d = json.loads(blob.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as e:
        raise _bad(path, f"the header is not JSON ({type(e).__name__})") from None
    if not isinstance(d, dict) or d.get("format") != FORMAT:
        raise _bad(path, "the header does not name the format 'localdiff-store'")
    if d.get("version") != VERSION:
        raise DataError(f"{path}: store format version {d.get('version')!r:.20} is not supported (this localdiff reads "
                        f"version {VERSION}); pack the source again with this version of localdiff")
    if d.get("dtype") not in DTYPES or d.get("checksum") != CHECKSUM:
        raise _bad(path, f"the header gives dtype {d.get('dtype')!r:.30} and checksum {d.get('checksum')!r:.30}")
    shape = d.get("shape")
    if not (isinstance(shape, list) and len(shape) == 3):
        raise _bad(path, f"the header's shape is {shape!r:.60}, not [C, H, W]")
    shape = tuple(_int(s, "shape", path, 1) for s in shape)
    block = _int(d.get("block_images"), "block_images", path, 1)
    splits_in = d.get("splits")
    if not isinstance(splits_in, dict) or not splits_in or not set(splits_in) <= set(SPLIT_NAMES):
        raise _bad(path, f"the header's splits are {list(splits_in or [])!r:.80}, not some of {SPLIT_NAMES}")
    image_bytes = math.prod(shape) * DTYPES[d["dtype"]].itemsize
    regions, splits = [], {}
    for name, s in splits_in.items():
        if not isinstance(s, dict):
            raise _bad(path, f"split {name!r} of the header is not a record")
        count = _int(s.get("count"), f"{name} count", path, 1)
        offset = _int(s.get("offset"), f"{name} offset", path, DATA_START)
        blocks = s.get("blocks")
        if not isinstance(blocks, list) or len(blocks) != -(-count // block):
            raise _bad(path, f"split {name!r} has {len(blocks) if isinstance(blocks, list) else 'no'} block digests "
                             f"for {count} images in blocks of {block}")
        blocks = tuple(_hex(b, f"{name} block digest", path) for b in blocks)
        regions.append((offset, offset + count * image_bytes, f"the {name} images"))
        labels = s.get("labels")
        if labels is not None:
            if not isinstance(labels, dict) or labels.get("dtype") != LABEL_DTYPE:
                raise _bad(path, f"split {name!r} has a labels record {labels!r:.80}")
            lo = _int(labels.get("offset"), f"{name} labels offset", path, DATA_START)
            _hex(labels.get("checksum"), f"{name} labels checksum", path)
            regions.append((lo, lo + 8 * count, f"the {name} labels"))
        meta = s.get("meta")
        if not isinstance(meta, dict):
            raise _bad(path, f"split {name!r} has no meta record")
        splits[name] = Split(name, count, offset, blocks, labels, _hex(s.get("sha256"), f"{name} sha256", path, 64),
                             meta)
    end = DATA_START
    for lo, hi, what in sorted(regions):
        if lo < end or hi > data_end:
            raise _bad(path, f"{what} (bytes {lo}..{hi}) overlap another region or run past the data "
                             f"(which ends at byte {data_end})")
        end = hi
    source = d.get("source") if isinstance(d.get("source"), dict) else {}
    return StoreHeader(DTYPES[d["dtype"]], shape, block, splits, source, str(d.get("created_by", "")))


@dataclass(frozen=True)
class BlockTable:
    """The blocks behind a dataset's rows, in row order: block ``b`` holds rows ``starts[b] .. starts[b+1]-1``,
    read from byte ``offsets[b]``, named ``names[b]`` ("train block 3") and checked against ``digests[b]``."""

    starts: np.ndarray  # int64 [nb + 1]
    offsets: np.ndarray  # int64 [nb]
    digests: tuple[str, ...]
    names: tuple[str, ...]

    @classmethod
    def of(cls, header: StoreHeader, split_names: list[str]) -> "BlockTable":
        starts, offsets, digests, names, row = [0], [], [], [], 0
        for name in split_names:
            s = header.splits[name]
            for j, dig in enumerate(s.blocks):
                rows = min(header.block_images, s.count - j * header.block_images)
                offsets.append(s.offset + j * header.block_bytes)
                row += rows
                starts.append(row)
                digests.append(dig)
                names.append(f"{name} block {j}")
        return cls(np.asarray(starts, np.int64), np.asarray(offsets, np.int64), tuple(digests), tuple(names))

    def __len__(self) -> int:
        return len(self.digests)

    def block_of(self, rows: np.ndarray) -> np.ndarray:
        """Block index of each row (int64 rows in 0 .. starts[-1] - 1)."""
        return np.searchsorted(self.starts, rows, side="right") - 1


class ReadStats:
    """What a process read from one store: bytes and, per block name, how many times it was read."""

    def __init__(self):
        self.bytes = 0
        self.blocks: Counter = Counter()
        self._lock = threading.Lock()

    def add(self, name: str, nbytes: int) -> None:
        with self._lock:
            self.bytes += nbytes
            self.blocks[name] += 1


class StoreFile:
    """An open store: its checked header, and block reads verified against their digests.

    Each thread keeps one block buffer (the last block it read, reused when the next read falls in the same
    block), so a sequential pass reads every block once whatever the chunk size of the caller."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        try:
            self.fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError as e:
            raise DataError(f"{self.path}: cannot open the store ({e})") from None
        try:
            self.header, self.header_bytes = self._read_header()
        except BaseException:
            os.close(self.fd)
            raise
        self.stats = ReadStats()
        self.stats.bytes = self.header_bytes
        self._local = threading.local()

    def _pread(self, nbytes: int, offset: int) -> bytes:
        try:
            return os.pread(self.fd, nbytes, offset)
        except OSError as e:
            raise DataError(f"{self.path}: cannot read the store ({e})") from None

    def _read_header(self) -> tuple[StoreHeader, int]:
        size = os.fstat(self.fd).st_size
        pre = self._pread(PREAMBLE.size, 0)
        if len(pre) < PREAMBLE.size or pre[:len(MAGIC)] != MAGIC:
            raise DataError(f"{self.path}: not a localdiff store (no store magic bytes at the start); pack a dataset "
                            "into a store with `localdiff pack SOURCE OUT`")
        _, version, _, offset, length, want = PREAMBLE.unpack(pre)
        if version != VERSION:
            raise DataError(f"{self.path}: store format version {version} is not supported (this localdiff reads "
                            f"version {VERSION}); pack the source again with this version of localdiff")
        if offset == 0 or offset < DATA_START or length > MAX_HEADER or offset + length != size:
            raise DataError(f"{self.path}: the store's header should span bytes {offset}..{offset + length} but the file "
                            f"holds {size} bytes; the file is truncated or damaged (an interrupted copy?): {REPACK}")
        blob = self._pread(length, offset)
        if len(blob) != length or xxhash.xxh3_128_digest(blob) != want:
            raise DataError(f"{self.path}: the store's header fails its checksum; the file is damaged: {REPACK}")
        return parse_header(blob, self.path, offset), PREAMBLE.size + length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

    # -- reading ------------------------------------------------------------------------------------
    def read_into(self, table: BlockTable, b: int, out: np.ndarray) -> np.ndarray:
        """Block ``b`` of ``table`` into the contiguous uint8 buffer ``out`` (exactly its bytes), verified."""
        view = memoryview(out).cast("B")
        want = (int(table.starts[b + 1]) - int(table.starts[b])) * self.header.image_bytes
        if len(view) != want:
            raise ValueError(f"block buffer of {len(view)} bytes for a block of {want}")
        got, offset = 0, int(table.offsets[b])
        while got < want:
            try:
                k = os.preadv(self.fd, [view[got:]], offset + got)
            except OSError as e:
                raise DataError(f"{self.path}: cannot read {table.names[b]} of the store ({e})") from None
            if k == 0:
                raise DataError(f"{self.path}: the file ends inside {table.names[b]} (byte {offset + got}); it was "
                                f"truncated after it was opened: {REPACK}")
            got += k
        self.stats.add(table.names[b], want)
        found = digest(view)
        if found != table.digests[b]:
            first = int(table.starts[b])
            raise DataError(f"{self.path}: {table.names[b]} (images {first}..{int(table.starts[b + 1]) - 1} of this "
                            f"dataset, bytes {offset}..{offset + want} of the file) fails its checksum ({CHECKSUM} "
                            f"{found} instead of {table.digests[b]}): the store is damaged; {REPACK}")
        return out

    def cached_block(self, table: BlockTable, b: int) -> np.ndarray:
        """Block ``b`` as uint8 bytes in this thread's block buffer (read only if it is not the last one read)."""
        local = self._local
        key = (id(table), b)
        if getattr(local, "key", None) == key:
            return local.view
        buf = getattr(local, "buf", None)
        if buf is None:
            buf = local.buf = np.empty(self.header.block_bytes, np.uint8)
        n = (int(table.starts[b + 1]) - int(table.starts[b])) * self.header.image_bytes
        local.key = None
        local.view = self.read_into(table, b, buf[:n])
        local.key = key
        return local.view

    def forget(self) -> None:
        """Drop this thread's block buffer."""
        self._local.__dict__.clear()

    def read_labels(self, split: Split) -> np.ndarray | None:
        """The labels of ``split`` (int64 [count]), verified, or None."""
        if split.labels is None:
            return None
        n = 8 * split.count
        out = np.empty(split.count, LABEL_DTYPE)
        view = memoryview(out).cast("B")
        if os.preadv(self.fd, [view], split.labels["offset"]) != n or digest(view) != split.labels["checksum"]:
            raise DataError(f"{self.path}: the {split.name} labels fail their checksum; the store is damaged: {REPACK}")
        self.stats.add(f"{split.name} labels", n)
        if out.min(initial=0) < 0:
            raise _bad(self.path, f"the {split.name} labels hold negative values")
        return out.astype(np.int64, copy=False)


__all__ = ["MAGIC", "VERSION", "FORMAT", "CHECKSUM", "DATA_START", "DTYPES", "Split", "StoreHeader", "BlockTable",
           "StoreFile", "ReadStats", "digest", "is_store", "encode_header", "parse_header", "align"]
