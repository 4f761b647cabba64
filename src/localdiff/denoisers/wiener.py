"""The Wiener filter (``wiener``): the Gaussian posterior mean, the optimal linear denoiser for data with
mean mu and covariance Sigma (docs/DESIGN.md §2.1), and the Wiener gain the masked model reads its masks from."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..schedules import NoiseLevel
from ..stats import Spectrum, data_spectrum
from .base import Capabilities, Denoiser, DenoiserConfig


def wiener_shrinkage(lam: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """Eigenvalues of the Wiener Jacobian ``J_t``: ``a lam / (a^2 lam + b2)`` (docs/DESIGN.md §2.1)."""
    return a * lam / (a * a * lam + b2)


def wiener_gain_eigs(lam: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """Eigenvalues of the Wiener gain ``G_t = a J_t``: ``a^2 lam / (a^2 lam + b2)`` (docs/DESIGN.md §2.5)."""
    return a * a * lam / (a * a * lam + b2)


def wiener_gain(spec: Spectrum, a: float, b2: float) -> torch.Tensor:
    """``G_t = U diag(a^2 lam / (a^2 lam + b2)) U^T`` [n, n], float64."""
    U = spec.eigvecs
    return (U * wiener_gain_eigs(spec.eigvals, a, b2)) @ U.T


def wiener_jacobian(spec: Spectrum, a: float, b2: float) -> torch.Tensor:
    """``J_t = d x0_hat / d x_t = U diag(a lam / (a^2 lam + b2)) U^T`` [n, n]; row i is pixel i's field."""
    U = spec.eigvecs
    return (U * wiener_shrinkage(spec.eigvals, a, b2)) @ U.T


def wiener_apply(spec: Spectrum, x_t: torch.Tensor, a: float, b2: float) -> torch.Tensor:
    """``x0_hat = mu + U diag(a lam/(a^2 lam + b2)) U^T (x_t - a mu)`` for flat ``x_t`` [B, n]."""
    z = (x_t - a * spec.mean) @ spec.eigvecs  # [B, n] in the eigenbasis
    return spec.mean + (z * wiener_shrinkage(spec.eigvals, a, b2)) @ spec.eigvecs.T


@dataclass
class WienerConfig(DenoiserConfig):
    cache: bool = True  # reuse the on-disk statistics cache


class WienerDenoiser(Denoiser):
    """The Gaussian posterior mean: optimal among linear maps, computed in float64 from the data spectrum."""

    name = "wiener"
    Config = WienerConfig
    capabilities = Capabilities(closed_form_jacobian=True, constant_jacobian=True, single_image_exact=True)
    uses_statistics = True
    merges_shards = True  # through its statistics: data_spectrum merges the ranks' moments

    def __init__(self, data, config: WienerConfig, schedule=None, *, spectrum: Spectrum | None = None):
        super().__init__(data.shape, config, schedule)
        spec = spectrum if spectrum is not None else data_spectrum(data, device=self.device, cache=config.cache)
        self.spectrum = spec.to(self.device)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1).to(torch.float64)
        return wiener_apply(self.spectrum, x, level.a, level.b2).reshape(x_t.shape)

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` of the (input-independent) Jacobian, repeated for each input: [B, Q, n]."""
        a, b2 = level.a, level.b2
        U = self.spectrum.eigvecs
        rows = (U[index] * wiener_shrinkage(self.spectrum.eigvals, a, b2)) @ U.T  # [Q, n]
        return rows.unsqueeze(0).expand(x_t.shape[0], -1, -1)

    def jacobian(self, t) -> torch.Tensor:
        """The exact, input-independent Jacobian [n, n] at the level ``t`` (a timestep or a NoiseLevel)."""
        level = self.schedule.at(t)
        return wiener_jacobian(self.spectrum, level.a, level.b2)
