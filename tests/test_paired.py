"""Paired comparisons against scipy's paired t-test, and the headline rule."""

import numpy as np
import pytest
from scipy import stats

from localdiff.paired import best_against_rest, compare, headline_sentence


@pytest.mark.parametrize("n", [2, 8, 32])
def test_interval_is_the_paired_t_test_interval(n):
    rng = np.random.default_rng(n)
    a, b = rng.normal(0.6, 0.1, n), rng.normal(0.55, 0.1, n)
    c = compare(a, b, a="masked", b="wiener", metric="final_r2")
    ref = stats.ttest_rel(a, b).confidence_interval(0.95)  # independent reference
    assert c.mean_diff == pytest.approx(np.mean(a - b), abs=1e-15)
    assert c.ci95 == pytest.approx((ref.low, ref.high), rel=1e-10)
    assert c.wins_a == int(np.sum(a > b)) and c.n == n


def test_wins_follow_the_direction_of_the_metric_and_ties_count_for_neither():
    a = np.array([0.1, 0.2, 0.3, 0.4])
    b = np.array([0.2, 0.2, 0.1, 0.1])
    assert compare(a, b, a="x", b="y", metric="final_r2").wins_a == 2
    assert compare(a, b, a="x", b="y", metric="final_mse", lower_is_better=True).wins_a == 1
    assert compare(a[:1], b[:1], a="x", b="y", metric="m").ci95 is None
    with pytest.raises(ValueError, match="same"):
        compare(a, b[:3], a="x", b="y", metric="m")
    with pytest.raises(ValueError, match="non-finite"):
        compare(np.array([np.nan, 1.0]), b[:2], a="x", b="y", metric="m")


def test_headline_names_a_winner_only_when_every_interval_excludes_zero():
    rng = np.random.default_rng(0)
    base = rng.normal(0, 1, 16)
    clear = {"masked": base + 1.0 + rng.normal(0, 0.05, 16), "wiener": base + rng.normal(0, 0.05, 16),
             "optimal": base - 1.0 + rng.normal(0, 0.05, 16)}
    comps, head = best_against_rest(clear, "final_r2")
    assert head == {"metric": "final_r2", "best": "masked", "closest": "masked", "tied": []}
    assert {c.b for c in comps} == {"wiener", "optimal"} and all(c.a == "masked" for c in comps)
    assert headline_sentence(comps, head, symbol="ΔR²", against="the U-Net").startswith("closest to the U-Net: masked")

    close = dict(clear, wiener=clear["masked"] - 0.01 + rng.normal(0, 0.5, 16))  # wiener not separable
    comps, head = best_against_rest(close, "final_r2")
    assert head["closest"] is None and set(head["tied"]) == {"masked", "wiener"} and head["tied"][0] == head["best"]
    sentence = headline_sentence(comps, head, symbol="ΔR²", against="the U-Net")
    assert "tied" in sentence and "95% CI" in sentence and "optimal" not in sentence

    # lower is better (MSE): the model with the smallest mean leads, intervals must lie below 0
    mse = {k: -v for k, v in clear.items()}
    _, head = best_against_rest(mse, "final_mse", lower_is_better=True)
    assert head["closest"] == "masked"
