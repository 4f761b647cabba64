"""The training set split over the ranks of a torchrun job (docs/DESIGN.md §9): each rank keeps one
contiguous, deterministic shard, images ``start .. stop - 1`` of ``total`` with
``start = rank * total // size``, and the models merge the states of the shards exactly.

A :class:`ShardedDataset` is an :class:`ImageDataset` holding only its rank's images (``len`` and the
streaming methods see those), that still names the whole set: its ``fingerprint`` and ``describe()``
are the whole set's (statistics caches and run records agree with a one-process run), and
``describe()`` adds the shards. Its ``subset`` is the whole set's subset, re-sharded; ``gathered()``
rebuilds the whole set on every rank for the models that cannot merge shards.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from ..distributed import gather_rows, world
from ..errors import ConfigError, DataError
from .dataset import ImageDataset


def shard_bounds(total: int, size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each rank's contiguous shard of ``total`` images (sizes differ by at most one)."""
    return [(r * total // size, (r + 1) * total // size) for r in range(size)]


def block_shard_bounds(starts, size: int) -> list[tuple[int, int]]:
    """Shards cut at block boundaries: ``starts`` [nb + 1] are the first image of each block of a store and the
    total; rank r holds blocks ``r nb // size .. (r + 1) nb // size - 1`` (their counts differ by at most one), so
    no block is read by two ranks. With fewer blocks than ranks, ``shard_bounds`` (boundary blocks shared)."""
    starts = [int(s) for s in starts]
    nb, total = len(starts) - 1, starts[-1]
    if nb < size:
        return shard_bounds(total, size)
    return [(starts[r * nb // size], starts[(r + 1) * nb // size]) for r in range(size)]


@dataclass(frozen=True)
class Shard:
    """Rank ``rank`` of ``size`` holds images ``start .. stop - 1`` of the ``total`` training images."""

    rank: int
    size: int
    start: int
    stop: int
    total: int
    bounds: tuple | None = None  # every rank's (start, stop) where not ``shard_bounds`` (a store: block-aligned)

    def record(self) -> dict:
        """For run records: the world size and every rank's ``[start, stop)``."""
        bounds = self.bounds if self.bounds is not None else shard_bounds(self.total, self.size)
        return {"world_size": self.size, "bounds": [list(b) for b in bounds]}


@dataclass
class ShardedDataset(ImageDataset):
    """This rank's shard of a training set (``raw`` holds only its images); see the module docstring."""

    shard: Shard | None = None
    whole_fingerprint: str = field(default="", repr=False)

    @property
    def fingerprint(self) -> str:
        """The whole training set's fingerprint (not the shard's)."""
        return self.whole_fingerprint

    def describe(self) -> dict:
        out = super().describe()
        out.update(num_images=self.shard.total, fingerprint=self.whole_fingerprint, shards=self.shard.record())
        return out

    def __getitem__(self, i: int) -> torch.Tensor:
        """Image ``i`` of the whole set, if this rank holds it."""
        s = self.shard
        if not s.start <= int(i) < s.stop:
            raise IndexError(f"image {i} of dataset '{self.name}' is held by another rank (rank {s.rank} holds "
                             f"{s.start}..{s.stop - 1})")
        return super().__getitem__(int(i) - s.start)

    def select(self, indices, *, note=None):
        raise ConfigError("a sharded dataset selects through subset() (collective) or gathered()")

    def subset(self, num: int, seed: int = 0) -> ImageDataset:
        """The whole set's ``subset(num, seed)`` (same images, same fingerprint), re-sharded over the ranks.
        Collective: every rank calls it; the subset's images travel to every rank once, to fingerprint them."""
        s = self.shard
        if not 0 < num <= s.total:
            raise DataError(f"subset size must be in 1..{s.total} for dataset '{self.name}', got {num}")
        if num == s.total:
            return self
        idx = np.sort(np.random.default_rng(seed).permutation(s.total)[:num])
        mine = idx[(idx >= s.start) & (idx < s.stop)] - s.start
        meta = dict(self.meta)
        meta["selections"] = list(self.meta.get("selections", [])) + [f"subset(num={num}, seed={seed})"]
        labels = None if self.labels is None else gather_rows(self.labels[mine])
        whole = ImageDataset(raw=gather_rows(self.raw[mine]), name=self.name, meta=meta, labels=labels)
        return shard_dataset(whole)

    def gathered(self) -> ImageDataset:
        """The whole training set on this rank (collective: every rank calls it)."""
        labels = None if self.labels is None else gather_rows(self.labels)
        whole = ImageDataset(raw=gather_rows(self.raw), name=self.name, meta=self.meta, labels=labels)
        whole._fingerprint = self.whole_fingerprint  # the same images: no need to hash them again
        return whole


def shard_dataset(data: ImageDataset) -> ImageDataset:
    """This rank's shard of ``data`` in a torchrun job of more than one process; ``data`` itself otherwise.

    The shard is a copy, so the whole set's memory is freed once the caller drops it; a store dataset
    (:mod:`.store_dataset`) gives a view of its rank's blocks instead and reads nothing. More processes than
    images is an error: every rank needs at least one image of its own.
    """
    w = world()
    if not w.active or isinstance(data, ShardedDataset):
        return data
    take_shard = getattr(data, "take_shard", None)
    if take_shard is not None:  # a store: this rank's blocks only, nothing read
        return take_shard(w.rank, w.size)
    total = len(data)
    if w.size > total:
        raise ConfigError(f"this torchrun job has {w.size} processes but the training set '{data.name}' holds "
                          f"{total} image(s): each process needs at least one image of its own; start at most "
                          f"{total} processes (--nproc-per-node) or use more images")
    start, stop = shard_bounds(total, w.size)[w.rank]
    fingerprint = data.fingerprint  # of the whole set, before its images are dropped
    labels = None if data.labels is None else data.labels[start:stop].copy()
    return ShardedDataset(raw=data.raw[start:stop].copy(), name=data.name, meta=data.meta, labels=labels,
                          shard=Shard(w.rank, w.size, start, stop, total), whole_fingerprint=fingerprint)


def shard_of(data) -> Shard | None:
    """The shard ``data`` is (None for a whole dataset)."""
    return getattr(data, "shard", None)


def total_images(data) -> int:
    """Images in the whole training set ``data`` is (a shard of)."""
    s = shard_of(data)
    return s.total if s is not None else len(data)


__all__ = ["Shard", "ShardedDataset", "shard_bounds", "block_shard_bounds", "shard_dataset", "shard_of",
           "total_images"]
