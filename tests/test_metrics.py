"""Evaluation metrics against hand-computed values and independent references (scikit-learn, brute force)."""

import math

import numpy as np
import pytest
import torch
from conftest import make_float_dataset

from localdiff.diffusion import Trajectory
from localdiff.errors import ConfigError
from localdiff.metrics import (
    compare_steps,
    mse,
    nearest_training_distances,
    own_trajectory_comparison,
    r2_score,
    single_step_comparison,
)


def imgs(*rows):
    """Rows of values -> a batch [N, 1, 1, n]."""
    return torch.tensor(rows, dtype=torch.float64)[:, None, None, :]


# Hand-computed: y1 = [0, 2, 4] has mean 2 and n*Var = 4 + 0 + 4 = 8; x1 = [1, 2, 3] misses by 1, 0, 1
# -> R2 = 1 - 2/8 = 0.75, MSE = 2/3.  y2 = [1, 1, 4]: mean 2, n*Var = 1 + 1 + 4 = 6; x2 = [1, 1, 1]
# misses by 0, 0, 3 -> R2 = 1 - 9/6 = -0.5, MSE = 3.
X = imgs([1, 2, 3], [1, 1, 1])
Y = imgs([0, 2, 4], [1, 1, 4])


def test_r2_and_mse_hand_computed():
    np.testing.assert_allclose(r2_score(X, Y).numpy(), [0.75, -0.5])
    np.testing.assert_allclose(mse(X, Y).numpy(), [2 / 3, 3.0])
    assert r2_score(X, Y).mean().item() == pytest.approx(0.125)
    # the reference is the second argument: with x1 as reference, n*Var = 2 and SS_res = 2 -> R2 = 0
    assert r2_score(Y[:1], X[:1]).item() == pytest.approx(0.0)
    np.testing.assert_allclose(r2_score(Y, Y).numpy(), [1.0, 1.0])


def test_r2_matches_sklearn_per_sample():
    from sklearn.metrics import r2_score as sk_r2

    g = torch.Generator().manual_seed(0)
    y = torch.randn(5, 1, 4, 4, generator=g)
    x = y + 0.7 * torch.randn(5, 1, 4, 4, generator=g)
    ref = [sk_r2(y[i].reshape(-1).numpy(), x[i].reshape(-1).numpy()) for i in range(5)]
    np.testing.assert_allclose(r2_score(x, y).numpy(), ref, rtol=1e-5)


def test_r2_undefined_for_constant_reference_and_shape_errors():
    r = r2_score(imgs([1, 2, 3]), imgs([5, 5, 5]))
    assert math.isnan(r.item())
    with pytest.raises(ConfigError, match="shape"):
        r2_score(imgs([1, 2, 3]), imgs([1, 2]))


def test_compare_steps_per_step_means():
    comp = compare_steps(torch.stack([X, Y]), torch.stack([Y, Y]), [500, 0])
    assert comp.r2.shape == (2, 2)
    assert comp.mean_r2() == pytest.approx([0.125, 1.0])
    assert comp.mean_mse() == pytest.approx([(2 / 3 + 3) / 2, 0.0])
    assert comp.by_step() == {"500": {"r2": pytest.approx(0.125), "mse": pytest.approx(11 / 6)},
                              "0": {"r2": 1.0, "mse": 0.0}}
    with pytest.raises(ConfigError, match="timesteps"):
        compare_steps(torch.stack([X, Y]), torch.stack([Y, Y]), [0])


def _traj(xt, x0, timesteps):
    xt, x0 = torch.stack(xt).float(), torch.stack(x0).float()
    return Trajectory(samples=x0[-1], timesteps=timesteps, xt=xt, x0_hat=x0)


def test_own_trajectory_compares_step_by_step_and_checks_inputs():
    noise = imgs([0, 0, 0], [0, 0, 0])
    model = _traj([noise, noise], [X, Y], [900, 0])
    ref = _traj([noise, imgs([7, 7, 7], [7, 7, 7])], [Y, Y], [900, 0])  # the reference drifts elsewhere: fine
    comp = own_trajectory_comparison(model, ref)
    assert comp.mean_r2() == pytest.approx([0.125, 1.0])
    with pytest.raises(ConfigError, match="different levels"):
        own_trajectory_comparison(model, _traj([noise, noise], [Y, Y], [800, 0]))
    with pytest.raises(ConfigError, match="initial noise"):
        own_trajectory_comparison(model, _traj([noise + 1, noise], [Y, Y], [900, 0]))


