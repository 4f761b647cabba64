"""Mathematics of the foundation checked against independent references."""

import numpy as np
import pytest
import torch

from localdiff import make_denoiser, sample
from localdiff.data.dataset import ImageDataset
from localdiff.diffusion import DEFAULT_SCHEDULE, timesteps_for
from localdiff.errors import ConfigError
from localdiff.stats import MomentState, data_spectrum, moments

from conftest import make_float_dataset


def gaussian_dataset(n_side=4, K=3000, seed=0):
    """A dataset whose empirical mean and covariance equal a known (mu, Sigma) (up to float32 storage)."""
    rng = np.random.default_rng(seed)
    n = n_side * n_side
    mu = rng.uniform(-0.2, 0.2, n)
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    Sigma = 0.01 * (A @ A.T + 0.05 * np.eye(n))
    Z = rng.normal(size=(K, n))
    Z -= Z.mean(0)
    C = Z.T @ Z / K
    w, V = np.linalg.eigh(C)
    Z = Z @ V @ np.diag(w ** -0.5) @ V.T  # empirical covariance exactly I
    L = np.linalg.cholesky(Sigma)
    Y = (mu + Z @ L.T).astype(np.float32)
    assert np.abs(Y).max() < 1
    data = make_float_dataset(Y.reshape(K, 1, n_side, n_side))
    y64 = Y.astype(np.float64)
    # the stored float32 values move the statistics by ~1e-9; use those exact stored statistics
    return data, y64.mean(0), np.cov(y64, rowvar=False, bias=True), mu, Sigma


@pytest.mark.parametrize("t", [0, 10, 250, 500, 999])
def test_wiener_equals_gaussian_posterior_mean(t, tmp_cache):
    data, mu_emp, S_emp, mu, Sigma = gaussian_dataset()
    assert np.abs(S_emp - Sigma).max() < 1e-7 and np.abs(mu_emp - mu).max() < 1e-7
    den = make_denoiser("wiener", data, device="cpu")
    a, b2 = DEFAULT_SCHEDULE.a(t), DEFAULT_SCHEDULE.b2(t)
    g = torch.Generator().manual_seed(t)
    x_t = torch.randn(5, 1, 4, 4, generator=g, dtype=torch.float64)
    # Posterior mean of x0 ~ N(mu, Sigma) given x_t = a x0 + sqrt(b2) eps, by a linear solve.
    n = mu.size
    rhs = x_t.reshape(5, n).numpy().T - a * mu[:, None]
    ref = mu[:, None] + a * Sigma @ np.linalg.solve(a * a * Sigma + b2 * np.eye(n), rhs)
    out = den(x_t, t).reshape(5, n).numpy().T
    np.testing.assert_allclose(out, ref, atol=1e-6, rtol=0)


def test_wiener_jacobian_matches_autograd(tmp_cache):
    data, *_ = gaussian_dataset(K=500)
    den = make_denoiser("wiener", data, device="cpu")
    x = torch.randn(1, 1, 4, 4, dtype=torch.float64)
    J = torch.autograd.functional.jacobian(lambda v: den(v, 300).reshape(-1), x).reshape(16, 16)
    torch.testing.assert_close(J, den.jacobian(300), atol=1e-10, rtol=1e-8)


