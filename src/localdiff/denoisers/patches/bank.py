"""Banks of candidate patches, the operands of the patch models that compare a query patch with patches
from every position of every training image (``els``, ``els-boundary`` and ``masked-equivariant``), and
the streamed softmax of queries against a bank (docs/DESIGN.md §2.6, §2.8)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..stream import SoftmaxState, merge


@dataclass
class PatchBank:
    """Candidate patches as GEMM operands: ``pt`` [D, N] the patches, ``sq`` [N] their squared norms,
    ``logn`` [N] log multiplicities (identical patches merged), ``vals`` [C+1, N] centre pixels and a 1
    (stored transposed: the weighted sums then run as a transposed-operand GEMM, much faster)."""

    pt: torch.Tensor
    sq: torch.Tensor
    logn: torch.Tensor
    vals: torch.Tensor

    @classmethod
    def of(cls, rows: torch.Tensor, centre: list[int], dedup: bool) -> "PatchBank":
        if dedup:  # exact: a patch seen n times enters the softmax once with weight n
            rows, counts = torch.unique(rows, dim=0, return_counts=True)
            logn = counts.to(rows.dtype).log()
        else:
            logn = rows.new_zeros(rows.shape[0])
        vals = torch.cat([rows[:, centre], rows.new_ones(rows.shape[0], 1)], dim=1)
        return cls(rows.t().contiguous(), (rows * rows).sum(1), logn, vals.t().contiguous())

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.pt, self.sq, self.logn, self.vals))


def bank_state(q: torch.Tensor, qmask: torch.Tensor | None, bank: PatchBank, a: float, b2: float,
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
        e = SoftmaxState.shifted_exp(logits, m)
        r = e @ bank.vals[:, s0:s0 + n].t()  # [Q, C+1]: weighted centre pixels and the weight sum
        state = merge(state, SoftmaxState(m[:, 0], r[:, C], r[:, :C]))
    return state


__all__ = ["PatchBank", "bank_state"]
