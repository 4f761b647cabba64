"""The theory that links sensitivity fields to the data covariance, as checkable functions.

* The Wiener gain ``G_t = U diag(a^2 lam / (a^2 lam + b2)) U^T`` tends to the projector onto the data's
  support (the identity for a full-rank covariance) as noise -> 0, and to ``(a^2 / b2) Sigma`` as
  noise grows (``a^2 lam / b2 -> 0``): at high noise the fields are covariance rows.
* On stationary data (circulant covariance) every field is the same blob translated to its pixel.
* On non-stationary data (faces) the fields concentrate in the span of the leading principal
  components, which a translated generic blob does not.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from .denoisers.wiener import wiener_gain
from .schedules import DEFAULT_SCHEDULE, Schedule
from .stats import Spectrum


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def gain_limits(spec: Spectrum, timesteps: Sequence[int], schedule: Schedule = DEFAULT_SCHEDULE) -> dict:
    """Per timestep: relative Frobenius distance of G_t to the identity (on the data's support) and to
    ``(a^2/b2) Sigma``, plus ``a^2 lam_max / b2`` which bounds the second approximation's error."""
    support = spec.eigvals > spec.eigvals[0] * 1e-12
    U = spec.eigvecs[:, support]
    proj = U @ U.T  # identity on the support of Sigma
    sigma = spec.covariance()
    out = {}
    for t in timesteps:
        a, b2 = schedule.a(t), schedule.b2(t)
        G = wiener_gain(spec, a, b2)
        out[str(int(t))] = {
            "to_identity": _rel(G, proj),
            "to_scaled_covariance": _rel(G, (a * a / b2) * sigma),
            "snr_max": float(a * a * spec.eigvals[0] / b2),
        }
    return out


def translation_invariance(fields: np.ndarray, pixels: Sequence[tuple[int, int]]) -> float:
    """Largest relative difference between fields [P, C, H, W] after circularly moving each pixel to (0, 0)."""
    aligned = [np.roll(np.asarray(f), shift=(-p[0], -p[1]), axis=(-2, -1)) for f, p in zip(fields, pixels)]
    ref = aligned[0]
    return float(max(np.linalg.norm(a - ref) for a in aligned) / np.linalg.norm(ref))


def gaussian_blob(shape: tuple[int, int, int], pixel: tuple[int, int], r50: float) -> np.ndarray:
    """A generic isotropic local field: a Gaussian centred on ``pixel`` whose energy radius r50 is ``r50``.

    For energy ``exp(-d^2/s^2)`` in 2-D, half the energy lies within ``s sqrt(ln 2)``.
    """
    c, h, w = shape
    s = max(float(r50), 0.5) / np.sqrt(np.log(2.0))
    rr, cc = np.mgrid[0:h, 0:w]
    blob = np.exp(-((rr - pixel[0]) ** 2 + (cc - pixel[1]) ** 2) / (2 * s * s))
    return np.repeat(blob[None], c, axis=0) / c


def pc_energy_fraction(fld: np.ndarray, spec: Spectrum, k: int) -> float:
    """Fraction of the field's energy inside the span of the top-``k`` principal components."""
    f = torch.as_tensor(np.asarray(fld, dtype=np.float64).ravel())
    U = spec.eigvecs[:, :k].cpu()
    return float((U.T @ f).square().sum() / f.square().sum())


def pc_energy_curve(fld: np.ndarray, spec: Spectrum, ks: Sequence[int]) -> dict:
    return {str(k): pc_energy_fraction(fld, spec, k) for k in ks}
