"""Synthetic datasets with known second-order statistics (deterministic from a seed).

``grf``: stationary Gaussian random fields on a periodic grid with a power-law spectrum
``S(k) ∝ (|k|^2 + k0^2)^(-alpha/2)``; ``anisotropy`` > 1 stretches the correlation length along the
rows (axis 1, vertical) by that factor. The covariance is circulant (translation-invariant with
wrap-around) and known in closed form (:func:`grf_covariance`), which makes the set a controlled test
of how Wiener fields follow the data's correlations.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .dataset import ImageDataset


def grf_spectrum(size: int, alpha: float, anisotropy: float = 1.0, k0: float = 1.0) -> np.ndarray:
    """Power spectrum [size, size] on the FFT grid (integer wave numbers), normalised to unit mean."""
    k = np.fft.fftfreq(size) * size
    ky, kx = np.meshgrid(k, k, indexing="ij")
    # stretching the correlation length by s along rows compresses the spectrum by s along ky
    k2 = (ky * anisotropy) ** 2 + kx**2
    s = (k2 + k0**2) ** (-alpha / 2.0)
    return s / s.mean()


def grf_covariance(size: int, alpha: float, anisotropy: float = 1.0, k0: float = 1.0,
                   scale: float = 1.0) -> np.ndarray:
    """Exact covariance [n, n] of :func:`gaussian_random_field` samples before quantisation (float64)."""
    spec = grf_spectrum(size, alpha, anisotropy, k0)
    acf = np.real(np.fft.ifft2(spec))  # autocovariance of unit-mean-spectrum white-noise filtering
    rr, cc = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    r, c = rr.ravel(), cc.ravel()
    cov = acf[(r[:, None] - r[None, :]) % size, (c[:, None] - c[None, :]) % size]
    return cov * scale**2


def gaussian_random_field(num: int = 20000, size: int = 16, *, alpha: float = 3.0, anisotropy: float = 1.0,
                          k0: float = 1.0, std: float = 0.25, seed: int = 0, name: str = "grf") -> ImageDataset:
    """``num`` samples [num, 1, size, size] of a zero-mean stationary GRF with pixel std ``std``.

    Samples are white noise filtered by sqrt(spectrum) in Fourier space (periodic boundary), scaled
    to the requested standard deviation, and clipped to [-1, 1] only if a rare value exceeds it (with
    std 0.25 that is a 4-sigma event; the count is recorded in ``meta``).
    """
    if num < 1 or size < 2:
        raise DataError(f"grf needs num >= 1 and size >= 2, got num={num}, size={size}")
    if alpha < 0 or anisotropy <= 0 or std <= 0:
        raise DataError("grf needs alpha >= 0, anisotropy > 0 and std > 0")
    rng = np.random.default_rng(seed)
    amp = np.sqrt(grf_spectrum(size, alpha, anisotropy, k0))
    out = np.empty((num, 1, size, size), dtype=np.float32)
    for start in range(0, num, 4096):
        m = min(4096, num - start)
        white = rng.standard_normal((m, size, size))
        field = np.real(np.fft.ifft2(np.fft.fft2(white) * amp))
        out[start:start + m, 0] = field * std
    clipped = int((np.abs(out) > 1).sum())
    np.clip(out, -1.0, 1.0, out=out)
    meta = {"kind": "gaussian-random-field", "num": num, "size": size, "alpha": alpha,
            "anisotropy": anisotropy, "k0": k0, "std": std, "seed": seed, "clipped_values": clipped}
    return ImageDataset(raw=out, name=name, meta=meta)
