"""A dataset backed by a store file (:mod:`.store`): the :class:`~.dataset.ImageDataset` API without the
images in memory.

``raw`` is a :class:`StoreRows`, indexed like the ``[N, C, H, W]`` array of an in-memory dataset (an int,
a slice, an array of indices or a boolean mask give numpy arrays) but read block by block, each block
verified against its digest when it is read. ``chunks`` reads the next chunk in a second thread while
the caller works on the current one (two reused raw buffers), ``chunk_at`` into a buffer each thread
reuses, so streaming a set of any size holds two chunks (plus one block) at a time. Its
``fingerprint`` is computed from the header (the block digests, the labels' digest, the recorded meta),
never from the image bytes, so opening a store of any size costs one header read; it changes when any
image, label or recorded choice changes. ``select`` / ``subset`` give views that read only the blocks
holding their images, and under torchrun a :class:`StoreShard` reads only its rank's blocks.
"""

from __future__ import annotations

import hashlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import ConfigError, DataError
from .dataset import DEFAULT_CHUNK, ImageDataset, _stable
from .limits import default_max_bytes, format_bytes
from .raw import HELD_OUT_EVERY, subset_indices
from .shards import Shard, ShardedDataset, block_shard_bounds, shard_bounds
from .store import CHECKSUM, FORMAT, VERSION, BlockTable, StoreFile


class StoreRows:
    """The images ``[N, C, H, W]`` of a store dataset, read on demand: rows ``offset .. offset + N - 1`` of
    ``table`` or, for a view, rows ``index`` of it."""

    ndim = 4

    def __init__(self, file: StoreFile, table: BlockTable, *, offset: int = 0, count: int | None = None,
                 index: np.ndarray | None = None):
        self.file, self.table, self.offset, self.index = file, table, int(offset), index
        n = len(index) if index is not None else (int(table.starts[-1]) - self.offset if count is None else count)
        h = file.header
        self.shape = (int(n), *h.shape)
        self.dtype = h.dtype
        self.itemsize = h.dtype.itemsize
        self.image_bytes = h.image_bytes
        self.size = int(n) * int(np.prod(h.shape))
        self.nbytes = int(n) * h.image_bytes

    def __len__(self) -> int:
        return self.shape[0]

    def __repr__(self) -> str:
        return f"StoreRows({self.file.path}, shape={self.shape}, dtype={self.dtype})"

    # -- reading ------------------------------------------------------------------------------------
    def read(self, start: int, stop: int, out: np.ndarray | None = None) -> np.ndarray:
        """Rows ``start .. stop - 1`` (0 <= start <= stop <= N) as ``[k, C, H, W]``, into ``out`` if given."""
        k = stop - start
        if out is None:
            out = np.empty((k, *self.shape[1:]), self.dtype)
        if k == 0:
            return out
        if self.index is not None:
            return self._take_base(self.index[start:stop], out)
        flat = out.reshape(-1).view(np.uint8)
        a, b, ib, t = self.offset + start, self.offset + stop, self.image_bytes, self.table
        for blk in range(int(t.block_of(np.int64(a))), int(t.block_of(np.int64(b - 1))) + 1):
            s, e = int(t.starts[blk]), int(t.starts[blk + 1])
            lo, hi = max(s, a), min(e, b)
            dst = flat[(lo - a) * ib:(hi - a) * ib]
            if lo == s and hi == e:
                self.file.read_into(t, blk, dst)  # a whole block: straight into the caller's buffer
            else:
                dst[:] = self.file.cached_block(t, blk)[(lo - s) * ib:(hi - s) * ib]
        return out

    def take(self, rows) -> np.ndarray:
        """Rows ``rows`` (int array of any shape, any order, repeats allowed) as ``[*rows.shape, C, H, W]``."""
        rows = self._check(np.asarray(rows, dtype=np.int64))
        base = self.index[rows.reshape(-1)] if self.index is not None else rows.reshape(-1) + self.offset
        out = np.empty((base.size, *self.shape[1:]), self.dtype)
        return self._take_base(base, out).reshape(*rows.shape, *self.shape[1:])

    def _take_base(self, base: np.ndarray, out: np.ndarray) -> np.ndarray:
        """Rows ``base`` of the table into ``out``; each block needed is read once (in block order)."""
        if base.size == 0:
            return out
        ib, t = self.image_bytes, self.table
        flat = out.reshape(len(base), -1).view(np.uint8)
        blocks = t.block_of(base)
        order = np.argsort(blocks, kind="stable")
        cuts = np.flatnonzero(np.diff(blocks[order])) + 1
        for group in np.split(order, cuts):
            blk = int(blocks[group[0]])
            data = self.file.cached_block(t, blk).reshape(-1, ib)
            flat[group] = data[base[group] - int(t.starts[blk])]
        return out

    def _check(self, rows: np.ndarray) -> np.ndarray:
        n = len(self)
        if rows.size and (rows.min() < -n or rows.max() >= n):
            bad = int(rows.max() if rows.max() >= n else rows.min())
            raise IndexError(f"image index {bad} out of range for a store dataset of {n} images")
        return np.where(rows < 0, rows + n, rows)

    # -- numpy-like indexing ------------------------------------------------------------------------------
    def __getitem__(self, key):
        if isinstance(key, tuple):
            if not key:
                return self.read(0, len(self))
            first = self[key[0]]
            rest = key[1:]
            return first[rest] if np.ndim(key[0]) == 0 and not isinstance(key[0], slice) else first[(slice(None), *rest)]
        if key is Ellipsis:
            return self.read(0, len(self))
        if isinstance(key, (int, np.integer)):
            return self.take(np.asarray([int(key)]))[0]
        if isinstance(key, slice):
            start, stop, step = key.indices(len(self))
            if step == 1:
                return self.read(start, max(start, stop))
            return self.take(np.arange(start, stop, step))
        arr = np.asarray(key)
        if arr.dtype == bool:
            if arr.shape != (len(self),):
                raise IndexError(f"boolean index of shape {arr.shape} for {len(self)} images")
            return self.take(np.flatnonzero(arr))
        if arr.dtype.kind not in "iu":
            raise IndexError(f"store rows are indexed by integers, slices or boolean masks, got {arr.dtype}")
        return self.take(arr)

    def __array__(self, dtype=None, copy=None):
        """Every image in memory (refused above the memory cap: stream with ``chunks`` instead)."""
        cap = default_max_bytes()
        if self.nbytes > cap:
            raise DataError(f"{self.file.path}: holding all {len(self)} images of this store in memory would take "
                            f"{format_bytes(self.nbytes)}, more than the cap of {format_bytes(cap)}; stream them "
                            "(dataset.chunks / chunk_at) or take a subset")
        out = self.read(0, len(self))
        return out if dtype is None else out.astype(dtype, copy=False)


