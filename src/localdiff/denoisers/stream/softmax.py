"""The streamed, max-shifted softmax average: one mergeable state for every model that averages training
images, pixels or patches with softmax weights (docs/DESIGN.md §2.3, §8).

For logits ``l_k`` and values ``v_k`` over a training set streamed in blocks, the state of a block (or
of several merged blocks) is

    m = max_k l_k,   s = sum_k e^(l_k - m),   acc = sum_k e^(l_k - m) v_k,   [second = sum_k e^(l_k - m) u_k v_k]

and the softmax average is ``acc / s``. Two states merge exactly by rescaling both to the larger
maximum, so blocks may be processed in any order, by worker threads or by processes (an all-gather
followed by :func:`merge`), and the result differs from one pass only by float round-off. The optional
second moment carries ``E_w[y_i y]`` for the closed-form Jacobians (posterior covariances) of the
optimal and masked denoisers. :class:`Log2SoftmaxState` is the same state in log2 units (weights
``2^(l - m)``), used by the masked kernel, whose products run faster with ``exp2``.

Shapes: ``m`` and ``s`` share a shape ``[...]`` (one softmax per entry); ``acc`` is ``[..., d]`` (values
on a last axis) or ``[...]`` (one value per softmax); ``second`` is ``[..., Q, n]`` (see :meth:`moments`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Callable

import torch


@dataclass
class SoftmaxState:
    """Mergeable partial state of a max-shifted streamed softmax average ``sum_k w_k v_k / sum_k w_k``."""

    m: torch.Tensor  # the shift: running maximum logit
    s: torch.Tensor  # sum of the shifted weights
    acc: torch.Tensor  # weighted sum of the values
    second: torch.Tensor | None = None  # weighted sum of second moments (closed-form Jacobians)

    exp: ClassVar[Callable[[torch.Tensor], torch.Tensor]] = staticmethod(torch.exp)

    @staticmethod
    def _b(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        """``v`` [...] broadcastable against ``like`` [..., d] (or as it is when they have the same rank)."""
        return v.unsqueeze(-1) if v.ndim < like.ndim else v

    @classmethod
    def of(cls, logits: torch.Tensor, values: torch.Tensor) -> "SoftmaxState":
        """State of one block: ``logits`` [B, k] (one softmax per query) with ``values`` [k, n]."""
        m = logits.max(dim=1).values
        e = cls.exp(logits - m.unsqueeze(1))
        return cls(m, e.sum(dim=1), e @ values)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, dim: int, weigh: Callable[[torch.Tensor], torch.Tensor], *,
                    keepdim: bool = False) -> "SoftmaxState":
        """State of one block from ``logits`` (one softmax along ``dim``): ``m`` the detached maximum,
        ``e = exp(logits - m)`` (in place unless autograd needs the logits), ``s = sum e`` and
        ``acc = weigh(e)``, the model's weighted sum of its values. ``keepdim`` keeps ``dim`` in m and s."""
        m = logits.detach().amax(dim, keepdim=True)
        e = cls.shifted_exp(logits, m)
        return cls(m if keepdim else m.squeeze(dim), e.sum(dim, keepdim=keepdim), weigh(e))

    @classmethod
    def shifted_exp(cls, logits: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """``exp(logits - m)`` (``2^(...)`` in log2 units); in place unless autograd needs the logits.
        ``m`` must be detached."""
        if torch.is_grad_enabled() and logits.requires_grad:
            return cls.exp(logits - m)
        return logits.sub_(m).exp_() if cls.exp is torch.exp else logits.sub_(m).exp2_()

    @classmethod
    def moments(cls, logits: torch.Tensor, y: torch.Tensor, index: torch.Tensor) -> "SoftmaxState":
        """State of one block with second moments, for posterior covariances.

        ``logits`` [B, R, k]: R = 1 (one softmax per query, shared by every requested row; the optimal
        denoiser) or R = Q (one softmax per query and row i = ``index[q]``; the masked denoiser).
        ``y`` [k, n]. Gives m, s [B, R], acc = sum_k w y_k [B, R, n] and
        second[b, q] = sum_k w y_k[index[q]] y_k [B, Q, n].
        """
        m = logits.amax(dim=-1)  # [B, R]
        e = cls.exp(logits - m.unsqueeze(-1))  # [B, R, k]
        B, R, k = e.shape
        # one [B R, k] @ [k, n] product each, written as 2-D products: `[B, R, k] @ [k, n]` can run as B
        # batched products that each read all of y (measured 6x slower on the CPU for R = 1)
        acc = (e.reshape(B * R, k) @ y).view(B, R, -1)
        second = ((e * y[:, index].T).reshape(-1, k) @ y).view(B, len(index), -1)
        return cls(m, e.sum(dim=-1), acc, second)

    def merge(self, other: "SoftmaxState") -> "SoftmaxState":
        """Combine two partial states: rescale both to the common maximum and add."""
        m = torch.maximum(self.m, other.m)
        f1, f2 = self.exp(self.m - m), self.exp(other.m - m)
        second = None
        if self.second is not None and other.second is not None:
            second = self.second * self._b(f1, self.second) + other.second * self._b(f2, other.second)
        return type(self)(m, self.s * f1 + other.s * f2,
                          self.acc * self._b(f1, self.acc) + other.acc * self._b(f2, other.acc), second)

    def mean(self) -> torch.Tensor:
        """The softmax average ``acc / s``."""
        return self.acc / self._b(self.s, self.acc)

    def covariance_rows(self, index: torch.Tensor) -> torch.Tensor:
        """``Cov_w(y[index[q]], y) = E_w[y_i y] - E_w[y_i] E_w[y]`` [B, Q, n] from a :meth:`moments` state."""
        mean = self.acc / self.s.unsqueeze(-1)  # E_w[y] [B, R, n]
        second = self.second / self.s.unsqueeze(-1)  # E_w[y_i y] [B, Q, n]
        B, Q, n = second.shape
        mean_i = mean.expand(B, Q, n).gather(2, index.view(1, Q, 1).expand(B, Q, 1))  # E_w[y_i] [B, Q, 1]
        return second - mean_i * mean


class Log2SoftmaxState(SoftmaxState):
    """The same state in log2 units: weights ``2^(l - m)`` (``exp2`` is ~3x faster than ``exp`` on a CPU)."""

    exp: ClassVar[Callable[[torch.Tensor], torch.Tensor]] = staticmethod(torch.exp2)


def merge(state: SoftmaxState | None, part: SoftmaxState | None) -> SoftmaxState | None:
    """``state`` merged with ``part``, either of which may be None (nothing streamed yet)."""
    if state is None:
        return part
    return state if part is None else state.merge(part)


__all__ = ["SoftmaxState", "Log2SoftmaxState", "merge"]
