"""The paper's analytical denoiser, the Wiener-masked local denoiser (DESIGN.md §2.5), exact and fast.

For each output pixel i a binary mask ``S_i(t)`` is read from the Wiener gain
``G_t = U diag(a^2 lam / (a^2 lam + b2)) U^T`` (float64); then, per pixel, a softmax over the
training images

    w_{k,i} ∝ exp(-sum_{m in S_i} (x_t[m] - a y_k[m])^2 / (2 b2 T)),      x0_hat[i] = sum_k w_{k,i} y_k[i].

How it is computed, exactly (the exact global softmax; see "Exactness" below):

* The ``x_t[m]^2`` term is constant over k and cancels, so in log2 units the logit is
  ``alpha sum_{m in S_i} x[m] y_k[m] - beta Q[k, i]`` with ``alpha = a log2(e) / (b2 T)``,
  ``beta = a^2 log2(e) / (2 b2 T)`` and ``Q = (Y*Y) M`` query-independent (cached per timestep; on a
  miss computed by a dense product, by a gathered sum of the rows of Y*Y (``embedding_bag``), or,
  cheapest for MNIST at high noise, from each mask's runs of consecutive pixels along image rows and
  row-wise cumulative sums of Y*Y: 2 terms per run).
* Output pixels are cut into small spatial tiles q of g pixels (all channels together). Tile q needs
  only ``U_q``, the union of its masks; their intersection (the core) is summed once per query and
  shared. One matrix product per tile and block of k training images gives every logit of the tile:
  ``[Y[U_q - core]; Q[q]; 1; core sums]^T @ W`` -> [k, B*g], where W carries ``alpha x M``,
  ``-beta`` and the softmax shift. The multiply-adds are about ``B K nnz(M)`` (0.9x at t=900 on
  MNIST, 2-3x where masks are small) at matrix-product speed, instead of the dense ``B K n^2``.
  Pixels with an empty mask (constant pixels) get uniform weights: the data mean. The tile shape and
  the use of cores are chosen per timestep from the masks by a small cost model; ``path="dense"``
  ignores the sparsity (every tile reads all pixels).
* Weights ``2^(logit - shift)`` and their sums ``[sum_k w; sum_k w y_k[q]]`` (a second product)
  are accumulated in float64 per query and pixel. The shift of each (query, pixel) is its maximum
  over the first block; a later block whose weights would overflow is redone with its own maximum and
  the sums so far rescaled, so any block order and size give the same result.
* ``exp2`` instead of ``exp`` (the same function in log2 units, about 3x faster on CPU).
* On the CPU the training blocks are shared out among worker threads (``threads``, default torch's
  thread count), each running torch single-threaded with its own softmax states, merged at the end:
  the per-tile products are too small to split well over cores. The block width follows the plan:
  narrow where masks are big (a tile's working set stays in cache), wide where they are small.

Exactness: weights below ``2^-64`` of the running maximum are dropped (they change x0_hat by less
than ``K 2^-64`` relative, and as subnormal floats they would slow the products a hundredfold).
The default float32 products evaluate the logit in its expanded form, whose terms are
``O(|S_i| / b2)`` while differences between images can be O(1): the absolute logit error is about
``eps32 |S_i| / b2``. It only matters between near-tied images, which agree at pixel i to within
~sqrt(b2), so x0_hat stays within ~1e-5: on 10,000 MNIST images, float32 vs float64 differ by at
most 4.4e-5 (mean 1e-6) at every t from 900 to 0. ``dtype="float64"`` agrees with a float64
brute-force reference to 1e-9 (tests).
"""

from __future__ import annotations

import math
import warnings
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from ..errors import ConfigError
from ..stats import Spectrum, data_spectrum
from .base import Denoiser, DenoiserConfig, register, resolve_dtype
from .linear import wiener_gain, wiener_gain_eigs

LOG2E = 1.4426950408889634
NORMALIZATIONS = ("diag", "sym")
PATHS = ("auto", "grouped", "dense")
DIAG_EPS = 1e-6  # the official code replaces |G[m, m]| < 1e-6 by 1 before dividing
CHUNK_AVERAGE_EPS = 1e-8  # the official code adds 1e-8 to the summed chunk weights
NEGLIGIBLE_LOG2 = -64.0  # weights below 2^-64 of the running total are dropped (see _exp_and_sum)
BLOCK_ELEMENTS = 450_000  # CPU: a tile's gathered rows plus logits per block of training images (~1.8 MB)
WEIGHTS_RESIDENT = 1 << 24  # build the tiles' weight matrices once per call below this many elements
DENSE_Q_MAX = 4096  # largest n for which Q may be computed by one dense [n, n] product per block
# Q = M^T (Y*Y), query-independent (cached per timestep), on a cache miss by: "dense" one [n, n] product
# per block; "sparse" a weighted gather-and-sum of the nnz(M) rows of Y*Y (embedding_bag); "runs" each
# mask as runs of consecutive pixels along image rows, Q[i] = sum over runs of C[end] - C[start - 1] with
# C the row-wise cumulative sum of Y*Y (2 terms per run: 5x fewer than nnz(M) for MNIST at high noise)
Q_MODES = ("dense", "sparse", "runs")
Q_SLICE = 128  # training images per gathered sum on the CPU (cache-resident)
# one term of such a gathered sum, in dense-product multiply-adds (measured on the CPU: embedding_bag
# runs 2x faster than the CSR product torch.sparse.mm, with the same sums in the same order)
SPARSE_MACS = 2.0


# ------------------------------------------------------------------------------------------------
# Masks (DESIGN.md §2.5)
# ------------------------------------------------------------------------------------------------

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


def normalized_gain(G: torch.Tensor, normalize: str = "diag") -> torch.Tensor:
    """Normalised Wiener gain [n, n]: ``G[m, i] / G[m, m]`` ("diag", the official rule: row m by its
    diagonal) or ``G[m, i] / sqrt(G[m, m] G[i, i])`` ("sym", well conditioned on near-constant pixels).
    Diagonal entries with ``|G[m, m]| < 1e-6`` are replaced by 1, as in the official code."""
    if normalize not in NORMALIZATIONS:
        raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got '{normalize}'")
    d = G.diagonal().clone()
    d[d.abs() < DIAG_EPS] = 1.0
    if normalize == "diag":
        return G / d[:, None]
    s = d.abs().sqrt()
    return G / (s[:, None] * s[None, :])


