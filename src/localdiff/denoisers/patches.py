"""Patch-based analytical denoisers of prior work, exact and streamed over the training set.

* ``ls``  -- Kamb & Ganguli 2024, "An analytic theory of creativity in convolutional diffusion models"
  (arXiv 2412.20292), the locally consistent / local score machine: pixel i is the posterior mean of
  its own value given only the P x P patch of x_t around i, over the training images' patches at the
  same location.
* ``els`` -- the same paper's equivariant local score machine: the candidates are patches from every
  position of every training image, so the denoiser commutes with (circular) shifts.
* ``els-boundary`` -- the same paper's boundary-broken ELS for zero-padded CNNs: a patch that crosses
  the image border only matches training patches with the same border configuration.
* ``pspc`` -- Niedoba, Zwartsenberg, Murphy & Wood 2024, "Towards a mechanistic explanation of
  diffusion model generalization" (arXiv 2411.19339), PSPC-Square: every P x P patch is denoised by
  the posterior mean of that patch under the training patches at the same place, and each pixel
  averages the estimates of all patches that cover it.
* ``scfdm`` -- Scarvelis, Borde & Solomon 2023, "Closed-form diffusion models" (arXiv 2310.12395):
  the closed-form (optimal) score smoothed with a Gaussian of width sigma.

Notation as in DESIGN.md: ``a = sqrt(alpha_bar_t)``, ``b2 = 1 - alpha_bar_t``, ``Pi_i`` the patch
around pixel i. Every softmax is a max-shifted, mergeable :class:`SoftmaxState` streamed over the
training set in blocks whose temporaries stay below ``block`` elements, so the result does not
depend on the chunking (up to rounding) and memory does not grow with the data. The
``||Pi_i x_t||^2`` term of every patch distance is constant over the candidates and cancels; the
cross term is a box sum of ``x_t * y`` by prefix sums (same-location models: cost independent of P)
or a matrix product of unfolded patches (shift-equivariant ones: B*HW*N*D multiply-adds for N
candidate patches of D = C*P*P values; identical candidates are merged exactly, with their count,
and the merged bank is kept between calls within ``bank_mb``). Everything runs on CPU or CUDA and
is differentiable (autograd) for sensitivity fields.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from .base import Denoiser, DenoiserConfig, TrainingSet, register, resolve_dtype
from .empirical import OptimalConfig, OptimalDenoiser, SoftmaxState, optimal_logits

SCHEDULE_FORMAT = "localdiff.patch-schedule"
PADDINGS = ("zeros", "truncate", "circular")


# ------------------------------------------------------------------------------------------------
# Patch-size schedules (written by ``localdiff calibrate-patches``)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchSchedule:
    """Patch size per timestep; a timestep between the listed ones uses the nearest listed one
    (ties go to the larger timestep, i.e. the noisier calibration point)."""

    sizes: dict[int, int]

    def at(self, t: int) -> int:
        best = min(self.sizes, key=lambda s: (abs(s - t), -s))
        return self.sizes[best]


def read_patch_schedule(path: str | Path) -> PatchSchedule:
    """Read a schedule JSON: ``{"format": "localdiff.patch-schedule", "patch_sizes": {"900": 27, ...}}``.

    A bare mapping ``{"900": 27, ...}`` is accepted too, so schedules can be written by hand.
    """
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"patch-size schedule {p} does not exist; write one with `localdiff calibrate-patches`")
    try:
        doc = json.loads(p.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ConfigError(f"patch-size schedule {p} is not readable JSON ({exc})") from exc
    if isinstance(doc, dict) and "patch_sizes" in doc:
        if doc.get("format", SCHEDULE_FORMAT) != SCHEDULE_FORMAT:
            raise ConfigError(f"{p} is a '{doc.get('format')}' file, not a {SCHEDULE_FORMAT} file")
        doc = doc["patch_sizes"]
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"patch-size schedule {p} must map timesteps to patch sizes, e.g. {{\"900\": 27}}")
    sizes = {}
    for key, value in doc.items():
        try:
            t, size = int(key), int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"patch-size schedule {p}: entry {key!r}: {value!r} is not timestep: size") from exc
        if isinstance(value, bool) or size != value or size < 1 or t < 0:
            raise ConfigError(f"patch-size schedule {p}: entry {key!r}: {value!r} needs a timestep >= 0 and "
                              "an integer patch size >= 1")
        sizes[t] = size
    return PatchSchedule(sizes)


# ------------------------------------------------------------------------------------------------
# Small numerical helpers
# ------------------------------------------------------------------------------------------------

def _shifted_exp(logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
    """``exp(logits - m)``; in place unless autograd needs the logits. ``m`` must be detached."""
    if torch.is_grad_enabled() and logits.requires_grad:
        return torch.exp(logits - m)
    return logits.sub_(m).exp_()


def _merge(state: SoftmaxState | None, part: SoftmaxState) -> SoftmaxState:
    return part if state is None else state.merge(part)


def _box_sum_axis(v: torch.Tensor, d: int, dim: int, circular: bool) -> torch.Tensor:
    """Sum of ``v`` over the window ``[i - d, i + d]`` along ``dim`` (zero outside, or wrapped)."""
    L = v.shape[dim]
    if (circular and 2 * d + 1 >= L) or d >= L - 1:  # every window covers the whole axis
        return v.sum(dim, keepdim=True).expand_as(v).contiguous()
    # pad by d + 1 before and d after; then sum(v[i-d .. i+d]) = c[i + 2d + 1] - c[i] for c = cumsum
    if circular:
        parts = [v.narrow(dim, L - d - 1, d + 1), v, v.narrow(dim, 0, d)]
    else:
        zeros = v.new_zeros(()).expand(*v.shape[:dim], 1, *v.shape[dim + 1:])
        parts = [zeros.expand(*v.shape[:dim], d + 1, *v.shape[dim + 1:]), v,
                 zeros.expand(*v.shape[:dim], d, *v.shape[dim + 1:])]
    c = torch.cat(parts, dim).cumsum(dim)
    return c.narrow(dim, 2 * d + 1, L) - c.narrow(dim, 0, L)


def box_sum(v: torch.Tensor, d: int, padding: str) -> torch.Tensor:
    """``sum_{m in Pi_i} v[m]`` for every pixel i of ``v`` [..., H, W]; Pi_i the (2d+1)^2 window at i.

    ``zeros``/``truncate``: the window is cut at the border; ``circular``: it wraps around.
    Cost independent of d (prefix sums).
    """
    circular = padding == "circular"
    return _box_sum_axis(_box_sum_axis(v, d, v.ndim - 1, circular), d, v.ndim - 2, circular)


def valid_box_sum(v: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Sums of ``v`` [..., H, W] over every ph x pw window that fits: [..., H - ph + 1, W - pw + 1]."""
    for dim, p in ((v.ndim - 2, ph), (v.ndim - 1, pw)):
        zero = torch.zeros_like(v.narrow(dim, 0, 1))
        c = torch.cat([zero, v.cumsum(dim)], dim)
        n = v.shape[dim] - p + 1
        v = c.narrow(dim, p, n) - c.narrow(dim, 0, n)
    return v


