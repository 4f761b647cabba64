"""``masked-soft`` and ``masked-equivariant`` against plain float64 implementations of their own formulas."""

import itertools
import json

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers.masked.equivariant import averaged_gain
from localdiff.denoisers.masked.soft import soft_weights
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError

from test_masked import plain_gain, smooth_images


# ------------------------------------------------------------------------------------------------
# Plain references (float64, loops and dense arrays written from the formulas)
# ------------------------------------------------------------------------------------------------

def plain_norm(G: np.ndarray, normalize: str = "diag") -> np.ndarray:
    d = np.diag(G).copy()
    d[np.abs(d) < 1e-6] = 1.0
    if normalize == "diag":
        return G / d[:, None]
    s = np.sqrt(np.abs(d))
    return G / (s[:, None] * s[None, :])


def plain_soft(x, y, N, t, tau, gamma, temperature=1.0):
    """x0_hat[b, i] = softmax_k(-sum_m W[m, i] (x[b, m] - a y_k[m])^2 / (2 b2 T)) . y[:, i],
    W = min(1, |N|)^gamma where |N| >= tau max|N|."""
    a, b2 = S.a(t), S.b2(t)
    support = np.abs(N) >= tau * np.abs(N).max()
    W = np.where(support, np.minimum(1.0, np.abs(N)) ** gamma, 0.0)
    d = (x[:, None, :] - a * y[None]) ** 2  # [B, K, n]
    logits = -np.einsum("bkm,mi->bki", d, W) / (2 * b2 * temperature)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bki,ki->bi", w, y)


def plain_stencil(N, shape, tau, gamma):
    """{(c', c, dh, dw): weight}: the translation-averaged gain s = (1/HW) sum_{i: i+d inside} N[(c', i+d), (c, i)]
    kept where |s| >= tau max|s| (and each channel's own pixel, weight 1)."""
    C, H, W = shape
    s = {}
    for cm, ci, dh, dw in itertools.product(range(C), range(C), range(-H + 1, H), range(-W + 1, W)):
        tot = 0.0
        for h, w in itertools.product(range(H), range(W)):
            if 0 <= h + dh < H and 0 <= w + dw < W:
                tot += N[(cm * H + h + dh) * W + w + dw, (ci * H + h) * W + w]
        s[(cm, ci, dh, dw)] = tot / (H * W)
    mx = max(abs(v) for v in s.values())
    sten = {k: (1.0 if gamma == 0 else min(1.0, abs(v) / mx) ** gamma) for k, v in s.items() if abs(v) >= tau * mx}
    for c in range(C):
        sten[(c, c, 0, 0)] = 1.0
    return s, sten


def plain_equivariant(x, y, N, shape, t, tau, gamma, temperature=1.0):
    """Per output pixel (c, h, w): the softmax over every training image k and every position j of the
    same border configuration (rows: the same row if within the stencil's reach of the top or bottom
    edge, else any such interior row; likewise columns) of -sum over the stencil offsets d that stay
    inside the image of W_d (x[i + d] - a y_k[j + d])^2 / (2 b2 T); the value is y_k[c, j]."""
    C, H, W = shape
    _, sten = plain_stencil(N, shape, tau, gamma)
    a, b2 = S.a(t), S.b2(t)
    B, K = x.shape[0], y.shape[0]
    out = np.zeros((B, C * H * W))
    for c in range(C):
        own = {(cm, dh, dw): wt for (cm, ci, dh, dw), wt in sten.items() if ci == c}
        up, down = max(-k[1] for k in own), max(k[1] for k in own)
        left, right = max(-k[2] for k in own), max(k[2] for k in own)

        def same(u, v, L, lo, hi):
            return u == v or (lo <= u < L - hi and lo <= v < L - hi)

        for h, w in itertools.product(range(H), range(W)):
            offs = [(k, wt) for k, wt in own.items() if 0 <= h + k[1] < H and 0 <= w + k[2] < W]
            cands = [(hj, wj) for hj, wj in itertools.product(range(H), range(W))
                     if same(h, hj, H, up, down) and same(w, wj, W, left, right)]
            logits = np.zeros((B, K, len(cands)))
            vals = np.zeros((K, len(cands)))
            for ci, (hj, wj) in enumerate(cands):
                vals[:, ci] = y[:, (c * H + hj) * W + wj]
                for (cm, dh, dw), wt in offs:
                    xi = x[:, (cm * H + h + dh) * W + w + dw]
                    yj = y[:, (cm * H + hj + dh) * W + wj + dw]
                    logits[:, :, ci] -= wt * (xi[:, None] - a * yj[None, :]) ** 2
            logits = logits.reshape(B, -1) / (2 * b2 * temperature)
            logits -= logits.max(axis=1, keepdims=True)
            e = np.exp(logits)
            e /= e.sum(axis=1, keepdims=True)
            out[:, (c * H + h) * W + w] = e @ vals.reshape(-1)
    return out


