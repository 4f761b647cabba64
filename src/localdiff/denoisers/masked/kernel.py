"""The streamed kernel of the masked denoiser: one pass over the training set for a batch of queries at
one timestep, tile by tile, exact (docs/DESIGN.md §2.5, §8).

In log2 units the logit of training image k at output pixel i is
``alpha sum_{m in S_i} x[m] y_k[m] - beta Q[k, i]`` with ``alpha = a log2(e) / (b2 T)``,
``beta = a^2 log2(e) / (2 b2 T)`` and ``Q = M^T (Y*Y)`` query-independent (the ``x[m]^2`` term is
constant over k and cancels). One matrix product per tile and block of k training images gives every
logit of the tile: ``[P; 1; Q[q]; Y[resid]]^T @ W`` -> [k, B*g], with P the core sums and W carrying
``alpha x M``, ``-beta`` and the softmax shift; a second product gives ``[sum_k w; sum_k w y_k[q]]``.
The multiply-adds are about ``B K nnz(M)`` at matrix-product speed instead of the dense ``B K n^2``.

The softmax of each (query, pixel) is a :class:`~localdiff.denoisers.softmax.Log2SoftmaxState`: its
shift is fixed at the worker's first block's maximum, and a later block whose weights would overflow is
redone with its own maximum and the sums so far rescaled, so any block order and size give the same
result. Weights below ``2^-64`` of the shift are dropped (they change x0_hat by less than ``K 2^-64``
relative, and as subnormal floats they would slow the products a hundredfold). On the CPU the training
blocks are shared out among worker threads, each running torch single-threaded with its own states;
:meth:`Partial.merge` combines them (and would combine the shards of several processes the same way:
each rank streams its share of the blocks, then the partials are gathered and merged).

The masks reach the kernel only through the plan's tiles (``core``: input pixels in every mask of the
tile, summed once per query with weight 1; ``sub_t``: each pixel's share of the rest, used as the
weights of :func:`tile_weights`) and through :class:`QOperator` (``M^T`` as a matrix or as weighted
gathers), so a variant of the model with other masks needs a planner, not another kernel.
"""

from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Callable

import torch

from .plan import MaskPlan, QMode, Tile, row_runs
from ..stream import ColumnBlocks, Log2SoftmaxState, merge

LOG2E = 1.4426950408889634
NEGLIGIBLE_LOG2 = -64.0  # weights below 2^-64 of the running total are dropped (see exp_and_sum)
WEIGHTS_RESIDENT = 1 << 24  # build the tiles' weight matrices once per call below this many elements
CHUNK_AVERAGE_EPS = 1e-8  # the official code adds 1e-8 to the summed chunk weights
Q_SLICE = 128  # training images per gathered sum on the CPU (cache-resident)


# ------------------------------------------------------------------------------------------------
# The query-independent term Q = M^T (Y*Y)
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class QOperator:
    """What ``Q = M^T (Y*Y)`` needs on a cache miss: ``M^T`` [n, n] dense in the working dtype
    (mode "dense"), or per output pixel the rows of (the row-wise cumulative sums of) Y*Y to add and
    their signs, as ``embedding_bag`` takes them (modes "sparse", "runs"; built from the nonzeros)."""

    mode: QMode
    width: int  # image width W: "runs" sums cumulative sums along image rows
    dense: torch.Tensor | None = None  # M^T [n, n]
    rows: torch.Tensor | None = None  # [terms] input rows, grouped by output pixel
    offsets: torch.Tensor | None = None  # [n] first term of each output pixel
    signs: torch.Tensor | None = None  # [terms] +-1 (runs) or 1 (sparse)

    @classmethod
    def of(cls, plan: MaskPlan, shape: tuple[int, int, int], dtype: torch.dtype) -> "QOperator":
        mt = plan.masks.T
        if plan.q_mode == "dense":
            return cls("dense", shape[2], dense=mt.to(dtype).contiguous())
        n = mt.shape[0]
        if plan.q_mode == "runs":
            d = row_runs(mt, shape)  # coalesced: sorted by output pixel, then by input pixel
            (pixel, rows), signs = d.indices(), d.values().to(dtype)
        else:
            pixel, rows = torch.nonzero(mt, as_tuple=True)  # row-major order
            signs = torch.ones(len(rows), dtype=dtype, device=mt.device)
        offsets = torch.zeros(n, dtype=torch.int64, device=mt.device)
        offsets[1:] = torch.cumsum(torch.bincount(pixel, minlength=n), 0)[:-1]
        return cls(plan.q_mode, shape[2], rows=rows, offsets=offsets, signs=signs)

    def fill(self, q_blk: torch.Tensor, yt: torch.Tensor) -> None:
        """``q_blk`` [n, k] = Q of the training block ``yt`` [n, k]."""
        if self.mode == "dense":  # all pixels at once
            q_blk.copy_(torch.mm(self.dense, torch.square(yt)))
            return
        n, k = yt.shape  # gathered sums of rows, on narrow column slices on the CPU (cache-resident)
        step = Q_SLICE if yt.device.type == "cpu" else k
        for s0 in range(0, k, step):
            sq = torch.square(yt[:, s0:s0 + step])
            if self.mode == "runs":  # row-wise cumulative sums; the signs are the runs' +-1
                sq = torch.cumsum(sq.view(-1, self.width, sq.shape[1]), dim=1).view(n, -1)
            q_blk[:, s0:s0 + step] = torch.nn.functional.embedding_bag(
                self.rows, sq, self.offsets, mode="sum", per_sample_weights=self.signs)


