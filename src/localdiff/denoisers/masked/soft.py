"""``masked-soft``: the Wiener-masked denoiser with soft masks (docs/DESIGN.md §2.8).

The paper's model keeps, for output pixel i, the binary mask ``S_i(t) = {m : |N[m, i]| >= tau max|N|}``
of the normalised Wiener gain N (:mod:`.masks`). Here every pixel of that support weighs in by how much
gain it carries instead of 0 or 1:

    W[m, i] = min(1, |N[m, i]|)^gamma   for m in S_i,   0 otherwise;

    w_{k,i} ∝ exp(-sum_m W[m, i] (x_t[m] - a y_k[m])^2 / (2 b2 T)),      x0_hat[i] = sum_k w_{k,i} y_k[i].

``gamma = 0`` gives back the binary masks (the ``masked`` model exactly); ``gamma = 1`` (default)
weighs each pixel by its normalised gain, which is 1 on the pixel itself (``normalize="diag"``) and
decays with the data's correlations. With ``normalize="sym"``, ``|N| <= 1`` holds for every pair (N is
the correlation matrix of the positive semi-definite gain), so the clip never acts.

It runs on the masked model's streamed kernel unchanged: the kernel already takes each output pixel's
share of its tile's inputs as the weights ``sub_t`` of its logit product and computes
``Q = W^T (Y*Y)`` through :class:`~.masked_kernel.QOperator`, so only the plan differs: real-valued
``sub_t`` and no shared cores (a core needs equal weights across a tile). The softmax is the exact
global one; the closed-form Jacobian is the masked one with W in place of the mask:
``d x0_hat_i / d x_t[m] = (a / (b2 T)) W[m, i] Cov_{w_i}(y[i], y[m])``.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import torch

from ...errors import ConfigError
from ...schedules import NoiseLevel
from ..wiener import wiener_gain
from .kernel import QOperator
from .model import MaskedConfig, MaskedDenoiser
from .plan import DENSE_Q_MAX, SPARSE_MACS, TILE_SHAPES, MaskPlan, Tile, tile_costs, gemm_efficiency, \
    tile_stats, tiles_of
from .masks import DIAG_EPS, normalized_gain, threshold_masks


@dataclass
class MaskedSoftConfig(MaskedConfig):
    gamma: float = 1.0  # weight exponent: W = min(1, |N|)^gamma on the mask's support; 0 = binary (masked)


def soft_weights(norm: torch.Tensor, tau: float, gamma: float) -> torch.Tensor:
    """Soft masks [n, n] (column i = pixel i's weights): ``min(1, |N|)^gamma`` where
    ``|N| >= tau max|N|`` (the paper's support), 0 elsewhere. ``norm`` is the normalised gain N."""
    support = threshold_masks(norm, tau)
    if gamma == 0:
        return support.to(norm.dtype)
    w = norm.abs().clamp(max=1.0).pow(gamma)
    return torch.where(support, w, torch.zeros((), dtype=w.dtype, device=w.device))


def plan_weights(weights: torch.Tensor, shape, batch: int, *, path: str = "auto", chunk: int = 2048,
                 tile: tuple[int, int] | None = None) -> MaskPlan:
    """The masked kernel's plan for real-valued masks ``weights`` [n, n] (column i = pixel i's weights):
    the tile shape minimising the masked cost model without cores; ``path="dense"`` reads every pixel."""
    n = weights.shape[0]
    w_cpu = weights.cpu()
    support = w_cpu != 0
    nonempty = support.any(dim=0)
    nnz = int(support.sum())
    s_float = support.to(torch.float32)
    best = None
    for th, tw in dict.fromkeys((min(th, shape[1]), min(tw, shape[2])) for th, tw in ([tile] if tile else TILE_SHAPES)):
        g, u, c = tile_stats(s_float, nonempty, shape, th, tw)
        zero = torch.zeros_like(c)
        for dense in ((False, True) if path == "auto" else (path == "dense",)):
            cost = tile_costs(g, torch.full_like(u, n) if dense else u, zero, batch, chunk).sum().item()
            if best is None or cost < best[0]:
                best = (cost, th, tw, dense)
    _, th, tw, dense = best
    dev = weights.device
    rows = w_cpu.T.contiguous()  # row i = pixel i's weights
    tiles, macs = [], 0
    for q in tiles_of(shape, th, tw):
        q = q[nonempty[q]]
        if not len(q):
            continue
        w_q = rows.index_select(0, q)  # [g, n]
        resid = torch.arange(n) if dense else torch.nonzero((w_q != 0).any(dim=0)).squeeze(1)
        macs += len(q) * len(resid)
        tiles.append(Tile(q.to(dev), torch.zeros(0, dtype=torch.long, device=dev), resid.to(dev),
                          w_q.index_select(1, resid).to(dev)))
    q_dense = n * n / gemm_efficiency(n) if n <= DENSE_Q_MAX else math.inf
    q_mode = "dense" if q_dense <= SPARSE_MACS * nnz else "sparse"
    empty = torch.nonzero(~nonempty).squeeze(1).to(dev)
    return MaskPlan(weights, tuple(tiles), empty, (th, tw), dense, q_mode, nnz, int(macs))


def weighted_q_operator(plan: MaskPlan, shape, dtype: torch.dtype) -> QOperator:
    """``Q = W^T (Y*Y)`` for real-valued masks: one dense product, or a gather of the nonzeros of W
    weighted by their values (``embedding_bag``'s per-sample weights)."""
    wt = plan.masks.T  # [n (output), n (input)]
    if plan.q_mode == "dense":
        return QOperator("dense", shape[2], dense=wt.to(dtype).contiguous())
    n = wt.shape[0]
    pixel, rows = torch.nonzero(wt, as_tuple=True)  # grouped by output pixel
    offsets = torch.zeros(n, dtype=torch.int64, device=wt.device)
    offsets[1:] = torch.cumsum(torch.bincount(pixel, minlength=n), 0)[:-1]
    return QOperator("sparse", shape[2], rows=rows, offsets=offsets, signs=wt[pixel, rows].to(dtype))


class MaskedSoftDenoiser(MaskedDenoiser):
    """The Wiener-masked denoiser with soft masks ``W = min(1, |N|)^gamma`` on the paper's support
    (module docstring); exact global softmax, streamed by the masked kernel, closed-form Jacobian."""

    name = "masked-soft"
    Config = MaskedSoftConfig

    def __init__(self, data, config: MaskedSoftConfig, schedule=None, *, spectrum=None):
        super().__init__(data, config, schedule, spectrum=spectrum)

    def validate(self) -> None:
        if self.config.chunk_average is not None:
            raise ConfigError("masked-soft: chunk_average (the official chunk-normalised softmax) exists only for "
                              "the masked model; masked-soft always uses the exact global softmax")
        gamma = self.config.gamma
        if not (math.isfinite(gamma) and gamma >= 0):
            raise ConfigError(f"masked-soft: gamma must be a number >= 0, got {gamma}")
        super().validate()

    def settings(self) -> dict:
        out = super().settings()
        out["masks"] = "soft wiener"
        return out

    def _compute_masks(self, level: NoiseLevel) -> torch.Tensor:
        """Soft masks [n, n] at ``level`` in the working dtype (column i = pixel i's weights)."""
        a, b2, tau = level.a, level.b2, self.tau_at(level)
        G = wiener_gain(self.spectrum, a, b2).to(torch.float64)
        w = soft_weights(normalized_gain(G, self.config.normalize), tau, float(self.config.gamma))
        lost = int(((G.diagonal().abs() >= DIAG_EPS) & (w.diagonal() == 0)).sum())  # varying pixels
        if lost:
            warnings.warn(f"masked-soft: at {level.label}, {lost} pixels are missing from their own mask "
                          f"(normalize='{self.config.normalize}', tau={tau}); use normalize=sym",
                          RuntimeWarning, stacklevel=3)
        return w.to(self.device)

    def mask_density(self, t) -> float:
        """Fraction of nonzero weights at timestep t (the support, as for ``masked``)."""
        return float((self.masks(t) != 0).double().mean())

    def mean_weight(self, t) -> float:
        """Mean weight over the support at timestep t (1 for binary masks)."""
        w = self.masks(t)
        return float(w.sum() / (w != 0).sum().clamp(min=1))

    def _make_plan(self, masks: torch.Tensor, batch: int) -> MaskPlan:
        return plan_weights(masks, self.shape, batch, path="dense" if self.config.path == "dense" else "auto",
                            chunk=self.columns.chunk, tile=self.config.tile)

    def _q_operator(self, plan: MaskPlan) -> QOperator:
        return weighted_q_operator(plan, self.shape, self.dtype)


__all__ = ["MaskedSoftConfig", "MaskedSoftDenoiser", "soft_weights", "plan_weights", "weighted_q_operator"]
