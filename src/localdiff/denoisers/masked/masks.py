"""The masks of the paper's analytical denoiser (docs/DESIGN.md §2.5), as the paper and its code define them.

For each output pixel i a binary mask ``S_i(t)`` is read from the Wiener gain
``G_t = U diag(a^2 lam / (a^2 lam + b2)) U^T`` (float64): each row m of ``G_t`` is normalised (by its
diagonal, the official rule, or symmetrically), the result is binarised at ``tau`` times its largest
magnitude, and column i is ``S_i``. The denoiser's logit for training image k at pixel i is

    -sum_{m in S_i} (x_t[m] - a y_k[m])^2 / (2 b2 T)                                  (masked_logits)

Masks are bool ``[n, n]`` tensors with column i = ``S_i``, pixels in (C, H, W) order.
"""

from __future__ import annotations

from typing import Literal

import torch

from ...errors import ConfigError
from ...stats import Spectrum
from ..wiener import wiener_gain, wiener_gain_eigs

Normalization = Literal["diag", "sym"]
DIAG_EPS = 1e-6  # the official code replaces |G[m, m]| < 1e-6 by 1 before dividing


def default_tau(shape: tuple[int, int, int]) -> tuple[float, str]:
    """The paper's thresholds by image shape: 0.005 for one-channel sets up to 28 px (MNIST,
    Fashion-MNIST), 0.05 up to 32 px (CIFAR-10), 0.02 above (64 px sets; also the official default)."""
    c, h, w = shape
    side = max(h, w)
    if c == 1 and side <= 28:
        return 0.005, "one channel, <= 28 px (MNIST-like): 0.005"
    if side <= 32:
        return 0.05, "<= 32 px (CIFAR-like): 0.05"
    return 0.02, "> 32 px (64 px sets): 0.02"


def normalized_gain(G: torch.Tensor, normalize: Normalization = "diag", *, inplace: bool = False) -> torch.Tensor:
    """Normalised Wiener gain [n, n]: ``G[m, i] / G[m, m]`` ("diag", the official rule: row m by its
    diagonal) or ``G[m, i] / sqrt(G[m, m] G[i, i])`` ("sym", well conditioned on near-constant pixels).
    Diagonal entries with ``|G[m, m]| < 1e-6`` are replaced by 1, as in the official code.

    ``inplace=True`` divides ``G`` itself (no second [n, n] float64 tensor: 1.2 GB at 64 px), row block by
    row block; every entry is the same single division either way, so the values are bit for bit equal."""
    if normalize not in ("diag", "sym"):
        raise ConfigError(f"normalize must be one of diag, sym, got '{normalize}'")
    d = G.diagonal().clone()
    d[d.abs() < DIAG_EPS] = 1.0
    s = d.abs().sqrt() if normalize == "sym" else None
    out = G if inplace else torch.empty_like(G)
    step = max(1, (16 << 20) // max(1, G.shape[1] * G.element_size()))  # rows of about 16 MB
    for r in range(0, G.shape[0], step):
        rows = slice(r, r + step)
        den = d[rows, None] if s is None else s[rows, None] * s[None, :]
        torch.div(G[rows], den, out=out[rows])
    return out


def threshold_masks(norm: torch.Tensor, tau: float, *, inplace: bool = False) -> torch.Tensor:
    """Binary masks [n, n]: ``|norm| >= tau * max|norm|`` (global maximum); column i is S_i.
    ``tau = 0`` gives all-ones masks (every pixel sees the whole image: the optimal denoiser).
    ``inplace=True`` overwrites ``norm`` with its magnitude instead of allocating another [n, n] tensor."""
    if tau == 0:
        return torch.ones(norm.shape, dtype=torch.bool, device=norm.device)
    mag = norm.abs_() if inplace else norm.abs()
    return mag >= tau * mag.max()


def wiener_masks(spectrum: Spectrum, a: float, b2: float, tau: float,
                 normalize: Normalization = "diag") -> torch.Tensor:
    """Masks ``S_i(t)`` from the Wiener gain, bool [n, n] with column i = S_i (computed in float64)."""
    G = wiener_gain(spectrum, a, b2).to(torch.float64)  # a new tensor of this call's own: worked on in place
    return threshold_masks(normalized_gain(G, normalize, inplace=True), tau, inplace=True)


def masked_logits(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, a: float, b2: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """``-sum_{m in S_i} (x[m] - a y_k[m])^2 / (2 b2 T)`` [B, k, n] for x [B, n], y [k, n] (plain formula)."""
    d = (x[:, None, :] - a * y[None, :, :]) ** 2  # [B, k, n]
    return -(d @ masks.to(d.dtype)) / (2 * b2 * temperature)


def pixels_outside_own_mask(masks: torch.Tensor, spectrum: Spectrum, a: float, b2: float) -> tuple[int, int]:
    """``(lost, varying)``: how many varying pixels (``G[i, i] >= 1e-6``) are missing from their own
    mask S_i, and how many pixels vary. ``diag(G) = (U * U) g`` is read in O(n^2), not from the [n, n] gain.

    With the official row-by-diagonal rule a nearly constant pixel (tiny ``G[m, m]``, common on small
    subsets) inflates the global maximum, the threshold rises above every other entry, and the outputs
    collapse to the mean image; ``lost > 0`` detects it."""
    gain_diag = spectrum.eigvecs.square() @ wiener_gain_eigs(spectrum.eigvals, a, b2)
    varying = gain_diag.abs() >= DIAG_EPS
    lost = int((varying & ~masks.diagonal().to(varying.device)).sum())
    return lost, int(varying.sum())


__all__ = ["Normalization", "DIAG_EPS", "default_tau", "normalized_gain", "threshold_masks", "wiener_masks",
           "masked_logits", "pixels_outside_own_mask"]