# ------------------------------------------------------------------------------------------------
# Typed inputs and outputs of a pass
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class KernelInputs:
    """One call: the timestep's plan, the queries and Q, fixed before the workers start (read-only)."""

    plan: MaskPlan
    xa: torch.Tensor  # alpha x [B, n], working dtype
    beta: float  # weight of Q[k, i] in the log2 logit
    xa_core: tuple[torch.Tensor, ...]  # per tile: xa[:, core] [B, c]
    gather: tuple[torch.Tensor, ...]  # per tile: resid then core input pixels [r + c]
    q_cached: torch.Tensor | None  # Q [n, K] from an earlier call at this timestep
    q_op: QOperator | None  # how to compute Q on a miss
    q_store: torch.Tensor | None  # [n, K]: workers write Q here (disjoint columns) to keep it; None: own buffers
    resident_weights: bool  # each worker builds every tile's weight matrix once (else once per block)
    chunk_average: bool  # the official chunk-normalised softmax: each block's own mean, averaged

    @classmethod
    def build(cls, plan: MaskPlan, x: torch.Tensor, alpha: float, beta: float, *, q_cached, q_op, q_store,
              workers: int, chunk_average: bool) -> "KernelInputs":
        B = x.shape[0]
        xa = alpha * x  # [B, n]
        weights = sum(B * len(tl.out) * (B + 1 + len(tl.out) + len(tl.resid)) for tl in plan.tiles)
        return cls(plan, xa, beta, tuple(xa[:, tl.core] for tl in plan.tiles),
                   tuple(torch.cat([tl.resid, tl.core]) for tl in plan.tiles), q_cached, q_op, q_store,
                   weights * workers <= WEIGHTS_RESIDENT, chunk_average)

    @property
    def batch(self) -> int:
        return self.xa.shape[0]


@dataclass
class Partial:
    """The sums of a share of the training blocks (one worker's, or several merged)."""

    states: list[Log2SoftmaxState | None]  # per tile: m, s [B*g], acc [B*g, g] = sum_k w y_k[out] (None: no block)
    means: list[torch.Tensor] | None  # chunk_average: per tile, the sum of the blocks' own means [B*g]
    empty: torch.Tensor  # pixels with an empty mask: sum of their values (chunk_average: of block means)
    blocks: int  # blocks streamed

    def merge(self, other: "Partial") -> "Partial":
        """Both shares together (exact: the softmax states are rescaled to the larger shift)."""
        means = None if self.means is None else [a + b for a, b in zip(self.means, other.means)]
        return Partial([merge(a, b) for a, b in zip(self.states, other.states)], means,
                       self.empty + other.empty, self.blocks + other.blocks)

    def finish(self, plan: MaskPlan, batch: int, num_images: int) -> torch.Tensor:
        """x0_hat [B, n] (float64): each pixel's softmax mean (empty masks: the data mean)."""
        B = batch
        out = torch.empty((B, plan.masks.shape[0]), device=self.empty.device, dtype=torch.float64)
        for ti, tl in enumerate(plan.tiles):
            g = len(tl.out)
            if self.means is not None:
                mu = self.means[ti] / (self.blocks + CHUNK_AVERAGE_EPS)
            else:  # pixel i of query b: acc[(b, i), i] / s[(b, i)]
                st = self.states[ti]
                mu = st.acc.reshape(B, g, g).diagonal(dim1=1, dim2=2).reshape(B * g) / st.s
            out[:, tl.out] = mu.view(B, -1)
        if len(plan.empty):
            denom = self.blocks + CHUNK_AVERAGE_EPS if self.means is not None else num_images
            out[:, plan.empty] = self.empty / denom
        return out


