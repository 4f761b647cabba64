"""Every pixel's Wiener sensitivity field, summarised as maps over the image (docs/DESIGN.md §2.1, §2.5, §3).

The Wiener Jacobian ``J_t = U diag(a lam / (a^2 lam + b2)) U^T`` does not depend on the input, so row i is
the exact field of output pixel i (no noise draws). For one noise level the gain ``G_t = a J_t`` is
computed once in float64 from the spectrum (the masks are read from it exactly as the masked denoiser
reads them, and ``J_t = G_t / a``), and every pixel's field is summarised with vectorised tensor operations:

- the *field* of image position p is ``F_p[c', q] = mean_c J[(c, p), (c', q)]`` (the mean over output
  channels, as :mod:`localdiff.sensitivity` does; one channel: row p of J), and its *mass* at position
  q is ``m_p[q] = sum_c' |F_p[c', q]|`` (colour images: summed over input channels);
- *extent* ``r90`` (and ``r50``): the smallest Euclidean distance r from p (pixel centres) such that the
  positions within r hold at least 90% (50%) of the mass; a field that is zero everywhere has none (NaN);
  the *energy extent* ``energy_r90`` is the same radius for the energy ``sum_c' F_p[c', q]^2`` instead of
  the mass (the r90 of docs/DESIGN.md §3 and of ``localdiff fields``). A field whose mass is below
  ``1e-9`` of the level's largest is taken as zero (a pixel that never varies, up to round-off). The mass counts the field's long
  tail of small values at full weight, the energy hardly at all: on MNIST at t = 100 the median
  ``r90`` is 20 px while the median ``energy_r90`` is 1.4 px;
- *anisotropy*: the mass-weighted second moments about p, ``M = sum_q m_p[q] d d^T / sum_q m_p[q]`` with
  ``d = (column offset, -row offset)`` (x to the right, y up), eigenvalues ``l1 >= l2``; the axis ratio
  is ``sqrt(l1 / l2)`` (1 = isotropic) and the angle of the major axis is in degrees from the horizontal,
  counter-clockwise as seen on screen, in [0, 180) (90 = vertical);
- *stationarity*: how far the field is from being the same everywhere, read as the spread of the
  extents across positions (interquartile range, standard deviation, coefficient of variation);
- the paper's *mask* at its tau (:func:`localdiff.denoisers.masks.wiener_masks`, the masked denoiser's
  own rule), as positions: position q is in p's mask when any channel of q is in the mask of any output
  channel of p; its size, and its Chebyshev radius ``max_q max(|dr|, |dc|)``: the half-width of the
  square window a convolutional network must see to read the whole mask.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from ..denoisers.masked.masks import Normalization, normalized_gain, threshold_masks
from ..denoisers.wiener import wiener_gain
from ..distributed import tqdm
from ..errors import ConfigError
from ..stats import Spectrum
from ..schedules import NoiseLevel

EXTENT_FRACTION = 0.9
ZERO_FIELD = 1e-9  # a field with less mass than this share of the level's largest one is zero (round-off)
DEFINITIONS = {
    "field": "F_p[c', q] = mean over output channels c of J_t[(c, p), (c', q)], J_t the exact Wiener Jacobian "
             "(docs/DESIGN.md §2.1); one channel: row p of J_t",
    "mass": "m_p[q] = sum over input channels c' of |F_p[c', q]|",
    "extent": "r90: smallest Euclidean distance r (pixels, between pixel centres) from p such that the positions "
              "within r hold >= 90% of the mass m_p (r50: 50%); NaN (null) where the field is zero (its mass below "
              "1e-9 of the level's largest: a pixel that never varies)",
    "energy_extent": "energy_r90: the same radius for the energy sum over c' of F_p[c', q]^2 (the r90 of "
                     "docs/DESIGN.md §3 and of `localdiff fields`)",
    "anisotropy": "mass-weighted second moments about p, M = sum_q m_p[q] d d^T / sum_q m_p[q], d = (column offset, "
                  "-row offset); axis_ratio = sqrt(l1 / l2) of M's eigenvalues, angle_deg = direction of the major "
                  "axis from the horizontal, counter-clockwise on screen, in [0, 180) (90 = vertical)",
    "stationarity": "spread of r90 across positions with a non-zero field: interquartile range, standard deviation "
                    "and coefficient of variation (std / mean), and the interquartile range of energy_r90; 0 for a "
                    "field that is the same everywhere",
    "mask": "the paper's mask S_i(t) at tau (masked denoiser's rule, docs/DESIGN.md §2.5); position q is in p's "
            "mask when any channel of q is in the mask of any output channel of p; size = positions in it",
    "mask_radius": "Chebyshev radius of the mask, max over its positions of max(|row offset|, |column offset|): "
                   "the half-width of the square window that holds the whole mask",
    "display_field": "what the page shows and sample_fields holds: sum over input channels of F_p, [H, W]",
}


@dataclass(frozen=True)
class Geometry:
    """Offsets between every pair of positions of an H x W grid (float64 [P, P], P = H*W, row-major), and
    each row's positions sorted by distance from it."""

    h: int
    w: int
    dr: torch.Tensor  # [P, P] row(q) - row(p)
    dc: torch.Tensor  # [P, P] col(q) - col(p)
    order: torch.Tensor  # [P, P] int64: positions by increasing distance from p (stable)
    sorted_dist: torch.Tensor  # [P, P] the distances in that order

    @property
    def dist(self) -> torch.Tensor:
        return torch.hypot(self.dr, self.dc)

    @property
    def chebyshev(self) -> torch.Tensor:
        return torch.maximum(self.dr.abs(), self.dc.abs())