def threshold_masks(norm: torch.Tensor, tau: float) -> torch.Tensor:
    """Binary masks [n, n]: ``|norm| >= tau * max|norm|`` (global maximum); column i is S_i.
    ``tau = 0`` gives all-ones masks (every pixel sees the whole image: the optimal denoiser)."""
    if tau == 0:
        return torch.ones(norm.shape, dtype=torch.bool, device=norm.device)
    mag = norm.abs()
    return mag >= tau * mag.max()


def wiener_masks(spectrum: Spectrum, a: float, b2: float, tau: float, normalize: str = "diag") -> torch.Tensor:
    """Masks ``S_i(t)`` from the Wiener gain, bool [n, n] with column i = S_i (computed in float64)."""
    G = wiener_gain(spectrum, a, b2).to(torch.float64)
    return threshold_masks(normalized_gain(G, normalize), tau)


def masked_logits(x: torch.Tensor, y: torch.Tensor, masks: torch.Tensor, a: float, b2: float,
                  temperature: float = 1.0) -> torch.Tensor:
    """``-sum_{m in S_i} (x[m] - a y_k[m])^2 / (2 b2 T)`` [B, k, n] for x [B, n], y [k, n] (plain formula)."""
    d = (x[:, None, :] - a * y[None, :, :]) ** 2  # [B, k, n]
    return -(d @ masks.to(d.dtype)) / (2 * b2 * temperature)


# ------------------------------------------------------------------------------------------------
# Execution plan: output tiles and the input pixels each tile needs
# ------------------------------------------------------------------------------------------------

@dataclass
class Tile:
    """A tile of output pixels and the input pixels their masks need.

    ``out`` [g] are the output pixels q; ``core`` [c] = the intersection of their masks (summed once per
    query, then shared by the g pixels); ``resid`` [r] = the rest of the union of their masks; and
    ``sub_t`` [g, r] (bool) = ``M[resid, out]^T``, each pixel's part of the rest.
    """

    out: torch.Tensor
    core: torch.Tensor
    resid: torch.Tensor
    sub_t: torch.Tensor


@dataclass
class MaskPlan:
    """How one timestep is computed: its masks, the tiles, and what they cost."""

    masks: torch.Tensor  # bool [n, n], column i = S_i
    tiles: list[Tile]
    empty: torch.Tensor  # output pixels whose mask is empty: uniform weights, x0_hat = the data mean
    tile_shape: tuple[int, int]
    dense: bool  # no use of the masks' sparsity (every tile reads all pixels, no cores)
    q_mode: str  # how Q = M^T (Y*Y) is computed on a cache miss: see ``Q_MODES``
    nnz: int  # nnz(M): the unavoidable multiply-adds per query and training image
    macs: int  # multiply-adds of the cross term this plan does per query and training image

    @property
    def density(self) -> float:
        return self.nnz / self.masks.numel()


TILE_SHAPES = ((1, 1), (1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8), (8, 16), (16, 16))
# Cost model, in multiply-adds at the peak matrix-product rate (measured on a 2-core AMD EPYC; only
# the ranking of the candidate plans matters, and the result never depends on the plan).
OVERHEAD_MACS = 2e6  # one tile and block of images: a dozen torch calls
GATHER_MACS = 30.0  # copying one float of the training block into a tile's buffer
ELEMENTWISE_MACS = 2.0  # one pass of a simple elementwise op, per element


def _gemm_efficiency(rows: int) -> float:
    """Rough fraction of peak a [rows, u] @ [u, k] product reaches on CPU (measured: 16 -> ~0.5, 128 -> ~0.9)."""
    return rows / (rows + 16.0)


