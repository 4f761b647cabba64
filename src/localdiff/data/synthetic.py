"""Synthetic datasets with known second-order statistics (deterministic from a seed).

``grf``: stationary Gaussian random fields on a periodic grid with a power-law spectrum
``S(k) ∝ (|k|^2 + k0^2)^(-alpha/2)``; ``anisotropy`` > 1 stretches the correlation length along the
rows (axis 1, vertical) by that factor. The covariance is circulant (translation-invariant with
wrap-around) and known in closed form (:func:`grf_covariance`), which makes the set a controlled test
of how Wiener fields follow the data's correlations; :func:`correlation_length_ratio` measures how far
``anisotropy`` stretches them.

``grf-varying``: a non-stationary field, white noise blurred by a Gaussian kernel whose width grows
linearly from the left column to the right one (:func:`varying_blur_field`); its covariance ``K K^T``
is exact too (:func:`varying_blur_covariance`), so locality can be checked to follow the data from one
side of the image to the other.
"""

from __future__ import annotations

import numpy as np

from ..errors import DataError
from .dataset import DEFAULT_CHUNK, ImageDataset


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
    for start in range(0, num, DEFAULT_CHUNK):
        m = min(DEFAULT_CHUNK, num - start)
        white = rng.standard_normal((m, size, size))
        field = np.real(np.fft.ifft2(np.fft.fft2(white) * amp))
        out[start:start + m, 0] = field * std
    clipped = int((np.abs(out) > 1).sum())
    np.clip(out, -1.0, 1.0, out=out)
    meta = {"kind": "gaussian-random-field", "num": num, "size": size, "alpha": alpha,
            "anisotropy": anisotropy, "k0": k0, "std": std, "seed": seed, "clipped_values": clipped}
    return ImageDataset(raw=out, name=name, meta=meta)


# ------------------------------------------------------------------------------------------------
# correlation lengths along the two image axes, from an exact covariance
# ------------------------------------------------------------------------------------------------


def correlation_lengths(cov: np.ndarray, shape: tuple[int, ...]) -> tuple[float, float]:
    """Lattice Taylor microscales ``(l_vertical, l_horizontal)`` in pixels of a covariance [n, n].

    ``rho_v`` (``rho_h``) is the correlation of vertically (horizontally) adjacent pixels, averaged over
    every such pair in the image (channels are not mixed); the length is ``l = 1 / sqrt(2 (1 - rho))``,
    which recovers ``l`` for a smooth field whose autocorrelation starts as ``1 - d^2 / (2 l^2)``.
    It is read from neighbouring pixels only, so unlike the distance at which the autocorrelation
    falls to 0.5 (or its second moment) it is defined for any covariance and does not saturate when
    the correlation outgrows the image: on grf-aniso's 16 px default the vertical autocorrelation
    never falls below 0.8, while this length stays finite and the ratio is the same from 16 to 64 px.
    ``shape`` is ``(H, W)`` or ``(C, H, W)``; float64 throughout.
    """
    cov = np.asarray(cov, dtype=np.float64)
    c, h, w = (1, *shape) if len(shape) == 2 else tuple(shape)
    n = c * h * w
    if cov.shape != (n, n):
        raise DataError(f"covariance of shape {cov.shape} does not match images of shape {tuple(shape)} "
                        f"(expected [{n}, {n}])")
    if h < 2 or w < 2:
        raise DataError(f"correlation lengths need at least 2 x 2 pixels, got {h} x {w}")
    idx = np.arange(n).reshape(c, h, w)
    std = np.sqrt(np.clip(np.diag(cov), 0.0, None))
    if not (std > 0).all():
        raise DataError("correlation lengths need every pixel to vary (a zero-variance pixel has no correlation); "
                        "crop constant pixels away first")

    def length(i: np.ndarray, j: np.ndarray) -> float:
        rho = float(np.mean(cov[i, j] / (std[i] * std[j])))  # mean correlation of adjacent pairs
        return float("inf") if rho >= 1.0 else 1.0 / np.sqrt(2.0 * (1.0 - rho))

    vertical = length(idx[:, :-1, :].ravel(), idx[:, 1:, :].ravel())
    horizontal = length(idx[:, :, :-1].ravel(), idx[:, :, 1:].ravel())
    return vertical, horizontal


def correlation_length_ratio(cov: np.ndarray, shape: tuple[int, ...]) -> float:
    """``l_vertical / l_horizontal`` of :func:`correlation_lengths`: 1 for isotropic data, > 1 when the
    correlations stretch along the vertical axis (as ``grf``'s ``anisotropy`` > 1 makes them)."""
    vertical, horizontal = correlation_lengths(cov, shape)
    return vertical / horizontal


