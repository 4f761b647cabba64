"""Sensitivity fields: closed forms against autograd, and the locality measures on known fields."""

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.data.dataset import ImageDataset
from localdiff.errors import ConfigError
from localdiff.sensitivity import (cosine, energy_radius, field_similarity, full_jacobian, jacobian_rows,
                                   locality_measures, parse_pixels, sensitivity_fields, window_energy)


def rel_err(a, b):
    return float((a - b).norm() / b.norm())


@pytest.fixture
def colour_data():
    rng = np.random.default_rng(4)
    base = rng.integers(0, 256, size=(1, 3, 5, 5))
    x = np.clip(0.6 * base + rng.integers(0, 100, size=(30, 3, 5, 5)), 0, 255).astype(np.uint8)
    return ImageDataset(raw=x, name="colour")


@pytest.mark.parametrize("model", ["wiener", "optimal", "masked"])
@pytest.mark.parametrize("t", [20, 300, 900])
def test_closed_form_equals_autograd(small_uint8_data, model, t, tmp_cache):
    den = make_denoiser(model, small_uint8_data, device="cpu")
    x_t = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(t), dtype=torch.float64)
    pixels = [(0, 0), (2, 3), (5, 5)]
    closed = jacobian_rows(den, x_t, t, pixels, method="closed")
    auto = jacobian_rows(den, x_t, t, pixels, method="autograd", rows_per_pass=4)
    assert closed.shape == (3, 3, 1, 6, 6)
    assert rel_err(closed, auto) <= 1e-5


@pytest.mark.parametrize("model", ["wiener", "optimal", "masked"])
def test_colour_fields_closed_form_equals_autograd(colour_data, model, tmp_cache):
    den = make_denoiser(model, colour_data, device="cpu")
    x_t = torch.randn(2, 3, 5, 5, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for out_channel in (None, 1):
        closed = jacobian_rows(den, x_t, 400, [(2, 2), (0, 4)], method="closed", out_channel=out_channel)
        auto = jacobian_rows(den, x_t, 400, [(2, 2), (0, 4)], method="autograd", out_channel=out_channel)
        assert closed.shape == (2, 2, 3, 5, 5)
        assert rel_err(closed, auto) <= 1e-5


def test_full_jacobian_of_wiener_is_its_matrix(small_uint8_data, tmp_cache):
    den = make_denoiser("wiener", small_uint8_data, device="cpu")
    J = full_jacobian(den, torch.zeros(1, 1, 6, 6, dtype=torch.float64), 250, method="autograd", rows_per_pass=10)
    torch.testing.assert_close(J.reshape(36, 36), den.jacobian(250), atol=1e-10, rtol=1e-8)


def test_sensitivity_fields_average_over_draws(small_uint8_data, tmp_cache):
    den = make_denoiser("optimal", small_uint8_data, device="cpu")
    f = sensitivity_fields(den, small_uint8_data, pixels="2,2;4,1", timesteps=[100, 800], draws=5, seed=1,
                           progress=False)
    assert f.mean.shape == (2, 2, 1, 6, 6) and f.method == "closed"
    g = sensitivity_fields(den, small_uint8_data, pixels="2,2;4,1", timesteps=[100, 800], draws=5, seed=1,
                           method="autograd", progress=False)
    assert rel_err(f.mean, g.mean) < 1e-5 and rel_err(f.abs_mean, g.abs_mean) < 1e-5


def test_energy_measures_on_known_fields():
    delta = np.zeros((1, 9, 9))
    delta[0, 4, 4] = 3.0
    assert energy_radius(delta, (4, 4), 0.5) == 0 and energy_radius(delta, (4, 4), 0.9) == 0
    assert window_energy(delta, (4, 4), 3) == 1.0
    ring = np.zeros((2, 9, 9))
    ring[0, 4, 7] = 1.0  # distance 3
    ring[1, 1, 4] = 1.0  # distance 3, other channel
    ring[0, 4, 4] = 1.0
    assert energy_radius(ring, (4, 4), 0.5) == 3.0
    assert energy_radius(ring, (4, 4), 0.3) == 0.0
    assert window_energy(ring, (4, 4), 3) == pytest.approx(1 / 3)
    assert window_energy(ring, (4, 4), 7) == pytest.approx(1.0)
    assert cosine(ring, ring) == pytest.approx(1.0) and cosine(ring, -ring) == pytest.approx(-1.0)
    assert cosine(delta, ring[:1]) == pytest.approx(1 / np.sqrt(2))


def test_wiener_fields_are_local_at_low_noise(small_uint8_data, tmp_cache):
    den = make_denoiser("wiener", small_uint8_data, device="cpu")
    f = sensitivity_fields(den, small_uint8_data, pixels="center", timesteps=[0, 999], draws=2, progress=False)
    m = locality_measures(f)
    assert m["0"]["3,3"]["r50"] == 0.0 and m["0"]["3,3"]["energy_3x3"] > 0.99  # G_0 ~ identity
    assert m["999"]["3,3"]["energy_3x3"] < m["0"]["3,3"]["energy_3x3"]
    sim = field_similarity({"a": f, "b": f})
    assert sim["a|b"]["0"] == pytest.approx(1.0)


def test_pixel_parsing():
    assert parse_pixels("center", (1, 28, 28)) == [(14, 14)]
    assert parse_pixels("1,2; 3,4", (1, 8, 8)) == [(1, 2), (3, 4)]
    assert len(parse_pixels("all", (3, 4, 5))) == 20
    with pytest.raises(ConfigError, match="inside"):
        parse_pixels("9,0", (1, 8, 8))
    with pytest.raises(ConfigError, match="r,c"):
        parse_pixels("a,b", (1, 8, 8))