# ------------------------------------------------------------------------------------------------
# One worker's pass
# ------------------------------------------------------------------------------------------------

def stream(inp: KernelInputs, columns: ColumnBlocks, share: list[tuple[int, int]]) -> Partial:
    """The training blocks ``share`` (image ranges) against every tile, with this worker's own buffers
    and states.

    Per tile and block one buffer holds, row-contiguously,
    ``[P (B rows: core sums per query); 1; Q[q] (g); Y[resid] (r); Y[core] (c)]``, and the tile's
    logits are ``buffer[...]^T @ W`` [k, B*g] with ``W`` [B + 1 + g + r, B*g] = [selector; -shift;
    -beta; alpha x M] (this orientation runs ~25% faster on CPU than ``W^T @ buffer``). Each column's
    shift is fixed at the worker's first block's maximum, so the raw sums ``[sum_k w, sum_k w y_k[i]]``
    of its blocks are simply added, in float64.
    """
    plan, B, beta, xa = inp.plan, inp.batch, inp.beta, inp.xa
    average = inp.chunk_average
    n, dev, dt = xa.shape[1], columns.device, columns.dtype
    f64 = dict(device=dev, dtype=torch.float64)
    tiles = plan.tiles

    k_max = max(e - s0 for s0, e in share)
    g_max = max((len(tl.out) for tl in tiles), default=1)
    rc_max = max((len(tl.resid) + len(tl.core) for tl in tiles), default=1)
    buf = torch.empty((B + 1 + g_max + rc_max) * k_max, device=dev, dtype=dt)
    buf_v = torch.empty((1 + g_max) * k_max, device=dev, dtype=dt)
    buf_l = torch.empty(B * g_max * k_max, device=dev, dtype=dt)
    buf_q = torch.empty(n * k_max if inp.q_cached is None and inp.q_store is None else 0, device=dev, dtype=dt)
    # the weights' shift row is written per tile, so every worker has its own
    weights = [tile_weights(tl, xa, beta) if inp.resident_weights else None for tl in tiles]

    # per tile: the fixed shift (None until its first block) and the float64 sums [1 + g, B*g]
    shifts: list[torch.Tensor | None] = [None] * len(tiles)
    totals = [torch.zeros((1 + len(tl.out), B * len(tl.out)), **f64) for tl in tiles]
    means = [torch.zeros(B * len(tl.out), **f64) for tl in tiles] if average else None
    empty_sum = torch.zeros(len(plan.empty), **f64)  # empty masks: uniform weights
    k_prev = None
    for start, stop in share:
        yt = columns.block(start, stop)  # [n, k], a view when resident
        k = yt.shape[1]
        if k != k_prev:  # lay the buffers out for this block width, with their constant rows
            rows_all = buf[:(B + 1 + g_max + rc_max) * k].view(-1, k)
            rows_all[:B].zero_()
            rows_all[B].fill_(1.0)
            v_all = buf_v[:(1 + g_max) * k].view(-1, k)
            v_all[0].fill_(1.0)
            views = [tile_views(tl, rows_all, v_all, buf_l, B, k) for tl in tiles]
            k_prev = k
        if inp.q_cached is not None:
            q_blk = inp.q_cached[:, start:stop]
        else:  # written straight into the cache when it is kept, else into this worker's buffer
            q_blk = inp.q_store[:, start:stop] if inp.q_store is not None else buf_q[:n * k].view(n, k)
            inp.q_op.fill(q_blk, yt)
        if len(plan.empty):
            part = yt[plan.empty].to(torch.float64)
            empty_sum += part.mean(dim=1) if average else part.sum(dim=1)
        for ti, tl in enumerate(tiles):
            g, r, c = len(tl.out), len(tl.resid), len(tl.core)
            a_mat, y_rc, core_out, q_rows, v_rows, v_mat, l_out = views[ti]
            torch.index_select(yt, 0, inp.gather[ti], out=y_rc)
            if c:
                torch.mm(inp.xa_core[ti], y_rc[r:], out=core_out)  # core sums [B, k]
            torch.index_select(q_blk, 0, tl.out, out=q_rows)
            w = weights[ti]  # [B + 1 + g + r, B*g]
            if w is None:
                w = tile_weights(tl, xa, beta)
                if shifts[ti] is not None:
                    w[B] = -shifts[ti].to(dt)
            w_a = w[0 if c else B:]
            torch.index_select(yt, 0, tl.out, out=v_rows)
            logits = torch.mm(a_mat.T, w_a, out=l_out)  # [k, B*g], log2 units
            if shifts[ti] is None or average:
                sums, shifts[ti] = first_block(logits, v_mat, w, B)
            else:
                sums = exp_and_sum(logits, v_mat)
                # a much better image: new shift (one reduction; inf or nan in any column makes the
                # sum non-finite, and a finite sum too large for the dtype only costs a redo)
                if not math.isfinite(sums[0].sum().item()):
                    old = shifts[ti]
                    w[B] = 0.0
                    torch.mm(a_mat.T, w_a, out=logits)
                    sums, shifts[ti] = first_block(logits, v_mat, w, B, floor=old)
                    totals[ti].mul_(torch.exp2(old - shifts[ti]))
            if average:  # official: each block's own softmax mean, the blocks' means averaged
                means[ti] += diagonal(sums, B, g) / sums[0]
            else:
                totals[ti].add_(sums)
    states = [None if m is None or average else Log2SoftmaxState(m, tot[0], tot[1:].T)  # acc [B*g, g]
              for m, tot in zip(shifts, totals)]
    return Partial(states, means, empty_sum, len(share))