def two_channel_set(num=16, side=5, seed=3) -> ImageDataset:
    """uint8 [num, 2, side, side]: correlated channels of blurred noise."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num, side + 2, side + 2))
    z = (z[:, 1:-1, 1:-1] + 0.5 * (z[:, :-2, 1:-1] + z[:, 2:, 1:-1] + z[:, 1:-1, :-2] + z[:, 1:-1, 2:]))
    img = np.stack([z, 0.6 * z + 0.4 * rng.normal(size=z.shape)], axis=1)
    img = np.clip(127.5 + 45 * img / img.std(), 0, 255).astype(np.uint8)
    return ImageDataset(raw=img, name=f"two-channel-{num}-{seed}")


def noisy(y: np.ndarray, t: int, num: int = 3, seed: int = 1) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return S.a(t) * y[:num] + np.sqrt(S.b2(t)) * rng.normal(size=y[:num].shape) + 0.05 * rng.normal(size=y[:num].shape)


@pytest.fixture(scope="module")
def smooth():
    return smooth_images(40, 8, 0)


# ------------------------------------------------------------------------------------------------
# masked-soft
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("normalize", ["diag", "sym"])
@pytest.mark.parametrize("t", [900, 500, 100, 0])
def test_soft_equals_brute_force(smooth, t, normalize, tmp_cache):
    y = smooth.tensor(dtype=torch.float64).reshape(len(smooth), -1).numpy()
    N = plain_norm(plain_gain(y, t), normalize)
    x = noisy(y, t)
    for gamma, temp in ((1.0, 1.0), (0.5, 0.7), (2.0, 1.3)):
        den = make_denoiser("masked-soft", smooth, device="cpu", tau=0.02, gamma=gamma, temperature=temp,
                            normalize=normalize, dtype="float64")
        out = den(torch.from_numpy(x).reshape(-1, 1, 8, 8), t).reshape(len(x), -1).numpy()
        np.testing.assert_allclose(out, plain_soft(x, y, N, t, 0.02, gamma, temp), atol=1e-9, rtol=0)
        fast = make_denoiser("masked-soft", smooth, device="cpu", tau=0.02, gamma=gamma, temperature=temp,
                             normalize=normalize)(torch.from_numpy(x).reshape(-1, 1, 8, 8).float(), t)
        np.testing.assert_allclose(fast.reshape(len(x), -1).double().numpy(), out, atol=2e-4, rtol=0)  # float32


def test_soft_with_gamma_zero_is_masked(smooth, tmp_cache):
    y = smooth.tensor(dtype=torch.float64)
    for t in (900, 300, 20):
        x = S.q_sample(y[:4], t, torch.randn(y[:4].shape, generator=torch.Generator().manual_seed(t), dtype=torch.float64))
        soft = make_denoiser("masked-soft", smooth, device="cpu", tau=0.01, gamma=0.0, dtype="float64")(x, t)
        masked = make_denoiser("masked", smooth, device="cpu", tau=0.01, dtype="float64")(x, t)
        torch.testing.assert_close(soft, masked, atol=1e-12, rtol=0)


def test_soft_weights_lie_in_unit_interval_on_the_papers_support(smooth, tmp_cache):
    y = smooth.tensor(dtype=torch.float64).reshape(len(smooth), -1).numpy()
    for t, normalize in ((700, "diag"), (200, "sym")):
        N = torch.from_numpy(plain_norm(plain_gain(y, t), normalize))
        for gamma in (0.0, 0.5, 1.0, 3.0):
            W = soft_weights(N, 0.01, gamma)
            support = N.abs() >= 0.01 * N.abs().max()
            assert ((W >= 0) & (W <= 1)).all() and (W[~support] == 0).all()
            assert (W[support] > 0).all()  # every pixel of the paper's mask keeps some weight
            if gamma == 0:
                assert torch.equal(W, support.double())
    den = make_denoiser("masked-soft", smooth, device="cpu", tau=0.01)
    assert 0 < den.mean_weight(500) < 1 and den.mask_density(500) == make_denoiser(
        "masked", smooth, device="cpu", tau=0.01).mask_density(500)


@pytest.mark.parametrize("opts", [dict(tile=(1, 1)), dict(tile=(8, 8)), dict(path="dense"), dict(threads=2, chunk=7)])
def test_soft_plans_and_blocks_do_not_change_the_result(smooth, opts, tmp_cache):
    x = smooth.tensor(dtype=torch.float64)[:3] * 0.6 + 0.3
    ref = make_denoiser("masked-soft", smooth, device="cpu", tau=0.02, dtype="float64")(x, 400)
    out = make_denoiser("masked-soft", smooth, device="cpu", tau=0.02, dtype="float64", **opts)(x, 400)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_soft_refuses_chunk_average_and_negative_gamma(smooth, tmp_cache):
    with pytest.raises(ConfigError, match="chunk_average"):
        make_denoiser("masked-soft", smooth, device="cpu", chunk_average=10)
    with pytest.raises(ConfigError, match="gamma"):
        make_denoiser("masked-soft", smooth, device="cpu", gamma=-1)


# ------------------------------------------------------------------------------------------------
# masked-equivariant
# ------------------------------------------------------------------------------------------------

def test_averaged_gain_equals_plain_loops(tmp_cache):
    data = two_channel_set(12, 4)
    y = data.tensor(dtype=torch.float64).reshape(len(data), -1).numpy()
    N = plain_norm(plain_gain(y, 500))
    s_plain, _ = plain_stencil(N, (2, 4, 4), 0.1, 0.0)
    s = averaged_gain(torch.from_numpy(N), (2, 4, 4))
    for (cm, ci, dh, dw), v in s_plain.items():
        assert abs(float(s[cm, ci, dh + 3, dw + 3]) - v) < 1e-12


@pytest.mark.parametrize("t,tau,gamma", [(900, 0.3, 0.0), (500, 0.2, 1.0), (100, 0.1, 0.0), (0, 0.05, 0.0),
                                         (300, 0.02, 0.5)])
def test_equivariant_equals_brute_force(t, tau, gamma, tmp_cache):
    data = smooth_images(16, 6, 0, constant_border=False)
    y = data.tensor(dtype=torch.float64).reshape(len(data), -1).numpy()
    N = plain_norm(plain_gain(y, t))
    x = noisy(y, t)
    den = make_denoiser("masked-equivariant", data, device="cpu", tau=tau, gamma=gamma, temperature=0.8,
                        dtype="float64")
    out = den(torch.from_numpy(x).reshape(-1, 1, 6, 6), t).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(out, plain_equivariant(x, y, N, (1, 6, 6), t, tau, gamma, 0.8), atol=1e-9, rtol=0)
    fast = make_denoiser("masked-equivariant", data, device="cpu", tau=tau, gamma=gamma, temperature=0.8,
                         block=1000, bank_mb=0)(torch.from_numpy(x).reshape(-1, 1, 6, 6).float(), t)
    np.testing.assert_allclose(fast.reshape(len(x), -1).double().numpy(), out, atol=2e-4, rtol=0)  # float32


def test_equivariant_with_two_channels_equals_brute_force_and_autograd(tmp_cache):
    data = two_channel_set(10, 5)
    y = data.tensor(dtype=torch.float64).reshape(len(data), -1).numpy()
    t = 400
    N = plain_norm(plain_gain(y, t))
    x = noisy(y, t, num=2)
    den = make_denoiser("masked-equivariant", data, device="cpu", tau=0.15, dtype="float64")
    xt = torch.from_numpy(x).reshape(-1, 2, 5, 5)
    out = den(xt, t).reshape(len(x), -1).numpy()
    np.testing.assert_allclose(out, plain_equivariant(x, y, N, (2, 5, 5), t, 0.15, 0.0), atol=1e-9, rtol=0)
    index = torch.tensor([0, 12, 31, 49])
    rows = den.jacobian_rows(xt, t, index)
    for b in range(2):
        J = torch.autograd.functional.jacobian(lambda v: den(v, t).reshape(-1), xt[b:b + 1]).reshape(50, 50)
        torch.testing.assert_close(rows[b], J[index], atol=1e-8, rtol=1e-6)
    streamed = make_denoiser("masked-equivariant", data, device="cpu", tau=0.15, dtype="float64", bank_mb=0)
    torch.testing.assert_close(streamed.jacobian_rows(xt, t, index), rows, atol=1e-10, rtol=0)  # unmerged banks


def test_equivariant_at_tau_zero_is_the_optimal_denoiser(tmp_cache):
    data = smooth_images(12, 5, 2, constant_border=False)
    x = S.q_sample(data.tensor(dtype=torch.float64)[:3], 300, torch.randn(3, 1, 5, 5, generator=torch.Generator().manual_seed(0),
                                                                           dtype=torch.float64))
    eq = make_denoiser("masked-equivariant", data, device="cpu", tau=0.0, dtype="float64")
    opt = make_denoiser("optimal", data, device="cpu", dtype="float64")
    torch.testing.assert_close(eq(x, 300), opt(x, 300), atol=1e-10, rtol=0)


def test_equivariant_subset_is_named_in_the_settings(tmp_cache):
    data = smooth_images(30, 6, 1, constant_border=False)
    exact = make_denoiser("masked-equivariant", data, device="cpu", max_train=None)
    approx = make_denoiser("masked-equivariant", data, device="cpu", max_train=10, seed=3)
    s_exact, s_approx = exact.settings(), approx.settings()
    assert s_exact["exact"] is True and s_exact["train_images"] == 30 and s_exact["max_train"] is None
    default = make_denoiser("masked-equivariant", data, device="cpu").settings()  # 1,000 > 30: every image
    assert default["max_train"] == 1000 and default["exact"] is True and default["train_images"] == 30
    assert s_approx["exact"] is False and s_approx["train_images"] == 10 and s_approx["max_train"] == 10
    json.dumps(s_approx)
    with pytest.raises(ConfigError):
        make_denoiser("masked-equivariant", data, device="cpu", tau=2.0)


def test_equivariant_banks_are_kept_and_reused(tmp_cache):
    data = smooth_images(20, 6, 1, constant_border=False)
    den = make_denoiser("masked-equivariant", data, device="cpu", tau=0.1)
    x = data.tensor()[:2] * 0.5
    first = den(x, 500)
    assert den.schedule.at(500).key in den._banks
    torch.testing.assert_close(den(x, 500), first, atol=0, rtol=0)
    none = make_denoiser("masked-equivariant", data, device="cpu", tau=0.1, bank_mb=0)
    torch.testing.assert_close(none(x, 500), first, atol=1e-6, rtol=0)
    assert not none._banks


# ------------------------------------------------------------------------------------------------
# wiener-quadratic
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [800, 300, 50])
def test_quadratic_fit_equals_least_squares_over_exact_gaussian_quadrature(t, tmp_cache):
    """The closed-form moments (Isserlis) against a plain weighted least-squares fit of the Wiener residual
    over every training image and a Gauss-Hermite rule in the neighbourhood's noise (exact for these
    polynomial degrees); the noise outside the neighbourhood is uncorrelated with the features."""
    data = smooth_images(12, 4, 0, constant_border=False)
    y = data.tensor(dtype=torch.float64).reshape(len(data), -1).numpy()
    k = 3
    den = make_denoiser("wiener-quadratic", data, device="cpu", k=k, ridge=0.0)
    a, b2 = S.a(t), S.b2(t)
    s = np.sqrt(b2)
    mu = y.mean(0)
    lam, U = np.linalg.eigh(np.cov(y, rowvar=False, bias=True))
    J = (U * (a * np.clip(lam, 0, None) / (a * a * np.clip(lam, 0, None) + b2))) @ U.T
    nodes, wts = np.polynomial.hermite_e.hermegauss(5)
    wts = wts / wts.sum()
    upper = np.triu_indices(k)
    beta = den.coefficients(t).numpy()
    for i in range(16):
        N = den.nbhd[i].numpy()
        X, r, W = [], [], []
        for yk in y:
            u, w = a * (yk - mu)[N], (yk - mu)[i] - a * J[i] @ (yk - mu)
            for idx in itertools.product(range(5), repeat=k):
                z = u + s * nodes[list(idx)]
                X.append(np.concatenate([[1.0], z, np.outer(z, z)[upper]]))
                r.append(w - s * J[i, N] @ nodes[list(idx)])
                W.append(np.prod(wts[list(idx)]))
        X, r, W = np.array(X), np.array(r), np.array(W)
        sol = np.linalg.solve((X * W[:, None]).T @ X, (X * W[:, None]).T @ r)
        np.testing.assert_allclose(beta[i], sol, atol=1e-9 * max(1.0, np.abs(sol).max()), rtol=1e-6)


def test_quadratic_is_wiener_plus_the_correction_and_beats_it_on_its_training_set(tmp_cache):
    data = smooth_images(60, 6, 3, constant_border=False)
    quad = make_denoiser("wiener-quadratic", data, device="cpu", k=4)
    wiener = make_denoiser("wiener", data, device="cpu")
    x0 = data.tensor(dtype=torch.float64)
    g = torch.Generator().manual_seed(0)
    for t in (700, 200):
        noise = torch.randn((20, *x0.shape), generator=g, dtype=torch.float64)
        x_t = S.q_sample(x0.expand(20, *x0.shape).reshape(-1, *x0.shape[1:]), t, noise.reshape(-1, *x0.shape[1:]))
        target = x0.repeat(20, 1, 1, 1)
        err_q = float(((quad(x_t, t) - target) ** 2).mean())
        err_w = float(((wiener(x_t, t) - target) ** 2).mean())
        assert err_q <= err_w  # beta = 0 is Wiener: the fitted correction cannot be worse (up to sampling)
        assert quad.coefficients(t).shape == (36, 1 + 4 + 10)