def test_moment_states_merge_exactly():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(1000, 7)) * rng.uniform(0.1, 3, 7) + rng.normal(size=7) * 5
    t = torch.from_numpy(x)
    parts = [MomentState.of(t[a:b]) for a, b in [(0, 1), (1, 300), (300, 301), (301, 1000)]]
    state = MomentState.empty(7)
    for p in reversed(parts):  # order must not matter
        state = p.merge(state)
    assert state.count == 1000
    np.testing.assert_allclose(state.mean.numpy(), x.mean(0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(state.covariance().numpy(), np.cov(x, rowvar=False, bias=True), rtol=1e-10, atol=1e-12)


def test_streamed_moments_independent_of_chunk(small_uint8_data):
    a = moments(small_uint8_data, chunk=7, progress=False)
    b = moments(small_uint8_data, chunk=40, progress=False)
    ref = small_uint8_data.tensor(dtype=torch.float64, flat=True).numpy()
    np.testing.assert_allclose(a.covariance().numpy(), np.cov(ref, rowvar=False, bias=True), atol=1e-12)
    np.testing.assert_allclose(a.covariance().numpy(), b.covariance().numpy(), atol=1e-12)


def test_spectrum_cache_detects_corruption(small_uint8_data, tmp_cache):
    spec = data_spectrum(small_uint8_data, progress=False)
    files = list(tmp_cache.glob("spectrum-*.safetensors"))
    assert len(files) == 1
    again = data_spectrum(small_uint8_data, progress=False)  # served from the cache
    torch.testing.assert_close(again.eigvecs, spec.eigvecs)
    # flip bytes in the payload: the checksum must catch it and the value must be recomputed
    raw = bytearray(files[0].read_bytes())
    raw[-16:] = bytes(16)
    files[0].write_bytes(bytes(raw))
    with pytest.warns(RuntimeWarning, match="checksum|unreadable"):
        fixed = data_spectrum(small_uint8_data, progress=False)
    torch.testing.assert_close(fixed.eigvals, spec.eigvals)
    data_spectrum(small_uint8_data, progress=False)  # the rewritten file is valid again (no warning)
    # a truncated file is unreadable
    files[0].write_bytes(files[0].read_bytes()[:50])
    with pytest.warns(RuntimeWarning):
        data_spectrum(small_uint8_data, progress=False)


def test_spectrum_cache_keyed_by_data(small_uint8_data, tmp_cache):
    a = data_spectrum(small_uint8_data, progress=False)
    other = small_uint8_data.subset(30, seed=3)
    b = data_spectrum(other, progress=False)
    assert a.fingerprint != b.fingerprint
    assert len(list(tmp_cache.glob("spectrum-*"))) == 2
    assert not torch.allclose(a.eigvals, b.eigvals)


def brute_force_optimal(Y, x, a, b2):
    """sum_k softmax_k(-||x - a y_k||^2 / (2 b2)) y_k, written plainly in float64."""
    d = ((x[:, None, :] - a * Y[None]) ** 2).sum(-1)  # [B, K]
    w = torch.softmax(-d / (2 * b2), dim=1)
    return w @ Y


@pytest.mark.parametrize("chunk", [1, 7, 40, 1000])
@pytest.mark.parametrize("t", [0, 30, 400, 999])
def test_optimal_equals_brute_force(small_uint8_data, chunk, t):
    den = make_denoiser("optimal", small_uint8_data, chunk=chunk, device="cpu")
    Y = small_uint8_data.tensor(dtype=torch.float64, flat=True)
    g = torch.Generator().manual_seed(t)
    x0 = Y[:4] + 0.3 * torch.randn(4, 36, generator=g, dtype=torch.float64)
    x_t = DEFAULT_SCHEDULE.q_sample(x0, t, torch.randn(4, 36, generator=g, dtype=torch.float64))
    ref = brute_force_optimal(Y, x_t, DEFAULT_SCHEDULE.a(t), DEFAULT_SCHEDULE.b2(t))
    out = den(x_t.reshape(4, 1, 6, 6), t).reshape(4, 36)
    torch.testing.assert_close(out, ref, atol=1e-9, rtol=1e-9)


def test_optimal_streaming_does_not_need_residency(small_uint8_data):
    a = make_denoiser("optimal", small_uint8_data, chunk=9, resident=False, device="cpu")
    b = make_denoiser("optimal", small_uint8_data, resident=True, device="cpu")
    x = torch.randn(3, 1, 6, 6)
    torch.testing.assert_close(a(x, 500), b(x, 500))


def test_optimal_top_k(small_uint8_data):
    exact = make_denoiser("optimal", small_uint8_data, device="cpu")
    full = make_denoiser("optimal", small_uint8_data, top_k=40, chunk=6, device="cpu")
    one = make_denoiser("optimal", small_uint8_data, top_k=1, chunk=6, device="cpu")
    near = make_denoiser("nearest", small_uint8_data, chunk=6, device="cpu")
    x = torch.randn(5, 1, 6, 6)
    torch.testing.assert_close(full(x, 600), exact(x, 600), atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(one(x, 600), near(x, 600))


def test_nearest_is_the_closest_training_image(small_uint8_data):
    den = make_denoiser("nearest", small_uint8_data, chunk=11, device="cpu")
    Y = small_uint8_data.tensor(dtype=torch.float64, flat=True)
    x = torch.randn(6, 36, dtype=torch.float64)
    t = 700
    a = DEFAULT_SCHEDULE.a(t)
    idx = ((x[:, None] - a * Y[None]) ** 2).sum(-1).argmin(1)
    torch.testing.assert_close(den(x.reshape(6, 1, 6, 6), t).reshape(6, 36), Y[idx])
    assert torch.equal(den.nearest_index(x.reshape(6, 1, 6, 6), t), idx)


@pytest.mark.parametrize("t", [0, 500, 999])
def test_one_image_training_set_returns_that_image(t):
    img = np.random.default_rng(0).integers(0, 256, size=(1, 1, 5, 5)).astype(np.uint8)
    data = ImageDataset(raw=img, name="one")
    den = make_denoiser("optimal", data, device="cpu")
    x = torch.randn(3, 1, 5, 5) * 10
    torch.testing.assert_close(den(x, t), data[0].expand(3, 1, 5, 5))


@pytest.mark.parametrize("sampler", ["ddim", "ddpm"])
def test_sampling_with_perfect_denoiser_returns_the_image(sampler):
    img = np.random.default_rng(1).integers(0, 256, size=(1, 3, 4, 4)).astype(np.uint8)
    data = ImageDataset(raw=img, name="one")
    den = make_denoiser("optimal", data, device="cpu")
    traj = sample(den, num=4, steps=10, seed=3, sampler=sampler, return_trajectory=True, progress=False)
    torch.testing.assert_close(traj.samples, data[0].expand(4, 3, 4, 4))
    # the chain itself must end at the image: the last x_t is close to a * y (t = 0)
    a0 = DEFAULT_SCHEDULE.a(0)
    assert (traj.xt[-1] - a0 * data[0]).abs().max() < 0.1


def test_ddim_timesteps_and_schedule_match_diffusers():
    from diffusers import DDPMScheduler

    assert timesteps_for(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    ref = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02).alphas_cumprod.double()
    torch.testing.assert_close(DEFAULT_SCHEDULE.alpha_bar, ref, atol=2e-6, rtol=0)


def test_sample_is_deterministic_and_batch_independent(small_uint8_data):
    den = make_denoiser("wiener", small_uint8_data, device="cpu")
    a = sample(den, num=6, steps=5, seed=11, progress=False)
    b = sample(den, num=6, steps=5, seed=11, batch_size=4, progress=False)
    c = sample(den, num=6, steps=5, seed=12, progress=False)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)
    noise = torch.randn(6, 1, 6, 6, generator=torch.Generator().manual_seed(11))
    torch.testing.assert_close(sample(den, init_noise=noise, steps=5, progress=False), a)


def test_eps_x0_round_trip():
    x0, eps = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64)
    for t in (0, 500, 999):
        x_t = DEFAULT_SCHEDULE.q_sample(x0, t, eps)
        torch.testing.assert_close(DEFAULT_SCHEDULE.eps_from_x0(x_t, x0, t), eps)
        torch.testing.assert_close(DEFAULT_SCHEDULE.x0_from_eps(x_t, eps, t), x0)


def test_bad_denoiser_inputs_are_reported(small_uint8_data):
    den = make_denoiser("optimal", small_uint8_data, device="cpu")
    with pytest.raises(ConfigError, match=r"\[B, 1, 6, 6\]"):
        den(torch.zeros(2, 1, 5, 5), 10)
    with pytest.raises(ConfigError, match="timestep"):
        den(torch.zeros(2, 1, 6, 6), 1000)
    with pytest.raises(ConfigError, match="no option 'tau'"):
        make_denoiser("optimal", small_uint8_data, tau=1)
    with pytest.raises(ConfigError, match="unknown model"):
        make_denoiser("optimall", small_uint8_data)
    with pytest.raises(ConfigError, match="chunk"):
        make_denoiser("optimal", small_uint8_data, chunk="many")
    with pytest.raises(ConfigError, match="GPU|cuda"):
        if not torch.cuda.is_available():
            make_denoiser("optimal", small_uint8_data, device="cuda")
        else:
            raise ConfigError("cuda present")


def test_options_from_strings(small_uint8_data):
    den = make_denoiser("optimal", small_uint8_data, chunk="8", top_k="none", resident="false", device="cpu")
    assert den.config.chunk == 8 and den.config.top_k is None and den.config.resident is False
