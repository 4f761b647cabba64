"""Writing a store file (format: :mod:`.store`) block by block, atomically.

:class:`StoreWriter` takes images in pieces of any size (``write``), so a set of any size is written with
one block in memory. The file is written under a temporary name in the target's folder (tagged with
its owner, so the leftovers of a killed writer are removed by the next one), fsynced, and linked to its
name only if that name is still free (``os.link`` never replaces a file), with the permissions the
user's umask gives a new file.
"""

from __future__ import annotations

import hashlib
import os
import re
import tempfile
from pathlib import Path

import numpy as np
import xxhash

from ..errors import ConfigError, DataError
from ..fileio import FILE_MODE, current_umask, owner_tag, remove_entry, stale_entries
from .store import (DATA_START, DTYPES, LABEL_DTYPE, MAGIC, PREAMBLE, SPLIT_NAMES, VERSION, Split, StoreHeader, align,
                    digest, encode_header)

DEFAULT_BLOCK_BYTES = 8 << 20  # blocks of about 8 MiB: few digests, reads far above the disk's request size


def default_block_images(image_bytes: int) -> int:
    """The largest power of two of images that fits in 8 MiB (at least 1): 512 at 3 x 64 x 64 uint8."""
    k = max(1, DEFAULT_BLOCK_BYTES // max(1, int(image_bytes)))
    return 1 << (k.bit_length() - 1)


def refuse_existing(out: Path) -> None:
    if os.path.lexists(out):
        raise ConfigError(f"{out} exists; a store is never written over anything: choose another OUT or remove "
                          "it first")


class StoreWriter:
    """Write a store at ``out``: ``begin_split(name)``, ``write(images, labels)`` any number of times,
    ``end_split(meta)``, for each split, then ``commit(source)``. Used as a context manager, an exception
    removes the temporary file and leaves ``out`` untouched.

    images: ``[k, C, H, W]`` of the store's ``dtype`` (uint8, or float32 on [-1, 1]); labels: int ``[k]``
    or None (the same for every piece of a split).
    """

    def __init__(self, out: str | os.PathLike, *, shape, dtype="uint8", block_images: int | None = None):
        self.out = Path(out).expanduser().absolute()
        refuse_existing(self.out)
        if np.dtype(dtype).name not in DTYPES:
            raise ConfigError(f"a store holds uint8 or float32 images, not {np.dtype(dtype)}")
        self.dtype = DTYPES[np.dtype(dtype).name]
        self.shape = tuple(int(s) for s in shape)
        if len(self.shape) != 3 or min(self.shape) < 1:
            raise ConfigError(f"a store's images have shape [C, H, W], got {list(self.shape)}")
        self.image_bytes = int(np.prod(self.shape)) * self.dtype.itemsize
        self.block_images = default_block_images(self.image_bytes) if block_images is None else int(block_images)
        if self.block_images < 1:
            raise ConfigError(f"--block-images must be a positive number of images, got {block_images}")
        self.out.parent.mkdir(parents=True, exist_ok=True)
        own = re.compile(rf"\.{re.escape(self.out.name)}\.h[0-9a-f]{{8}}p\d+s\d+\.[^.]+\.tmp")
        for stale, state in stale_entries(self.out.parent, own):
            if state == "dead":
                remove_entry(stale)
        fd, tmp = tempfile.mkstemp(prefix=f".{self.out.name}.{owner_tag()}.", suffix=".tmp", dir=self.out.parent)
        self.tmp = Path(tmp)
        os.fchmod(fd, FILE_MODE & ~current_umask())
        self.f = os.fdopen(fd, "wb")
        self.f.write(b"\0" * DATA_START)  # the preamble, patched by commit()
        self.pos = DATA_START
        self.splits: dict[str, Split] = {}
        self._labels: dict[str, np.ndarray] = {}
        self._split = None
        self.images_written = 0

    # -- splits -------------------------------------------------------------------------------------
    def begin_split(self, name: str) -> None:
        if name not in SPLIT_NAMES or name in self.splits or self._split is not None:
            raise ConfigError(f"a store holds the splits {', '.join(SPLIT_NAMES)}, each once; cannot begin {name!r}")
        self._pad_to(align(self.pos))
        self._split = {"name": name, "offset": self.pos, "count": 0, "blocks": [],
                       "labels": [], "has_labels": None, "sha": hashlib.sha256()}
        self._buf = np.empty((self.block_images, *self.shape), self.dtype)
        self._fill = 0

    def write(self, images: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Append ``images`` [k, C, H, W] (and their labels [k]) to the current split."""
        s = self._split
        if s is None:
            raise ConfigError("StoreWriter.write before begin_split")
        images = np.asarray(images)
        if images.dtype != self.dtype or tuple(images.shape[1:]) != self.shape:
            raise DataError(f"images of dtype {images.dtype} and shape {list(images.shape[1:])} for a store of "
                            f"{self.dtype} {list(self.shape)}; every piece must match the first")
        has = labels is not None
        if s["has_labels"] is not None and s["has_labels"] != has:
            raise DataError(f"split '{s['name']}': some pieces have labels and some do not")
        s["has_labels"] = has
        if has:
            labels = np.asarray(labels, dtype=np.int64).reshape(-1)
            if labels.shape[0] != images.shape[0]:
                raise DataError(f"{images.shape[0]} images but {labels.shape[0]} labels")
            s["labels"].append(labels)
        images = np.ascontiguousarray(images)
        i, k, b = 0, images.shape[0], self.block_images
        while i < k:
            if self._fill == 0 and k - i >= b:  # a whole block straight from the caller's array
                self._block(images[i:i + b])
                i += b
                continue
            take = min(b - self._fill, k - i)
            self._buf[self._fill:self._fill + take] = images[i:i + take]
            self._fill += take
            i += take
            if self._fill == b:
                self._block(self._buf)
                self._fill = 0
        s["count"] += k
        self.images_written += k

    def _block(self, block: np.ndarray) -> None:
        view = memoryview(np.ascontiguousarray(block)).cast("B")
        self._split["blocks"].append(digest(view))
        self._split["sha"].update(view)
        self.f.write(view)
        self.pos += len(view)

    def end_split(self, meta: dict | None = None) -> None:
        """Close the current split; ``meta`` (what ``load_dataset`` records for it) goes into the header."""
        s = self._split
        if s is None:
            raise ConfigError("StoreWriter.end_split without begin_split")
        if self._fill:
            self._block(self._buf[:self._fill])
            self._fill = 0
        if s["count"] == 0:
            raise DataError(f"split '{s['name']}' holds no images; a store split needs at least one")
        if s["has_labels"]:
            self._labels[s["name"]] = np.concatenate(s["labels"]).astype(LABEL_DTYPE)
        self.splits[s["name"]] = Split(s["name"], s["count"], s["offset"], tuple(s["blocks"]), None,
                                       s["sha"].hexdigest(), dict(meta or {}))
        self._split, self._buf = None, None

    # -- the end --------------------------------------------------------------------------------------
    def _pad_to(self, pos: int) -> None:
        if pos > self.pos:
            self.f.write(b"\0" * (pos - self.pos))
            self.pos = pos

    def commit(self, source: dict | None = None) -> Path:
        """Write the labels and the header, patch the preamble, fsync, and give the file its name."""
        if self._split is not None:
            self.end_split()
        if not self.splits:
            raise DataError("a store needs at least one split")
        splits = {}
        for name, s in self.splits.items():
            labels = None
            if name in self._labels:
                self._pad_to(-(-self.pos // 8) * 8)
                y = self._labels[name]
                if y.size and y.min() < 0:
                    raise DataError(f"split '{name}': labels must be class indices >= 0, found {int(y.min())}")
                labels = {"offset": self.pos, "dtype": LABEL_DTYPE, "checksum": digest(y)}
                self.f.write(memoryview(y).cast("B"))
                self.pos += y.nbytes
            splits[name] = Split(s.name, s.count, s.offset, s.blocks, labels, s.sha256, s.meta)
        from .. import __version__

        header = StoreHeader(self.dtype, self.shape, self.block_images, splits, dict(source or {}),
                             f"localdiff {__version__}")
        blob = encode_header(header)
        offset = self.pos
        self.f.write(blob)
        self.f.flush()
        os.pwrite(self.f.fileno(), PREAMBLE.pack(MAGIC, VERSION, 0, offset, len(blob), xxhash.xxh3_128_digest(blob)),
                  0)
        os.fsync(self.f.fileno())
        self.f.close()
        try:
            os.link(self.tmp, self.out)  # fails if the name was taken meanwhile: never replaces anything
        except FileExistsError:
            raise ConfigError(f"{self.out} appeared while the store was being written; it was left as it is and "
                              "the new store discarded") from None
        finally:
            self.tmp.unlink(missing_ok=True)
        _fsync_dir(self.out.parent)
        return self.out

    def abort(self) -> None:
        try:
            self.f.close()
        finally:
            self.tmp.unlink(missing_ok=True)

    def __enter__(self) -> "StoreWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


__all__ = ["StoreWriter", "default_block_images", "refuse_existing"]
