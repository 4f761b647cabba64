"""How the masked denoiser computes one timestep: output tiles, the input pixels each tile needs, and
the cost model that picks the tiling (docs/DESIGN.md §2.5; the result never depends on the plan).

Output pixels are cut into small spatial tiles q of g pixels (all channels together). Tile q needs
only ``U_q``, the union of its masks; their intersection (the core) is summed once per query and
shared by the g pixels. The tile shape, and whether a tile's core pays, are chosen per timestep from
the masks by a small cost model in multiply-adds; ``path="dense"`` ignores the sparsity (every tile
reads all pixels). The query-independent term ``Q = M^T (Y*Y)`` is computed on a cache miss in the
cheapest of three ways (:data:`QMode`); :func:`row_runs` gives the masks' runs along image rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

PlanPath = Literal["auto", "grouped", "dense"]
# Q = M^T (Y*Y), query-independent (cached per timestep), on a cache miss by: "dense" one [n, n] product
# per block; "sparse" a weighted gather-and-sum of the nnz(M) rows of Y*Y (embedding_bag); "runs" each
# mask as runs of consecutive pixels along image rows, Q[i] = sum over runs of C[end] - C[start - 1] with
# C the row-wise cumulative sum of Y*Y (2 terms per run: 5x fewer than nnz(M) for MNIST at high noise)
QMode = Literal["dense", "sparse", "runs"]
DENSE_Q_MAX = 4096  # largest n for which Q may be computed by one dense [n, n] product per block
# one term of such a gathered sum, in dense-product multiply-adds (measured on the CPU: embedding_bag
# runs 2x faster than the CSR product torch.sparse.mm, with the same sums in the same order)
SPARSE_MACS = 2.0



@dataclass(frozen=True)
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


@dataclass(frozen=True)
class MaskPlan:
    """How one timestep is computed: its masks, the tiles, and what they cost."""

    masks: torch.Tensor  # bool [n, n], column i = S_i
    tiles: tuple[Tile, ...]
    empty: torch.Tensor  # output pixels whose mask is empty: uniform weights, x0_hat = the data mean
    tile_shape: tuple[int, int]
    dense: bool  # no use of the masks' sparsity (every tile reads all pixels, no cores)
    q_mode: QMode  # how Q = M^T (Y*Y) is computed on a cache miss: see ``QMode``
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


def gemm_efficiency(rows: int) -> float:
    """Rough fraction of peak a [rows, u] @ [u, k] product reaches on CPU (measured: 16 -> ~0.5, 128 -> ~0.9)."""
    return rows / (rows + 16.0)


def tile_of(shape, th: int, tw: int) -> tuple[torch.Tensor, int]:
    """The tile of every pixel (th x tw tiles numbered row-major, all channels of a tile together) and
    the number of tiles."""
    C, H, W = shape
    per_row = -(-W // tw)
    h, w = torch.arange(H)[:, None] // th, torch.arange(W)[None, :] // tw
    return (h * per_row + w).reshape(-1).repeat(C), -(-H // th) * per_row


def tiles_of(shape, th: int, tw: int) -> list[torch.Tensor]:
    """Output pixel indices of each tile of ``tile_of``, in increasing order (channel by channel)."""
    tile, count = tile_of(shape, th, tw)
    return list(torch.split(torch.argsort(tile, stable=True), torch.bincount(tile, minlength=count).tolist()))


def tile_stats(masks: torch.Tensor, nonempty: torch.Tensor, shape, th: int, tw: int):
    """Per tile (as ``tiles_of``): pixels with a non-empty mask g, union size u, core size c.

    ``masks`` [n, n] float (1.0 = in the mask; column i = S_i). Summed over each tile's output pixels,
    the masks count, for every input pixel j and tile, the tile's masks that contain j: j is in the union
    where that count is positive, in the core where it equals g (counts of at most n are exact)."""
    tile, count = tile_of(shape, th, tw)
    g = torch.zeros(count, dtype=masks.dtype).index_add_(0, tile, nonempty.to(masks.dtype))
    hits = torch.zeros((masks.shape[0], count), dtype=masks.dtype).index_add_(1, tile, masks)  # [n, tiles]
    u = (hits > 0).sum(dim=0)
    c = torch.where(g > 0, (hits == g).sum(dim=0), 0)  # no core where every mask is empty
    return g.long(), u, c


def tile_costs(g, r, c, batch: int, chunk: int):
    """Estimated time per training image of tiles with g outputs, r residual and c core pixels."""
    rows = batch * g
    eff = rows / (rows + 16.0)
    cost = rows * (r + g + 1 + torch.where(c > 0, batch, 0)) / eff  # logits
    cost = cost + batch * c / gemm_efficiency(batch)  # core sums
    cost = cost + rows * (g + 1) / eff  # weighted sums
    cost = cost + rows * 3 * ELEMENTWISE_MACS  # threshold, exp2
    cost = cost + GATHER_MACS * (r + c + 2 * g) + OVERHEAD_MACS / chunk
    return torch.where(g > 0, cost, 0.0)


def plan_masks(masks: torch.Tensor, shape, batch: int, *, path: PlanPath = "auto", chunk: int = 2048,
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
    # Q = M^T (Y*Y) on a cache miss, per training image: the cheapest QMode
    q_costs = {"dense": n * n / gemm_efficiency(n) if n <= DENSE_Q_MAX else math.inf,
               "sparse": SPARSE_MACS * nnz,
               "runs": SPARSE_MACS * int(row_runs(m_cpu.T, shape).values().numel()) + 2 * ELEMENTWISE_MACS * n}
    q_mode = min(q_costs, key=q_costs.get)
    best = None
    for th, tw in dict.fromkeys((min(th, shape[1]), min(tw, shape[2])) for th, tw in ([tile] if tile else TILE_SHAPES)):
        g, u, c = tile_stats(m_float, nonempty, shape, th, tw)
        options = []
        if path in ("auto", "grouped"):
            plain = tile_costs(g, u, torch.zeros_like(c), batch, chunk)
            cored = tile_costs(g, u - c, c, batch, chunk)
            use_core = (c > 0) if path == "grouped" else cored < plain  # "grouped": every core, for tests
            options.append((torch.where(use_core, cored, plain).sum().item(), False, use_core))
        if path in ("auto", "dense"):
            cost = tile_costs(g, torch.full_like(u, n), torch.zeros_like(c), batch, chunk)
            options.append((cost.sum().item(), True, torch.zeros_like(g, dtype=torch.bool)))
        for total, dense, use_core in options:
            if best is None or total < best[0]:
                best = (total, th, tw, dense, use_core)
    _, th, tw, dense, use_core = best
    dev = masks.device
    tiles, macs = [], 0
    rows = m_cpu.T.contiguous()  # row i = S_i
    for q, core_pays in zip(tiles_of(shape, th, tw), use_core.tolist()):
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
    return MaskPlan(masks, tuple(tiles), empty, (th, tw), dense, q_mode, nnz, int(macs))


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


__all__ = ["Tile", "MaskPlan", "PlanPath", "QMode", "TILE_SHAPES", "plan_masks", "row_runs", "tile_of", "tiles_of",
           "tile_stats"]
