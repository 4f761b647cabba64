"""The covariance theory of locality, checked numerically on data with known statistics."""

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.data.synthetic import gaussian_random_field, grf_covariance
from localdiff.sensitivity import energy_radius, sensitivity_fields
from localdiff.stats import data_spectrum, eigendecompose
from localdiff.theory import (gain_limits, gaussian_blob, pc_energy_fraction, translation_invariance)


@pytest.fixture(scope="module")
def grf():
    return gaussian_random_field(num=4000, size=12, alpha=3.0, seed=0)


def test_grf_covariance_matches_closed_form(grf):
    y = grf.tensor(flat=True, dtype=torch.float64).numpy()
    emp = np.cov(y, rowvar=False, bias=True)
    exact = grf_covariance(12, 3.0, scale=0.25)
    # sampling error of a covariance entry ~ var * sqrt(2 / N)
    assert np.abs(emp - exact).max() < 6 * exact.max() * np.sqrt(2 / len(grf))


def test_gain_limits(grf, tmp_cache):
    spec = data_spectrum(grf, progress=False)
    lim = gain_limits(spec, [0, 50, 300, 700, 999])
    to_id = [lim[t]["to_identity"] for t in ("0", "50", "300", "700", "999")]
    to_cov = [lim[t]["to_scaled_covariance"] for t in ("0", "50", "300", "700", "999")]
    assert to_id[0] < 0.05 and all(np.diff(to_id) > 0)  # G_t -> I as noise -> 0
    assert to_cov[-1] < 1e-3 and all(np.diff(to_cov) < 0)  # G_t -> (a^2/b2) Sigma at high noise
    assert to_cov[-1] <= 2 * lim["999"]["snr_max"]


def test_stationary_wiener_fields_are_translated_blobs_growing_with_noise(grf):
    # use the exact circulant covariance so the test isolates the theory from sampling noise
    cov = torch.from_numpy(grf_covariance(12, 3.0, scale=0.25))
    spec = eigendecompose(torch.zeros(144, dtype=torch.float64), cov, 1)
    den = make_denoiser("wiener", grf, device="cpu")
    den.spectrum = spec
    pixels = [(0, 0), (5, 7), (11, 3), (6, 6)]
    f = sensitivity_fields(den, grf, pixels=pixels, timesteps=[20, 200, 500, 900], draws=1, progress=False)
    for ti in range(4):
        assert translation_invariance(f.mean[ti].numpy(), pixels) < 1e-8
    r50 = [energy_radius(f.mean[ti, 3].numpy(), (6, 6), 0.5) for ti in range(4)]
    r90 = [energy_radius(f.mean[ti, 3].numpy(), (6, 6), 0.9) for ti in range(4)]
    assert r50[0] == 0 and r90[-1] > r90[0] and all(np.diff(r90) >= 0)
    # and a non-stationary field breaks translation invariance
    g = f.mean[2].numpy().copy()
    g[1] *= np.linspace(0.5, 1.5, 144).reshape(1, 12, 12)
    assert translation_invariance(g, pixels) > 0.05


def test_pc_energy_fraction():
    rng = np.random.default_rng(0)
    A = rng.normal(size=(16, 16))
    spec = eigendecompose(torch.zeros(16, dtype=torch.float64), torch.from_numpy(A @ A.T), 1)
    top = spec.eigvecs[:, 0].numpy().reshape(1, 4, 4)
    assert pc_energy_fraction(top, spec, 1) == pytest.approx(1.0)
    assert pc_energy_fraction(top, spec, 16) == pytest.approx(1.0)
    other = spec.eigvecs[:, 5].numpy().reshape(1, 4, 4)
    assert pc_energy_fraction(other, spec, 5) == pytest.approx(0.0, abs=1e-12)
    blob = gaussian_blob((1, 9, 9), (4, 4), 2.0)
    assert energy_radius(blob, (4, 4), 0.5) == pytest.approx(2.0, abs=0.6)


def test_face_fields_move_into_the_leading_components_as_noise_grows(tmp_cache):
    """On non-stationary data (LFW faces) the Wiener fields approach covariance rows at high noise,
    whose energy sits in the leading principal components; at low noise they do not."""
    from localdiff import load_dataset

    train, test = load_dataset("lfw-faces"), load_dataset("lfw-faces", split="test")
    den = make_denoiser("wiener", train, device="cpu")
    f = sensitivity_fields(den, test, [(12, 12), (8, 8)], [100, 500, 900], draws=1, progress=False)
    for pi in range(2):
        frac = [pc_energy_fraction(f.mean[ti, pi].numpy(), den.spectrum, 10) for ti in range(3)]
        assert frac[0] < 0.5 < frac[2] and frac[0] < frac[1] < frac[2]
