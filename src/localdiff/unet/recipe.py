"""The step-indexed parts of the training recipe: data order, learning rate, EMA decay."""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field

import torch

from .configs import TrainConfig


def mix_seed(*ints: int) -> int:
    """A 63-bit seed derived from integers (stable across runs and platforms)."""
    h = hashlib.sha256(",".join(str(int(i)) for i in ints).encode()).digest()
    return int.from_bytes(h[:8], "little") & ((1 << 63) - 1)


@dataclass
class DataOrder:
    """Epoch-wise random permutations of ``num`` images; the full state is ``(seed, epoch, position)``."""

    num: int
    seed: int
    epoch: int = 0
    position: int = 0
    _perm: torch.Tensor | None = field(default=None, repr=False, compare=False)
    _perm_epoch: int = field(default=-1, repr=False, compare=False)

    def permutation(self, epoch: int) -> torch.Tensor:
        """The image order of ``epoch`` [num] (a pure function of seed and epoch)."""
        if self._perm_epoch != epoch:
            gen = torch.Generator().manual_seed(mix_seed(self.seed, epoch))
            self._perm, self._perm_epoch = torch.randperm(self.num, generator=gen), epoch
        return self._perm  # type: ignore[return-value]

    def take(self, batch: int) -> torch.Tensor:
        """The next ``batch`` indices [batch] (CPU int64); a batch may run across an epoch boundary."""
        parts, need = [], batch
        while need:
            k = min(need, self.num - self.position)
            parts.append(self.permutation(self.epoch)[self.position:self.position + k])
            self.position += k
            need -= k
            if self.position == self.num:
                self.epoch, self.position = self.epoch + 1, 0
        return torch.cat(parts)

    @property
    def epochs(self) -> float:
        return self.epoch + self.position / self.num

    def state(self) -> dict:
        return {"num": self.num, "seed": self.seed, "epoch": self.epoch, "position": self.position}


def lr_at(step: int, cfg: TrainConfig, total: int | None = None, warmup: int | None = None) -> float:
    """Learning rate of (0-based) ``step``: linear warm-up over ``warmup`` steps (default ``cfg.warmup``),
    times ``(1 + cos(pi step / total)) / 2`` for ``lr_decay="cosine"`` once the run's ``total`` is known
    (SGDR, Loshchilov & Hutter 2017, without restarts)."""
    warmup = cfg.warmup if warmup is None else warmup
    ramp = min(1.0, (step + 1) / warmup) if warmup > 0 else 1.0
    if cfg.lr_decay == "constant" or total is None:
        return cfg.lr * ramp
    return cfg.lr * ramp * 0.5 * (1.0 + math.cos(math.pi * min(step, total) / max(total, 1)))


def warmup_for(cfg: TrainConfig, total: int) -> int:
    """Warm-up steps of a run of ``total`` steps: ``cfg.warmup``, at most a tenth of a cosine run."""
    return cfg.warmup if cfg.lr_decay == "constant" else min(cfg.warmup, max(1, total // 10))


def ema_decay_at(step: int, decay: float) -> float:
    """EMA decay after ``step`` updates: ``min(decay, (1 + step) / (10 + step))`` (diffusers' EMAModel)."""
    return min(decay, (1 + step) / (10 + step))
