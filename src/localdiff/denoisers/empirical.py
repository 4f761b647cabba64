"""Denoisers built from the finite training set itself: the exact empirical optimum and nearest-dataset.

Both use the same weights ``w_k ∝ exp(-||x_t - a y_k||^2 / (2 b2))`` (DESIGN.md §2.3). The
``||x_t||^2`` term is constant over k and cancels, so the log-weights are computed by one matrix
product per chunk: ``(a x_t·y_k - a^2 ||y_k||^2 / 2) / b2``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import ConfigError
from .base import Denoiser, DenoiserConfig, TrainingSet, register, resolve_dtype


def optimal_logits(x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """Log-weights ``(a x·y_k - a^2 ||y_k||^2 / 2) / b2`` [B, k] (``-||x - a y_k||^2/(2 b2)`` up to a constant)."""
    return (a * (x @ y.T) - (0.5 * a * a) * y_sq) / b2


@dataclass
class SoftmaxState:
    """Mergeable partial state of a max-shifted streamed softmax average ``sum_k w_k v_k``.

    ``m`` is the running maximum logit, ``s = sum exp(l - m)`` and ``acc = sum exp(l - m) v``.
    ``m`` and ``s`` have shape [B] (one softmax per query) or [B, n] (one per query and pixel).
    """

    m: torch.Tensor
    s: torch.Tensor
    acc: torch.Tensor

    @staticmethod
    def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return v.unsqueeze(-1) if v.ndim < like.ndim else v

    @classmethod
    def of(cls, logits: torch.Tensor, values: torch.Tensor) -> "SoftmaxState":
        """State of one chunk: ``logits`` [B, k] with ``values`` [k, n]."""
        m = logits.max(dim=1).values
        e = torch.exp(logits - m.unsqueeze(1))
        return cls(m, e.sum(dim=1), e @ values)

    def merge(self, other: "SoftmaxState") -> "SoftmaxState":
        """Combine two partial states: rescale both to the common maximum and add."""
        m = torch.maximum(self.m, other.m)
        f1, f2 = torch.exp(self.m - m), torch.exp(other.m - m)
        return SoftmaxState(m, self.s * f1 + other.s * f2,
                            self.acc * self._b(f1, self.acc) + other.acc * self._b(f2, other.acc))

    def mean(self) -> torch.Tensor:
        return self.acc / self._b(self.s, self.acc)


@dataclass
class EmpiricalConfig(DenoiserConfig):
    chunk: int = 4096  # training images per streamed chunk (the result does not depend on it)
    dtype: str = "float64"  # arithmetic of the distances; float64 keeps low-noise logits exact
    resident: bool | None = None  # keep the float training set on the device (default: if it fits)


@dataclass
class OptimalConfig(EmpiricalConfig):
    top_k: int | None = None  # approximate: average only the top_k largest weights (None = exact)


@register("optimal")
class OptimalDenoiser(Denoiser):
    """The exact minimiser of the denoising loss on the training set: a softmax average of all images."""

    Config = OptimalConfig

    def __init__(self, data, config: OptimalConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        if config.top_k is not None and config.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or None, got {config.top_k}")
        self.dtype = resolve_dtype(config.dtype)
        self.train_set = TrainingSet(data, device=self.device, dtype=self.dtype, chunk=config.chunk,
                                     resident=config.resident)

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, b2 = self.schedule.a(t), self.schedule.b2(t)
        x = x_t.reshape(x_t.shape[0], -1).to(self.dtype)  # [B, n]
        if self.config.top_k is not None:
            return self._top_k(x, a, b2).reshape(x_t.shape)
        state = None
        for _, y, y_sq in self.train_set:
            part = SoftmaxState.of(optimal_logits(x, y, y_sq, a, b2), y)
            state = part if state is None else state.merge(part)
        return state.mean().reshape(x_t.shape)

    @property
    def has_closed_form_jacobian(self) -> bool:
        return self.config.top_k is None

    def jacobian_rows(self, x_t: torch.Tensor, t: int, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` at each input, [B, Q, n].

        Closed form: ``(a / b2) * Cov_w(y)``, i.e. row i is
        ``(a / b2) (sum_k w_k y_k[i] y_k - x0_hat[i] x0_hat)`` (the posterior covariance of the
        empirical distribution), streamed over the training set like the denoiser itself.
        """
        t = self.schedule.check_t(t)
        a, b2 = self.schedule.a(t), self.schedule.b2(t)
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=self.dtype)
        index = torch.as_tensor(index, device=self.device).reshape(-1)
        m = s = acc0 = acc1 = None
        for _, y, y_sq in self.train_set:
            logits = optimal_logits(x, y, y_sq, a, b2)  # [B, k]
            cm = logits.max(dim=1).values
            if m is None:
                m = cm
                s = torch.zeros_like(cm)
                acc0 = torch.zeros(x.shape[0], y.shape[1], dtype=x.dtype, device=x.device)
                acc1 = torch.zeros(x.shape[0], index.numel(), y.shape[1], dtype=x.dtype, device=x.device)
            new_m = torch.maximum(m, cm)
            f = torch.exp(m - new_m)
            e = torch.exp(logits - new_m.unsqueeze(1))  # [B, k]
            s = s * f + e.sum(1)
            acc0 = acc0 * f[:, None] + e @ y
            weighted = e.unsqueeze(2) * y[:, index].unsqueeze(0)  # [B, k, Q]
            acc1 = acc1 * f[:, None, None] + weighted.transpose(1, 2) @ y  # [B, Q, n]
            m = new_m
        mean = acc0 / s[:, None]  # x0_hat [B, n]
        second = acc1 / s[:, None, None]  # E_w[y_i y] [B, Q, n]
        return (a / b2) * (second - mean[:, index].unsqueeze(2) * mean.unsqueeze(1))

    def _top_k(self, x: torch.Tensor, a: float, b2: float) -> torch.Tensor:
        vals = idx = None
        for start, y, y_sq in self.train_set:
            logits = optimal_logits(x, y, y_sq, a, b2)
            ids = torch.arange(start, start + y.shape[0], device=x.device).expand_as(logits)
            if vals is not None:
                logits, ids = torch.cat([vals, logits], 1), torch.cat([idx, ids], 1)
            k = min(self.config.top_k, logits.shape[1])
            vals, pos = logits.topk(k, dim=1)
            idx = ids.gather(1, pos)
        w = torch.softmax(vals, dim=1)  # [B, k]
        return torch.einsum("bk,bkn->bn", w, self.train_set.rows(idx))


@register("nearest")
class NearestDenoiser(Denoiser):
    """The training image with the largest optimal-denoiser weight (nearest to x_t / a)."""

    Config = EmpiricalConfig

    def __init__(self, data, config: EmpiricalConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        self.dtype = resolve_dtype(config.dtype)
        self.train_set = TrainingSet(data, device=self.device, dtype=self.dtype, chunk=config.chunk,
                                     resident=config.resident)

    def nearest_index(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """Index [B] of the training image with the largest weight at timestep t."""
        a, b2 = self.schedule.a(t), self.schedule.b2(t)
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=self.dtype)
        best = best_idx = None
        for start, y, y_sq in self.train_set:
            v, i = optimal_logits(x, y, y_sq, a, b2).max(dim=1)
            i = i + start
            if best is None:
                best, best_idx = v, i
            else:
                better = v > best
                best, best_idx = torch.where(better, v, best), torch.where(better, i, best_idx)
        return best_idx

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return self.train_set.rows(self.nearest_index(x_t, t)).reshape(x_t.shape)