def test_single_step_applies_reference_to_the_models_own_xt():
    calls = []

    def half(x, t):  # the reference: x0_hat = x_t / 2
        calls.append((int(t), x.shape[0]))
        return 0.5 * x

    # step 900: x_t = 2*y1, 2*y2 -> reference y1, y2; model x1, x2 -> R2 0.75, -0.5 (hand-computed above)
    # step 0: model output equals the reference -> R2 1
    Z = imgs([1, 2, 3], [0, 1, 5])
    model = _traj([2 * Y, 2 * Z], [X, Z], [900, 0])
    comp, ref = single_step_comparison(model, half)
    assert comp.mean_r2() == pytest.approx([0.125, 1.0])
    np.testing.assert_allclose(ref[0].double().numpy(), Y.numpy())
    assert calls == [(900, 2), (0, 2)]
    calls.clear()
    comp1, _ = single_step_comparison(model, half, batch_size=1)  # batching does not change the result
    assert calls == [(900, 1), (900, 1), (0, 1), (0, 1)]
    torch.testing.assert_close(comp1.r2, comp.r2)


# -- nearest training image ---------------------------------------------------------------------

def test_nearest_distances_hand_computed():
    train = make_float_dataset(np.array([[0, 0], [1, 0], [0, 1], [-1, -1]], np.float32).reshape(4, 1, 1, 2))
    q = torch.tensor([[0.9, 0.0], [-1.0, -1.0], [0.0, 0.6]]).reshape(3, 1, 1, 2)
    for chunk, qc in [(4096, 1024), (1, 1), (3, 2)]:
        res = nearest_training_distances(q, train, chunk=chunk, query_chunk=qc)
        assert res.index.tolist() == [1, 3, 2]
        np.testing.assert_allclose(res.distance.numpy(), [0.1, 0.0, 0.4], atol=1e-7)
        # second nearest: [0,0] at 0.9; [0,0] at sqrt(2); [0,0] at 0.6
        np.testing.assert_allclose(res.second.numpy(), [0.9, math.sqrt(2), 0.6], atol=1e-7)
    assert res.distance[1].item() == 0.0  # an exact copy is exactly 0 (recomputed directly)
    assert res.ratio[0].item() == pytest.approx(0.1 / 0.9, rel=1e-6)


def test_nearest_distances_match_brute_force_and_stream_in_chunks():
    from localdiff.data.dataset import ImageDataset

    rng = np.random.default_rng(1)
    raw = rng.integers(0, 256, size=(203, 1, 5, 5)).astype(np.uint8)
    train = ImageDataset(raw=raw, name="r")
    queries = torch.from_numpy(rng.uniform(-1, 1, size=(17, 1, 5, 5)))  # float64
    queries[4] = torch.from_numpy(raw[150]).double() / 127.5 - 1  # one exact copy
    seen = []
    orig = train.chunks

    def spy(size, **kw):
        for c in orig(size, **kw):
            seen.append(c.shape[0])
            yield c

    train.chunks = spy
    res = nearest_training_distances(queries, train, chunk=50, query_chunk=5)
    assert max(seen) == 50 and sum(seen) == 203  # streamed: never more than one chunk of the set at once
    y = torch.from_numpy(raw).double().reshape(203, -1) / 127.5 - 1
    d = torch.cdist(queries.double().reshape(17, -1), y)  # brute force [Q, K]
    srt, idx = d.sort(dim=1)
    assert res.index.tolist() == idx[:, 0].tolist()
    np.testing.assert_allclose(res.distance.numpy(), srt[:, 0].numpy(), rtol=1e-10, atol=1e-6)
    np.testing.assert_allclose(res.second.numpy(), srt[:, 1].numpy(), rtol=1e-10)
    assert res.index[4].item() == 150 and res.distance[4].item() == 0.0
    summary = res.summary()
    assert summary["min"] == 0.0 and summary["median"] == pytest.approx(float(srt[:, 0].median()))


def test_nearest_distances_single_image_set_and_shape_check():
    train = make_float_dataset(np.zeros((1, 1, 2, 2), np.float32))
    res = nearest_training_distances(torch.ones(2, 1, 2, 2), train)
    np.testing.assert_allclose(res.distance.numpy(), [2.0, 2.0])
    assert torch.isinf(res.second).all() and res.index.tolist() == [0, 0]
    with pytest.raises(ConfigError, match="values per image"):
        nearest_training_distances(torch.ones(2, 1, 3, 3), train)
