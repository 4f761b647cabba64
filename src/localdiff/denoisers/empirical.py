"""Denoisers built from the finite training set itself: the exact empirical optimum and nearest-dataset.

Both use the same weights ``w_k ∝ exp(-||x_t - a y_k||^2 / (2 b2))`` (docs/DESIGN.md §2.3). The
``||x_t||^2`` term is constant over k and cancels, so the log-weights are computed by one matrix
product per chunk: ``(a x_t·y_k - a^2 ||y_k||^2 / 2) / b2``. In a torchrun job each rank streams its
shard and the ranks' states are merged exactly (:func:`localdiff.distributed.merge_ranks`): the softmax
states of ``optimal``, the top-k candidates of ``top_k``, the best image of ``nearest``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from ..distributed import gather
from ..errors import ConfigError
from ..schedules import NoiseLevel
from .base import Capabilities
from .stream import SoftmaxState, StreamedDenoiser, StreamOptions


def optimal_logits(x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """Log-weights ``(a x·y_k - a^2 ||y_k||^2 / 2) / b2`` [B, k] (``-||x - a y_k||^2/(2 b2)`` up to a constant)."""
    return (a * (x @ y.T) - (0.5 * a * a) * y_sq) / b2


@dataclass
class EmpiricalConfig(StreamOptions):
    dtype: Literal["float32", "float64"] = "float64"  # arithmetic of the distances (float64: exact low-noise logits)


@dataclass
class OptimalConfig(EmpiricalConfig):
    top_k: int | None = None  # approximate: average only the top_k largest weights (None = exact)


class OptimalDenoiser(StreamedDenoiser):
    """The exact minimiser of the denoising loss on the training set: a softmax average of all images."""

    name = "optimal"
    Config = OptimalConfig
    capabilities = Capabilities(closed_form_jacobian=True, single_image_exact=True)
    merges_shards = True

    def __init__(self, data, config: OptimalConfig, schedule=None):
        super().__init__(data, config, schedule)
        if self.config.top_k is not None:  # the approximation has no closed-form Jacobian
            self.capabilities = dataclasses.replace(self.capabilities, closed_form_jacobian=False)
        if self.config.top_k is not None and self.config.top_k < 1:
            raise ConfigError(f"top_k must be a positive integer or None, got {self.config.top_k}")

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        a, b2 = level.a, level.b2
        x = self.rank_input(x_t.reshape(x_t.shape[0], -1).to(self.dtype))  # [B, n]
        if self.config.top_k is not None:
            return self._top_k(x, a, b2).reshape(x_t.shape)
        state = self.fold(lambda _, y, y_sq: SoftmaxState.of(optimal_logits(x, y, y_sq, a, b2), y))
        return state.mean().reshape(x_t.shape)

    def why_no_closed_form(self) -> str:
        return "optimal: the closed-form Jacobian is the exact model's; top_k needs autograd"

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` at each input, [B, Q, n].

        Closed form: ``(a / b2) * Cov_w(y)``, i.e. row i is
        ``(a / b2) (sum_k w_k y_k[i] y_k - x0_hat[i] x0_hat)`` (the posterior covariance of the
        empirical distribution), streamed over the training set like the denoiser itself.
        """
        a, b2 = level.a, level.b2
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=self.dtype)
        # [B, 1, k] logits: one softmax per query, shared by every requested row
        state = self.fold(lambda _, y, y_sq: SoftmaxState.moments(optimal_logits(x, y, y_sq, a, b2).unsqueeze(1),
                                                                   y, index))
        return (a / b2) * state.covariance_rows(index)  # [B, Q, n]

    def _top_k(self, x: torch.Tensor, a: float, b2: float) -> torch.Tensor:
        vals = idx = None
        for start, y, y_sq in self.train_set:
            logits = optimal_logits(x, y, y_sq, a, b2)
            start += self.train_set.offset  # global image indices
            ids = torch.arange(start, start + y.shape[0], device=x.device).expand_as(logits)
            if vals is not None:
                logits, ids = torch.cat([vals, logits], 1), torch.cat([idx, ids], 1)
            k = min(self.config.top_k, logits.shape[1])
            vals, pos = logits.topk(k, dim=1)
            idx = ids.gather(1, pos)
        rows = self.train_set.rows(idx)  # [B, k, n]
        if self.shard is not None:  # every rank's candidates, in rank order: the top k of all
            parts = gather((vals, idx, rows))
            vals, idx, rows = (torch.cat([p[i] for p in parts], 1) for i in range(3))
            vals, pos = vals.topk(min(self.config.top_k, vals.shape[1]), dim=1)
            rows = rows.gather(1, pos.unsqueeze(2).expand(-1, -1, rows.shape[2]))
        w = torch.softmax(vals, dim=1)  # [B, k]
        return torch.einsum("bk,bkn->bn", w, rows)


class NearestDenoiser(StreamedDenoiser):
    """The training image with the largest optimal-denoiser weight (nearest to x_t / a)."""

    name = "nearest"
    Config = EmpiricalConfig
    capabilities = Capabilities(piecewise_constant=True, single_image_exact=True)
    merges_shards = True

    def nearest_index(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """Index [B] of the training image with the largest weight at the level ``t``."""
        return self._nearest(x_t, self.schedule.at(t))[0]

    def _nearest(self, x_t: torch.Tensor, level: NoiseLevel) -> tuple[torch.Tensor, torch.Tensor]:
        """The winners' indices [B] and images [B, n]: the first largest weight over the whole set (over
        the ranks' winners in rank order, i.e. in index order, in a torchrun job)."""
        a, b2 = level.a, level.b2
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
        best_idx = best_idx + self.train_set.offset
        rows = self.train_set.rows(best_idx)  # [B, n]
        if self.shard is not None:
            parts = gather((best, best_idx, rows))
            best, best_idx, rows = parts[0]
            for v, i, y in parts[1:]:
                better = v > best
                best, best_idx = torch.where(better, v, best), torch.where(better, i, best_idx)
                rows = torch.where(better[:, None], y, rows)
        return best_idx, rows

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        return self._nearest(x_t, level)[1].reshape(x_t.shape)
