"""``masked-equivariant``: the paper's data-derived neighbourhood with ELS's equivariance (docs/DESIGN.md §2.8).

The masked model reads one mask per output pixel from the Wiener gain and compares training images
only at the pixel's own position. Here the neighbourhood is one *stencil* per timestep, read from the
translation-averaged normalised gain,

    s_t[c', c, d] = (1 / HW) sum_{i : i + d inside} N_t[(c', i + d), (c, i)],
    D_c(t) = {(c', d) : |s_t[c', c, d]| >= tau max|s_t|}  (plus (c, 0), the pixel itself),

and the candidates are patches from every position of every training image, as in Kamb & Ganguli's
ELS machine. Near the border the stencil is cut to the offsets that stay inside the image
(``D_i = {(c', d) in D_c : i + d inside}``), and, as in their boundary-broken ELS, pixel i is compared
only with the patches at positions j of the same border configuration (the same cut stencil: interior
positions with every interior position; a position within the stencil's reach of an edge with the
positions at the same distance from that edge). Per output pixel i = (c, p):

    w_{(k,j),i} ∝ exp(-sum_{(c',d) in D_i} W_{c',d} (x_t[c', p + d] - a y_k[c', j + d])^2 / (2 b2 T)),
    x0_hat[i] = sum_{k,j} w_{(k,j),i} y_k[c, j],

with ``W = 1`` (the paper's binary neighbourhood; ``gamma=0``, default) or ``W = (|s| / max|s|)^gamma``.
When the stencil reaches across the whole image every pixel is its own configuration and the model is
the masked model with the (translation-invariant) stencil as mask; ``tau = 0`` is the optimal denoiser.

Cost: ``B sum_F |F|^2 K |D_F|`` multiply-adds per call (families F of positions), against ``B K nnz(M)``
for masked: tens of times more on MNIST. Like ``els`` it uses a seeded subset of ``max_train`` training
images by default (1,000, recorded in the settings as ``exact: false`` when the set is larger: the
measured model of docs/RESULTS.md §4); ``max_train=None`` is exact (every training image). Identical candidate patches (blank background) are merged exactly, with their
multiplicity, and the merged banks are kept between calls within ``bank_mb``; a set whose patches do
not fit in ``bank_mb`` is streamed from the training images block by block (exact, without merging).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Literal

import torch

from ...errors import ConfigError
from ...schedules import NoiseLevel
from ...stats import Spectrum, data_spectrum
from ..base import Capabilities
from ..patches.bank import PatchBank
from ..stream import SoftmaxState, StreamedDenoiser, StreamOptions, merge, seeded_subset
from ..wiener import wiener_gain
from .masks import Normalization, normalized_gain
from .schedule import MaskedSchedule, PerLevelTau, check_tau, check_temperature, read_masked_schedule

NEGLIGIBLE = -80.0  # log-weights this far below their block's maximum are dropped (see bank_softmax)
BANK_BLOCK = 1 << 22  # elements of the gathered patches per step while building a bank
DEFAULT_TAU = 0.02  # chosen on held-out denoising MSE on MNIST (docs/RESULTS.md §4: better than 0.05 at t >= 300);
# the paper's 0.005 gives stencils that span the whole image, where the model is masked with an averaged mask


@dataclass
class MaskedEquivariantConfig(StreamOptions):
    tau: float = DEFAULT_TAU  # stencil threshold, a fraction of max |translation-averaged normalised gain|
    temperature: float = 1.0  # softmax temperature T
    tau_schedule: str | None = None  # JSON file timestep -> tau and temperature (calibrate-masked); overrides both
    gamma: float = 0.0  # stencil weights (|s| / max|s|)^gamma; 0 = binary (the paper's neighbourhood)
    normalize: Normalization = "diag"  # gain normalisation before averaging, as for masked
    max_train: int | None = 1000  # a seeded random subset of this many training images (None: all, exact), as els
    seed: int = 0  # seed of that subset
    dtype: Literal["float32", "float64"] = "float32"  # arithmetic of the patch products
    block: int = 1 << 21  # elements of the largest logit temporary
    bank_mb: int = 1024  # memory for candidate-patch banks kept between calls; larger sets (or 0) are streamed
    cache: bool = True  # reuse the on-disk statistics cache


def averaged_gain(norm: torch.Tensor, shape) -> torch.Tensor:
    """``s[c', c, dh + H - 1, dw + W - 1] = (1/HW) sum_{i: i + d inside} norm[(c', i + d), (c, i)]``
    [C, C, 2H-1, 2W-1] from the normalised gain ``norm`` [n, n] (row m, column i)."""
    C, H, W = shape
    ch, hh, ww = torch.meshgrid(torch.arange(C), torch.arange(H), torch.arange(W), indexing="ij")
    ch, hh, ww = ch.reshape(-1), hh.reshape(-1), ww.reshape(-1)
    # flat bin of every pair (m, i): (c_m, c_i, h_m - h_i, w_m - w_i)
    dh = hh[:, None] - hh[None, :] + H - 1
    dw = ww[:, None] - ww[None, :] + W - 1
    bins = ((ch[:, None] * C + ch[None, :]) * (2 * H - 1) + dh) * (2 * W - 1) + dw  # [n, n]
    s = torch.zeros(C * C * (2 * H - 1) * (2 * W - 1), dtype=torch.float64)
    s.index_add_(0, bins.reshape(-1), norm.to("cpu", torch.float64).reshape(-1))
    return s.view(C, C, 2 * H - 1, 2 * W - 1) / (H * W)


@dataclass(frozen=True)
class Stencil:
    """The neighbourhood of every output channel c: offsets ``(c', dh, dw)`` [D_c, 3] and weights [D_c]."""

    offsets: tuple[torch.Tensor, ...]
    weights: tuple[torch.Tensor, ...]

    @property
    def sizes(self) -> list[int]:
        return [len(o) for o in self.offsets]


def stencil_of(s: torch.Tensor, tau: float, gamma: float) -> Stencil:
    """Offsets with ``|s| >= tau max|s|`` (and each channel's own pixel) and their weights."""
    C, _, H2, W2 = s.shape
    H, W = (H2 + 1) // 2, (W2 + 1) // 2
    mag = s.abs() / s.abs().max().clamp(min=1e-300)
    keep = mag >= tau
    offsets, weights = [], []
    for c in range(C):
        k = keep[:, c].clone()
        k[c, H - 1, W - 1] = True
        idx = torch.nonzero(k)  # [D, 3]: c', dh + H - 1, dw + W - 1
        w = mag[:, c][k].clamp(max=1.0)
        w = torch.ones_like(w) if gamma == 0 else torch.where(w > 0, w.pow(gamma), w)
        w[((idx[:, 0] == c) & (idx[:, 1] == H - 1) & (idx[:, 2] == W - 1))] = 1.0  # the pixel itself: weight 1
        offsets.append(idx - torch.tensor([0, H - 1, W - 1]))
        weights.append(w)
    return Stencil(tuple(offsets), tuple(weights))


@dataclass(frozen=True)
class Family:
    """Positions sharing one border configuration: rows x cols, their cut stencil (flat pixel offsets of
    every position's patch, [P, D]), the stencil weights [D] and the centre's column in the patch."""

    positions: torch.Tensor  # [P] flat h*W + w
    gather: torch.Tensor  # [P, D] flat pixel indices (c' HW + (h + dh) W + (w + dw)) of each position's patch
    weights: torch.Tensor  # [D]
    centre: int


def families_of(offsets: torch.Tensor, weights: torch.Tensor, channel: int, shape) -> list[Family]:
    """Border configurations of a stencil on an image of ``shape``: each border row (a row within the
    stencil's reach of the top or bottom edge) is its own group, the other rows one group; likewise
    columns; a family is a row group x a column group."""
    C, H, W = shape
    dh, dw = offsets[:, 1], offsets[:, 2]
    up, down, left, right = int(-dh.min()), int(dh.max()), int(-dw.min()), int(dw.max())

    def groups(L, lo, hi):
        inner = [u for u in range(L) if lo <= u < L - hi]
        return [[u] for u in range(L) if not lo <= u < L - hi] + ([inner] if inner else [])

    fams = []
    for rows in groups(H, up, down):
        for cols in groups(W, left, right):
            r0, c0 = rows[0], cols[0]
            inside = (r0 + dh >= 0) & (r0 + dh < H) & (c0 + dw >= 0) & (c0 + dw < W)
            off = offsets[inside]
            r = torch.tensor(rows)[:, None].expand(-1, len(cols)).reshape(-1)
            c = torch.tensor(cols)[None, :].expand(len(rows), -1).reshape(-1)
            gather = off[None, :, 0] * H * W + (r[:, None] + off[None, :, 1]) * W + (c[:, None] + off[None, :, 2])
            centre = int(torch.nonzero((off[:, 0] == channel) & (off[:, 1] == 0) & (off[:, 2] == 0))[0, 0])
            fams.append(Family(r * W + c, gather, weights[inside], centre))
    return fams


class MaskedEquivariantDenoiser(PerLevelTau, StreamedDenoiser):
    """The paper's Wiener neighbourhood as one stencil per timestep, with candidate patches from every
    position of every training image at the same border configuration (module docstring)."""

    name = "masked-equivariant"
    Config = MaskedEquivariantConfig
    capabilities = Capabilities(closed_form_jacobian=True, slow_autograd=True)
    uses_statistics = True

    def __init__(self, data, config: MaskedEquivariantConfig, schedule=None, *, spectrum: Spectrum | None = None):
        super().__init__(data, config, schedule)  # validates, keeps the (subset of the) training set
        c = self.config
        self.tau = c.tau
        self.tau_schedule: MaskedSchedule | None = None
        if c.tau_schedule is not None:
            self.tau_schedule = read_masked_schedule(c.tau_schedule)
        spec = spectrum if spectrum is not None else data_spectrum(data, device="cpu", cache=c.cache)
        self.spectrum = spec.to("cpu")
        self._stencils: dict[tuple, Stencil] = {}  # per level (a, b2)
        self._families: dict[tuple, list[list[Family]]] = {}
        self._banks: OrderedDict[tuple, list[list[PatchBank]]] = OrderedDict()  # per level, channel, family

    def validate(self) -> None:
        c = self.config
        check_tau(c.tau)
        check_temperature(c.temperature)
        if not (math.isfinite(c.gamma) and c.gamma >= 0):
            raise ConfigError(f"masked-equivariant: gamma must be a number >= 0, got {c.gamma}")
        for key in ("block", "chunk"):
            if getattr(c, key) < 1:
                raise ConfigError(f"masked-equivariant: {key} must be positive, got {getattr(c, key)}")
        if c.bank_mb < 0:
            raise ConfigError(f"masked-equivariant: bank_mb must be >= 0, got {c.bank_mb}")

    def training_data(self, data):
        return seeded_subset(data, self.config.max_train, self.config.seed, self.name)

    def settings(self) -> dict:
        out = super().settings()
        out.update(train_images=len(self.train_set), exact=len(self.train_set) == self.num_data,
                   tau_schedule_params=self.tau_schedule.to_dict() if self.tau_schedule is not None else None)
        return out

    # -- stencils, families, banks ----------------------------------------------------------------
    def stencil(self, t) -> Stencil:
        """The stencil at the level ``t`` (cached)."""
        level = self.schedule.at(t)
        if level.key not in self._stencils:
            G = wiener_gain(self.spectrum, level.a, level.b2).to(torch.float64)
            s = averaged_gain(normalized_gain(G, self.config.normalize), self.shape)
            self._stencils[level.key] = stencil_of(s, self.tau_at(level), float(self.config.gamma))
        return self._stencils[level.key]

    def families(self, t) -> list[list[Family]]:
        """Per output channel, the border families of the stencil at the level ``t``."""
        level = self.schedule.at(t)
        if level.key not in self._families:
            st = self.stencil(level)
            self._families[level.key] = [families_of(o, w, c, self.shape)
                                         for c, (o, w) in enumerate(zip(st.offsets, st.weights))]
        return self._families[level.key]

    def _rows(self, fam: Family):
        """The family's patches of every training image, scaled by sqrt(W), in blocks of images [k*P, D]."""
        scale = fam.weights.to(self.device, self.dtype).sqrt()  # [D]
        gather = fam.gather.to(self.device)
        step = max(1, BANK_BLOCK // gather.numel())
        for _, y, _ in self.train_set:
            for s0 in range(0, y.shape[0], step):
                yield y[s0:s0 + step, gather].reshape(-1, gather.shape[1]) * scale

    def _bank(self, fam: Family, rows: torch.Tensor, dedup: bool) -> PatchBank:
        """Candidate patches ``rows`` [N, D] as a bank; ``dedup`` merges identical ones (exact, counted)."""
        if dedup:
            rows, counts = torch.unique(rows, dim=0, return_counts=True)
            logn = counts.to(rows.dtype).log()
        else:
            logn = rows.new_zeros(rows.shape[0])
        centre = rows[:, fam.centre] / fam.weights[fam.centre].to(rows).sqrt()
        vals = torch.stack([centre, rows.new_ones(rows.shape[0])])  # [2, N]
        return PatchBank(rows.t().contiguous(), (rows * rows).sum(1), logn, vals.contiguous())

    def banks(self, t, c: int, f: int) -> Iterator[PatchBank]:
        """The candidate banks of family f of output channel c at the level ``t``. When every family of the
        level fits in ``bank_mb`` (before merging identical patches), they are built once, merged and kept
        (the oldest levels make room); otherwise they are streamed from the training set in blocks."""
        level = self.schedule.at(t)
        key = level.key
        if key not in self._banks:
            fams = self.families(level)
            size = len(self.train_set) * sum(fm.gather.numel() for per_c in fams for fm in per_c) \
                * self.dtype.itemsize
            budget = self.config.bank_mb << 20
            if size > budget:
                for rows in self._rows(fams[c][f]):
                    yield self._bank(fams[c][f], rows, dedup=False)
                return
            built = [[self._bank(fm, torch.cat(list(self._rows(fm))), dedup=True) for fm in per_c] for per_c in fams]
            used = sum(b.nbytes() for bs in built for b in bs)
            while self._banks and used + sum(b.nbytes() for v in self._banks.values() for bs in v for b in bs) > budget:
                self._banks.popitem(last=False)
            self._banks[key] = built
        self._banks.move_to_end(key)
        yield self._banks[key][c][f]

    # -- the denoiser -------------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        B = x_t.shape[0]
        grad = torch.is_grad_enabled() and x_t.requires_grad
        dtype = torch.float64 if grad else self.dtype  # autograd: float64, as the masked model's plain path
        x = x_t.reshape(B, -1).to(dtype)
        a, b2T = level.a, level.b2 * self.temperature_at(level)
        HW = self.shape[1] * self.shape[2]
        pixels, means = [], []
        for c, fams in enumerate(self.families(level)):
            for f, fam in enumerate(fams):
                scale = fam.weights.to(x.device, dtype).sqrt()
                q = x[:, fam.gather.to(x.device)].reshape(-1, fam.gather.shape[1]) * scale  # [B*P, D]
                st = None
                for bank in self.banks(level, c, f):
                    if grad:
                        bank = PatchBank(*(v.to(torch.float64) for v in (bank.pt, bank.sq, bank.logn, bank.vals)))
                    st = merge(st, bank_softmax(q, bank, a, b2T, self.config.block))
                means.append((st.acc[:, 0] / st.s).view(B, -1))  # [B, P]
                pixels.append(c * HW + fam.positions)
        idx = torch.cat(pixels).to(x.device)  # every output pixel exactly once
        out = torch.zeros(B, self.dim, dtype=dtype, device=x.device).scatter(1, idx.expand(B, -1), torch.cat(means, 1))
        return out.view(B, *self.shape)

    # -- closed-form Jacobian -----------------------------------------------------------------------
    @torch.no_grad()
    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t``, [B, Q, n] float64. For output pixel i with cut
        stencil D_i: ``d x0_hat_i / d x_t[c', p_i + d] = (a / (b2 T)) W_{c',d} Cov_w(y_k[c, j], y_k[c', j + d])``
        over the candidates (k, j) with their softmax weights (every other entry is 0)."""
        a, b2T = level.a, level.b2 * self.temperature_at(level)
        B = x_t.shape[0]
        x = x_t.reshape(B, -1).to(device=self.device, dtype=torch.float64)
        index = index.cpu()
        HW = self.shape[1] * self.shape[2]
        rows = torch.zeros(B, len(index), self.dim, dtype=torch.float64, device=self.device)
        where = {}
        for c, fams in enumerate(self.families(level)):
            for fi, fam in enumerate(fams):
                for pi, p in enumerate(fam.positions.tolist()):
                    where[c * HW + p] = (c, fi, pi)
        for qi, i in enumerate(index.tolist()):
            c, fi, pi = where[int(i)]
            fam = self.families(level)[c][fi]
            scale = fam.weights.to(self.device, torch.float64).sqrt()
            q = x[:, fam.gather[pi].to(self.device)] * scale  # [B, D]
            state = None
            for bank in self.banks(level, c, fi):
                state = merge(state, patch_moments(q, bank, a, b2T))
            D = q.shape[1]
            mean = state.mean()  # E[p], E[v p], E[v]
            cov = mean[:, D:2 * D] - mean[:, 2 * D:] * mean[:, :D]  # [B, D]: Cov_w(centre, scaled patch value)
            rows[:, qi].index_add_(1, fam.gather[pi].to(self.device), (a / b2T) * cov * scale)
        return rows


def bank_softmax(q: torch.Tensor, bank: PatchBank, a: float, b2T: float, block: int) -> SoftmaxState:
    """Softmax state (m, s [Q], acc [Q, 1]) of queries ``q`` [Q, D] against every candidate of ``bank``:
    log-weight ``log n_p + (a <q, p> - a^2 ||p||^2 / 2) / b2T``, the centre value averaged.

    As :func:`..patches.bank.bank_state`, but weights below ``e^-80`` of their block's maximum are set to 0
    before the exponential: they change the result by less than ``N e^-80`` relative, and in float32 they
    would be subnormal numbers, which slow the products down a hundredfold (at t = 100 on MNIST)."""
    Q = q.shape[0]
    grad = torch.is_grad_enabled() and q.requires_grad
    step = max(1, block // Q)
    buf = None if grad else q.new_empty(Q * min(step, bank.pt.shape[1]))
    state = None
    for s0 in range(0, bank.pt.shape[1], step):
        pt = bank.pt[:, s0:s0 + step]  # [D, n]
        n = pt.shape[1]
        bias = bank.logn[s0:s0 + n] - (0.5 * a * a / b2T) * bank.sq[s0:s0 + n]
        if grad:
            logits = torch.addmm(bias, q, pt, alpha=a / b2T)  # [Q, n]
        else:
            logits = torch.addmm(bias, q, pt, alpha=a / b2T, out=buf[:Q * n].view(Q, n))
        m = logits.detach().amax(1, keepdim=True)
        if not grad:
            logits.sub_(m)
            torch.nn.functional.threshold_(logits, NEGLIGIBLE, -math.inf)
            e = logits.exp_()
        else:
            e = SoftmaxState.shifted_exp(logits, m)
        r = e @ bank.vals[:, s0:s0 + n].t()  # [Q, 2]: weighted centre values and the weight sum
        state = merge(state, SoftmaxState(m[:, 0], r[:, 1], r[:, :1]))
    return state


def patch_moments(q: torch.Tensor, bank: PatchBank, a: float, b2T: float) -> SoftmaxState:
    """Softmax state of ``[p, v p, v]`` [B, 2D + 1] (p the scaled patch, v the centre value) over the bank's
    candidates, weighted by ``log n + (a <q, p> - a^2 ||p||^2 / 2) / b2T`` (float64, streamed)."""
    pt = bank.pt.to(torch.float64)  # [D, N]
    vals = bank.vals.to(torch.float64)  # [2, N]: centre, 1
    state = None
    for s0 in range(0, pt.shape[1], 1 << 16):
        p = pt[:, s0:s0 + (1 << 16)]
        logits = (a * (q @ p) - 0.5 * a * a * bank.sq[s0:s0 + p.shape[1]].to(torch.float64)) / b2T \
            + bank.logn[s0:s0 + p.shape[1]].to(torch.float64)  # [B, n]
        m = logits.amax(1)
        e = torch.exp(logits - m[:, None])
        v = vals[0, s0:s0 + p.shape[1]]
        acc = torch.cat([e @ p.T, (e * v) @ p.T, (e @ v)[:, None]], dim=1)  # unnormalised E[p], E[v p], E[v]
        state = merge(state, SoftmaxState(m, e.sum(1), acc))
    return state


__all__ = ["MaskedEquivariantConfig", "MaskedEquivariantDenoiser", "averaged_gain", "stencil_of", "families_of",
           "Stencil", "Family", "bank_softmax", "patch_moments"]