def run_workers(fn: Callable, shares: list) -> list:
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


# ------------------------------------------------------------------------------------------------
# Per-tile pieces
# ------------------------------------------------------------------------------------------------

def tile_views(tl: Tile, rows_all, v_all, buf_l, B: int, k: int):
    """Views into the shared buffers for one tile at block width k: ``a_mat`` ([P;] 1; Q[q]; Y[resid]),
    the gathered ``Y[resid + core]``, the core sums P, the Q rows, ``Y[q]`` and ``[1; Y[q]]``, the logits."""
    g, r, c = len(tl.out), len(tl.resid), len(tl.core)
    return (rows_all[0 if c else B:B + 1 + g + r], rows_all[B + 1 + g:B + 1 + g + r + c], rows_all[:B],
            rows_all[B + 1:B + 1 + g], v_all[1:1 + g], v_all[:1 + g], buf_l[:B * g * k].view(k, B * g))


def diagonal(sums: torch.Tensor, B: int, g: int) -> torch.Tensor:
    """``sum_k w_{k,i} y_k[i]`` from the sums [1 + g, B*g] (row 1 + i, column (b, i)) -> [B*g]."""
    return sums[1:].reshape(g, B, g).diagonal(dim1=0, dim2=2).reshape(B * g)


def exp_and_sum(logits: torch.Tensor, v_mat: torch.Tensor) -> torch.Tensor:
    """``2^logits`` in place ([k, B*g]), then ``[sum_k w; sum_k w y_k[q]]`` per column: [1 + g, B*g].

    Terms below ``2^-64`` of the column's shift (at most the running maximum) are dropped: together
    they change the result by less than ``K 2^-64`` relative, and they would otherwise be computed
    as subnormal numbers, which slow the products down a hundredfold on x86."""
    torch.nn.functional.threshold_(logits, NEGLIGIBLE_LOG2, -math.inf)
    logits.exp2_()
    return torch.mm(v_mat, logits)


def first_block(logits, v_mat, w, B: int, floor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Shift each column (b, i) by its own maximum (at least ``floor``, the previous shift), which
    becomes the tile's shift for later blocks: ``(sums, shift)``, the shift in float64."""
    m = logits.amax(dim=0)  # [B*g]
    if floor is not None:
        m = torch.maximum(m, floor.to(m.dtype))
    logits.sub_(m)
    w[B] = -m
    return exp_and_sum(logits, v_mat), m.to(torch.float64)


def tile_weights(tl: Tile, xa: torch.Tensor, beta: float) -> torch.Tensor:
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


__all__ = ["KernelInputs", "Partial", "QOperator", "stream", "run_workers", "LOG2E", "NEGLIGIBLE_LOG2",
           "CHUNK_AVERAGE_EPS"]