def _blocks(y: torch.Tensor, per_image: int, block: int) -> Iterator[torch.Tensor]:
    """Split a chunk of training images so each block's temporaries hold at most ~``block`` elements."""
    k = max(1, block // max(1, per_image))
    for s in range(0, y.shape[0], k):
        yield y[s:s + k]


# ------------------------------------------------------------------------------------------------
# Configs
# ------------------------------------------------------------------------------------------------

@dataclass
class PatchConfig(DenoiserConfig):
    patch_size: int = 5  # P, side of the square patch (used at every timestep unless patch_schedule is given)
    patch_schedule: str | None = None  # JSON file timestep -> patch size (calibrate-patches); overrides patch_size
    chunk: int = 4096  # training images per streamed chunk (the result does not depend on it)
    block: int = 1 << 20  # elements of the largest temporary (about cache-sized: the speed depends on it)
    dtype: str = "float64"  # arithmetic of the patch distances
    resident: bool | None = None  # keep the float training set on the device (default: if it fits)


@dataclass
class LSConfig(PatchConfig):
    padding: str = "zeros"  # zeros (= truncate: patches cut at the border, the paper's code) or circular


@dataclass
class BoundaryELSConfig(PatchConfig):
    max_train: int | None = 1000  # use a seeded random subset of this many training images (None = all, exact)
    seed: int = 0  # seed of that subset
    dtype: str = "float32"  # B*K*J*H*W logits per call: float32 halves the time; float64 for exactness
    bank_mb: int = 1024  # memory for candidate-patch banks kept between calls (identical patches merged
    # exactly, counted by multiplicity); 0 streams them from the training set at every call


@dataclass
class ELSConfig(BoundaryELSConfig):
    padding: str = "circular"  # how the query patch Pi_i(x_t) is padded: circular (paper), zeros or truncate
    candidates: str = "valid"  # valid: training patches fully inside the image (paper's code); padded: every
    # position, padded like the query


@dataclass
class PSPCConfig(PatchConfig):
    pass


# ------------------------------------------------------------------------------------------------
# Common base: patch size per timestep
# ------------------------------------------------------------------------------------------------

class PatchDenoiser(Denoiser):
    """A denoiser whose locality is a square patch of side P chosen per timestep.

    :meth:`denoise_patch` runs it at an explicit patch size (used by calibration).
    """

    Config: ClassVar[type] = PatchConfig
    odd_only: ClassVar[bool] = True

    def __init__(self, data, config: PatchConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        self.dtype = resolve_dtype(config.dtype)
        if config.block < 1:
            raise ConfigError(f"{self.name}: block must be a positive number of elements, got {config.block}")
        path = config.patch_schedule
        self.size_schedule = read_patch_schedule(path) if path is not None else None
        sizes = [config.patch_size] if self.size_schedule is None else list(self.size_schedule.sizes.values())
        for size in sizes:
            self.check_patch_size(size)
        self.train_set = TrainingSet(self.training_data(data), device=self.device, dtype=self.dtype,
                                     chunk=config.chunk, resident=config.resident)

    def training_data(self, data):
        return data

    def patch_size_at(self, t: int) -> int:
        """P used at timestep t: from the schedule (nearest listed timestep) or the constant patch_size."""
        return self.size_schedule.at(t) if self.size_schedule is not None else self.config.patch_size

    def max_patch_size(self) -> int:
        """The largest meaningful patch size (larger ones give the same result or are not allowed)."""
        return 2 * max(self.shape[1:]) - 1

    def default_sizes(self) -> list[int]:
        """Candidate sizes for calibration: odd sizes 1, 3, ... up to :meth:`max_patch_size`."""
        return list(range(1, self.max_patch_size() + 1, 2))

    def check_patch_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(f"{self.name}: patch size must be a positive integer, got {size!r}")
        size = int(size)
        if self.odd_only and size % 2 == 0:
            raise ConfigError(f"{self.name}: patch size must be odd (the patch is centred on its pixel), got {size}")
        return size

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        return self.denoise_patch(x_t, t, self.patch_size_at(t))

    def denoise_patch(self, x_t: torch.Tensor, t: int, patch_size: int) -> torch.Tensor:
        """x0_hat at an explicit patch size (``x_t`` [B, C, H, W] on this denoiser's device)."""
        t = self.schedule.check_t(t)
        size = self.check_patch_size(patch_size)
        x = x_t.to(device=self.device, dtype=self.dtype)
        return self._denoise(x, self.schedule.a(t), self.schedule.b2(t), size).to(x_t.dtype)

    def _denoise(self, x: torch.Tensor, a: float, b2: float, size: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def _images(self) -> Iterator[torch.Tensor]:
        """Training chunks as images [k, C, H, W]."""
        for _, y, _ in self.train_set:
            yield y.view(y.shape[0], *self.shape)


def _check_padding(name: str, padding: str, allowed=PADDINGS) -> str:
    if padding not in allowed:
        raise ConfigError(f"{name}: padding must be one of {', '.join(allowed)}, got '{padding}'")
    return padding


def _subset(data, max_train: int | None, seed: int, name: str):
    if max_train is None:
        return data
    if max_train < 1:
        raise ConfigError(f"{name}: max_train must be a positive number of images or None, got {max_train}")
    return data if len(data) <= max_train else data.subset(max_train, seed=seed)


# ------------------------------------------------------------------------------------------------
# LS: same-location patches (Kamb & Ganguli 2024)
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
    logits = ls_logits(x, y, a, b2, d, padding)  # [B, k, H, W]
    m = logits.detach().amax(1, keepdim=True)
    e = _shifted_exp(logits, m)
    return SoftmaxState(m, e.sum(1, keepdim=True), torch.einsum("bkhw,kchw->bchw", e, y))


@register("ls")
class LSDenoiser(PatchDenoiser):
    """Kamb & Ganguli's LS machine: ``x0_hat[i] = sum_k w_{k,i} y_k[i]``,
    ``w_{k,i} ∝ exp(-||Pi_i(x_t) - a Pi_i(y_k)||^2 / (2 b2))`` with the P x P patch at the same location.

    Border: ``zeros`` (default, as the paper's code, which zero-pads x_t and y alike) is the same as
    ``truncate`` -- the patch is cut at the border; ``circular`` wraps around. A patch of side
    ``2 max(H, W) - 1`` (zeros) or ``>= max(H, W)`` (circular) covers the whole image for every pixel and
    gives the exact ``optimal`` denoiser.
    """

    Config = LSConfig

    def __init__(self, data, config: LSConfig, schedule=None):
        _check_padding(self.name, config.padding)
        super().__init__(data, config, schedule)

    def max_patch_size(self) -> int:
        L = max(self.shape[1:])
        return 2 * L - 1 if self.config.padding != "circular" else L + 1 - L % 2

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        d, state = size // 2, None
        for y in self._images():
            for yb in _blocks(y, B * (C + 2) * H * W, self.config.block):
                state = _merge(state, ls_state(x, yb, a, b2, d, self.config.padding))
        return state.mean()


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
class _Bank:
    """Candidate patches as GEMM operands: ``pt`` [D, N] the patches, ``sq`` [N] their squared norms,
    ``logn`` [N] log multiplicities (identical patches merged), ``vals`` [C+1, N] centre pixels and a 1
    (stored transposed: the weighted sums then run as a transposed-operand GEMM, much faster)."""

    pt: torch.Tensor
    sq: torch.Tensor
    logn: torch.Tensor
    vals: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, centre: list[int], dedup: bool) -> "_Bank":
        if dedup:  # exact: a patch seen n times enters the softmax once with weight n
            rows, counts = torch.unique(rows, dim=0, return_counts=True)
            logn = counts.to(rows.dtype).log()
        else:
            logn = rows.new_zeros(rows.shape[0])
        vals = torch.cat([rows[:, centre], rows.new_ones(rows.shape[0], 1)], dim=1)
        return cls(rows.t().contiguous(), (rows * rows).sum(1), logn, vals.t().contiguous())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pt, self.sq, self.logn, self.vals))