class StoreDataset(ImageDataset):
    """An :class:`ImageDataset` whose images stay in a store file (see the module docstring)."""

    def __init__(self, rows: StoreRows, *, name: str, meta: dict, labels: np.ndarray | None, identity: dict):
        self.raw, self.name, self.meta, self.labels = rows, name, meta, labels
        self.identity = identity  # what the fingerprint hashes besides meta: the header's digests, the view
        self._fingerprint = None
        self._local = threading.local()
        if labels is not None and labels.shape != (len(rows),):
            raise DataError(f"dataset '{name}': {len(rows)} images but labels of shape {labels.shape}")

    @property
    def path(self) -> Path:
        return self.raw.file.path

    @property
    def read_stats(self):
        """Bytes and blocks this process has read from the store file (``.bytes``, ``.blocks``)."""
        return self.raw.file.stats

    def chunks(self, size: int = DEFAULT_CHUNK, *, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, flat: bool = False) -> Iterator[torch.Tensor]:
        """Consecutive chunks ``[k, C, H, W]`` (or ``[k, n]``), as an in-memory dataset gives them, with the next
        chunk read (and verified) by a second thread while the caller works on this one: two raw buffers."""
        if size <= 0:
            raise ValueError(f"chunk size must be positive, got {size}")
        n, size = len(self), int(size)
        bufs = [np.empty((min(size, n), *self.shape), self.raw.dtype) for _ in range(2)]
        with ThreadPoolExecutor(1, thread_name_prefix="store-read") as pool:
            ahead = pool.submit(self.raw.read, 0, min(size, n), bufs[0][:min(size, n)])
            for i, start in enumerate(range(0, n, size)):
                raw = ahead.result()
                nxt = start + size
                if nxt < n:
                    k = min(size, n - nxt)
                    ahead = pool.submit(self.raw.read, nxt, nxt + k, bufs[(i + 1) % 2][:k])
                yield self._convert(raw, device, dtype, flat)

    def chunk_at(self, start: int, size: int, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, flat: bool = False) -> torch.Tensor:
        """Images ``start .. start + size - 1`` (fewer at the end) as ``[k, C, H, W]`` (or ``[k, n]``): read into
        this thread's reused buffer, then converted exactly as an in-memory dataset converts them."""
        n = len(self)
        start = max(0, min(int(start), n))
        k = min(int(size), n - start)
        buf = getattr(self._local, "buf", None)
        if buf is None or buf.shape[0] < k:
            buf = self._local.buf = np.empty((k, *self.shape), self.raw.dtype)
        return self._convert(self.raw.read(start, start + k, out=buf[:k]), device, dtype, flat)

    def _convert(self, raw: np.ndarray, device, dtype: torch.dtype, flat: bool) -> torch.Tensor:
        """``raw`` [k, C, H, W] as a new float tensor: uint8 by x / 127.5 - 1, the same float operations as
        ImageDataset (so the values are bit for bit the same), in place."""
        out = torch.empty(raw.shape, dtype=dtype, device=device)
        out.copy_(torch.from_numpy(raw))
        if self.raw.dtype == np.uint8:
            out.div_(127.5).sub_(1.0)
        return out.reshape(len(raw), -1) if flat else out

    @property
    def fingerprint(self) -> str:
        """sha256 of the header's block and label digests, the view's rows and the meta (not of the image bytes:
        the digests already change with any byte); the store's path is left out, so a copy keeps its caches."""
        if self._fingerprint is None:
            meta = {k: v for k, v in self.meta.items() if k != "source"}
            text = json.dumps({"store": self.identity, "meta": _stable(meta)}, sort_keys=True)
            self._fingerprint = hashlib.sha256(text.encode()).hexdigest()
        return self._fingerprint

    def describe(self) -> dict:
        out = super().describe()
        h = self.raw.file.header
        out["storage"] = f"{self.raw.dtype} store, blocks of {h.block_images} images, {CHECKSUM} per block"
        return out

    # -- views ------------------------------------------------------------------------------------------
    def _view(self, rows: StoreRows, labels, meta: dict, identity: dict) -> "StoreDataset":
        return StoreDataset(rows, name=self.name, meta=meta, labels=labels, identity=identity)

    def select(self, indices, *, note: str | None = None) -> "StoreDataset":
        """A view of images ``indices`` (labels follow): nothing is read until its images are."""
        rows = self.raw._check(np.asarray(indices, dtype=np.int64).reshape(-1))
        r = self.raw
        base = r.index[rows] if r.index is not None else rows + r.offset
        meta = dict(self.meta)
        if note:
            meta["selections"] = list(self.meta.get("selections", [])) + [note]
        identity = {**self.identity, "rows": hashlib.sha256(base.astype("<i8").tobytes()).hexdigest()}
        labels = None if self.labels is None else self.labels[rows]
        return self._view(StoreRows(r.file, r.table, index=base), labels, meta, identity)

    def take_shard(self, rank: int, size: int) -> "StoreShard":
        """Rank ``rank`` of ``size``'s shard: whole blocks of the store where there are at least ``size`` of them
        (so no block is read by two ranks), else ``shard_bounds``. Reads nothing."""
        total, r = len(self), self.raw
        if size > total:
            raise ConfigError(f"this torchrun job has {size} processes but the training set '{self.name}' holds "
                              f"{total} image(s): each process needs at least one image of its own; start at most "
                              f"{total} processes (--nproc-per-node) or use more images")
        whole_rows = r.index is None and r.offset == 0 and len(r) == int(r.table.starts[-1])
        bounds = block_shard_bounds(r.table.starts, size) if whole_rows else shard_bounds(total, size)
        start, stop = bounds[rank]
        if r.index is not None:
            rows = StoreRows(r.file, r.table, index=r.index[start:stop])
        else:
            rows = StoreRows(r.file, r.table, offset=r.offset + start, count=stop - start)
        labels = None if self.labels is None else self.labels[start:stop]
        return StoreShard(rows, name=self.name, meta=self.meta, labels=labels, identity=self.identity,
                          shard=Shard(rank, size, start, stop, total, tuple(bounds)), whole=self)


