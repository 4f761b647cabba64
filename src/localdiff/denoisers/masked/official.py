"""The masked model as the paper's published code computes it: ``masked`` with ``compat=official``
(docs/DESIGN.md §2.5).

The paper's code (github.com/ottogin/locality-in-diffusion-models, ``pca_locality.py`` and
``utils/wiener.py``) computes the same model as :mod:`.masks` in other arithmetic, and its hard threshold
turns the difference into mask flips (full MNIST, t = 100: 8,454 flipped entries, x0_hat up to 1.03 away
from the exact mode; 0.46 from the statistics alone). This module recomputes its numbers, in float32:

* statistics: the data loader's batches of ``batch`` consecutive images (its own batch size, 512 for
  the MNIST, Fashion-MNIST and CIFAR-10 configurations); the mean is the float32 sum of the batches'
  float32 column sums divided by K; the covariance the float32 sum over the batches of
  ``(Y_b - mean)^T (Y_b - mean)``, divided by ``K - 1`` (the sample covariance, not localdiff's
  population covariance); then ``torch.linalg.svd`` of it in float32, ``Sigma = U diag(lam) V^T``;
* the level: diffusers' float32 ``alphas_cumprod`` at the timestep (the official scheduler's table; a
  level without a timestep of a DDPM table: float32 ``a^2``), ``b2 = 1 - alpha_bar`` in float32;
* the gain ``G = U diag(alpha_bar lam / (b2 + alpha_bar lam)) V^T`` in float32; rows normalised by the
  diagonal, where ``|G[m, m]| < 1e-6`` is replaced by 1 *in G as well* (so such a pixel's own entry is
  1 and it stays in its own mask, unlike :func:`.masks.normalized_gain`); binarised at
  ``|N| >= float32(max |N| * tau)``.

Given the same float32 data and batches, these are the same torch operations on the same operands as
the official code, so where the arithmetic is the same (device, BLAS/LAPACK) the masks are bit-identical
(tested against fixtures made by running that code). Elsewhere they are not, and neither are the official
code's own: its threshold is set by a near-constant pixel's row, whose diagonal is mostly float32
round-off (full MNIST, t = 100: batches of 500 instead of 512 flip 14,957 of 16,448 mask entries). The
softmax is the streamed kernel's chunk-normalised variant (``chunk_average``, :mod:`.kernel`), which
agrees with the official per-chunk float32 softmax to float32 round-off (x0_hat within 1e-5).
"""

from __future__ import annotations

import functools
import warnings
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...schedules import SCHEDULES, NoiseLevel, NoiseSchedule, Schedule, schedule_named
from .masks import DIAG_EPS

OFFICIAL_BATCH = 512  # the data loader's batch size in the official MNIST, Fashion-MNIST and CIFAR-10 configs


@dataclass(frozen=True)
class OfficialStatistics:
    """The official float32 statistics: ``Sigma = U diag(lam) V^T`` (``u``, ``vh`` [n, n], ``lam`` [n]) of the
    sample covariance, the mean [n], from ``count`` images read in batches of ``batch``."""

    u: torch.Tensor  # [n, n] float32
    lam: torch.Tensor  # [n] float32, decreasing
    vh: torch.Tensor  # [n, n] float32
    mean: torch.Tensor  # [n] float32
    count: int
    batch: int

    def record(self) -> dict:
        return {"count": self.count, "batch": self.batch, "covariance": "sample (K - 1)", "dtype": "float32",
                "decomposition": "torch.linalg.svd"}


def official_statistics(data, batch: int = OFFICIAL_BATCH, device: torch.device | str = "cpu") -> OfficialStatistics:
    """Mean, sample covariance and its float32 SVD as the official code computes them from a data loader
    of ``batch`` consecutive images (two passes over ``data``, in order; float32 on ``device``)."""
    if batch < 1:
        raise ConfigError(f"the official statistics need a positive batch size, got {batch}")
    count = len(data)
    if count < 2:
        raise ConfigError(f"the official statistics divide by K - 1 and need at least 2 images, got {count}")
    n = data.dim
    total = torch.zeros(n, device=device, dtype=torch.float32)
    for y in data.chunks(batch, device=device, dtype=torch.float32, flat=True):  # [k, n]
        total += y.sum(dim=0)
    mean = total / count  # [n]
    scatter = torch.zeros((n, n), device=device, dtype=torch.float32)
    for y in data.chunks(batch, device=device, dtype=torch.float32, flat=True):
        centred = y - mean.unsqueeze(0)  # [k, n]
        scatter += centred.T @ centred  # [n, n]
    u, lam, vh = torch.linalg.svd(scatter / (count - 1))
    return OfficialStatistics(u, lam, vh, mean, count, int(batch))


