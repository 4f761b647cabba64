"""Patch baselines (LS, ELS, boundary ELS, PSPC, smoothed CFDM) against plain loop implementations."""

import json
import math

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.diffusion import DEFAULT_SCHEDULE
from localdiff.errors import ConfigError

from conftest import make_float_dataset

H = W = 6


def toy_data(K=12, C=1, h=H, w=W, seed=0):
    """Smooth-ish random images in [-1, 1] (so patch posteriors are neither flat nor one-hot)."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(K, C, h, w)).cumsum(axis=2).cumsum(axis=3)
    x = np.tanh(0.4 * x)
    return make_float_dataset(x.astype(np.float32))


def noisy(data, t, B=2, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.rand((B, *data.shape), generator=g, dtype=torch.float64) * 2 - 1
    return DEFAULT_SCHEDULE.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))


def train_array(data):
    return data.tensor(dtype=torch.float64).numpy()  # [K, C, H, W]


# ------------------------------------------------------------------------------------------------
# Plain references: explicit loops over pixels, positions and images
# ------------------------------------------------------------------------------------------------

def softmax_average(logits, values):
    w = np.exp(logits - logits.max())
    return (w[:, None] * values).sum(0) / w.sum()


def window(u, d, L, padding):
    """Coordinates of the window [u-d, u+d] on an axis of length L: (index or None when outside)."""
    out = []
    for r in range(u - d, u + d + 1):
        if padding == "circular":
            out.append(r % L)
        else:
            out.append(r if 0 <= r < L else None)
    if padding == "circular" and 2 * d + 1 >= L:
        out = list(range(L))  # a periodic window at least as long as the axis is the whole axis
    return out


def patch(img, u, w, d, padding):
    """Patch values of img [C, H, W] around (u, w) and the in-image mask, both flat."""
    C, h, wd = img.shape
    vals, mask = [], []
    for c in range(C):
        for r in window(u, d, h, padding):
            for s in window(w, d, wd, padding):
                inside = r is not None and s is not None
                vals.append(img[c, r, s] if inside else 0.0)
                mask.append(1.0 if inside else 0.0)
    return np.array(vals), np.array(mask)


def ref_ls(x, Y, a, b2, P, padding):
    B, C, h, w = x.shape
    d = P // 2
    out = np.zeros_like(x)
    for b in range(B):
        for u in range(h):
            for v in range(w):
                q, _ = patch(x[b], u, v, d, padding)
                logits = np.array([-((q - a * patch(y, u, v, d, padding)[0]) ** 2).sum() / (2 * b2) for y in Y])
                out[b, :, u, v] = softmax_average(logits, Y[:, :, u, v])
    return out


def ref_els(x, Y, a, b2, P, padding, candidates):
    B, C, h, w = x.shape
    d = P // 2
    cand_pad = "circular" if padding == "circular" else "zeros"
    cands, centres = [], []
    for y in Y:
        for u in range(h):
            for v in range(w):
                if candidates == "valid" and not (d <= u < h - d and d <= v < w - d):
                    continue
                cands.append(patch(y, u, v, d, cand_pad)[0])
                centres.append(y[:, u, v])
    cands, centres = np.array(cands), np.array(centres)
    out = np.zeros_like(x)
    for b in range(B):
        for u in range(h):
            for v in range(w):
                q, mask = patch(x[b], u, v, d, padding)
                if padding != "truncate":
                    mask = np.ones_like(mask)
                logits = np.array([-(mask * (q - a * p) ** 2).sum() / (2 * b2) for p in cands])
                out[b, :, u, v] = softmax_average(logits, centres)
    return out


def ref_els_boundary(x, Y, a, b2, P):
    B, C, h, w = x.shape
    d = P // 2

    def config(u, L):
        return u if (u < d or u >= L - d) else "interior"

    out = np.zeros_like(x)
    for b in range(B):
        for u in range(h):
            for v in range(w):
                q, _ = patch(x[b], u, v, d, "zeros")
                logits, centres = [], []
                for y in Y:
                    for r in range(h):
                        for s in range(w):
                            if config(r, h) == config(u, h) and config(s, w) == config(v, w):
                                logits.append(-((q - a * patch(y, r, s, d, "zeros")[0]) ** 2).sum() / (2 * b2))
                                centres.append(y[:, r, s])
                out[b, :, u, v] = softmax_average(np.array(logits), np.array(centres))
    return out


def ref_pspc(x, Y, a, b2, P):
    B, C, h, w = x.shape
    ph, pw = min(P, h), min(P, w)
    total, count = np.zeros_like(x), np.zeros_like(x)
    for b in range(B):
        for r in range(h - ph + 1):
            for s in range(w - pw + 1):
                q = x[b, :, r:r + ph, s:s + pw]
                logits = np.array([-((q - a * y[:, r:r + ph, s:s + pw]) ** 2).sum() / (2 * b2) for y in Y])
                est = softmax_average(logits, Y[:, :, r:r + ph, s:s + pw].reshape(len(Y), -1))
                total[b, :, r:r + ph, s:s + pw] += est.reshape(C, ph, pw)
                count[b, :, r:r + ph, s:s + pw] += 1
    return total / count


def ref_optimal(x, Y, a, b2):
    out = np.zeros_like(x)
    for b in range(x.shape[0]):
        logits = np.array([-((x[b] - a * y) ** 2).sum() / (2 * b2) for y in Y])
        out[b] = softmax_average(logits, Y.reshape(len(Y), -1)).reshape(x.shape[1:])
    return out


def ab(t):
    return DEFAULT_SCHEDULE.a(t), DEFAULT_SCHEDULE.b2(t)


# ------------------------------------------------------------------------------------------------
# LS
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding", ["zeros", "truncate", "circular"])
@pytest.mark.parametrize("P,t", [(3, 300), (5, 700), (1, 100)])
def test_ls_equals_brute_force(padding, P, t):
    data = toy_data(K=10, C=2)
    x = noisy(data, t)
    den = make_denoiser("ls", data, patch_size=P, padding=padding, device="cpu", chunk=4, block=300)
    ref = ref_ls(x.numpy(), train_array(data), *ab(t), P, padding)
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("padding,P", [("zeros", 2 * H - 1), ("truncate", 2 * H + 5), ("circular", H + 1)])
@pytest.mark.parametrize("t", [50, 500, 950])
def test_ls_with_whole_image_patch_is_optimal(padding, P, t):
    data = toy_data(K=15)
    x = noisy(data, t, B=3)
    ls = make_denoiser("ls", data, patch_size=P, padding=padding, device="cpu")
    opt = make_denoiser("optimal", data, device="cpu")
    torch.testing.assert_close(ls(x, t), opt(x, t), atol=1e-10, rtol=0)


def test_ls_independent_of_chunking():
    data = toy_data(K=30)
    x = noisy(data, 400, B=3)
    a = make_denoiser("ls", data, patch_size=3, device="cpu")(x, 400)
    b = make_denoiser("ls", data, patch_size=3, device="cpu", chunk=7, block=500, resident=False)(x, 400)
    torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


# ------------------------------------------------------------------------------------------------
# ELS and boundary ELS
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("padding,candidates,P", [("circular", "valid", 3), ("circular", "padded", 3),
                                                   ("zeros", "valid", 3), ("truncate", "padded", 3),
                                                   ("truncate", "valid", 3),
                                                   ("zeros", "padded", 5), ("circular", "valid", 1)])
def test_els_equals_brute_force(padding, candidates, P):
    data = toy_data(K=5, C=2)
    t = 400
    x = noisy(data, t)
    den = make_denoiser("els", data, patch_size=P, padding=padding, candidates=candidates, dtype="float64",
                        device="cpu", chunk=3, block=2000)
    ref = ref_els(x.numpy(), train_array(data), *ab(t), P, padding, candidates)
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)


def test_els_merging_identical_patches_is_exact():
    """Blank backgrounds repeat the same patch many times; merged with their counts, nothing changes."""
    rng = np.random.default_rng(3)
    raw = np.zeros((6, 1, H, W), np.uint8)
    raw[:, :, 1:3, 1:3] = rng.integers(0, 256, size=(6, 1, 2, 2))
    from localdiff.data.dataset import ImageDataset

    data = ImageDataset(raw=raw, name="sparse")
    t = 300
    x = noisy(data, t)
    for model in ("els-boundary", "els"):
        merged = make_denoiser(model, data, patch_size=3, dtype="float64", device="cpu")
        streamed = make_denoiser(model, data, patch_size=3, dtype="float64", device="cpu", bank_mb=0)
        torch.testing.assert_close(merged(x, t), streamed(x, t), atol=1e-12, rtol=0)
        assert merged._banks[(3, "valid")].pt.shape[1] < len(data) * (H - 2) * (W - 2)
    ref = ref_els(x.numpy(), train_array(data), *ab(t), 3, "circular", "valid")
    np.testing.assert_allclose(merged(x, t).numpy(), ref, atol=1e-10, rtol=0)


@pytest.mark.parametrize("candidates", ["valid", "padded"])
def test_els_is_shift_equivariant_with_circular_padding(candidates):
    data = toy_data(K=6, h=6, w=7)
    t = 500
    x = noisy(data, t, B=2)
    den = make_denoiser("els", data, patch_size=3, padding="circular", candidates=candidates, dtype="float64",
                        device="cpu")
    out = den(x, t)
    for shift in [(1, 0), (2, 3), (-1, 5)]:
        shifted = den(torch.roll(x, shift, dims=(2, 3)), t)
        torch.testing.assert_close(shifted, torch.roll(out, shift, dims=(2, 3)), atol=1e-12, rtol=0)


@pytest.mark.parametrize("P", [1, 3, 5, 11])
def test_boundary_els_equals_brute_force(P):
    data = toy_data(K=4)
    t = 600
    x = noisy(data, t)
    den = make_denoiser("els-boundary", data, patch_size=P, dtype="float64", device="cpu", block=3000)
    ref = ref_els_boundary(x.numpy(), train_array(data), *ab(t), P)
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)


def test_boundary_els_covering_the_image_is_ls_and_optimal():
    data = toy_data(K=8)
    t = 700
    x = noisy(data, t)
    bb = make_denoiser("els-boundary", data, patch_size=2 * H - 1, dtype="float64", device="cpu")
    opt = make_denoiser("optimal", data, device="cpu")
    torch.testing.assert_close(bb(x, t), opt(x, t), atol=1e-10, rtol=0)


def test_els_max_train_uses_a_seeded_subset():
    data = toy_data(K=20)
    x = noisy(data, 500)
    sub = make_denoiser("els", data, patch_size=3, max_train=8, seed=3, dtype="float64", device="cpu")
    ref = make_denoiser("els", data.subset(8, seed=3), patch_size=3, max_train=None, dtype="float64", device="cpu")
    torch.testing.assert_close(sub(x, 500), ref(x, 500), atol=1e-12, rtol=0)
    assert len(sub.train_set) == 8


# ------------------------------------------------------------------------------------------------
# PSPC
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("P,t", [(1, 200), (2, 500), (3, 500), (4, 900)])
def test_pspc_equals_brute_force(P, t):
    data = toy_data(K=9, C=2, h=5, w=6)
    x = noisy(data, t)
    den = make_denoiser("pspc", data, patch_size=P, device="cpu", chunk=4, block=400)
    ref = ref_pspc(x.numpy(), train_array(data), *ab(t), P)
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)


def test_pspc_with_whole_image_patch_is_optimal():
    data = toy_data(K=12)
    x = noisy(data, 300)
    pspc = make_denoiser("pspc", data, patch_size=H + 3, device="cpu")
    opt = make_denoiser("optimal", data, device="cpu")
    torch.testing.assert_close(pspc(x, 300), opt(x, 300), atol=1e-10, rtol=0)


# ------------------------------------------------------------------------------------------------
# Smoothed closed-form denoiser
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("smoothing", ["score", "data"])
def test_scfdm_with_zero_sigma_is_optimal(smoothing):
    data = toy_data(K=10)
    x = noisy(data, 400)
    den = make_denoiser("scfdm", data, sigma=0.0, smoothing=smoothing, device="cpu")
    opt = make_denoiser("optimal", data, device="cpu")
    torch.testing.assert_close(den(x, 400), opt(x, 400), atol=1e-12, rtol=0)
    tiny = make_denoiser("scfdm", data, sigma=1e-9, smoothing=smoothing, device="cpu")
    torch.testing.assert_close(tiny(x, 400), opt(x, 400), atol=1e-6, rtol=0)


@pytest.mark.parametrize("t", [100, 600])
def test_scfdm_score_smoothing_equals_plain_monte_carlo(t):
    data = toy_data(K=10)
    x = noisy(data, t)
    sigma, M, seed = 0.3, 5, 7
    den = make_denoiser("scfdm", data, sigma=sigma, num_samples=M, seed=seed, device="cpu", chunk=3)
    eps = torch.randn((M, *data.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    a, b2 = ab(t)
    Y = train_array(data)
    # the paper's estimator in z = x_t / (a + sqrt(b2)): mean over draws of the optimal denoiser at z + sigma eps
    ref = np.mean([ref_optimal(x.numpy() + sigma * (a + math.sqrt(b2)) * e.numpy(), Y, a, b2) for e in eps], axis=0)
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)
    # a deterministic map: the same draws at every call, independent of the batch
    torch.testing.assert_close(den(x[:1], t), den(x, t)[:1], atol=1e-12, rtol=0)


def test_scfdm_data_smoothing_is_the_gaussian_mixture_posterior_mean():
    data = toy_data(K=7)
    t, s = 500, 0.2
    x = noisy(data, t)
    a, b2 = ab(t)
    Y = train_array(data)
    v = a * a * s * s + b2
    xs = x.numpy()
    ref = np.zeros_like(xs)
    for b in range(xs.shape[0]):
        logits = np.array([-((xs[b] - a * y) ** 2).sum() / (2 * v) for y in Y])
        means = np.array([y + a * s * s / v * (xs[b] - a * y) for y in Y])
        ref[b] = softmax_average(logits, means.reshape(len(Y), -1)).reshape(xs.shape[1:])
    den = make_denoiser("scfdm", data, sigma=s, smoothing="data", device="cpu")
    np.testing.assert_allclose(den(x, t).numpy(), ref, atol=1e-10, rtol=0)


def centred_posterior_rows(x, Y, a, var, index):
    """``(a / var) Cov_w(y[index], y)`` for one flat input ``x`` [n]: the posterior covariance of the training
    images under weights ``softmax(-||x - a y_k||^2 / (2 var))``, by the two-pass (centred) formula."""
    logits = np.array([-((x - a * y) ** 2).sum() / (2 * var) for y in Y])
    w = np.exp(logits - logits.max())
    w /= w.sum()
    C = Y - w @ Y  # [K, n] centred
    return (a / var) * (w[:, None] * C[:, index]).T @ C  # [Q, n]


@pytest.mark.parametrize("smoothing", ["score", "data"])
@pytest.mark.parametrize("t", [100, 600])
def test_scfdm_closed_form_rows_equal_the_centred_posterior_covariance(smoothing, t):
    """The streamed closed-form Jacobian rows (blocks of 3 images) against the two-pass covariance written
    out: score smoothing, the mean over the draws at the perturbed inputs; data smoothing,
    ``(1 - a c) (a / v) Cov_w + c I`` at variance ``v = a^2 sigma^2 + b2``, ``c = a sigma^2 / v``."""
    data = toy_data(K=10)
    x = noisy(data, t)
    sigma, M, seed = 0.3, 4, 7
    den = make_denoiser("scfdm", data, sigma=sigma, smoothing=smoothing, num_samples=M, seed=seed, device="cpu",
                        chunk=3)
    index = torch.tensor([0, 7, 20, 35])
    rows = den.jacobian_rows(x, t, index).numpy()  # [B, Q, n]
    a, b2 = ab(t)
    Y = train_array(data).reshape(10, -1)
    xs = x.numpy().reshape(x.shape[0], -1)
    for b in range(xs.shape[0]):
        if smoothing == "score":
            eps = torch.randn((M, *data.shape), generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
            shift = sigma * (a + math.sqrt(b2)) * eps.numpy().reshape(M, -1)
            ref = np.mean([centred_posterior_rows(xs[b] + d, Y, a, b2, index.numpy()) for d in shift], axis=0)
        else:
            v = a * a * sigma * sigma + b2
            c = a * sigma * sigma / v
            ref = (1 - a * c) * centred_posterior_rows(xs[b], Y, a, v, index.numpy())
            ref[np.arange(len(index)), index.numpy()] += c
        np.testing.assert_allclose(rows[b], ref, atol=1e-10, rtol=1e-8)
        assert np.abs(ref).max() > 1e-3  # not a trivially flat posterior


# ------------------------------------------------------------------------------------------------
# Autograd (sensitivity fields need it), options, schedules and calibration
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model,opts", [("ls", {"patch_size": 3}), ("els", {"patch_size": 3, "dtype": "float64"}),
                                        ("pspc", {"patch_size": 2}),
                                        ("els-boundary", {"patch_size": 3, "dtype": "float64"})])
def test_patch_models_are_differentiable(model, opts):
    data = toy_data(K=4, h=4, w=4)
    den = make_denoiser(model, data, device="cpu", **opts)
    x = noisy(data, 500, B=1).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: den(v, 500), (x,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("model,opts", [("ls", {"patch_size": 3}), ("els", {"patch_size": 3}),
                                        ("els-boundary", {"patch_size": 3}), ("pspc", {"patch_size": 2}),
                                        ("scfdm", {"sigma": 0.2, "num_samples": 4})])
def test_patch_models_sample(model, opts):
    from localdiff import sample

    den = make_denoiser(model, toy_data(K=8), device="cpu", **opts)
    out = sample(den, num=3, steps=4, seed=0, progress=False)
    assert out.shape == (3, 1, H, W) and out.dtype == torch.float32 and torch.isfinite(out).all()
    torch.testing.assert_close(sample(den, num=3, steps=4, seed=0, progress=False, batch_size=1), out)


def test_bad_patch_options_are_reported():
    data = toy_data(K=4)
    with pytest.raises(ConfigError, match="odd"):
        make_denoiser("ls", data, patch_size=4)
    with pytest.raises(ConfigError, match="exceeds the image"):
        make_denoiser("els", data, patch_size=7)
    with pytest.raises(ConfigError, match="padding"):
        make_denoiser("ls", data, padding="reflect")
    with pytest.raises(ConfigError, match="does not exist"):
        make_denoiser("ls", data, patch_schedule="/nonexistent/schedule.json")
    with pytest.raises(ConfigError, match="sigma"):
        make_denoiser("scfdm", data, sigma=-1)


def test_schedule_option_picks_the_nearest_timestep(tmp_path):
    from localdiff.denoisers.patches import read_patch_schedule

    path = tmp_path / "s.json"
    path.write_text(json.dumps({"format": "localdiff.patch-schedule", "patch_sizes": {"900": 5, "500": 3, "0": 1}}))
    sched = read_patch_schedule(path)
    assert [sched.at(t) for t in (999, 900, 701, 700, 650, 250, 249, 0)] == [5, 5, 5, 5, 3, 3, 1, 1]
    data = toy_data(K=6)
    den = make_denoiser("ls", data, patch_schedule=str(path), device="cpu")
    x = noisy(data, 880)
    torch.testing.assert_close(den(x, 880), den.denoise_patch(x, 880, 5), atol=0, rtol=0)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"900": 4}))
    with pytest.raises(ConfigError, match="odd"):
        make_denoiser("ls", data, patch_schedule=str(bad))


def test_calibration_recovers_a_known_patch_size_and_round_trips(tmp_path):
    from localdiff.calibrate import calibrate_patch_sizes
    from localdiff.denoisers.patches import read_patch_schedule

    data = toy_data(K=12, seed=0)
    held_out = toy_data(K=5, seed=1)
    target = make_denoiser("ls", data, patch_size=3, device="cpu")
    out = tmp_path / "schedule.json"
    result = calibrate_patch_sizes("ls", data, target, timesteps=[900, 500, 100], sizes=[1, 3, 5, 7],
                                   num_images=4, seed=0, held_out=held_out, device="cpu", out=out)
    assert result["patch_sizes"] == {"900": 3, "500": 3, "100": 3}
    for t in ("900", "500", "100"):
        assert result["mse"][t]["3"] < 1e-20 and min(result["mse"][t]["1"], result["mse"][t]["7"]) > 1e-8
    assert read_patch_schedule(out).sizes == {900: 3, 500: 3, 100: 3}
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    den = make_denoiser("ls", data, patch_schedule=str(out), device="cpu")
    x = noisy(data, 500)
    torch.testing.assert_close(den(x, 500), target(x, 500), atol=1e-12, rtol=0)
    with pytest.raises(ConfigError, match="exists"):
        calibrate_patch_sizes("ls", data, target, timesteps=[500], sizes=[3], num_images=2, seed=0,
                              held_out=held_out, device="cpu", out=out)


def test_calibrate_patches_command(tmp_path, monkeypatch, capsys):
    import localdiff.commands.common as command
    from localdiff.cli import main
    from localdiff.denoisers.patches import read_patch_schedule

    train, test = toy_data(K=12, seed=0), toy_data(K=6, seed=1)
    monkeypatch.setattr(command, "load_data_from_args", lambda args, split=None: test if split == "test" else train)
    out = tmp_path / "schedule.json"
    argv = ["calibrate-patches", "--data", "unused", "--model", "pspc", "--target", "pspc", "--target-opt",
            "patch_size=2", "--timesteps", "900,300", "--sizes", "1,2,3", "--num", "4", "--device", "cpu",
            "--out", str(out)]
    assert main(argv) == 0
    doc = json.loads(out.read_text())
    assert doc["patch_sizes"] == {"900": 2, "300": 2} and doc["held_out"]["split"] == "test"
    assert read_patch_schedule(out).sizes == {900: 2, 300: 2}
    assert main(argv) == 2  # an existing schedule is never overwritten
    assert "already exists" in capsys.readouterr().err