# ------------------------------------------------------------------------------------------------
# grf-varying: a non-stationary field, white noise blurred by a Gaussian whose width grows to the right
# ------------------------------------------------------------------------------------------------


def varying_blur_sigmas(size: int, sigma_left: float = 0.5, sigma_right: float = 3.0) -> np.ndarray:
    """Kernel width [size] per column: linear from ``sigma_left`` (column 0) to ``sigma_right`` (last)."""
    return np.linspace(sigma_left, sigma_right, size, dtype=np.float64)


def varying_blur_kernel(size: int, sigma_left: float = 0.5, sigma_right: float = 3.0) -> np.ndarray:
    """``K`` [size^2, m], float64: row i is pixel i's Gaussian kernel over a padded white-noise grid.

    The noise grid extends ``ceil(4 sigma_right)`` pixels beyond every side of the image, so no kernel
    is cut at the border; each row has unit L2 norm, so every pixel has unit variance and only the
    correlation length changes across the image (``x = K w`` with white ``w`` has covariance ``K K^T``).
    """
    if size < 2:
        raise DataError(f"grf-varying needs size >= 2, got {size}")
    if not (sigma_left > 0 and sigma_right > 0):
        raise DataError(f"grf-varying needs positive kernel widths, got sigma_left={sigma_left}, "
                        f"sigma_right={sigma_right}")
    pad = int(np.ceil(4.0 * max(sigma_left, sigma_right)))
    grid = np.arange(-pad, size + pad, dtype=np.float64)  # noise-grid coordinates, in image pixels
    sig = varying_blur_sigmas(size, sigma_left, sigma_right)
    r = np.arange(size, dtype=np.float64)
    # separable Gaussian: g_i(u, v) = exp(-(u - r_i)^2 / 2s^2) exp(-(v - c_i)^2 / 2s^2), s = sigma(c_i)
    gy = np.exp(-((grid[None, None, :] - r[:, None, None]) ** 2) / (2 * sig[None, :, None] ** 2))  # [row, col, u]
    gx = np.exp(-((grid[None, :] - r[:, None]) ** 2) / (2 * sig[:, None] ** 2))  # [col, v]
    K = gy[:, :, :, None] * gx[None, :, None, :]  # [row, col, u, v]
    K = K.reshape(size * size, grid.size * grid.size)
    return K / np.linalg.norm(K, axis=1, keepdims=True)


def varying_blur_covariance(size: int, sigma_left: float = 0.5, sigma_right: float = 3.0,
                            scale: float = 1.0) -> np.ndarray:
    """Exact covariance ``scale^2 K K^T`` [n, n] (float64) of :func:`varying_blur_field` before quantisation."""
    K = varying_blur_kernel(size, sigma_left, sigma_right)
    return (K @ K.T) * scale**2


def varying_blur_field(num: int = 20000, size: int = 16, *, sigma_left: float = 0.5, sigma_right: float = 3.0,
                       std: float = 0.25, seed: int = 0, name: str = "grf-varying") -> ImageDataset:
    """``num`` samples [num, 1, size, size] of a zero-mean non-stationary Gaussian field with pixel std ``std``.

    White noise blurred by a Gaussian kernel whose width grows linearly across the columns
    (:func:`varying_blur_kernel`); short-range correlations on the left, long-range on the right. Values
    beyond [-1, 1] (a 4-sigma event at std 0.25) are clipped and counted in ``meta``.
    """
    if num < 1:
        raise DataError(f"grf-varying needs num >= 1, got num={num}")
    if std <= 0:
        raise DataError(f"grf-varying needs std > 0, got {std}")
    K = varying_blur_kernel(size, sigma_left, sigma_right)
    rng = np.random.default_rng(seed)
    out = np.empty((num, 1, size, size), dtype=np.float32)
    for start in range(0, num, DEFAULT_CHUNK):
        m = min(DEFAULT_CHUNK, num - start)
        white = rng.standard_normal((m, K.shape[1]))  # [m, padded grid]
        out[start:start + m, 0] = ((white @ K.T) * std).reshape(m, size, size)  # x = K w
    clipped = int((np.abs(out) > 1).sum())
    np.clip(out, -1.0, 1.0, out=out)
    meta = {"kind": "varying-blur-field", "num": num, "size": size, "sigma_left": sigma_left,
            "sigma_right": sigma_right, "std": std, "seed": seed, "clipped_values": clipped}
    return ImageDataset(raw=out, name=name, meta=meta)
