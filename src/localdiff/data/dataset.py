"""The one in-memory dataset type every part of localdiff consumes.

Images are kept in their compact source form (``uint8`` 0..255 for every real set, or ``float32``
already on the [-1, 1] data scale for synthetic sets) and converted chunk by chunk, so statistics and
denoisers stream over the data instead of holding a float copy of the whole set on the device.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import torch

from ..errors import DataError

DEFAULT_CHUNK = 4096


@dataclass
class ImageDataset:
    """A set of images, shape ``[N, C, H, W]``, served as float32 on the [-1, 1] scale.

    ``raw`` is uint8 (0..255, mapped by ``x / 127.5 - 1``) or float32 (already in [-1, 1]).
    ``meta`` records the source and every preprocessing choice; it enters the fingerprint.
    """

    raw: np.ndarray  # [N, C, H, W] uint8 or float32
    name: str
    meta: dict = field(default_factory=dict)
    labels: np.ndarray | None = None  # [N] int64, when the source has them
    _fingerprint: str | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        raw = self.raw
        if not isinstance(raw, np.ndarray) or raw.ndim != 4:
            shape = getattr(raw, "shape", None)
            raise DataError(
                f"dataset '{self.name}': images must be an array of shape [N, C, H, W], got shape {shape}"
            )
        if raw.shape[0] == 0:
            raise DataError(f"dataset '{self.name}' holds no images: check the path, split and subset options")
        if min(raw.shape[1:]) == 0:
            raise DataError(f"dataset '{self.name}': images of shape {tuple(raw.shape[1:])} hold no pixels")
        if raw.dtype == np.uint8:
            pass
        elif raw.dtype == np.float32:
            if not np.isfinite(raw).all():
                bad = int((~np.isfinite(raw)).sum())
                raise DataError(
                    f"dataset '{self.name}': {bad} NaN or Inf values in the images; clean the data "
                    "(for example np.nan_to_num) before loading it"
                )
            lo, hi = float(raw.min()), float(raw.max())
            if lo < -1.0 - 1e-6 or hi > 1.0 + 1e-6:
                raise DataError(
                    f"dataset '{self.name}': float images must lie in [-1, 1] on the data scale, found "
                    f"[{lo:.4g}, {hi:.4g}]"
                )
        else:
            raise DataError(f"dataset '{self.name}': images must be uint8 or float32, got {raw.dtype}")
        self.raw = np.ascontiguousarray(raw)
        if self.labels is not None:
            self.labels = np.asarray(self.labels, dtype=np.int64)
            if self.labels.shape != (raw.shape[0],):
                raise DataError(
                    f"dataset '{self.name}': {raw.shape[0]} images but labels of shape {self.labels.shape}"
                )

    # -- basic container protocol ---------------------------------------------------------------
    def __len__(self) -> int:
        return int(self.raw.shape[0])

    def __getitem__(self, i: int) -> torch.Tensor:
        """One image as a float32 ``[C, H, W]`` tensor on the [-1, 1] scale."""
        n = len(self)
        if not -n <= int(i) < n:
            raise IndexError(f"image index {i} out of range for dataset '{self.name}' of {n} images")
        return to_float(self.raw[int(i) % n][None])[0]

    @property
    def shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of one image."""
        return tuple(int(s) for s in self.raw.shape[1:])  # type: ignore[return-value]

    @property
    def dim(self) -> int:
        """``n = C * H * W``, the flattened length."""
        c, h, w = self.shape
        return c * h * w

    # -- streaming ------------------------------------------------------------------------------
    def chunks(
        self,
        size: int = DEFAULT_CHUNK,
        *,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        flat: bool = False,
    ) -> Iterator[torch.Tensor]:
        """Yield consecutive chunks ``[k, C, H, W]`` (or ``[k, n]`` with ``flat``) on ``device``."""
        if size <= 0:
            raise ValueError(f"chunk size must be positive, got {size}")
        for start in range(0, len(self), size):
            yield self.chunk_at(start, size, device=device, dtype=dtype, flat=flat)

    def chunk_at(self, start: int, size: int, *, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, flat: bool = False) -> torch.Tensor:
        """Images ``start .. start + size - 1`` (fewer at the end) as ``[k, C, H, W]`` (or ``[k, n]``)."""
        x = to_float(self.raw[start : start + size], device=device, dtype=dtype)
        return x.reshape(x.shape[0], -1) if flat else x

    def tensor(self, *, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               flat: bool = False) -> torch.Tensor:
        """The whole set as one tensor (use for resident copies; converts chunk by chunk)."""
        n = len(self)
        out = torch.empty((n, self.dim) if flat else (n, *self.shape), dtype=dtype, device=device)
        start = 0
        for x in self.chunks(DEFAULT_CHUNK, device=device, dtype=dtype, flat=flat):
            out[start : start + x.shape[0]] = x
            start += x.shape[0]
        return out

    # -- identity -------------------------------------------------------------------------------
    @property
    def fingerprint(self) -> str:
        """sha256 of the image bytes, their dtype and shape, and the preprocessing record."""
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(json.dumps({"dtype": str(self.raw.dtype), "shape": list(self.raw.shape),
                                 "meta": _stable(self.meta)}, sort_keys=True).encode())
            h.update(memoryview(self.raw).cast("B"))
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def select(self, indices, *, note: str | None = None) -> "ImageDataset":
        """A new dataset holding ``raw[indices]`` (labels follow); ``note`` is recorded in meta."""
        idx = np.asarray(indices, dtype=np.int64)
        meta = dict(self.meta)
        if note:
            meta["selections"] = list(self.meta.get("selections", [])) + [note]
        return ImageDataset(
            raw=self.raw[idx],
            name=self.name,
            meta=meta,
            labels=None if self.labels is None else self.labels[idx],
        )

    def subset(self, num: int, seed: int = 0) -> "ImageDataset":
        """``num`` images chosen without replacement by a seeded permutation (order preserved)."""
        n = len(self)
        if not 0 < num <= n:
            raise DataError(f"subset size must be in 1..{n} for dataset '{self.name}', got {num}")
        if num == n:
            return self
        rng = np.random.default_rng(seed)
        idx = np.sort(rng.permutation(n)[:num])
        return self.select(idx, note=f"subset(num={num}, seed={seed})")

    def describe(self) -> dict:
        return {**self.meta, "name": self.name, "num_images": len(self), "shape": list(self.shape),
                "storage": str(self.raw.dtype), "fingerprint": self.fingerprint}


def to_float(raw: np.ndarray, *, device: str | torch.device = "cpu",
              dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 0..255 -> x / 127.5 - 1; float32 is already on the data scale."""
    t = torch.from_numpy(np.ascontiguousarray(raw)).to(device)
    if t.dtype == torch.uint8:
        return t.to(dtype) / 127.5 - 1.0
    return t.to(dtype)


def _stable(obj):
    if isinstance(obj, dict):
        return {str(k): _stable(v) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))}
    if isinstance(obj, (list, tuple)):
        return [_stable(v) for v in obj]
    if isinstance(obj, (str, int, float, bool)) or obj is None:
        return obj
    return str(obj)
