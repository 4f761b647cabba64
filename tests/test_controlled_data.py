"""Built-in sets with controlled statistics (issue #7): permuted MNIST, anisotropic and non-stationary fields."""

import numpy as np
import pytest
import torch

from localdiff import load_dataset, make_denoiser
from localdiff.data import BUILTIN_DATASETS
from localdiff.data.builtin import mnist_permutation, permute_pixels, unpermute_pixels
from localdiff.data.synthetic import (
    correlation_length_ratio,
    correlation_lengths,
    grf_covariance,
    varying_blur_covariance,
    varying_blur_kernel,
)
from localdiff.denoisers.wiener import wiener_jacobian
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError
from localdiff.sensitivity import energy_radius, sensitivity_fields
from localdiff.stats import data_spectrum, eigendecompose


def test_new_builtins_are_registered():
    for name in ("mnist-permuted", "grf-aniso", "grf-varying"):
        assert BUILTIN_DATASETS.get(name)
    with pytest.raises(ConfigError, match="perm_seed"):
        load_dataset("mnist-permuted", alpha=2.0)
    with pytest.raises(ConfigError, match="perm_seed must be a non-negative integer"):
        mnist_permutation(-1)


# ------------------------------------------------------------------------------------------------
# mnist-permuted
# ------------------------------------------------------------------------------------------------


def test_mnist_permuted_is_mnist_with_one_fixed_permutation():
    perm = mnist_permutation(0)
    assert sorted(perm.tolist()) == list(range(784)) and not np.array_equal(perm, np.arange(784))
    for split in ("train", "test"):
        mp, m = load_dataset("mnist-permuted", split=split), load_dataset("mnist", split=split)
        assert mp.meta["permutation"] == perm.tolist() and mp.meta["perm_seed"] == 0  # same for both splits
        np.testing.assert_array_equal(mp.labels, m.labels)
        np.testing.assert_array_equal(unpermute_pixels(mp.raw, perm), m.raw)
        np.testing.assert_array_equal(mp.raw.reshape(len(m), 784), m.raw.reshape(len(m), 784)[:, perm])
    # torch tensors un-permute the same way (float images on the [-1, 1] scale)
    x = load_dataset("mnist-permuted", subset=5).tensor()
    torch.testing.assert_close(unpermute_pixels(x, perm), load_dataset("mnist", subset=5).tensor(), rtol=0, atol=0)
    other = load_dataset("mnist-permuted", subset=5, perm_seed=1)
    assert other.meta["permutation"] == mnist_permutation(1).tolist() != perm.tolist()
    assert other.fingerprint != load_dataset("mnist-permuted", subset=5).fingerprint


def test_mnist_permuted_resizes_before_permuting():
    perm14 = mnist_permutation(0, 14)
    mp = load_dataset("mnist-permuted", resolution=14, subset=30, seed=2)
    m = load_dataset("mnist", resolution=14, subset=30, seed=2)
    assert mp.shape == (1, 14, 14) and mp.meta["permutation"] == perm14.tolist()
    np.testing.assert_array_equal(mp.raw, permute_pixels(m.raw, perm14))


def test_mnist_permuted_wiener_jacobian_is_the_permuted_mnist_jacobian(tmp_cache):
    """Sigma_perm = P Sigma P^T, hence J_perm(t) = P J(t) P^T at every t (the same seeded subset of both)."""
    perm = torch.from_numpy(mnist_permutation(0))
    spec_p = data_spectrum(load_dataset("mnist-permuted", subset=3000), progress=False)
    spec = data_spectrum(load_dataset("mnist", subset=3000), progress=False)
    torch.testing.assert_close(spec_p.mean, spec.mean[perm], rtol=0, atol=1e-12)
    for t in (100, 500, 900):
        a, b2 = S.a(t), S.b2(t)
        Jp, J = wiener_jacobian(spec_p, a, b2), wiener_jacobian(spec, a, b2)
        scale = float(J.abs().max())
        assert float((Jp - J[perm][:, perm]).abs().max()) < 1e-9 * scale
        assert float((Jp - J).norm() / J.norm()) > 0.5  # the permutation really moves the fields


# ------------------------------------------------------------------------------------------------
# grf-aniso and the correlation-length ratio
# ------------------------------------------------------------------------------------------------


def test_grf_aniso_is_grf_with_anisotropy_4():
    a = load_dataset("grf-aniso", num=300, resolution=8)
    np.testing.assert_array_equal(a.raw, load_dataset("grf", num=300, resolution=8, anisotropy=4.0).raw)
    assert a.meta["anisotropy"] == 4.0 and a.meta["source"] == "builtin:grf-aniso"
    b = load_dataset("grf-aniso", num=300, resolution=8, anisotropy=2.0, alpha=2.5)
    np.testing.assert_array_equal(b.raw, load_dataset("grf", num=300, resolution=8, anisotropy=2.0, alpha=2.5).raw)
    assert not np.array_equal(load_dataset("grf-aniso", num=300, resolution=8, seed=1).raw, a.raw)