class StoreShard(ShardedDataset, StoreDataset):
    """This rank's shard of a store dataset: reads only its own blocks; ``gathered()`` is the whole store
    dataset (read on demand, no collective needed) and ``subset`` the whole set's subset, re-sharded."""

    def __init__(self, rows: StoreRows, *, name, meta, labels, identity, shard: Shard, whole: StoreDataset):
        StoreDataset.__init__(self, rows, name=name, meta=meta, labels=labels, identity=identity)
        self.shard, self.whole = shard, whole
        self.whole_fingerprint = whole.fingerprint

    def subset(self, num: int, seed: int = 0) -> ImageDataset:
        whole = self.whole.subset(num, seed)
        return whole if whole is self.whole else whole.take_shard(self.shard.rank, self.shard.size)

    def gathered(self) -> ImageDataset:
        return self.whole


def open_store(path: str | Path, *, split: str = "train", resolution: int | None = None,
               channels: int | None = None, subset: int | None = None, seed: int = 0) -> StoreDataset:
    """The ``split`` of the store at ``path`` ("all": train then test) as a :class:`StoreDataset`.

    A store holds images at one size and channel count: ``resolution`` / ``channels`` must be those (or
    None); ``subset`` gives a view of ``subset`` images chosen as ``ImageDataset.subset(subset, seed)``.
    """
    path = Path(path)
    file = StoreFile(path)
    h = file.header
    names = ["train", "test"] if split == "all" else [split]
    if any(s not in h.splits for s in names):
        raise DataError(f"{path}: the store holds the split(s) {', '.join(h.splits)}, not '{split}'; pack the source "
                        f"again with `localdiff pack SOURCE OUT --split {split}`")
    c, hh, ww = h.shape
    for what, want, changes, flag in (("resolution", resolution, (resolution, resolution) != (hh, ww), "--resolution"),
                                      ("channels", channels, channels != c, "--channels")):
        if want is not None and changes:
            raise ConfigError(f"{path}: the store holds {c} x {hh} x {ww} images; {what}={want} would change them, "
                              f"which a store does not do when read: pack the source with `localdiff pack SOURCE "
                              f"OUT {flag} {want}`")
    table = BlockTable.of(h, names)
    labels = [file.read_labels(h.splits[s]) for s in names]
    labels = None if any(y is None for y in labels) else np.concatenate(labels)
    order = _source_order(h) if split == "all" else None
    packed = h.splits[names[0]].meta if len(names) == 1 else {s: h.splits[s].meta for s in names}
    meta = {"source": str(path.resolve()), "format": FORMAT, "packed": packed, "split": split,
            "native_shape": [c, hh, ww], "resolution": hh if hh == ww else [hh, ww], "resize": None,
            "channels": c, "channel_conversion": None, "subset": None if subset is None else int(subset),
            "seed": None if subset is None else int(seed)}
    identity = {"format": f"{FORMAT}-{VERSION}", "dtype": h.dtype.name, "shape": list(h.shape),
                "block_images": h.block_images, "checksum": CHECKSUM,
                "splits": [{"name": s, "count": h.splits[s].count, "blocks": list(h.splits[s].blocks),
                            "labels": None if h.splits[s].labels is None else h.splits[s].labels["checksum"]}
                           for s in names]}
    ds = StoreDataset(StoreRows(file, table), name=path.stem, meta=meta, labels=labels, identity=identity)
    if order is not None:  # a source split by raw.SPLIT_RULE: "all" is every image in the source's order
        ds = ds.select(order)
    if subset is not None and subset != len(ds):
        ds = ds.select(subset_indices(len(ds), int(subset), int(seed), ds.name))
    return ds


def _source_order(h) -> np.ndarray | None:
    """For a source without a split of its own (``raw.SPLIT_RULE``: every 10th image held out), the rows of
    train-then-test in the source's order, so that "all" is what ``load_dataset(SOURCE, split="all")`` gives;
    None for sources with their own splits (their "all" is train then test)."""
    if set(h.splits) != {"train", "test"}:
        return None
    tr, te = h.splits["train"], h.splits["test"]
    n = tr.meta.get("images_in_source")
    if "split_rule" not in tr.meta or n != te.meta.get("images_in_source") or n != tr.count + te.count:
        return None
    held = np.arange(n) % HELD_OUT_EVERY == HELD_OUT_EVERY - 1
    return np.where(held, tr.count + np.cumsum(held) - 1, np.cumsum(~held) - 1)


__all__ = ["StoreRows", "StoreDataset", "StoreShard", "open_store"]
