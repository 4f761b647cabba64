"""Paired comparisons: two models measured on the same noise, sample by sample (STYLE.md principle 9).

For per-sample values ``a_k`` and ``b_k`` (k = 1..n, the same initial noise or the same noisy image for
both models) the comparison is the mean of the differences ``d_k = a_k - b_k``, its 95% Student-t
interval ``mean(d) +- t_{0.975, n-1} sd(d) / sqrt(n)`` (the interval of a paired t-test), and the number
of samples on which ``a`` is better. A statement "a beats b" is made only where the interval excludes 0;
otherwise the two are reported as tied. The t-interval is used rather than a bootstrap because the
sample counts here are small (8-64), where percentile bootstraps are too narrow.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

CONFIDENCE = 0.95


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (scipy)."""
    from scipy.stats import t

    return float(t.ppf(p, df))


@dataclass(frozen=True)
class Comparison:
    """``a`` against ``b`` on one metric: ``mean_diff = mean(a - b)``, its 95% interval, wins of ``a``."""

    a: str
    b: str
    metric: str
    mean_diff: float
    ci95: tuple[float, float] | None  # None with fewer than two samples (no interval)
    wins_a: int  # samples where a is better (higher, or lower when lower_is_better); ties count for neither
    n: int
    lower_is_better: bool = False

    @property
    def a_better(self) -> bool:
        """The interval lies entirely on ``a``'s side of zero."""
        if self.ci95 is None:
            return False
        return self.ci95[1] < 0 if self.lower_is_better else self.ci95[0] > 0

    @property
    def b_better(self) -> bool:
        if self.ci95 is None:
            return False
        return self.ci95[0] > 0 if self.lower_is_better else self.ci95[1] < 0

    @property
    def tied(self) -> bool:
        return not (self.a_better or self.b_better)

    def to_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "mean_diff": self.mean_diff,
                "ci95": list(self.ci95) if self.ci95 is not None else None, "wins_a": self.wins_a, "n": self.n}

    def interval_text(self, symbol: str = "Δ") -> str:
        """``ΔR² +0.014, 95% CI [-0.07, 0.10], 3/8 wins`` (``symbol`` names the metric)."""
        ci = f"95% CI [{self.ci95[0]:+.3g}, {self.ci95[1]:+.3g}]" if self.ci95 is not None else "no interval (n=1)"
        return f"{symbol} {self.mean_diff:+.3g}, {ci}, {self.wins_a}/{self.n} wins"


def compare(a_values, b_values, *, a: str, b: str, metric: str, lower_is_better: bool = False) -> Comparison:
    """Paired comparison of per-sample values ``a_values`` and ``b_values`` [n] measured on the same samples."""
    x = np.asarray(a_values, dtype=np.float64).ravel()
    y = np.asarray(b_values, dtype=np.float64).ravel()
    if x.shape != y.shape or x.size == 0:
        raise ValueError(f"paired values must have the same, non-zero length; got {x.size} for {a} and {y.size} "
                         f"for {b}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise ValueError(f"{metric}: non-finite per-sample values for {a} or {b}")
    d = x - y
    n = int(d.size)
    mean = float(d.mean())
    ci = None
    if n >= 2:
        half = t_quantile(0.5 + CONFIDENCE / 2, n - 1) * float(d.std(ddof=1)) / math.sqrt(n)
        ci = (mean - half, mean + half)
    wins = int((d < 0).sum() if lower_is_better else (d > 0).sum())
    return Comparison(a, b, metric, mean, ci, wins, n, lower_is_better)


def best_against_rest(per_sample: dict[str, np.ndarray], metric: str, *,
                      lower_is_better: bool = False) -> tuple[list[Comparison], dict]:
    """The model with the best mean against every other model, and the headline that follows.

    ``per_sample`` maps model -> values [n] (the same samples for every model). Returns the comparisons
    (best as ``a``) and ``{"metric", "best", "closest", "tied"}``: ``closest`` is the best model only when
    every interval against the others lies on its side of zero, else None; ``tied`` then lists the best
    and every model not separable from it (empty when ``closest`` is set).
    """
    if not per_sample:
        return [], {"metric": metric, "best": None, "closest": None, "tied": []}
    means = {m: float(np.mean(v)) for m, v in per_sample.items()}
    best = (min if lower_is_better else max)(means, key=means.get)
    comps = [compare(per_sample[best], per_sample[m], a=best, b=m, metric=metric, lower_is_better=lower_is_better)
             for m in per_sample if m != best]
    if comps and all(c.a_better for c in comps):
        return comps, {"metric": metric, "best": best, "closest": best, "tied": []}
    tied = [best] + [c.b for c in comps if not c.a_better]
    return comps, {"metric": metric, "best": best, "closest": None, "tied": tied if len(per_sample) > 1 else []}


def headline_sentence(comps: list[Comparison], head: dict, *, symbol: str, against: str) -> str:
    """One true sentence for the end of a run, e.g. ``closest to the U-Net: masked (ΔR² +0.10 over wiener,
    95% CI [+0.05, +0.15], 25/32 wins; every other model further)`` or ``masked and wiener are tied ...``."""
    best = head.get("best")
    if best is None:
        return f"nothing to compare with {against}"
    if not comps:
        return f"only {best} was compared with {against}"
    by_b = {c.b: c for c in comps}
    if head.get("closest"):
        runner = min(comps, key=lambda c: abs(c.mean_diff))  # the nearest competitor
        return (f"closest to {against}: {best} ({runner.interval_text(symbol)} over {runner.b}; "
                f"every interval against the other {len(comps)} model(s) excludes 0)")
    others = [m for m in head["tied"] if m != best]
    parts = "; ".join(f"vs {m}: {by_b[m].interval_text(symbol)}" for m in others)
    names = " and ".join([", ".join(head["tied"][:-1]), head["tied"][-1]]) if len(head["tied"]) > 1 else best
    return f"{names} are tied in closeness to {against} ({best} has the best mean; {parts})"