@functools.lru_cache(maxsize=8)
def _alphas_cumprod(schedule: Schedule) -> torch.Tensor:
    """diffusers' float32 ``alphas_cumprod`` [T] of a DDPM table (what the official scheduler steps on)."""
    from diffusers import DDIMScheduler

    return DDIMScheduler(**schedule.scheduler_kwargs()).alphas_cumprod.to(torch.float32).clone()


def official_alpha_bar(level: NoiseLevel, schedule: NoiseSchedule | None = None) -> torch.Tensor:
    """float32 ``alpha_bar`` (0-d) of ``level``: diffusers' table entry at its timestep when the level is an
    entry of a DDPM table (``schedule``'s, or the family it names), else float32 ``a^2``."""
    candidates = [schedule] if schedule is not None else []
    if level.schedule in SCHEDULES:
        candidates.append(schedule_named(level.schedule))
    for s in candidates:
        if isinstance(s, Schedule) and s.owns(level):
            return _alphas_cumprod(s)[level.t]
    return torch.tensor(level.a * level.a, dtype=torch.float32)


def official_level(alpha_bar: torch.Tensor) -> tuple[float, float]:
    """``(a, b2)`` of the logits: float32 ``sqrt(alpha_bar)`` and ``1 - alpha_bar``."""
    return float(torch.sqrt(alpha_bar)), float(1 - alpha_bar)


def official_gain(stats: OfficialStatistics, alpha_bar: torch.Tensor) -> torch.Tensor:
    """Wiener gain ``U diag(alpha_bar lam / (b2 + alpha_bar lam)) V^T`` [n, n] in float32 (docs/DESIGN.md §2.1)."""
    ab = alpha_bar.to(stats.lam.device)
    shrink = ab * stats.lam / ((1 - ab) + ab * stats.lam)  # [n]
    return (stats.u * shrink) @ stats.vh  # U diag(shrink) exactly: one nonzero product per entry


def official_masks(stats: OfficialStatistics, alpha_bar: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary masks bool [n, n] (column i = S_i) as the official code thresholds its float32 gain."""
    if not tau > 0:
        raise ConfigError("compat=official needs tau > 0: with tau = 0 the official code skips the threshold and "
                          "weighs pixels by the normalised gain itself, a different model; use a positive tau "
                          "or compat=exact (tau=0 there means all-ones masks)")
    g = official_gain(stats, alpha_bar)  # [n, n]
    d = g.diagonal()  # a view: the official code's replacement writes into G's diagonal too
    d[d.abs() < DIAG_EPS] = 1.0
    norm = (g / d.unsqueeze(1)).abs_()  # row m by G[m, m]
    return norm >= norm.max() * tau


def lost_pixels(masks: torch.Tensor, stats: OfficialStatistics, alpha_bar: torch.Tensor) -> tuple[int, int]:
    """``(lost, varying)``: varying pixels (float32 ``G[i, i] >= 1e-6``) missing from their own mask."""
    ab = alpha_bar.to(stats.lam.device)
    shrink = ab * stats.lam / ((1 - ab) + ab * stats.lam)
    diag = ((stats.u * stats.vh.T) @ shrink).abs()  # [n] diag(U diag(shrink) V^T)
    varying = diag >= DIAG_EPS
    return int((varying & ~masks.diagonal()).sum()), int(varying.sum())


def warn_lost(name: str, label: str, lost: int, varying: int, tau: float) -> None:
    """A RuntimeWarning when ``lost`` pixels are missing from their own mask (:func:`lost_pixels`)."""
    if lost:
        warnings.warn(f"{name} (compat=official): at {label}, {lost} of the {varying} pixels with |G[i, i]| >= 1e-6 "
                      f"are missing from their own mask (tau={tau}); a nearly constant pixel dominates the official "
                      "threshold and those outputs collapse towards the mean image, as in the official code",
                      RuntimeWarning, stacklevel=4)


__all__ = ["OFFICIAL_BATCH", "OfficialStatistics", "official_statistics", "official_alpha_bar", "official_level",
           "official_gain", "official_masks", "lost_pixels", "warn_lost"]
