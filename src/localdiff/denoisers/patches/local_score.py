"""Kamb & Ganguli 2024, "An analytic theory of creativity in convolutional diffusion models" (arXiv
2412.20292): the local score machines (docs/DESIGN.md §2.6), exact and streamed over the training set.

* ``ls`` -- the locally consistent / local score machine: pixel i is the posterior mean of its own value
  given only the P x P patch of x_t around i, over the training images' patches at the same location.
  The cross term is a box sum of ``x_t * y`` by prefix sums (cost independent of P).
* ``els`` -- the equivariant local score machine: the candidates are patches from every position of
  every training image, so the denoiser commutes with (circular) shifts. A matrix product of unfolded
  patches (B*HW*N*D multiply-adds for N candidate patches of D = C*P*P values); identical candidates are
  merged exactly, with their count, and the merged bank is kept between calls within ``bank_mb``.
* ``els-boundary`` -- the boundary-broken ELS for zero-padded CNNs: a patch that crosses the image
  border only matches training patches with the same border configuration.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Literal

import torch
import torch.nn.functional as F

from ...distributed import merge_ranks
from ...errors import ConfigError
from ..base import Capabilities
from ..stream import SoftmaxState, merge, seeded_subset
from .bank import PatchBank, bank_state
from .common import Padding, PatchConfig, PatchDenoiser, box_sum


@dataclass
class LSConfig(PatchConfig):
    padding: Padding = "zeros"  # zeros (= truncate: patches cut at the border, the paper's code) or circular


@dataclass
class BoundaryELSConfig(PatchConfig):
    max_train: int | None = 1000  # use a seeded random subset of this many training images (None = all, exact)
    seed: int = 0  # seed of that subset
    dtype: Literal["float32", "float64"] = "float32"  # B*K*J*H*W logits per call: float32 halves the time;
    # float64 for exactness
    bank_mb: int = 1024  # memory for candidate-patch banks kept between calls (identical patches merged
    # exactly, counted by multiplicity); 0 streams them from the training set at every call


@dataclass
class ELSConfig(BoundaryELSConfig):
    padding: Padding = "circular"  # how the query patch Pi_i(x_t) is padded: circular (paper), zeros or truncate
    candidates: Literal["valid", "padded"] = "valid"  # valid: training patches fully inside the image (paper's
    # code); padded: every position, padded like the query


# ------------------------------------------------------------------------------------------------
# LS: same-location patches
# ------------------------------------------------------------------------------------------------

# ------------------------------------------------------------------------------------------------

def ls_logits(x: torch.Tensor, y: torch.Tensor, a: float, b2: float, d: int, padding: str) -> torch.Tensor:
    """Log-weights [B, k, H, W] of the LS machine: ``-||Pi_i x - a Pi_i y_k||^2 / (2 b2)`` up to a
    per-pixel constant, as ``box(a x y_k - a^2 y_k^2 / 2) / b2`` (``x`` [B,C,H,W], ``y`` [k,C,H,W])."""
    yy = (y * y).sum(1).mul_(-0.5 * a).unsqueeze(0)  # [1, k, H, W]
    if x.shape[1] == 1:
        v = torch.addcmul(yy, x, y.transpose(0, 1))  # [B, k, H, W]: x y_k - a y_k^2 / 2
    else:
        v = torch.einsum("bchw,kchw->bkhw", x, y) + yy
    return box_sum(v, d, padding).mul_(a / b2)


def ls_state(x: torch.Tensor, y: torch.Tensor, a: float, b2: float, d: int, padding: str) -> SoftmaxState:
    """Per-pixel softmax state of one block: m, s [B, 1, H, W], acc [B, C, H, W]."""
    logits = ls_logits(x, y, a, b2, d, padding)  # [B, k, H, W]: one softmax over k per query and pixel
    return SoftmaxState.from_logits(logits, 1, lambda e: torch.einsum("bkhw,kchw->bchw", e, y), keepdim=True)


class LSDenoiser(PatchDenoiser):
    """Kamb & Ganguli's LS machine: ``x0_hat[i] = sum_k w_{k,i} y_k[i]``,
    ``w_{k,i} ∝ exp(-||Pi_i(x_t) - a Pi_i(y_k)||^2 / (2 b2))`` with the P x P patch at the same location.

    Border: ``zeros`` (default, as the paper's code, which zero-pads x_t and y alike) is the same as
    ``truncate`` -- the patch is cut at the border; ``circular`` wraps around. A patch of side
    ``2 max(H, W) - 1`` (zeros) or ``>= max(H, W)`` (circular) covers the whole image for every pixel and
    gives the exact ``optimal`` denoiser.
    """

    name = "ls"
    Config = LSConfig
    capabilities = Capabilities(slow_autograd=True, single_image_exact=True)
    merges_shards = True

    def max_patch_size(self) -> int:
        L = max(self.shape[1:])
        return 2 * L - 1 if self.config.padding != "circular" else L + 1 - L % 2

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        d, state = size // 2, None
        for yb in self.images(B * (C + 2) * H * W, self.config.block):
            state = merge(state, ls_state(x, yb, a, b2, d, self.config.padding))
        return self.merge_ranks(state).mean()


# ------------------------------------------------------------------------------------------------
# ELS family: candidate patches from many positions (Kamb & Ganguli 2024)
# ------------------------------------------------------------------------------------------------

def _unfold(x: torch.Tensor, size: int, padding: str) -> torch.Tensor:
    """Patches [N, C*P*P, H*W] centred at every pixel of ``x`` [N, C, H, W], padded as asked."""
    d = size // 2
    if d:
        x = F.pad(x, (d, d, d, d), mode="circular" if padding == "circular" else "constant")
    return F.unfold(x, size)


def _candidate_rows(y: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Candidate patches of training images ``y`` [k, C, H, W] as rows [k*J, D]: ``valid`` (fully
    inside: J = (H-P+1)(W-P+1)) or every position padded by ``circular``/``zeros`` (J = H*W)."""
    cols = F.unfold(y, size) if mode == "valid" else _unfold(y, size, mode)  # [k, D, J]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


@dataclass
class _Family:
    """``G`` groups of query pixels; group g's queries (flat positions ``q_idx[g]``, [G, I]) are
    compared with the candidate patches at positions ``c_idx[g]`` ([G, J]) of every training image."""

    q_idx: torch.Tensor
    c_idx: torch.Tensor


def _family_state(q: torch.Tensor, cand: torch.Tensor, centre: torch.Tensor, fam: _Family,
                  a: float, b2: float) -> SoftmaxState:
    """Softmax state (m, s [G, B, I], acc [G, B, I, C]) of one block of training images.

    ``q`` [B, D, HW] unfolded query patches, ``cand`` [k, D, HW] unfolded candidate patches and
    ``centre`` [k, C, HW] their centre pixels. Log-weight: ``(a <q_i, p_kj> - a^2 ||p_kj||^2 / 2) / b2``.
    """
    G, I = fam.q_idx.shape
    J = fam.c_idx.shape[1]
    B, D, _ = q.shape
    k, C = centre.shape[0], centre.shape[1]
    qf = q[:, :, fam.q_idx].permute(2, 0, 3, 1).reshape(G, B * I, D)  # [G, B*I, D]
    pf = cand[:, :, fam.c_idx].permute(2, 1, 0, 3).reshape(G, D, k * J)  # [G, D, k*J]
    vf = centre[:, :, fam.c_idx].permute(2, 0, 3, 1).reshape(G, k * J, C)  # [G, k*J, C]
    bias = (pf * pf).sum(1, keepdim=True) * (-0.5 * a * a / b2)  # [G, 1, k*J]
    logits = torch.baddbmm(bias, qf, pf, alpha=a / b2)  # [G, B*I, k*J]
    st = SoftmaxState.from_logits(logits, 2, lambda e: torch.bmm(e, vf))  # acc [G, B*I, C]
    return SoftmaxState(st.m.view(G, B, I), st.s.view(G, B, I), st.acc.view(G, B, I, C))


def merge_ranks_each(states: list[SoftmaxState], shard) -> list[SoftmaxState]:
    """Each state merged over the ranks, in one exchange: the list's merge is element-wise."""
    if shard is None:
        return states
    return merge_ranks(_States(list(states)), shard).states


@dataclass
class _States:
    states: list[SoftmaxState]

    def merge(self, other: "_States") -> "_States":
        return _States([a.merge(b) for a, b in zip(self.states, other.states)])


def _grid(rows: list[int], cols: list[int], W: int, device) -> torch.Tensor:
    r = torch.as_tensor(rows, dtype=torch.long, device=device)
    c = torch.as_tensor(cols, dtype=torch.long, device=device)
    return (r[:, None] * W + c[None, :]).reshape(-1)


class _EquivariantBase(PatchDenoiser):
    """Shared by ELS and boundary ELS: a subset of the training set and a cache of candidate banks."""

    capabilities = Capabilities(slow_autograd=True)

    def __init__(self, data, config, schedule=None):
        super().__init__(data, config, schedule)
        if self.config.bank_mb < 0:
            raise ConfigError(f"{self.name}: bank_mb must be >= 0, got {self.config.bank_mb}")
        self._banks: dict[tuple[int, str], PatchBank] = {}

    def training_data(self, data):
        return seeded_subset(data, self.config.max_train, self.config.seed, self.name)

    def _centre(self, size: int) -> list[int]:
        d = size // 2
        return [c * size * size + d * size + d for c in range(self.shape[0])]

    def banks(self, size: int, mode: str) -> Iterator[PatchBank]:
        """The candidate patches of every training image (``mode`` as in :func:`_candidate_rows`).

        Kept between calls, deduplicated, when all of them fit in ``bank_mb`` (the oldest kept banks
        make room); otherwise streamed in blocks from the training set.
        """
        key = (size, mode)
        if key in self._banks:
            yield self._banks[key]
            return
        C, H, W = self.shape
        J = (H - size + 1) * (W - size + 1) if mode == "valid" else H * W
        D = C * size * size
        budget = self.config.bank_mb << 20
        if len(self.train_set) * J * D * self.dtype.itemsize <= budget:
            rows = torch.cat([_candidate_rows(y, size, mode) for y in self.images()])
            bank = PatchBank.of(rows, self._centre(size), dedup=True)
            del rows
            while self._banks and sum(b.nbytes() for b in self._banks.values()) + bank.nbytes() > budget:
                self._banks.pop(next(iter(self._banks)))
            self._banks[key] = bank
            yield bank
            return
        for yb in self.images(J * D, self.config.block):
            yield PatchBank.of(_candidate_rows(yb, size, mode), self._centre(size), dedup=False)

    def _bank_softmax(self, q, qmask, size, mode, a, b2) -> SoftmaxState:
        grad = torch.is_grad_enabled() and q.requires_grad
        Q = q.shape[0]
        buf = None if grad else q.new_empty(Q * max(1, self.config.block // Q))
        state = None
        for bank in self.banks(size, mode):
            state = merge(state, bank_state(q, qmask, bank, a, b2, self.config.block, buf))
        return self.merge_ranks(state)


class ELSDenoiser(_EquivariantBase):
    """Kamb & Ganguli's ELS machine: ``x0_hat[i] = sum_{k,j} w_{(k,j),i} y_k[j]``,
    ``w_{(k,j),i} ∝ exp(-||Pi_i(x_t) - a Pi_j(y_k)||^2 / (2 b2))`` over patches at every position j of
    every training image.

    As in the paper's code, the query x_t is padded circularly (``padding``) and the candidates are the
    training patches that lie fully inside their image (``candidates=valid``, (H-P+1)(W-P+1) per image);
    ``candidates=padded`` takes all H*W positions, padded like the query (``truncate`` pads candidates
    with zeros and leaves the query's outside part out of the distance). The candidate set does not
    depend on the query position, so with circular padding the map commutes exactly with circular shifts.
    The cost is B*K*J*H*W logits per call, hence ``max_train`` (a seeded subset; None = all images).
    Identical candidate patches (common: blank background) are merged exactly, with their multiplicity.
    Patch sizes are limited to ``min(H, W)``.
    """

    name = "els"
    Config = ELSConfig
    merges_shards = True

    def max_patch_size(self) -> int:
        L = min(self.shape[1:])
        return L - 1 + L % 2

    def check_patch_size(self, size):
        size = super().check_patch_size(size)
        if size > min(self.shape[1:]):
            raise ConfigError(f"{self.name}: patch size {size} exceeds the image ({self.shape[1]}x{self.shape[2]}); "
                              f"use at most {self.max_patch_size()}")
        return size

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        padding = self.config.padding
        q = _unfold(x, size, padding).transpose(1, 2).reshape(B * H * W, -1)  # [B*HW, D]
        qmask = None
        if padding == "truncate":
            ones = torch.ones(1, C, H, W, dtype=x.dtype, device=x.device)
            qmask = _unfold(ones, size, "zeros")[0].t().repeat(B, 1)  # [B*HW, D]
        if self.config.candidates == "valid":
            mode = "valid"
        else:
            mode = "circular" if padding == "circular" else "zeros"
        state = self._bank_softmax(q, qmask, size, mode, a, b2)
        return state.mean().view(B, H * W, C).transpose(1, 2).reshape(B, C, H, W)


class BoundaryELSDenoiser(_EquivariantBase):
    """Kamb & Ganguli's boundary-broken ELS machine (their model of zero-padded CNNs).

    Our reading of the paper and its code: patches are zero-padded, and along each axis a pixel closer
    than d = P//2 to the border is in a "border" configuration that only its own coordinate shares, while
    all other coordinates share one "interior" configuration. Pixel i is compared only with training
    patches at positions j of the same configuration on both axes: interior pixels with every interior
    patch (the ELS machine with valid candidates), pixels near one edge with the patches at the same
    distance from that edge anywhere along it, and corner pixels with the patch at their own position
    (the LS machine). When P >= the image every pixel is a corner and the model is LS with zero padding.
    """

    name = "els-boundary"
    Config = BoundaryELSConfig
    merges_shards = True

    def _edge_families(self, size: int, device) -> list[_Family]:
        C, H, W = self.shape
        d = size // 2

        def split(L):  # border coordinates (each its own configuration) and the shared interior ones
            return [u for u in range(L) if u < d or u >= L - d], [u for u in range(L) if d <= u < L - d]

        rb, ri = split(H)
        cb, ci = split(W)
        fams = []
        if rb and ci:  # near the top/bottom edge: one group per border row
            g = torch.stack([_grid([u], ci, W, device) for u in rb])
            fams.append(_Family(g, g))
        if ri and cb:  # near the left/right edge: one group per border column
            g = torch.stack([_grid(ri, [w], W, device) for w in cb])
            fams.append(_Family(g, g))
        return fams

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        d = size // 2
        # corners (and everything when P covers the image): LS with zero padding, same position only
        corners = None
        for yb in self.images(B * (C + 2) * H * W, self.config.block):
            corners = merge(corners, ls_state(x, yb, a, b2, d, "zeros"))
        out = self.merge_ranks(corners).mean().reshape(B, C, H * W)
        if H <= 2 * d or W <= 2 * d:
            return out.view(B, C, H, W)
        q = _unfold(x, size, "zeros")  # [B, D, HW]
        # interior pixels: every patch that lies inside its image (the ELS machine, valid candidates)
        inner = _grid(list(range(d, H - d)), list(range(d, W - d)), W, x.device)
        q_in = q[:, :, inner].transpose(1, 2).reshape(B * inner.numel(), -1)
        state = self._bank_softmax(q_in, None, size, "valid", a, b2)
        out = out.clone()
        out[:, :, inner] = state.mean().view(B, inner.numel(), C).transpose(1, 2)
        # pixels near one edge: patches at the same distance from that edge, anywhere along it
        fams = self._edge_families(size, x.device)
        if not fams:
            return out.view(B, C, H, W)
        states = [None] * len(fams)
        per_image = max(q.shape[1] * H * W, max(B * f.q_idx.numel() * f.c_idx.shape[1] for f in fams))
        for yb in self.images(2 * per_image, self.config.block):
            cand = _unfold(yb, size, "zeros")  # [k, D, HW]
            centre = yb.reshape(yb.shape[0], C, H * W)
            for n, fam in enumerate(fams):
                states[n] = merge(states[n], _family_state(q, cand, centre, fam, a, b2))
        for fam, st in zip(fams, merge_ranks_each(states, self.shard)):
            G, Bq, I, _ = st.acc.shape
            out[:, :, fam.q_idx.reshape(-1)] = st.mean().permute(1, 3, 0, 2).reshape(B, C, G * I)
        return out.view(B, C, H, W)


__all__ = ["LSConfig", "ELSConfig", "BoundaryELSConfig", "LSDenoiser", "ELSDenoiser", "BoundaryELSDenoiser",
           "ls_logits", "ls_state"]
