"""The trained linear denoiser (docs/DESIGN.md §2.2): SGD on the denoising loss converges to the Wiener filter."""

import json

import numpy as np
import pytest
import torch

from localdiff import load_dataset, make_denoiser
from localdiff.denoisers.linear import parse_timesteps, wiener_offset
from localdiff.denoisers.wiener import wiener_jacobian
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.diffusion import timesteps_for
from localdiff.errors import ConfigError
from localdiff.sensitivity import jacobian_rows, sensitivity_fields
from localdiff.stats import data_spectrum

FIT = {"timesteps": "700,300", "steps": 1500, "batch_size": 256, "device": "cpu", "progress": False}


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.fixture(scope="module")
def fitted(digits):
    return make_denoiser("linear", digits, cache=False, **FIT)


def rel(a, b):
    return float((a - b).norm() / b.norm())


def test_converges_to_the_wiener_filter(digits, fitted):
    spec = data_spectrum(digits, cache=False, progress=False)  # an independent computation of the statistics
    assert fitted.timesteps == (700, 300)
    for t in (700, 300):
        a, b2 = S.a(t), S.b2(t)
        J = wiener_jacobian(spec, a, b2)
        assert rel(fitted.jacobian(t), J) < 0.05
        # the offset: minimising over c gives c = mu - a A mu, so at A = J it is c* = mu - a J mu
        c_star = spec.mean - a * (J @ spec.mean)
        torch.testing.assert_close(wiener_offset(spec, a, b2), c_star, rtol=0, atol=1e-10)
        assert rel(fitted.offset(t), c_star) < 0.05
        # the fit is far from its starting point (A = 0, c = mu) and from the identity
        assert rel(torch.zeros_like(J), J) == 1.0 and rel(torch.eye(64, dtype=J.dtype), J) > 0.5
        # and its outputs match the Wiener denoiser's on noisy test digits
        test = load_dataset("digits", split="test")
        x0 = test.tensor(dtype=torch.float64)
        x_t = S.q_sample(x0, t, torch.randn(x0.shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64))
        wiener = make_denoiser("wiener", digits, device="cpu", cache=False)
        assert rel(fitted(x_t, t), wiener(x_t, t)) < 0.02


def test_history_records_convergence(fitted):
    for t, h in fitted.history.items():
        assert h["timestep"] == t and h["step"] == list(range(100, 1501, 100))
        assert len(h["rel_error"]) == len(h["loss"]) == 15 and all(np.isfinite(h["loss"]))
        assert h["rel_error"][-1] < 0.5 * h["rel_error"][0] and h["rel_error"][-1] == min(h["rel_error"])
        # the history's eigenbasis formula agrees with the pixel-space comparison of the stored A_t
        assert h["final_rel_error"] == pytest.approx(h["rel_error"][-1], rel=1e-4)
        assert h["final_rel_error"] < 0.05 and h["offset_rel_error"] < 0.05
        assert 0 < h["averaged_from"] < 1500 and h["step_size"] > 0 and h["seconds"] > 0
    # the loss approaches the Wiener filter's mean squared error per pixel, E||x0 - x0_hat||^2 / n
    spec = fitted.spectrum
    for t in (700, 300):
        a, b2 = S.a(t), S.b2(t)
        mse = float((b2 * spec.eigvals / (a * a * spec.eigvals + b2)).sum()) / 64  # trace of the posterior covariance
        assert fitted.history[t]["loss"][-1] == pytest.approx(mse, rel=0.05)
    assert json.loads(json.dumps(fitted.history))["700"]["step"][-1] == 1500  # plain data, ready for run records


def test_raises_at_an_unfitted_timestep(fitted):
    x = torch.zeros(2, 1, 8, 8)
    with pytest.raises(ConfigError, match=r"fitted at timesteps 700, 300 only, not at t=500.*timesteps=700,300,500"):
        fitted(x, 500)
    with pytest.raises(ConfigError, match="not at t=0"):
        jacobian_rows(fitted, x.double(), 0, [(3, 3)])
    assert fitted(x, 700).shape == (2, 1, 8, 8)


def test_closed_form_jacobian_rows_equal_autograd(fitted):
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    pixels = [(0, 0), (3, 4), (7, 7)]
    for t in (700, 300):
        closed = jacobian_rows(fitted, x_t, t, pixels, method="closed")
        auto = jacobian_rows(fitted, x_t, t, pixels, method="autograd", rows_per_pass=4)
        assert closed.shape == (3, 3, 1, 8, 8)
        torch.testing.assert_close(closed, auto, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(closed[1, 1].reshape(64), fitted.jacobian(t)[8 * 3 + 4])
    f = sensitivity_fields(fitted, load_dataset("digits", split="test"), pixels=pixels, timesteps=[700, 300],
                           draws=4, progress=False)
    assert f.method == "closed"
    torch.testing.assert_close(f.mean[0, 2].reshape(64), fitted.jacobian(700)[63])


def test_seeded_and_configurable(digits, tmp_cache):
    small = {"steps": 5, "batch_size": 16, "eval_every": 2, "device": "cpu", "progress": False}
    den = make_denoiser("linear", digits, **small)
    assert den.timesteps == tuple(timesteps_for(10)) == (900, 800, 700, 600, 500, 400, 300, 200, 100, 0)
    assert den.history[900]["step"] == [2, 4, 5] and den.settings()["timesteps"] == list(den.timesteps)
    a = make_denoiser("linear", digits, timesteps="500", **small)
    b = make_denoiser("linear", digits, timesteps=[500], **small)
    c = make_denoiser("linear", digits, timesteps="500", seed=1, **small)
    torch.testing.assert_close(a.jacobian(500), b.jacobian(500), rtol=0, atol=0)
    torch.testing.assert_close(a.jacobian(500), den.jacobian(500), rtol=0, atol=0)  # seeded per timestep
    assert not torch.equal(a.jacobian(500), c.jacobian(500))
    new = a.fit(digits, 400)  # fitting more timesteps later keeps the earlier ones
    assert list(new) == [400] and a.timesteps == (500, 400) and a(torch.zeros(1, 1, 8, 8), 400).shape == (1, 1, 8, 8)
    torch.testing.assert_close(a.jacobian(500), b.jacobian(500), rtol=0, atol=0)
    assert parse_timesteps((0, 900, 500, 500), S) == (900, 500, 0) and parse_timesteps(400, S) == (400,)
    for bad, msg in [({"timesteps": "1000"}, "timestep must be in"), ({"timesteps": "9x"}, "must be integers"),
                     ({"precondition": "adam"}, "precondition must be one of"),
                     ({"batch_size": 15}, "batch_size must be even"), ({"lr": 0.0}, "lr > 0")]:
        with pytest.raises(ConfigError, match=msg):
            make_denoiser("linear", digits, **{**small, **bad})


def test_plain_sgd_in_pixel_coordinates_also_converges_on_well_conditioned_data(tmp_cache):
    """Without whitening the fit is plain SGD on (A, c); at high noise on a GRF the problem is well
    conditioned and it reaches the Wiener filter too (on MNIST at low noise it would not, see the module)."""
    grf = load_dataset("grf", num=3000, resolution=8)
    den = make_denoiser("linear", grf, timesteps="900", steps=800, batch_size=256, precondition="none",
                        device="cpu", progress=False)
    J = wiener_jacobian(data_spectrum(grf, progress=False), S.a(900), S.b2(900))
    assert rel(den.jacobian(900), J) < 0.05
