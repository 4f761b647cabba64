"""What a dataset's covariance spectrum says: eigenvalue decay, effective rank, variance held by the top
components, and the top principal components as images (docs/DESIGN.md §1: ``Sigma = U diag(lam) U^T``).

Definitions (recorded in probe.json): with ``p_k = lam_k / sum(lam)``,

- effective rank (Roy & Vetterli 2007) ``exp(-sum_k p_k log p_k)``: n for white data, 1 for one direction;
- participation ratio ``(sum lam)^2 / sum lam^2``: the same two limits, more sensitive to the leading values;
- ``top_k_fraction[k] = sum_{j<k} p_j``, and the number of components that hold 90% / 99% of the variance.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..stats import Spectrum

TOP_K = (1, 5, 10, 20, 50, 100)
DEFINITIONS = {
    "effective_rank": "exp(entropy of lam / sum(lam)) (Roy & Vetterli 2007)",
    "participation_ratio": "(sum lam)^2 / sum lam^2",
    "top_k_fraction": "share of the total variance held by the k largest eigenvalues",
    "principal_components": "eigenvectors of the covariance (unit norm, sign: largest entry positive), as images",
}


@dataclass(frozen=True)
class SpectrumSummary:
    """Eigenvalues [n] (descending, float64) and the scalar summaries of :func:`summarize_spectrum`."""

    eigenvalues: np.ndarray
    total_variance: float
    effective_rank: float
    participation_ratio: float
    top_k_fraction: dict[int, float]
    components_for_90pct: int
    components_for_99pct: int

    def record(self, max_values: int | None = None) -> dict:
        lam = self.eigenvalues if max_values is None else self.eigenvalues[:max_values]
        return {"total_variance": self.total_variance, "effective_rank": self.effective_rank,
                "participation_ratio": self.participation_ratio,
                "top_k_fraction": {str(k): v for k, v in self.top_k_fraction.items()},
                "components_for_90pct": self.components_for_90pct,
                "components_for_99pct": self.components_for_99pct,
                "eigenvalues": [float(f"{v:.6g}") for v in lam]}


def summarize_spectrum(spec: Spectrum) -> SpectrumSummary:
    """Decay summaries of ``spec.eigvals`` (float64); a zero covariance has rank 0 and no fractions."""
    lam = spec.eigvals.detach().to("cpu", torch.float64).numpy().clip(min=0.0)
    total = float(lam.sum())
    n = lam.size
    if not total > 0:
        return SpectrumSummary(lam, 0.0, 0.0, 0.0, {k: float("nan") for k in TOP_K if k <= n}, 0, 0)
    p = lam / total
    nz = p[p > 0]
    eff = float(np.exp(-(nz * np.log(nz)).sum()))
    pr = float(total**2 / (lam**2).sum())
    cum = np.cumsum(p)
    fractions = {k: float(cum[k - 1]) for k in TOP_K if k <= n}
    need = lambda f: int(min(n, np.searchsorted(cum, f - 1e-12) + 1))  # noqa: E731
    return SpectrumSummary(lam, total, eff, pr, fractions, need(0.9), need(0.99))


def principal_components(spec: Spectrum, shape: tuple[int, int, int], k: int = 8) -> np.ndarray:
    """The ``k`` leading eigenvectors as images [k, C, H, W] (float32), each signed so that its entry of
    largest magnitude is positive (an eigenvector's sign is arbitrary; this makes pictures reproducible)."""
    k = min(int(k), spec.dim)
    U = spec.eigvecs[:, :k].detach().to("cpu", torch.float64).T  # [k, n]
    peak = U.gather(1, U.abs().argmax(dim=1, keepdim=True))  # [k, 1]
    U = U * torch.where(peak < 0, -1.0, 1.0)
    return U.reshape(k, *shape).to(torch.float32).numpy()


__all__ = ["SpectrumSummary", "summarize_spectrum", "principal_components", "TOP_K", "DEFINITIONS"]