@functools.lru_cache(maxsize=4)
def geometry(h: int, w: int) -> Geometry:
    """The :class:`Geometry` of an ``h`` x ``w`` grid (cached: the same for every level and dataset)."""
    rr, cc = torch.meshgrid(torch.arange(h, dtype=torch.float64), torch.arange(w, dtype=torch.float64), indexing="ij")
    r, c = rr.reshape(-1), cc.reshape(-1)
    dr, dc = r[None, :] - r[:, None], c[None, :] - c[:, None]  # [P, P]
    dist = torch.hypot(dr, dc)
    sorted_dist, order = torch.sort(dist, dim=1, stable=True)
    return Geometry(h, w, dr, dc, order, sorted_dist)


def position_fields(J: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """Fields of every position from a Jacobian [n, n] (row = output element): [P, C, P], the mean over
    output channels (``F_p[c', q]``)."""
    c, h, w = shape
    p = h * w
    if J.shape != (c * p, c * p):
        raise ConfigError(f"a Jacobian of shape {tuple(J.shape)} does not match images of shape {shape}")
    return J.reshape(c, p, c, p).mean(dim=0)  # [P, C, P]


def mass_radius(mass: torch.Tensor, geo: Geometry, fraction: float = EXTENT_FRACTION) -> torch.Tensor:
    """Radius [P] holding ``fraction`` of each row's mass ``mass`` [P, P] (row p: mass around position p).

    Per row, the mass is sorted by distance from p, accumulated and normalised, and the first distance at
    which it reaches ``fraction`` is read off (ties at equal distance do not change the answer). NaN for
    a row with no mass."""
    m = mass.to(torch.float64).gather(1, geo.order.to(mass.device))  # [P, P] by distance
    cum = torch.cumsum(m, dim=1)
    total = cum[:, -1:]
    safe = torch.where(total > 0, total, torch.ones_like(total))
    target = torch.full_like(total, fraction - 1e-12)
    idx = torch.searchsorted((cum / safe).contiguous(), target).clamp_max(m.shape[1] - 1)  # [P, 1]
    r = geo.sorted_dist.to(mass.device).gather(1, idx)[:, 0]
    return torch.where(total[:, 0] > 0, r, torch.full_like(r, math.nan))


def second_moments(mass: torch.Tensor, geo: Geometry) -> tuple[torch.Tensor, torch.Tensor]:
    """``(axis_ratio, angle_deg)`` [P] of each row's mass distribution about its own position (see the
    module's definition). A row with no mass, or all its mass on p, gives NaN; mass on one line gives inf."""
    m = mass.to(torch.float64)
    total = m.sum(dim=1)
    wgt = m / torch.where(total > 0, total, torch.ones_like(total))[:, None]
    x, y = geo.dc.to(m.device), -geo.dr.to(m.device)
    mxx, myy, mxy = (wgt * x * x).sum(1), (wgt * y * y).sum(1), (wgt * x * y).sum(1)
    half_tr, half_diff = 0.5 * (mxx + myy), 0.5 * (mxx - myy)
    rad = torch.sqrt(half_diff**2 + mxy**2)
    l1, l2 = half_tr + rad, (half_tr - rad).clamp_min(0.0)
    ratio = torch.sqrt(l1 / l2)  # l2 = 0 < l1: inf
    angle = torch.rad2deg(0.5 * torch.atan2(2 * mxy, mxx - myy)) % 180.0
    undefined = ~(total > 0) | ~(l1 > 1e-12 * (1 + half_tr))
    ratio = torch.where(undefined, torch.full_like(ratio, math.nan), ratio)
    angle = torch.where(undefined, torch.full_like(angle, math.nan), angle)
    return ratio, angle


def position_masks(masks: torch.Tensor, shape: tuple[int, int, int]) -> torch.Tensor:
    """The masks ``[n, n]`` (column i = S_i, docs/DESIGN.md §2.5) as positions: bool [P, P], row p = the
    positions q with any channel in the mask of any output channel of p."""
    c, h, w = shape
    p = h * w
    return masks.T.reshape(c, p, c, p).any(dim=2).any(dim=0)


@dataclass
class LevelFields:
    """One noise level of one dataset: maps [P] (float64) and, for the explorer, the display fields
    [P, P] (float32: row p = position p's field summed over input channels) and position masks [P, P]."""

    level: NoiseLevel
    r90: torch.Tensor
    r50: torch.Tensor
    energy_r90: torch.Tensor
    axis_ratio: torch.Tensor
    angle_deg: torch.Tensor
    mask_size: torch.Tensor
    mask_radius: torch.Tensor
    display: torch.Tensor
    masks: torch.Tensor


def level_fields(spec: Spectrum, shape: tuple[int, int, int], level: NoiseLevel, tau: float,
                 normalize: Normalization = "diag") -> LevelFields:
    """Fields, extents, anisotropy and masks of every position at one level, from the spectrum (float64)."""
    c, h, w = shape
    if spec.dim != c * h * w:
        raise ConfigError(f"a spectrum of dimension {spec.dim} does not match images of shape {shape}")
    geo = geometry(h, w)
    G = wiener_gain(spec, level.a, level.b2).to(torch.float64)  # [n, n], G_t = a J_t (§2.1)
    pm = position_masks(threshold_masks(normalized_gain(G, normalize), tau), shape).cpu()  # = wiener_masks, [P, P]
    F = position_fields(G / level.a, shape)  # [P, C, P]: J_t = G_t / a, one product per level
    del G
    mass = F.abs().sum(dim=1).cpu()  # [P, P]
    energy = F.square().sum(dim=1).cpu()  # [P, P]
    total = mass.sum(dim=1)
    zero = total <= ZERO_FIELD * total.max()  # a constant pixel's field, up to the eigendecomposition's round-off
    mass[zero], energy[zero] = 0.0, 0.0
    display = F.sum(dim=1).to("cpu", torch.float32)  # [P, P]
    del F
    ratio, angle = second_moments(mass, geo)
    cheb = torch.where(pm, geo.chebyshev, torch.full_like(geo.chebyshev, -1.0)).amax(dim=1)
    return LevelFields(level, mass_radius(mass, geo, EXTENT_FRACTION), mass_radius(mass, geo, 0.5),
                       mass_radius(energy, geo, EXTENT_FRACTION), ratio, angle, pm.sum(dim=1).to(torch.float64), cheb,
                       display, pm)


def probe_fields(spec: Spectrum, shape: tuple[int, int, int], levels: Sequence[NoiseLevel], tau: float, *,
                 normalize: Normalization = "diag", progress: bool = True, desc: str = "fields") -> list[LevelFields]:
    """:func:`level_fields` at every level (highest noise first, as ``levels`` are)."""
    return [level_fields(spec, shape, lv, tau, normalize)
            for lv in tqdm(levels, desc=desc, unit="level", disable=not progress, leave=False)]


def spread(values: torch.Tensor | np.ndarray) -> dict:
    """Distribution of a map over the positions where it is finite: quantiles, mean, std, count."""
    v = np.asarray(values, dtype=np.float64).ravel()
    finite = v[np.isfinite(v)]
    if finite.size == 0:
        return {"count": 0, "undefined": int(v.size)}
    q = np.percentile(finite, [0, 10, 25, 50, 75, 90, 100])
    return {"median": float(q[3]), "p10": float(q[1]), "p25": float(q[2]), "p75": float(q[4]), "p90": float(q[5]),
            "min": float(q[0]), "max": float(q[6]), "mean": float(finite.mean()), "std": float(finite.std()),
            "count": int(finite.size), "undefined": int(v.size - finite.size)}


def stationarity(lf: "LevelFields") -> dict:
    """Spread of the extents across positions (0 when the field is the same everywhere): interquartile
    range, standard deviation and coefficient of variation of r90, and the IQR of energy_r90."""
    s, e = spread(lf.r90), spread(lf.energy_r90)
    if not s["count"]:
        return {"r90_iqr": None, "r90_std": None, "r90_cv": None, "energy_r90_iqr": None}
    return {"r90_iqr": s["p75"] - s["p25"], "r90_std": s["std"], "r90_cv": s["std"] / s["mean"] if s["mean"] > 0 else None,
            "energy_r90_iqr": e["p75"] - e["p25"] if e["count"] else None}


def level_summary(lf: LevelFields) -> dict:
    """The numbers of one level for probe.json: distributions of every map over the image."""
    ratio = lf.axis_ratio
    return {"extent_r90": spread(lf.r90), "extent_r50": spread(lf.r50), "energy_r90": spread(lf.energy_r90),
            "axis_ratio": spread(ratio),
            "angle_deg": spread(lf.angle_deg), "stationarity": stationarity(lf),
            "mask_size": spread(lf.mask_size), "mask_radius": spread(lf.mask_radius),
            "zero_fields": int(torch.isnan(lf.r90).sum())}


__all__ = ["Geometry", "geometry", "position_fields", "mass_radius", "second_moments", "position_masks",
           "LevelFields", "level_fields", "probe_fields", "spread", "stationarity", "level_summary", "DEFINITIONS",
           "EXTENT_FRACTION"]
