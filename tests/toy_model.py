"""A model added the way a user adds one: this file, written against localdiff's public extension points
only, and one line, ``register_model(ToyDenoiser)`` (the tests run it in ``model_table.added_models``;
a user's script runs it once before ``make_denoiser("toy", ...)`` or ``run_study``).

``toy`` is the empirical optimal denoiser at a softmax temperature T (docs/DESIGN.md §2.3 with ``b2``
replaced by ``b2 T``):

    w_k ∝ exp(-||x_t - a y_k||^2 / (2 b2 T)),      x0_hat = sum_k w_k y_k,

whose Jacobian is ``d x0_hat / d x_t = (a / (b2 T)) Cov_w(y)``. T = 1 is ``optimal``; a larger T spreads
the weights over more training images. It streams the training set like the library's own models: the
state of one block from its logits (``SoftmaxState.from_logits``, ``SoftmaxState.moments``), blocks and
then ranks merged by ``StreamedDenoiser.fold``, and ``rank_input`` marking this rank's share for autograd.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from localdiff.denoisers import Capabilities
from localdiff.denoisers.stream import SoftmaxState, StreamedDenoiser, StreamOptions
from localdiff.errors import ConfigError
from localdiff.schedules import NoiseLevel


@dataclass
class ToyConfig(StreamOptions):
    temperature: float = 2.0  # softmax temperature T (1: the optimal denoiser)


class ToyDenoiser(StreamedDenoiser):
    """The optimal denoiser at temperature T (module docstring)."""

    name = "toy"
    Config = ToyConfig
    capabilities = Capabilities(closed_form_jacobian=True, single_image_exact=True)
    merges_shards = True  # fold() merges the ranks' softmax states exactly

    def validate(self) -> None:
        T = self.config.temperature
        if not (isinstance(T, (int, float)) and math.isfinite(T) and T > 0):
            raise ConfigError(f"toy: temperature must be a positive number, got {T}")

    def logits(self, x: torch.Tensor, y: torch.Tensor, y_sq: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        """``-||x - a y_k||^2 / (2 b2 T)`` up to a constant in k, [B, k], for queries ``x`` [B, n], images
        ``y`` [k, n] and their squared norms ``y_sq`` [k]."""
        a, v = level.a, level.b2 * self.config.temperature
        return (a * (x @ y.T) - (0.5 * a * a) * y_sq) / v

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        x = self.rank_input(x_t.reshape(x_t.shape[0], -1).to(self.dtype))  # [B, n]
        state = self.fold(lambda _, y, y_sq: SoftmaxState.from_logits(self.logits(x, y, y_sq, level), 1,
                                                                      lambda e: e @ y))  # acc [B, n]
        return state.mean().reshape(x_t.shape)

    def closed_form_rows(self, x_t: torch.Tensor, level, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``(a / (b2 T)) Cov_w(y)`` at each input ``x_t`` [B, C, H, W]: [B, Q, n]."""
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=self.dtype)  # [B, n]
        state = self.fold(lambda _, y, y_sq: SoftmaxState.moments(self.logits(x, y, y_sq, level).unsqueeze(1), y,
                                                                  index))  # one softmax per query: [B, 1, k]
        rows = (level.a / (level.b2 * self.config.temperature)) * state.covariance_rows(index)
        return rows.to(torch.float64)


__all__ = ["ToyConfig", "ToyDenoiser"]
