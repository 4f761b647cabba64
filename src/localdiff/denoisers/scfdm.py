"""Scarvelis, Borde & Solomon 2023, "Closed-form diffusion models" (arXiv 2310.12395): the smoothed
closed-form denoiser ``scfdm`` (docs/DESIGN.md §2.6), the closed-form (optimal) score smoothed with a
Gaussian of width sigma. It has no patches: it is the optimal denoiser averaged over perturbed inputs.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from ..errors import ConfigError
from ..schedules import NoiseLevel
from .base import Capabilities, Denoiser
from .empirical import OptimalConfig, OptimalDenoiser, optimal_logits
from .stream import SoftmaxState, StreamOptions


@dataclass
class SCFDMConfig(StreamOptions):
    sigma: float = 0.1  # smoothing width, in the paper's coordinates z = x_t / (a + sqrt(b2)) (see class doc)
    smoothing: Literal["score", "data"] = "score"  # score: the paper's smoothed closed-form score (Monte Carlo
    # over num_samples); data: closed-form posterior mean of the training set blurred by N(0, sigma^2 I)
    num_samples: int = 16  # M, Gaussian perturbations averaged by the score smoothing
    seed: int = 0  # seed of those perturbations (the same M draws at every call: a deterministic map)
    nearest_k: int | None = None  # approximate: each perturbed point uses only its nearest_k training images


class SmoothedClosedFormDenoiser(Denoiser):
    """Scarvelis, Borde & Solomon's smoothed closed-form diffusion model (sigma-CFDM).

    The paper smooths the closed-form score of the training set, ``s_sigma(z) = E_eps[s(z + sigma eps)]``,
    in its interpolant coordinates ``z = tau x1 + (1 - tau) x0``; ours are ``z = x_t / (a + sqrt(b2))``,
    ``tau = a / (a + sqrt(b2))``. Because the score is affine in the denoiser and the perturbation has
    mean zero, this is the denoiser ``x0_hat_sigma(x_t) = E_eps[x0_hat_opt(x_t + sigma (a + sqrt(b2)) eps)]``.
    The expectation has no closed form; as in the paper it is a Monte Carlo average over ``num_samples``
    draws (fixed by ``seed``, shared by every input, so the map is deterministic), and ``nearest_k``
    restricts each draw's softmax to its nearest training images (the paper's nearest-neighbour estimator,
    here exact top-k). ``sigma = 0`` is exactly the ``optimal`` denoiser.

    ``smoothing=data`` is the other reading of "smoothing": the exact posterior mean when the data are the
    training images blurred by ``N(0, sigma^2 I)`` (sigma in data units): weights
    ``∝ exp(-||x_t - a y_k||^2 / (2 (a^2 sigma^2 + b2)))`` and ``E[y | x_t, k] = y_k + a sigma^2 (x_t - a y_k)
    / (a^2 sigma^2 + b2)``.
    """

    name = "scfdm"
    Config = SCFDMConfig
    capabilities = Capabilities(closed_form_jacobian=True, single_image_exact=True)
    merges_shards = True

    def __init__(self, data, config: SCFDMConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        config = self.config
        if config.smoothing == "data":  # the blurred-data posterior mean moves towards x_t
            self.capabilities = dataclasses.replace(self.capabilities, single_image_exact=False)
        if config.nearest_k is not None:  # the top-k approximation has no closed-form Jacobian
            self.capabilities = dataclasses.replace(self.capabilities, closed_form_jacobian=False)
        if not (config.sigma >= 0 and math.isfinite(config.sigma)):
            raise ConfigError(f"{self.name}: sigma must be a finite number >= 0, got {config.sigma}")
        if config.num_samples < 1:
            raise ConfigError(f"{self.name}: num_samples must be a positive integer, got {config.num_samples}")
        if config.smoothing == "data" and config.nearest_k is not None:
            raise ConfigError(f"{self.name}: nearest_k applies to smoothing=score only")
        # the optimal denoiser it smooths streams the training set (and merges the ranks' states)
        self.optimal = OptimalDenoiser(data, OptimalConfig(device=self.device, chunk=config.chunk, dtype=config.dtype,
                                                           resident=config.resident, top_k=config.nearest_k),
                                       self.schedule)
        self.dtype = self.optimal.dtype

    def perturbations(self) -> torch.Tensor:
        """The M standard-normal draws eps [M, C, H, W] (float64, CPU generator seeded by ``seed``)."""
        gen = torch.Generator().manual_seed(int(self.config.seed))
        return torch.randn((self.config.num_samples, *self.shape), generator=gen, dtype=torch.float64)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        a, b2 = level.a, level.b2
        x = x_t.to(self.dtype)
        sigma = float(self.config.sigma)
        if sigma == 0.0:
            return self.optimal.denoise(x, level)
        if self.config.smoothing == "data":
            return self._data_smoothed(x, a, b2, sigma)
        eps = self.perturbations().to(device=x.device, dtype=x.dtype)  # [M, C, H, W]
        scale = sigma * (a + math.sqrt(b2))  # sigma in z coordinates -> x_t coordinates
        B, M = x.shape[0], eps.shape[0]
        xs = (x.unsqueeze(0) + scale * eps.unsqueeze(1)).reshape(M * B, *self.shape)  # [M*B, C, H, W]
        return self.optimal.denoise(xs, level).view(M, B, *self.shape).mean(0)

    def why_no_closed_form(self) -> str:
        return f"{self.name}: nearest_k (the top-k approximation) has no closed-form Jacobian; use autograd"

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` [B, Q, n], streamed like the denoiser (no autograd graph,
        which would keep every training block alive: memory in K n instead of one block).

        ``smoothing=score``: the perturbation does not depend on ``x_t``, so the Jacobian is the mean over the
        M draws of the optimal denoiser's closed form at the perturbed inputs, ``(a / b2) Cov_w(y)``.
        ``smoothing=data``: ``x0_hat = y_bar + c (x_t - a y_bar)`` with ``c = a sigma^2 / v``,
        ``v = a^2 sigma^2 + b2`` and ``y_bar`` the softmax mean at variance v, so
        ``J = (1 - a c) (a / v) Cov_w(y) + c I``."""
        a, b2 = level.a, level.b2
        x = x_t.to(self.dtype)
        sigma = float(self.config.sigma)
        if sigma == 0.0:
            return self.optimal.closed_form_rows(x, level, index)
        if self.config.smoothing == "data":
            v = a * a * sigma * sigma + b2
            c = a * sigma * sigma / v
            xf = x.reshape(x.shape[0], -1)
            state = self.optimal.fold(lambda _, y, y_sq: SoftmaxState.moments(
                optimal_logits(xf, y, y_sq, a, v).unsqueeze(1), y, index))
            rows = ((1.0 - a * c) * a / v) * state.covariance_rows(index)  # [B, Q, n]
            rows[:, torch.arange(len(index), device=rows.device), index] += c
            return rows
        eps = self.perturbations().to(device=x.device, dtype=x.dtype)
        scale = sigma * (a + math.sqrt(b2))
        B, M = x.shape[0], eps.shape[0]
        xs = (x.unsqueeze(0) + scale * eps.unsqueeze(1)).reshape(M * B, *self.shape)
        return self.optimal.closed_form_rows(xs, level, index).view(M, B, len(index), -1).mean(0)

    def _data_smoothed(self, x, a, b2, sigma):
        v = a * a * sigma * sigma + b2  # variance of x_t given the component k
        xf = x.reshape(x.shape[0], -1)
        xs = self.optimal.rank_input(xf)  # this rank's share; x also enters directly below
        y_bar = self.optimal.fold(lambda _, y, y_sq: SoftmaxState.of(optimal_logits(xs, y, y_sq, a, v), y)).mean()
        return (y_bar + (a * sigma * sigma / v) * (xf - a * y_bar)).view_as(x)


__all__ = ["SCFDMConfig", "SmoothedClosedFormDenoiser"]