def separable_ar1_covariance(h: int, w: int, r_v: float, r_h: float) -> np.ndarray:
    """Cov[(i, j), (k, l)] = r_v^|i-k| r_h^|j-l|: adjacent-pixel correlations r_v and r_h exactly."""
    tv = r_v ** np.abs(np.subtract.outer(np.arange(h), np.arange(h)))
    th = r_h ** np.abs(np.subtract.outer(np.arange(w), np.arange(w)))
    return np.kron(tv, th)


def test_correlation_lengths_on_a_known_covariance():
    cov = 3.0 * separable_ar1_covariance(6, 9, 0.9, 0.5)  # the scale must not matter
    lv, lh = correlation_lengths(cov, (6, 9))
    assert lv == pytest.approx(1 / np.sqrt(2 * 0.1), rel=1e-12) and lh == pytest.approx(1.0, rel=1e-12)
    assert correlation_length_ratio(cov, (1, 6, 9)) == pytest.approx(lv / lh, rel=1e-12)


def test_correlation_length_ratio_follows_anisotropy():
    ratios = [correlation_length_ratio(grf_covariance(16, 3.0, an), (16, 16)) for an in (0.5, 1, 2, 4, 8)]
    assert ratios[1] == pytest.approx(1.0, abs=1e-9)  # isotropic
    assert ratios[0] < 1 and all(np.diff(ratios) > 0.3)  # grows with the anisotropy, < 1 below 1
    # swapping the axes inverts the ratio
    cov4 = grf_covariance(12, 3.0, 4.0)
    swap = np.arange(144).reshape(12, 12).T.ravel()
    assert correlation_length_ratio(cov4[swap][:, swap], (12, 12)) == pytest.approx(
        1 / correlation_length_ratio(cov4, (12, 12)), rel=1e-12)


def test_grf_aniso_samples_have_the_exact_ratio():
    data = load_dataset("grf-aniso", num=4000)
    emp = np.cov(data.tensor(flat=True, dtype=torch.float64).numpy(), rowvar=False, bias=True)
    exact = correlation_length_ratio(grf_covariance(16, 3.0, 4.0), (16, 16))
    assert exact > 2.5
    assert correlation_length_ratio(emp, data.shape) == pytest.approx(exact, rel=0.05)


# ------------------------------------------------------------------------------------------------
# grf-varying
# ------------------------------------------------------------------------------------------------


def test_grf_varying_kernel_is_unit_norm_and_widens_to_the_right():
    K = varying_blur_kernel(10, 0.5, 3.0)
    np.testing.assert_allclose(np.linalg.norm(K, axis=1), 1.0, rtol=1e-12)
    cov = varying_blur_covariance(10, 0.5, 3.0, scale=0.25)
    assert cov.dtype == np.float64 and np.allclose(np.diag(cov), 0.0625)
    # horizontal neighbour correlation at the left column vs the right one (row 5)
    left, right = cov[50, 51] / 0.0625, cov[58, 59] / 0.0625
    assert left < 0.5 and right > 0.9


def test_grf_varying_samples_match_the_closed_form_covariance():
    data = load_dataset("grf-varying")
    assert len(data) == 20000 and data.shape == (1, 16, 16) and data.meta["sigma_right"] == 3.0
    np.testing.assert_array_equal(data.raw, load_dataset("grf-varying").raw)  # deterministic from the seed
    assert not np.array_equal(data.raw[:100], load_dataset("grf-varying", split="test").raw[:100])
    y = data.tensor(flat=True, dtype=torch.float64).numpy()
    emp = np.cov(y, rowvar=False, bias=True)
    exact = varying_blur_covariance(16, 0.5, 3.0, scale=0.25)
    # sampling error of a covariance entry ~ var * sqrt(2 / N)
    assert np.abs(emp - exact).max() < 6 * exact.max() * np.sqrt(2 / len(data))
    # the sets really differ: the empirical covariance is far from a stationary one's
    assert np.abs(emp - grf_covariance(16, 3.0, scale=0.25)).max() > 0.1 * exact.max()


def test_grf_varying_wiener_fields_widen_to_the_right(tmp_cache):
    train, test = load_dataset("grf-varying", num=6000), load_dataset("grf-varying", split="test", num=200)
    den = make_denoiser("wiener", train, device="cpu")
    left, right = (8, 1), (8, 12)
    f = sensitivity_fields(den, test, pixels=[left, right], timesteps=[100, 300, 500], draws=1, progress=False)
    for ti in range(3):
        r_left = energy_radius(f.mean[ti, 0].numpy(), left, 0.5)
        r_right = energy_radius(f.mean[ti, 1].numpy(), right, 0.5)
        assert r_right > r_left + 0.9
    # and with the exact covariance (no sampling noise) at the noisiest step
    exact = torch.from_numpy(varying_blur_covariance(16, 0.5, 3.0, scale=0.25))
    den.spectrum = eigendecompose(torch.zeros(256, dtype=torch.float64), exact, 1)
    J = den.jacobian(900).reshape(256, 1, 16, 16).numpy()
    r = [energy_radius(J[16 * 8 + c], (8, c), 0.5) for c in (1, 4, 8, 12)]
    assert all(np.diff(r) >= 0) and r[-1] > r[0] + 1