def bank_state(q: torch.Tensor, qmask: torch.Tensor | None, bank: _Bank, a: float, b2: float,
               block: int, buf: torch.Tensor | None = None) -> SoftmaxState:
    """Softmax state (m, s [Q], acc [Q, C]) of queries ``q`` [Q, D] against every candidate of ``bank``.

    Log-weight of candidate p: ``log n_p + (a <q, p> - a^2 ||mask * p||^2 / 2) / b2`` (``qmask`` [Q, D]
    marks the in-image part of truncated query patches; None = all of it). Temporaries hold at most
    ``block`` elements, written into ``buf`` when autograd is not recording.
    """
    Q = q.shape[0]
    C = bank.vals.shape[0] - 1
    reuse = buf is not None and not (torch.is_grad_enabled() and q.requires_grad)
    step = max(1, block // Q)
    lhs = None if qmask is None else torch.cat([q * (a / b2), qmask * (-0.5 * a * a / b2)], dim=1)  # [Q, 2D]
    state = None
    for s0 in range(0, bank.pt.shape[1], step):
        pt = bank.pt[:, s0:s0 + step]  # [D, n]
        n = pt.shape[1]
        if lhs is None:
            bias = bank.logn[s0:s0 + n] - (0.5 * a * a / b2) * bank.sq[s0:s0 + n]
            if reuse:
                logits = torch.addmm(bias, q, pt, alpha=a / b2, out=buf[:Q * n].view(Q, n))  # [Q, n]
            else:
                logits = torch.addmm(bias, q, pt, alpha=a / b2)
        else:
            rhs = torch.cat([pt, pt * pt], dim=0)  # [2D, n]
            if reuse:
                logits = torch.mm(lhs, rhs, out=buf[:Q * n].view(Q, n)).add_(bank.logn[s0:s0 + n])
            else:
                logits = lhs @ rhs + bank.logn[s0:s0 + n]
        m = logits.detach().amax(1, keepdim=True)
        e = _shifted_exp(logits, m)
        r = e @ bank.vals[:, s0:s0 + n].t()  # [Q, C+1]: weighted centre pixels and the weight sum
        state = _merge(state, SoftmaxState(m[:, 0], r[:, C], r[:, :C]))
    return state


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
    m = logits.detach().amax(2, keepdim=True)
    e = _shifted_exp(logits, m)
    acc = torch.bmm(e, vf)  # [G, B*I, C]
    return SoftmaxState(m.view(G, B, I), e.sum(2).view(G, B, I), acc.view(G, B, I, C))


def _grid(rows: list[int], cols: list[int], W: int, device) -> torch.Tensor:
    r = torch.as_tensor(rows, dtype=torch.long, device=device)
    c = torch.as_tensor(cols, dtype=torch.long, device=device)
    return (r[:, None] * W + c[None, :]).reshape(-1)


class _EquivariantBase(PatchDenoiser):
    """Shared by ELS and boundary ELS: a subset of the training set and a cache of candidate banks."""

    def __init__(self, data, config, schedule=None):
        if config.bank_mb < 0:
            raise ConfigError(f"{self.name}: bank_mb must be >= 0, got {config.bank_mb}")
        super().__init__(data, config, schedule)
        self._banks: dict[tuple[int, str], _Bank] = {}

    def training_data(self, data):
        return _subset(data, self.config.max_train, self.config.seed, self.name)

    def _centre(self, size: int) -> list[int]:
        d = size // 2
        return [c * size * size + d * size + d for c in range(self.shape[0])]

    def banks(self, size: int, mode: str) -> Iterator[_Bank]:
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
            rows = torch.cat([_candidate_rows(y, size, mode) for y in self._images()])
            bank = _Bank.of(rows, self._centre(size), dedup=True)
            del rows
            while self._banks and sum(b.nbytes() for b in self._banks.values()) + bank.nbytes() > budget:
                self._banks.pop(next(iter(self._banks)))
            self._banks[key] = bank
            yield bank
            return
        for y in self._images():
            for yb in _blocks(y, J * D, self.config.block):
                yield _Bank.of(_candidate_rows(yb, size, mode), self._centre(size), dedup=False)

    def _bank_softmax(self, q, qmask, size, mode, a, b2) -> SoftmaxState:
        grad = torch.is_grad_enabled() and q.requires_grad
        Q = q.shape[0]
        buf = None if grad else q.new_empty(Q * max(1, self.config.block // Q))
        state = None
        for bank in self.banks(size, mode):
            state = _merge(state, bank_state(q, qmask, bank, a, b2, self.config.block, buf))
        return state


@register("els")
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

    Config = ELSConfig

    def __init__(self, data, config: ELSConfig, schedule=None):
        _check_padding(self.name, config.padding)
        if config.candidates not in ("valid", "padded"):
            raise ConfigError(f"{self.name}: candidates must be 'valid' or 'padded', got '{config.candidates}'")
        super().__init__(data, config, schedule)

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


@register("els-boundary")
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

    Config = BoundaryELSConfig

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
        for y in self._images():
            for yb in _blocks(y, B * (C + 2) * H * W, self.config.block):
                corners = _merge(corners, ls_state(x, yb, a, b2, d, "zeros"))
        out = corners.mean().reshape(B, C, H * W)
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
        for y in self._images():
            for yb in _blocks(y, 2 * per_image, self.config.block):
                cand = _unfold(yb, size, "zeros")  # [k, D, HW]
                centre = yb.reshape(yb.shape[0], C, H * W)
                for n, fam in enumerate(fams):
                    states[n] = _merge(states[n], _family_state(q, cand, centre, fam, a, b2))
        for fam, st in zip(fams, states):
            G, Bq, I, _ = st.acc.shape
            out[:, :, fam.q_idx.reshape(-1)] = st.mean().permute(1, 3, 0, 2).reshape(B, C, G * I)
        return out.view(B, C, H, W)


# ------------------------------------------------------------------------------------------------
# PSPC-Square (Niedoba et al. 2024)
# ------------------------------------------------------------------------------------------------

@register("pspc")
class PSPCDenoiser(PatchDenoiser):
    """Niedoba et al.'s PSPC-Square: for every placement p of a P x P patch that fits in the image,
    the patch posterior mean ``E[Pi_p y | Pi_p x_t] = sum_k w_{k,p} Pi_p y_k``,
    ``w_{k,p} ∝ exp(-||Pi_p x_t - a Pi_p y_k||^2 / (2 b2))``, over the training patches at the same
    place p (as in the authors' code); each pixel is the plain average of the estimates of all
    patches that cover it. Patches never cross the border; a side larger than the image is cut to
    the image, so ``patch_size >= max(H, W)`` is the exact ``optimal`` denoiser. Any P >= 1 (even too).
    """

    Config = PSPCConfig
    odd_only = False

    def max_patch_size(self) -> int:
        return max(self.shape[1:])

    def default_sizes(self) -> list[int]:
        L = self.max_patch_size()
        return sorted(set(range(1, L + 1, 2)) | {L})

    def _denoise(self, x, a, b2, size):
        B, (C, H, W) = x.shape[0], self.shape
        ph, pw = min(size, H), min(size, W)
        nh, nw = H - ph + 1, W - pw + 1
        D = C * ph * pw
        state = None
        for y in self._images():
            for yb in _blocks(y, B * (C + 1) * H * W + nh * nw * D, self.config.block):
                xy = (x.unsqueeze(1) * yb.unsqueeze(0)).sum(2)  # [B, k, H, W]
                yy = (yb * yb).sum(1)  # [k, H, W]
                logits = (a * valid_box_sum(xy, ph, pw) - (0.5 * a * a) * valid_box_sum(yy, ph, pw)) / b2
                logits = logits.flatten(2)  # [B, k, Np]
                m = logits.detach().amax(1)  # [B, Np]
                e = _shifted_exp(logits, m.unsqueeze(1))
                patches = F.unfold(yb, (ph, pw))  # [k, D, Np]
                acc = torch.einsum("bkp,kdp->bpd", e, patches)  # [B, Np, D]
                state = _merge(state, SoftmaxState(m, e.sum(1), acc))
        est = state.mean().transpose(1, 2)  # [B, D, Np]: each placement's patch posterior mean
        total = F.fold(est, (H, W), (ph, pw))
        count = F.fold(torch.ones_like(est[:1]), (H, W), (ph, pw))
        return total / count


# ------------------------------------------------------------------------------------------------
# Smoothed closed-form denoiser (Scarvelis, Borde & Solomon 2023)
# ------------------------------------------------------------------------------------------------

@dataclass
class SCFDMConfig(DenoiserConfig):
    sigma: float = 0.1  # smoothing width, in the paper's coordinates z = x_t / (a + sqrt(b2)) (see class doc)
    smoothing: str = "score"  # score: the paper's smoothed closed-form score (Monte Carlo over num_samples);
    # data: closed-form posterior mean of the training set blurred by N(0, sigma^2 I) (Gaussian KDE)
    num_samples: int = 16  # M, Gaussian perturbations averaged by the score smoothing
    seed: int = 0  # seed of those perturbations (the same M draws at every call: a deterministic map)
    nearest_k: int | None = None  # approximate: each perturbed point uses only its nearest_k training images
    chunk: int = 4096  # training images per streamed chunk (the result does not depend on it)
    dtype: str = "float64"
    resident: bool | None = None


@register("scfdm")
class SmoothedClosedFormDenoiser(Denoiser):
    """Scarvelis, Borde & Solomon's smoothed closed-form diffusion model (sigma-CFDM).

    The paper smooths the closed-form score of the training set, ``s_sigma(z) = E_eps[s(z + sigma eps)]``,
    in its interpolant coordinates ``z = tau x1 + (1 - tau) x0``; ours are ``z = x_t / (a + sqrt(b2))``,
    ``tau = a / (a + sqrt(b2))``. Because the score is affine in the denoiser and the perturbation has
    mean zero, this is the denoiser ``x0_hat_sigma(x_t) = E_eps[x0_hat_opt(x_t + sigma (a + sqrt(b2)) eps)]``.
    The expectation has no closed form; as in the paper it is a Monte Carlo average over ``num_samples``
    draws (fixed by ``seed``, shared by every input, so the map is deterministic), and ``nearest_k``
    restricts each draw's softmax to its nearest training images (the paper's nearest-neighbour estimator,
    here exact top-k). ``sigma = 0`` is exactly the ``optimal`` denoiser.

    ``smoothing=data`` is the other reading of "smoothing": the exact posterior mean when the data are the
    training images blurred by ``N(0, sigma^2 I)`` (sigma in data units): weights
    ``∝ exp(-||x_t - a y_k||^2 / (2 (a^2 sigma^2 + b2)))`` and ``E[y | x_t, k] = y_k + a sigma^2 (x_t - a y_k)
    / (a^2 sigma^2 + b2)``.
    """

    Config = SCFDMConfig

    def __init__(self, data, config: SCFDMConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        if not (config.sigma >= 0 and math.isfinite(config.sigma)):
            raise ConfigError(f"{self.name}: sigma must be a finite number >= 0, got {config.sigma}")
        if config.smoothing not in ("score", "data"):
            raise ConfigError(f"{self.name}: smoothing must be 'score' or 'data', got '{config.smoothing}'")
        if config.num_samples < 1:
            raise ConfigError(f"{self.name}: num_samples must be a positive integer, got {config.num_samples}")
        if config.smoothing == "data" and config.nearest_k is not None:
            raise ConfigError(f"{self.name}: nearest_k applies to smoothing=score only")
        self.dtype = resolve_dtype(config.dtype)
        self.optimal = OptimalDenoiser(data, OptimalConfig(device=str(self.device), chunk=config.chunk,
                                                           dtype=config.dtype, resident=config.resident,
                                                           top_k=config.nearest_k), self.schedule)
        self.train_set = self.optimal.train_set

    def perturbations(self) -> torch.Tensor:
        """The M standard-normal draws eps [M, C, H, W] (float64, CPU generator seeded by ``seed``)."""
        gen = torch.Generator().manual_seed(int(self.config.seed))
        return torch.randn((self.config.num_samples, *self.shape), generator=gen, dtype=torch.float64)

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        a, b2 = self.schedule.a(t), self.schedule.b2(t)
        x = x_t.to(self.dtype)
        sigma = float(self.config.sigma)
        if sigma == 0.0:
            return self.optimal.denoise(x, t)
        if self.config.smoothing == "data":
            return self._data_smoothed(x, a, b2, sigma)
        eps = self.perturbations().to(device=x.device, dtype=x.dtype)  # [M, C, H, W]
        scale = sigma * (a + math.sqrt(b2))  # sigma in z coordinates -> x_t coordinates
        B, M = x.shape[0], eps.shape[0]
        xs = (x.unsqueeze(0) + scale * eps.unsqueeze(1)).reshape(M * B, *self.shape)  # [M*B, C, H, W]
        return self.optimal.denoise(xs, t).view(M, B, *self.shape).mean(0)

    def _data_smoothed(self, x, a, b2, sigma):
        v = a * a * sigma * sigma + b2  # variance of x_t given the component k
        xf = x.reshape(x.shape[0], -1)
        state = None
        for _, y, y_sq in self.train_set:
            state = _merge(state, SoftmaxState.of(optimal_logits(xf, y, y_sq, a, v), y))
        y_bar = state.mean()  # sum_k w_k y_k
        return (y_bar + (a * sigma * sigma / v) * (xf - a * y_bar)).view_as(x)