def _tile_of(shape, th: int, tw: int) -> tuple[torch.Tensor, int]:
    """The tile of every pixel (th x tw tiles numbered row-major, all channels of a tile together) and
    the number of tiles."""
    C, H, W = shape
    per_row = -(-W // tw)
    h, w = torch.arange(H)[:, None] // th, torch.arange(W)[None, :] // tw
    return (h * per_row + w).reshape(-1).repeat(C), -(-H // th) * per_row


def _tiles(shape, th: int, tw: int) -> list[torch.Tensor]:
    """Output pixel indices of each tile of ``_tile_of``, in increasing order (channel by channel)."""
    tile, count = _tile_of(shape, th, tw)
    return list(torch.split(torch.argsort(tile, stable=True), torch.bincount(tile, minlength=count).tolist()))


def _tile_stats(masks: torch.Tensor, nonempty: torch.Tensor, shape, th: int, tw: int):
    """Per tile (as ``_tiles``): pixels with a non-empty mask g, union size u, core size c.

    ``masks`` [n, n] float (1.0 = in the mask; column i = S_i). Summed over each tile's output pixels,
    the masks count, for every input pixel j and tile, the tile's masks that contain j: j is in the union
    where that count is positive, in the core where it equals g (counts of at most n are exact)."""
    tile, count = _tile_of(shape, th, tw)
    g = torch.zeros(count, dtype=masks.dtype).index_add_(0, tile, nonempty.to(masks.dtype))
    hits = torch.zeros((masks.shape[0], count), dtype=masks.dtype).index_add_(1, tile, masks)  # [n, tiles]
    u = (hits > 0).sum(dim=0)
    c = torch.where(g > 0, (hits == g).sum(dim=0), 0)  # no core where every mask is empty
    return g.long(), u, c


def _costs(g, r, c, batch: int, chunk: int):
    """Estimated time per training image of tiles with g outputs, r residual and c core pixels."""
    rows = batch * g
    eff = rows / (rows + 16.0)
    cost = rows * (r + g + 1 + torch.where(c > 0, batch, 0)) / eff  # logits
    cost = cost + batch * c / _gemm_efficiency(batch)  # core sums
    cost = cost + rows * (g + 1) / eff  # weighted sums
    cost = cost + rows * 3 * ELEMENTWISE_MACS  # threshold, exp2
    cost = cost + GATHER_MACS * (r + c + 2 * g) + OVERHEAD_MACS / chunk
    return torch.where(g > 0, cost, 0.0)


def plan_masks(masks: torch.Tensor, shape, batch: int, *, path: str = "auto", chunk: int = 2048,
               tile: tuple[int, int] | None = None) -> MaskPlan:
    """Pick the tiling of the output pixels that minimises the estimated time for ``batch`` queries
    (or use the tile shape ``tile``).

    Pixels with an empty mask get uniform weights (their output is the data mean) and are left out;
    a tile sums its masks' common part (core) once per query where that pays.
    """
    n = masks.shape[0]
    nnz = int(masks.sum())
    m_cpu = masks.cpu()
    nonempty = m_cpu.any(dim=0)
    m_float = m_cpu.to(torch.float32)  # exact: counts of at most n
    # Q = M^T (Y*Y) on a cache miss, per training image: the cheapest of Q_MODES
    q_costs = {"dense": n * n / _gemm_efficiency(n) if n <= DENSE_Q_MAX else math.inf,
               "sparse": SPARSE_MACS * nnz,
               "runs": SPARSE_MACS * int(row_runs(m_cpu.T, shape).values().numel()) + 2 * ELEMENTWISE_MACS * n}
    q_mode = min(q_costs, key=q_costs.get)
    best = None
    for th, tw in dict.fromkeys((min(th, shape[1]), min(tw, shape[2])) for th, tw in ([tile] if tile else TILE_SHAPES)):
        g, u, c = _tile_stats(m_float, nonempty, shape, th, tw)
        options = []
        if path in ("auto", "grouped"):
            plain = _costs(g, u, torch.zeros_like(c), batch, chunk)
            cored = _costs(g, u - c, c, batch, chunk)
            use_core = (c > 0) if path == "grouped" else cored < plain  # "grouped": every core, for tests
            options.append((torch.where(use_core, cored, plain).sum().item(), False, use_core))
        if path in ("auto", "dense"):
            cost = _costs(g, torch.full_like(u, n), torch.zeros_like(c), batch, chunk)
            options.append((cost.sum().item(), True, torch.zeros_like(g, dtype=torch.bool)))
        for total, dense, use_core in options:
            if best is None or total < best[0]:
                best = (total, th, tw, dense, use_core)
    _, th, tw, dense, use_core = best
    dev = masks.device
    tiles, macs = [], 0
    rows = m_cpu.T.contiguous()  # row i = S_i
    for q, core_pays in zip(_tiles(shape, th, tw), use_core.tolist()):
        q = q[nonempty[q]]
        if not len(q):
            continue
        m_q = rows.index_select(0, q)  # [g, n]
        if dense:
            core, resid = torch.zeros(0, dtype=torch.long), torch.arange(n)
        elif core_pays:
            inter = m_q.all(dim=0)
            core, resid = torch.nonzero(inter).squeeze(1), torch.nonzero(m_q.any(dim=0) & ~inter).squeeze(1)
        else:
            core, resid = torch.zeros(0, dtype=torch.long), torch.nonzero(m_q.any(dim=0)).squeeze(1)
        sub_t = m_q.index_select(1, resid)  # [g, r]
        macs += len(q) * len(resid) + len(core)
        tiles.append(Tile(q.to(dev), core.to(dev), resid.to(dev), sub_t.to(dev)))
    empty = torch.nonzero(~nonempty).squeeze(1).to(dev)
    return MaskPlan(masks, tiles, empty, (th, tw), dense, q_mode, nnz, int(macs))


def row_runs(rows: torch.Tensor, shape) -> torch.Tensor:
    """The masks ``rows`` [r, n] (bool, one mask per row, pixels in (C, H, W) order) as runs of
    consecutive pixels along image rows: a sparse COO [r, n] with +1 at each run's last pixel and -1 just
    before its first (none when the run starts the image row), so that ``D @ C`` with C the row-wise
    cumulative sum of any image v equals ``rows @ v``."""
    C, H, W = shape
    m = rows.reshape(-1, C * H, W)
    after = torch.zeros_like(m)
    after[..., :-1] = m[..., 1:]
    ends = m & ~after  # last pixel of a run
    pre = torch.zeros_like(m)
    pre[..., :-1] = m[..., 1:] & ~m[..., :-1]  # the pixel just before a run (not for runs at w = 0)
    d = ends.to(torch.int8) - pre.to(torch.int8)
    return d.reshape(rows.shape[0], -1).to_sparse_coo().coalesce()


# ------------------------------------------------------------------------------------------------
# The training set, pixel-major
# ------------------------------------------------------------------------------------------------

class ColumnBlocks:
    """The training images pixel-major, ``YT`` [n, K] (one column per image): kept whole on the device
    when it fits in ``max_resident_bytes`` (or as asked), so that a block of any width is a view;
    otherwise each block is converted when it is needed. Iterating gives blocks of ``chunk`` images."""

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype, chunk: int,
                 resident: bool | None = None, max_resident_bytes: int = 4 << 30):
        self.data, self.device, self.dtype, self.chunk = data, device, dtype, int(chunk)
        nbytes = len(data) * data.dim * torch.finfo(dtype).bits // 8
        self.resident = nbytes <= max_resident_bytes if resident is None else bool(resident)
        self._full = None
        if self.resident:
            self._full = torch.empty((data.dim, len(data)), device=device, dtype=dtype)
            for start in range(0, len(data), self.chunk):
                y = data.chunk_at(start, self.chunk, device=device, dtype=dtype, flat=True)
                self._full[:, start:start + y.shape[0]] = y.T

    def block(self, start: int, stop: int) -> torch.Tensor:
        """Images ``start .. stop - 1`` as [n, stop - start] (a view when resident, else converted now)."""
        if self._full is not None:
            return self._full[:, start:stop]
        return self.data.chunk_at(start, stop - start, device=self.device, dtype=self.dtype, flat=True).T.contiguous()

    def bounds(self, width: int, multiple: int = 1) -> list[tuple[int, int]]:
        """``(start, stop)`` of consecutive blocks of about ``width`` images; their number is rounded up to
        a multiple of ``multiple`` (when there is more than one) so that workers get equal shares."""
        K, width = len(self), max(1, int(width))
        blocks = -(-K // width)
        if blocks > 1 and blocks % multiple:
            width = -(-K // (-(-blocks // multiple) * multiple))
        return [(s, min(s + width, K)) for s in range(0, K, width)]

    def __len__(self) -> int:
        return len(self.data)

    def __iter__(self):
        return (self.block(s, e) for s, e in self.bounds(self.chunk))


# ------------------------------------------------------------------------------------------------
# The denoiser
# ------------------------------------------------------------------------------------------------

@dataclass
class MaskedConfig(DenoiserConfig):
    tau: float | None = None  # mask threshold, a fraction of max |normalised G_t|; None = by image shape
    temperature: float = 1.0  # softmax temperature T
    normalize: str = "diag"  # mask normalisation: "diag" (official, row by its diagonal) or "sym"
    chunk: int | None = None  # training images per streamed block (None: per timestep on the CPU); exact mode
    # does not depend on it
    chunk_average: int | None = None  # compatibility: the official chunk-normalised softmax, chunks of N
    dtype: str = "float32"  # arithmetic of the big products; softmax states are always float64
    resident: bool | None = None  # keep the float training set on the device (default: if it fits)
    path: str = "auto"  # "auto" (tiles and cores chosen from the masks by a cost model), "grouped"
    # (tiles, every non-empty core used) or "dense" (tiles read every pixel: no use of sparsity)
    tile: str | None = None  # output tile shape "HxW" (e.g. "2x4"); None: chosen per timestep
    threads: int | None = None  # CPU: worker threads, each streaming its share of the training blocks
    # with single-threaded torch ops (None: torch.get_num_threads()); ignored on a GPU
    cache_mb: int = 1024  # in-memory per-timestep cache (masks, plans, the query-independent Q)
    cache: bool = True  # reuse the on-disk statistics cache


@register("masked")
class MaskedDenoiser(Denoiser):
    """Wiener-masked local denoiser: per pixel, the exact softmax average of the training images
    restricted to the pixel's Wiener mask (DESIGN.md §2.5).

    ``chunk_average=N`` reproduces the official code's streaming instead: softmax normalised within
    each block of N consecutive training images, the blocks' weighted means averaged. It is not the
    default because its result depends on N (on 2,000 MNIST images, N=512 vs one block: final samples
    differ by up to 1.9 on the [-1, 1] scale); it is not the model the paper writes down.

    ``masks`` (a bool [n, n] tensor or a function t -> tensor, column i = S_i) replaces the Wiener
    masks, e.g. for square-window ablations; ``spectrum`` replaces the data statistics.
    """

    Config = MaskedConfig
    has_closed_form_jacobian = True

    def __init__(self, data, config: MaskedConfig, schedule=None, *, spectrum: Spectrum | None = None,
                 masks: torch.Tensor | Callable[[int], torch.Tensor] | None = None):
        super().__init__(data.shape, config, schedule)
        self._validate(config)
        self.dtype = resolve_dtype(config.dtype)
        if config.tau is None:
            self.tau, self.tau_rule = default_tau(self.shape)
        else:
            self.tau, self.tau_rule = float(config.tau), "given"
        self._mask_override = masks
        if masks is None:
            spec = spectrum if spectrum is not None else data_spectrum(data, device="cpu", cache=config.cache)
            self.spectrum = spec.to(self.device)
        else:
            self.spectrum = spectrum.to(self.device) if spectrum is not None else None
        n = self.dim
        if config.chunk_average is not None:
            chunk = config.chunk_average
        elif config.chunk is not None:
            chunk = config.chunk
        else:  # a block [n, k] of about 8 MB (float32) on the CPU, 256 MB on a GPU; on the CPU the tiled
            # path sizes its blocks per timestep instead (see _block_width)
            budget = (64 << 20) if self.device.type == "cuda" else (2 << 20)  # elements
            chunk = max(256, min(len(data), budget // n))
        self.columns = ColumnBlocks(data, device=self.device, dtype=self.dtype, chunk=chunk,
                                    resident=config.resident)
        self._fixed_width = config.chunk is not None or config.chunk_average is not None or self.device.type != "cpu"
        self._masks: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._plans: OrderedDict[tuple[int, int], MaskPlan] = OrderedDict()
        self._q: dict[int, torch.Tensor] = {}  # Q [n, K] per timestep

    @staticmethod
    def _validate(c: MaskedConfig) -> None:
        if c.tau is not None and not (0.0 <= c.tau <= 1.0):
            raise ConfigError(f"tau must lie in [0, 1] (a fraction of the largest normalised gain), got {c.tau}")
        if not (c.temperature > 0 and math.isfinite(c.temperature)):
            raise ConfigError(f"temperature must be a positive number, got {c.temperature}")
        if c.normalize not in NORMALIZATIONS:
            raise ConfigError(f"normalize must be one of {', '.join(NORMALIZATIONS)}, got '{c.normalize}'")
        if c.path not in PATHS:
            raise ConfigError(f"path must be one of {', '.join(PATHS)}, got '{c.path}'")
        for key in ("chunk", "chunk_average"):
            v = getattr(c, key)
            if v is not None and v < 1:
                raise ConfigError(f"{key} must be a positive number of images, got {v}")
        if c.tile is not None:
            MaskedDenoiser._tile_shape(c.tile)
        if c.threads is not None and c.threads < 1:
            raise ConfigError(f"threads must be a positive number of CPU worker threads, got {c.threads}")
        if c.cache_mb < 0:
            raise ConfigError(f"cache_mb must be >= 0, got {c.cache_mb}")

    @staticmethod
    def _tile_shape(spec: str | None) -> tuple[int, int] | None:
        if spec is None:
            return None
        try:
            th, tw = (int(v) for v in str(spec).lower().split("x"))
        except ValueError:
            th = tw = 0
        if th < 1 or tw < 1:
            raise ConfigError(f"tile must look like '2x4' (rows x columns of output pixels), got '{spec}'")
        return th, tw

    def settings(self) -> dict:
        out = super().settings()
        out.update(tau=self.tau, tau_rule=self.tau_rule,
                   chunk=self.columns.chunk if self._fixed_width else "per timestep",
                   masks="given" if self._mask_override is not None else "wiener")
        return out

    # -- masks and plans ------------------------------------------------------------------------
    def masks(self, t) -> torch.Tensor:
        """The masks at timestep t, bool [n, n] on the device; column i is S_i (cached)."""
        t = self.schedule.check_t(t)
        if t in self._masks:
            self._masks.move_to_end(t)
            return self._masks[t]
        if self._mask_override is not None:
            m = self._mask_override(t) if callable(self._mask_override) else self._mask_override
            m = torch.as_tensor(m).to(device=self.device, dtype=torch.bool)
            if m.shape != (self.dim, self.dim):
                raise ConfigError(f"masks must have shape [{self.dim}, {self.dim}], got {tuple(m.shape)}")
        else:
            m = wiener_masks(self.spectrum, self.schedule.a(t), self.schedule.b2(t), self.tau,
                             self.config.normalize)
            self._warn_if_degenerate(m, t)
        self._masks[t] = m
        self._trim(self._masks, self._cache_bytes() // 4)
        return m

    def _warn_if_degenerate(self, m: torch.Tensor, t: int) -> None:
        """Warn when a varying pixel's own mask leaves it out: with the official row-by-diagonal rule a
        nearly constant pixel (tiny G[m, m], common on small subsets) inflates the global maximum, the
        threshold rises above every other entry, and outputs collapse to the mean image."""
        spec = self.spectrum
        gain_diag = spec.eigvecs.square() @ wiener_gain_eigs(spec.eigvals, self.schedule.a(t), self.schedule.b2(t))
        varying = gain_diag.abs() >= DIAG_EPS  # diag(U g U^T) in O(n^2), not the [n, n] gain
        lost = int((varying & ~m.diagonal().to(varying.device)).sum())
        if lost:
            warnings.warn(
                f"masked: at t={t}, {lost} of {int(varying.sum())} varying pixels are missing from their own "
                f"mask (normalize='{self.config.normalize}', tau={self.tau}); a nearly constant pixel dominates "
                "the threshold and the outputs collapse towards the mean image. Use normalize=sym (well "
                "conditioned) or more training images.", RuntimeWarning, stacklevel=3)

    def mask_density(self, t) -> float:
        """Fraction of ones in the masks at timestep t."""
        return float(self.masks(t).double().mean())

    def plan(self, t, batch: int = 8) -> MaskPlan:
        """The tiling used at timestep t for ``batch`` queries (cached)."""
        t = self.schedule.check_t(t)
        key = (t, int(batch))
        if key in self._plans:
            self._plans.move_to_end(key)
            return self._plans[key]
        p = plan_masks(self.masks(t), self.shape, batch, path=self.config.path, chunk=self.columns.chunk,
                       tile=self._tile_shape(self.config.tile))
        self._plans[key] = p
        self._trim(self._plans, self._cache_bytes() // 4)
        return p

    def clear_cache(self) -> None:
        """Forget the cached masks, plans and query-independent terms."""
        self._masks.clear()
        self._plans.clear()
        self._q.clear()

    def _cache_bytes(self) -> int:
        return int(self.config.cache_mb) << 20

    @staticmethod
    def _nbytes(obj) -> int:
        if isinstance(obj, torch.Tensor):
            return obj.numel() * obj.element_size()
        if isinstance(obj, MaskPlan):
            return MaskedDenoiser._nbytes(obj.masks) + sum(
                sum(MaskedDenoiser._nbytes(v) for v in (tl.out, tl.core, tl.resid, tl.sub_t)) for tl in obj.tiles)
        return sum(MaskedDenoiser._nbytes(v) for v in obj)

    def _trim(self, store: OrderedDict, budget: int) -> None:
        """Drop least recently used entries beyond ``budget`` bytes, always keeping the newest."""
        while len(store) > 1 and sum(self._nbytes(v) for v in store.values()) > budget:
            store.popitem(last=False)

    def _q_may_cache(self) -> bool:
        """Whether one more timestep of Q [n, K] fits the budget (kept entries are never evicted:
        the sampler visits timesteps cyclically, so keeping the first ones beats LRU)."""
        per_t = self.dim * len(self.columns) * torch.finfo(self.dtype).bits // 8
        used = sum(self._nbytes(v) for v in self._q.values())
        return used + per_t <= self._cache_bytes() * 3 // 4

    # -- the denoiser ---------------------------------------------------------------------------
    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        x = x_t.reshape(x_t.shape[0], -1)  # [B, n]
        if torch.is_grad_enabled() and x.requires_grad:
            out = self._denoise_differentiable(x.to(torch.float64), t)
        else:
            out = self._denoise_tiled(x.to(self.dtype), t)
        return out.reshape(x_t.shape)

    def _coefficients(self, t: int) -> tuple[float, float]:
        """``alpha``, ``beta`` of the log2-unit logit ``alpha x.y - beta Q``."""
        a, b2, T = self.schedule.a(t), self.schedule.b2(t), self.config.temperature
        return a * LOG2E / (b2 * T), a * a * LOG2E / (2.0 * b2 * T)

    def _workers(self) -> int:
        """Worker threads of the tiled path: on the CPU ``threads`` (default: torch's intra-op thread
        count), on a GPU one."""
        if self.device.type != "cpu":
            return 1
        return max(1, int(self.config.threads or torch.get_num_threads()))

    @torch.no_grad()
    def _denoise_tiled(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The fast exact path (see the module docstring): ``x`` [B, n] -> x0_hat [B, n] (float64).

        The training blocks are shared out among the worker threads (``_stream``); each keeps its own
        softmax state per tile and the states are merged here. On a CPU every worker runs torch
        single-threaded: the products of a tile are small ([k, ~400] x [~400, B*g]), and splitting each
        of them over the cores wastes much of the time in synchronisation (bench_masked.py on 2 cores:
        two workers are 1.5x (t = 900) to 3.2x (t = 0) faster than one stream using both cores for every
        product).
        """
        B, n = x.shape
        plan = self.plan(t, B)
        alpha, beta = self._coefficients(t)
        q_cached = self._q.get(t)
        tiles = plan.tiles
        xa = alpha * x  # [B, n]
        ctx = dict(
            plan=plan, B=B, beta=beta, xa=xa, q_cached=q_cached, store_q=q_cached is None and self._q_may_cache(),
            m_t=self._q_operator(plan) if q_cached is None else None,  # see _q_operator
            xa_core=[xa[:, tl.core] for tl in tiles],  # [B, c]
            gather=[torch.cat([tl.resid, tl.core]) for tl in tiles],
        )
        workers = self._workers()
        # blocks as asked (chunk, chunk_average), else in a number the workers share evenly
        bounds = self.columns.bounds(self._block_width(plan, B), 1 if self._fixed_width else workers)
        workers = min(workers, len(bounds))
        weights = sum(B * len(tl.out) * (B + 1 + len(tl.out) + len(tl.resid)) for tl in tiles)
        ctx["resident"] = weights * workers <= WEIGHTS_RESIDENT  # each worker holds its own
        if ctx["store_q"]:  # the workers fill disjoint column ranges
            ctx["q_store"] = torch.empty((n, len(self.columns)), device=self.device, dtype=self.dtype)
        shares = [bounds[w::workers] for w in range(workers)]
        parts = self._in_workers(lambda share: self._stream(ctx, share), shares)

        average = self.config.chunk_average is not None
        first = parts[0]
        for part in parts[1:]:  # merge: sums rescaled to the larger of the two shifts
            first["empty"] += part["empty"]
            for ti in range(len(tiles)):
                if average:
                    first["means"][ti] += part["means"][ti]
                    continue
                s0, s1 = first["shifts"][ti], part["shifts"][ti]
                if s1 is None:
                    continue
                if s0 is None:
                    first["shifts"][ti], first["totals"][ti] = s1, part["totals"][ti]
                    continue
                s = torch.maximum(s0, s1)
                first["totals"][ti] = first["totals"][ti] * torch.exp2(s0 - s) + part["totals"][ti] * torch.exp2(s1 - s)
                first["shifts"][ti] = s
        blocks = len(bounds)
        if ctx["store_q"]:
            self._q[t] = ctx["q_store"]
        out = torch.empty((B, n), device=self.device, dtype=torch.float64)
        for ti, tl in enumerate(tiles):
            if average:
                mu = first["means"][ti] / (blocks + CHUNK_AVERAGE_EPS)
            else:
                mu = self._diagonal(first["totals"][ti], B, len(tl.out)) / first["totals"][ti][0]
            out[:, tl.out] = mu.view(B, -1)
        if len(plan.empty):
            empty = first["empty"]
            out[:, plan.empty] = empty / (blocks + CHUNK_AVERAGE_EPS) if average else empty / len(self.columns)
        return out

    @staticmethod
    def _in_workers(fn, shares: list) -> list:
        """``[fn(share) for share in shares]``, one thread per share, each running torch single-threaded
        (torch's thread count is restored afterwards). Each thread's work is fixed in advance, so the
        result does not depend on timing."""
        if len(shares) == 1:
            return [fn(shares[0])]
        threads = torch.get_num_threads()

        def run(share):
            torch.set_num_threads(1)  # this thread's own OpenMP team
            return fn(share)

        try:
            with ThreadPoolExecutor(len(shares), thread_name_prefix="localdiff-masked") as pool:
                return list(pool.map(run, shares))
        finally:
            torch.set_num_threads(threads)

    def _block_width(self, plan: MaskPlan, B: int) -> int:
        """Training images per block for this plan: the given ``chunk``, or on the CPU as many as keep a
        tile's working set (gathered rows [u, k] and logits [k, B*g]) near ``BLOCK_ELEMENTS``. Measured
        on MNIST: ~750 at high noise (u ~ 450, B*g = 128) is 10-15% faster than 2,500, while at low noise
        (u < 100) wide blocks win, the per-call overheads dominating."""
        if self._fixed_width or not plan.tiles:
            return self.columns.chunk
        rows = sum(B + 1 + len(tl.out) + len(tl.resid) + len(tl.core) for tl in plan.tiles) / len(plan.tiles)
        cols = max(B * len(tl.out) for tl in plan.tiles)
        return int(min(max(BLOCK_ELEMENTS / (rows + cols), 512), 8192))

    def _stream(self, ctx: dict, share: list[tuple[int, int]]) -> dict:
        """One worker's share: the training blocks ``share`` (image ranges), every tile, its own buffers
        and state.

        Per tile and block one buffer holds, row-contiguously,
        ``[P (B rows: core sums per query); 1; Q[q] (g); Y[resid] (r); Y[core] (c)]``, and the tile's
        logits are ``buffer[...]^T @ W`` [k, B*g] with ``W`` [B + 1 + g + r, B*g] = [selector; -shift;
        -beta; alpha x M] (this orientation runs ~25% faster on CPU than ``W^T @ buffer``).
        Each column's softmax shift is fixed at the worker's first block's maximum (a later block that
        would overflow is redone with its own maximum and the sums rescaled), so the raw sums
        ``[sum_k w, sum_k w y_k[i]]`` of its blocks are simply added, in float64.
        """
        plan, B, beta, xa = ctx["plan"], ctx["B"], ctx["beta"], ctx["xa"]
        q_cached, m_t = ctx["q_cached"], ctx["m_t"]
        xa_core, gather = ctx["xa_core"], ctx["gather"]
        average = self.config.chunk_average is not None
        n, dev, dt = self.dim, self.device, self.dtype
        f64 = dict(device=dev, dtype=torch.float64)
        tiles = plan.tiles

        k_max = max(e - s0 for s0, e in share)
        g_max = max((len(tl.out) for tl in tiles), default=1)
        rc_max = max((len(tl.resid) + len(tl.core) for tl in tiles), default=1)
        buf = torch.empty((B + 1 + g_max + rc_max) * k_max, device=dev, dtype=dt)
        buf_v = torch.empty((1 + g_max) * k_max, device=dev, dtype=dt)
        buf_l = torch.empty(B * g_max * k_max, device=dev, dtype=dt)
        buf_q = torch.empty(n * k_max if q_cached is None and not ctx["store_q"] else 0, device=dev, dtype=dt)
        # the weights' shift row is written per tile, so every worker has its own
        weights = [self._tile_weights(tl, xa, beta) if ctx["resident"] else None for tl in tiles]

        # per tile: the fixed shift (None until its first block) and the float64 sums [1 + g, B*g]
        shifts: list[torch.Tensor | None] = [None] * len(tiles)
        totals = [torch.zeros((1 + len(tl.out), B * len(tl.out)), **f64) for tl in tiles]
        means = [torch.zeros(B * len(tl.out), **f64) for tl in tiles] if average else None
        empty_sum = torch.zeros(len(plan.empty), **f64)  # empty masks: uniform weights
        k_prev = None
        for start, stop in share:
            yt = self.columns.block(start, stop)  # [n, k], a view when resident
            k = yt.shape[1]
            if k != k_prev:  # lay the buffers out for this block width, with their constant rows
                rows_all = buf[:(B + 1 + g_max + rc_max) * k].view(-1, k)
                rows_all[:B].zero_()
                rows_all[B].fill_(1.0)
                v_all = buf_v[:(1 + g_max) * k].view(-1, k)
                v_all[0].fill_(1.0)
                views = [self._tile_views(tl, rows_all, v_all, buf_l, B, k) for tl in tiles]
                k_prev = k
            if q_cached is not None:
                q_blk = q_cached[:, start:stop]
            else:  # written straight into the cache when it is kept, else into this worker's buffer
                q_blk = ctx["q_store"][:, start:stop] if ctx["store_q"] else buf_q[:n * k].view(n, k)
                self._fill_q(q_blk, yt, plan.q_mode, m_t)
            if len(plan.empty):
                part = yt[plan.empty].to(torch.float64)
                empty_sum += part.mean(dim=1) if average else part.sum(dim=1)
            for ti, tl in enumerate(tiles):
                g, r, c = len(tl.out), len(tl.resid), len(tl.core)
                a_mat, y_rc, core_out, q_rows, v_rows, v_mat, l_out = views[ti]
                torch.index_select(yt, 0, gather[ti], out=y_rc)
                if c:
                    torch.mm(xa_core[ti], y_rc[r:], out=core_out)  # core sums [B, k]
                torch.index_select(q_blk, 0, tl.out, out=q_rows)
                w = weights[ti]  # [B + 1 + g + r, B*g]
                if w is None:
                    w = self._tile_weights(tl, xa, beta)
                    if shifts[ti] is not None:
                        w[B] = -shifts[ti].to(dt)
                w_a = w[0 if c else B:]
                torch.index_select(yt, 0, tl.out, out=v_rows)
                logits = torch.mm(a_mat.T, w_a, out=l_out)  # [k, B*g], log2 units
                if shifts[ti] is None or average:
                    sums = self._first_block(logits, v_mat, w, shifts, ti, B)
                else:
                    sums = self._exp_and_sum(logits, v_mat)
                    # a much better image: new shift (one reduction; inf or nan in any column makes the
                    # sum non-finite, and a finite sum too large for the dtype only costs a redo)
                    if not math.isfinite(sums[0].sum().item()):
                        old = shifts[ti]
                        w[B] = 0.0
                        torch.mm(a_mat.T, w_a, out=logits)
                        sums = self._first_block(logits, v_mat, w, shifts, ti, B, floor=old)
                        totals[ti].mul_(torch.exp2(old - shifts[ti]))
                if average:  # official: each block's own softmax mean, the blocks' means averaged
                    means[ti] += self._diagonal(sums, B, g) / sums[0]
                else:
                    totals[ti].add_(sums)
        return dict(shifts=shifts, totals=totals, means=means, empty=empty_sum)

    def _fill_q(self, q_blk: torch.Tensor, yt: torch.Tensor, q_mode: str, m_t) -> None:
        """``q_blk`` [n, k] = Q = M^T (Y*Y) of the block ``yt`` [n, k], with ``m_t`` from ``_q_operator``."""
        if q_mode == "dense":  # all pixels at once
            q_blk.copy_(torch.mm(m_t, torch.square(yt)))
            return
        n, k = yt.shape  # gathered sums of rows, on narrow column slices on the CPU (cache-resident)
        step = Q_SLICE if yt.device.type == "cpu" else k
        rows, offsets, signs = m_t
        for s0 in range(0, k, step):
            sq = torch.square(yt[:, s0:s0 + step])
            if q_mode == "runs":  # row-wise cumulative sums; the signs are the runs' +-1
                sq = torch.cumsum(sq.view(-1, self.shape[2], sq.shape[1]), dim=1).view(n, -1)
            q_blk[:, s0:s0 + step] = torch.nn.functional.embedding_bag(
                rows, sq, offsets, mode="sum", per_sample_weights=signs)

    @staticmethod
    def _tile_views(tl: Tile, rows_all, v_all, buf_l, B: int, k: int):
        """Views into the shared buffers for one tile at block width k: ``a_mat`` ([P;] 1; Q[q]; Y[resid]),
        the gathered ``Y[resid + core]``, the core sums P, the Q rows, ``Y[q]`` and ``[1; Y[q]]``, the logits."""
        g, r, c = len(tl.out), len(tl.resid), len(tl.core)
        return (rows_all[0 if c else B:B + 1 + g + r], rows_all[B + 1 + g:B + 1 + g + r + c], rows_all[:B],
                rows_all[B + 1:B + 1 + g], v_all[1:1 + g], v_all[:1 + g], buf_l[:B * g * k].view(k, B * g))

    @staticmethod
    def _diagonal(sums: torch.Tensor, B: int, g: int) -> torch.Tensor:
        """``sum_k w_{k,i} y_k[i]`` from the sums [1 + g, B*g] (row 1 + i, column (b, i)) -> [B*g]."""
        return sums[1:].reshape(g, B, g).diagonal(dim1=0, dim2=2).reshape(B * g)

    @staticmethod
    def _exp_and_sum(logits: torch.Tensor, v_mat: torch.Tensor) -> torch.Tensor:
        """``2^logits`` in place ([k, B*g]), then ``[sum_k w; sum_k w y_k[q]]`` per column: [1 + g, B*g].

        Terms below ``2^-64`` of the row's shift (at most the running maximum) are dropped: together
        they change the result by less than ``K 2^-64`` relative, and they would otherwise be computed
        as subnormal numbers, which slow the products down a hundredfold on x86."""
        torch.nn.functional.threshold_(logits, NEGLIGIBLE_LOG2, -math.inf)
        logits.exp2_()
        return torch.mm(v_mat, logits)

    @staticmethod
    def _first_block(logits, v_mat, w, shifts, ti, B, floor=None):
        """Shift each column (b, i) by its own maximum (at least ``floor``, the previous shift), which
        becomes the tile's shift for later blocks."""
        m = logits.amax(dim=0)  # [B*g]
        if floor is not None:
            m = torch.maximum(m, floor.to(m.dtype))
        logits.sub_(m)
        w[B] = -m
        shifts[ti] = m.to(torch.float64)
        return MaskedDenoiser._exp_and_sum(logits, v_mat)

    @staticmethod
    def _tile_weights(tl: Tile, xa: torch.Tensor, beta: float) -> torch.Tensor:
        """The right factor of a tile's logit product ``A^T W``, [B + 1 + g + r, B*g] (columns (b, i)):
        1 on the query's core sum, the shift (filled in later), ``-beta`` on Q[i],
        ``alpha x[resid] * M[resid, i]``."""
        B, g, r = xa.shape[0], len(tl.out), len(tl.resid)
        w = torch.zeros((B + 1 + g + r, B, g), device=xa.device, dtype=xa.dtype)
        if len(tl.core):
            w[:B].diagonal(dim1=0, dim2=1).fill_(1.0)
        w[B + 1:B + 1 + g].diagonal(dim1=0, dim2=2).fill_(-beta)
        torch.mul(xa[:, tl.resid].T.unsqueeze(2), tl.sub_t.T.to(xa.dtype).unsqueeze(1), out=w[B + 1 + g:])
        return w.view(B + 1 + g + r, B * g)

    def _q_operator(self, plan: MaskPlan):
        """What ``Q = M^T (Y*Y)`` needs on a cache miss: ``M^T`` [n, n] dense in the working dtype, or,
        for the sparse modes, per output pixel the rows of (the row-wise cumulative sums of) Y*Y to add
        and their signs, as ``embedding_bag`` takes them: ``(rows, offsets [n], signs)``, built from the
        nonzeros, never from a dense float matrix."""
        mt = plan.masks.T
        if plan.q_mode == "dense":
            return mt.to(self.dtype).contiguous()
        n = mt.shape[0]
        if plan.q_mode == "runs":
            d = row_runs(mt, self.shape)  # coalesced: sorted by output pixel, then by input pixel
            (pixel, rows), signs = d.indices(), d.values().to(self.dtype)
        else:
            pixel, rows = torch.nonzero(mt, as_tuple=True)  # row-major order
            signs = torch.ones(len(rows), dtype=self.dtype, device=mt.device)
        offsets = torch.zeros(n, dtype=torch.int64, device=mt.device)
        offsets[1:] = torch.cumsum(torch.bincount(pixel, minlength=n), 0)[:-1]
        return rows, offsets, signs

    def _denoise_differentiable(self, x: torch.Tensor, t: int) -> torch.Tensor:
        """The same model written plainly (``masked_logits``, autograd-friendly, float64), block by block
        [B, k, n]; used when ``x_t`` requires a gradient. Meant for small sets: autograd keeps every block."""
        M = self.masks(t)
        a, b2, T = self.schedule.a(t), self.schedule.b2(t), self.config.temperature
        average = self.config.chunk_average is not None
        lse = mean = None
        blocks = 0
        for yt in self.columns:
            y = yt.T.to(torch.float64)  # [k, n]
            logits = masked_logits(x, y, M, a, b2, T)  # [B, k, n]
            m = logits.amax(dim=1).detach()  # [B, n]
            e = torch.exp(logits - m[:, None, :])
            s, acc = e.sum(dim=1), (e * y[None]).sum(dim=1)
            if average:  # official: each block's own softmax mean, the blocks' means averaged
                mean = acc / s if mean is None else mean + acc / s
            elif lse is None:
                lse, mean = m + torch.log(s), acc / s
            else:  # merge two softmax averages by their log-sum-exps
                new = torch.logaddexp(lse, m + torch.log(s))
                mean = mean * torch.exp(lse - new) + acc * torch.exp(m - new)
                lse = new
            blocks += 1
        return mean / (blocks + CHUNK_AVERAGE_EPS) if average else mean

    # -- closed-form Jacobian -------------------------------------------------------------------
    @torch.no_grad()
    def jacobian_rows(self, x_t: torch.Tensor, t: int, index: torch.Tensor) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` at each input, [B, Q, n], float64.

        Closed form (DESIGN.md §3): ``d x0_hat_i / d x_t[m] = (a / (b2 T)) 1[m in S_i] Cov_{w_i}(y[i], y[m])``,
        streamed over the training set with a max-shifted softmax per query and row (exact mode only).
        """
        if self.config.chunk_average is not None:
            raise ConfigError("the closed-form Jacobian needs the exact softmax; drop chunk_average or use autograd")
        t = self.schedule.check_t(t)
        a, b2, T = self.schedule.a(t), self.schedule.b2(t), self.config.temperature
        x = x_t.reshape(x_t.shape[0], -1).to(device=self.device, dtype=torch.float64)
        index = torch.as_tensor(index, device=self.device).reshape(-1)
        Mq = self.masks(t)[:, index]  # [n, Q]: the masks S_i of the requested rows
        B, Q = x.shape[0], index.numel()
        m = s = acc0 = acc1 = None
        for yt in self.columns:
            y = yt.T.to(torch.float64)  # [k, n]
            logits = masked_logits(x, y, Mq, a, b2, T)  # [B, k, Q]
            cm = logits.amax(dim=1)  # [B, Q]
            if m is None:
                m, s = cm, torch.zeros_like(cm)
                acc0 = torch.zeros(B, Q, y.shape[1], dtype=torch.float64, device=self.device)
                acc1 = torch.zeros_like(acc0)
            new_m = torch.maximum(m, cm)
            f = torch.exp(m - new_m)
            e = torch.exp(logits - new_m[:, None, :]).transpose(1, 2)  # [B, Q, k]
            s = s * f + e.sum(dim=2)
            acc0 = acc0 * f[..., None] + e @ y  # sum_k w y_k
            acc1 = acc1 * f[..., None] + (e * y[:, index].T[None]) @ y  # sum_k w y_k[i] y_k
            m = new_m
        mean = acc0 / s[..., None]  # E_w[y] [B, Q, n]
        second = acc1 / s[..., None]  # E_w[y_i y]
        mean_i = mean.gather(2, index.view(1, Q, 1).expand(B, Q, 1))  # E_w[y_i]
        cov = second - mean_i * mean
        return (a / (b2 * T)) * cov * Mq.T[None].to(torch.float64)


__all__ = ["MaskedDenoiser", "MaskedConfig", "MaskPlan", "Tile", "ColumnBlocks", "default_tau",
           "normalized_gain", "threshold_masks", "wiener_masks", "masked_logits", "plan_masks"]
