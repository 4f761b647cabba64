"""The training set on the compute device, streamed in blocks: image-major rows for the models that
compare whole images (optimal, nearest, patch models) and pixel-major columns for the masked model.

In a torchrun job the data may be this rank's shard (:mod:`localdiff.data.shards`): both classes then
stream only its images and say which they are (``shard``, ``offset`` = global index of the first one,
``total`` = images in the whole set); the models merge the ranks' states (:mod:`localdiff.distributed`)."""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ...data.dataset import DEFAULT_CHUNK, to_float
from ...data.shards import shard_of, total_images
from ...errors import ConfigError


STREAMED_CHUNK_BYTES = 16 << 20  # float images per chunk read from a store: about 16 MB


def streamed(data) -> bool:
    """Whether the images are read from disk block by block (a store, :mod:`localdiff.data.store`)."""
    return not isinstance(data.raw, np.ndarray)


def default_resident(data, device: torch.device, nbytes: int, max_bytes: int) -> bool:
    """Keep the float copy on the device when it fits, except a store's on the CPU: there the copy would only
    duplicate in memory what the store streams from the page cache."""
    return nbytes <= max_bytes and not (streamed(data) and device.type == "cpu")


class TrainingSet:
    """The training images as flat rows ``[k, n]`` on the compute device, streamed chunk by chunk.

    Resident by default when the float copy fits in ``max_resident_bytes`` (keeping the set on the
    device is the first win on a GPU); otherwise each pass converts chunks from the compact source.
    Squared norms ``||y_k||^2`` are computed once per chunk and reused.
    """

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype, chunk: int = DEFAULT_CHUNK,
                 resident: bool | None = None, max_resident_bytes: int = 4 << 30):
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive number of images, got {chunk}")
        self.data, self.device, self.dtype, self.chunk = data, device, dtype, int(chunk)
        self.shard, self.total = shard_of(data), total_images(data)
        self.offset = self.shard.start if self.shard is not None else 0
        bytes_needed = len(data) * data.dim * torch.finfo(dtype).bits // 8
        self.resident = default_resident(data, device, bytes_needed, max_resident_bytes) if resident is None \
            else bool(resident)
        if not self.resident and streamed(data):  # read from disk: chunks of about 16 MB, not DEFAULT_CHUNK images
            self.chunk = max(1, min(self.chunk, STREAMED_CHUNK_BYTES // (data.dim * torch.finfo(dtype).bits // 8)))
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.resident:
            self._cache = [(y, (y * y).sum(dim=1)) for y in self._convert()]

    def __len__(self) -> int:
        return len(self.data)

    def _convert(self) -> Iterator[torch.Tensor]:
        return self.data.chunks(self.chunk, device=self.device, dtype=self.dtype, flat=True)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, Y [k, n], ||Y||^2 [k])`` over the set (this rank's shard), ``start`` local."""
        start = 0
        if self._cache is not None:
            for y, y_sq in self._cache:
                yield start, y, y_sq
                start += y.shape[0]
        else:
            for y in self._convert():
                yield start, y, (y * y).sum(dim=1)
                start += y.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Training images ``[*index.shape, n]`` by (global) index; of a shard, only the images it holds."""
        flat = index.reshape(-1).cpu().numpy() - self.offset
        if len(flat) and (flat.min() < 0 or flat.max() >= len(self.data)):
            raise IndexError("rows: an index outside the images this process holds")
        raw = self.data.raw[flat]
        y = to_float(raw, device=self.device, dtype=self.dtype).reshape(len(flat), -1)
        return y.reshape(*index.shape, -1)


class ColumnBlocks:
    """The training images pixel-major, ``YT`` [n, K] (one column per image): kept whole on the device
    when it fits in ``max_resident_bytes`` (or as asked), so that a block of any width is a view;
    otherwise each block is converted when it is needed. Iterating gives blocks of ``chunk`` images."""

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype, chunk: int,
                 resident: bool | None = None, max_resident_bytes: int = 4 << 30):
        self.data, self.device, self.dtype, self.chunk = data, device, dtype, int(chunk)
        self.shard, self.total = shard_of(data), total_images(data)
        nbytes = len(data) * data.dim * torch.finfo(dtype).bits // 8
        self.resident = default_resident(data, device, nbytes, max_resident_bytes) if resident is None \
            else bool(resident)
        self._full = None
        if self.resident:
            self._full = torch.empty((data.dim, len(data)), device=device, dtype=dtype)
            for start in range(0, len(data), self.chunk):
                y = data.chunk_at(start, self.chunk, device=device, dtype=dtype, flat=True)
                self._full[:, start:start + y.shape[0]] = y.T

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start .. stop - 1`` as [n, stop - start] (a view when resident, else converted now)."""
        if self._full is not None:
            return self._full[:, start:stop]
        return self.data.chunk_at(start, stop - start, device=self.device, dtype=self.dtype, flat=True).T.contiguous()

    def bounds(self, width: int, multiple: int = 1) -> list[tuple[int, int]]:
        """``(start, stop)`` of consecutive blocks of about ``width`` images; their number is rounded up to
        a multiple of ``multiple`` (when there is more than one) so that workers get equal shares."""
        K, width = len(self), max(1, int(width))
        blocks = -(-K // width)
        if blocks > 1 and blocks % multiple:
            width = -(-K // (-(-blocks // multiple) * multiple))
        return [(s, min(s + width, K)) for s in range(0, K, width)]

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return (self.block(s, e) for s, e in self.bounds(self.chunk))


__all__ = ["TrainingSet", "ColumnBlocks"]
