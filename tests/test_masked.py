"""The Wiener-masked local denoiser (`masked`) against plain, independent implementations of its formulas."""

import dataclasses

import numpy as np
import pytest
import torch

from localdiff import make_denoiser, sample
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers.masked import MaskedDenoiser
from localdiff.denoisers.masked.plan import row_runs, tile_stats, tiles_of
from localdiff.denoisers.masked.masks import default_tau, wiener_masks
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError
from localdiff.stats import Spectrum, data_spectrum


# ------------------------------------------------------------------------------------------------
# Plain references (float64, written from the formulas, no streaming)
# ------------------------------------------------------------------------------------------------

def plain_gain(y: np.ndarray, t: int) -> np.ndarray:
    """G_t = U diag(a^2 lam / (a^2 lam + b2)) U^T from the data's population covariance."""
    a2, b2 = S.a(t) ** 2, S.b2(t)
    cov = np.cov(y, rowvar=False, bias=True)
    lam, U = np.linalg.eigh(cov)
    lam = np.clip(lam, 0, None)
    return (U * (a2 * lam / (a2 * lam + b2))) @ U.T


def plain_masks(G: np.ndarray, tau: float) -> np.ndarray:
    """The official rule: row m divided by G[m, m] (|G[m, m]| < 1e-6 -> 1), kept where
    |value| >= tau * (global max |value|); column i is S_i."""
    d = np.diag(G).copy()
    d[np.abs(d) < 1e-6] = 1.0
    norm = G / d[:, None]
    return np.abs(norm) >= tau * np.abs(norm).max()


def plain_masked(x: np.ndarray, y: np.ndarray, masks: np.ndarray, t: int, temperature: float = 1.0) -> np.ndarray:
    """x0_hat[b, i] = sum_k softmax_k(-sum_{m in S_i} (x[b, m] - a y_k[m])^2 / (2 b2 T)) y_k[i]."""
    a, b2 = S.a(t), S.b2(t)
    d = (x[:, None, :] - a * y[None, :, :]) ** 2  # [B, K, n]
    logits = -np.einsum("bkm,mi->bki", d, masks.astype(np.float64)) / (2 * b2 * temperature)
    logits -= logits.max(axis=1, keepdims=True)
    w = np.exp(logits)
    w /= w.sum(axis=1, keepdims=True)
    return np.einsum("bki,ki->bi", w, y)


def plain_chunk_average(x, y, masks, t, chunk):
    """The official streaming: softmax within each chunk, weighted sums and weight sums added."""
    a, b2 = S.a(t), S.b2(t)
    num = den = 0.0
    for s in range(0, y.shape[0], chunk):
        yc = y[s:s + chunk]
        d = (x[:, None, :] - a * yc[None]) ** 2
        logits = -np.einsum("bkm,mi->bki", d, masks.astype(np.float64)) / (2 * b2)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        w /= w.sum(axis=1, keepdims=True)
        num = num + np.einsum("bki,ki->bi", w, yc)
        den = den + w.sum(axis=1)
    return num / (den + 1e-8)


# ------------------------------------------------------------------------------------------------
# Data
# ------------------------------------------------------------------------------------------------

def smooth_images(num=60, side=8, seed=0, constant_border=True):
    """uint8 images of blurred noise (local correlations: local masks, tiles with cores), optionally
    with a constant top row (zero variance: empty masks)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num, side + 4, side + 4))
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.2) ** 2)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, z)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 2, z)
    z = z / z.std()
    img = np.clip(127.5 + 50 * z, 0, 255).astype(np.uint8)
    if constant_border:
        img[:, 0, :] = 40
    return ImageDataset(raw=img[:, None], name="smooth")


@pytest.fixture(scope="module")
def smooth():
    return smooth_images()


def flat(data) -> np.ndarray:
    return data.raw.reshape(len(data), -1).astype(np.float64) / 127.5 - 1.0


def queries(data, t, num=3, seed=1):
    """x_t from the forward process on perturbed training images (realistic, with near ties)."""
    g = torch.Generator().manual_seed(seed + t)
    x0 = torch.stack([data[i] for i in range(num)]).double()
    x0 = (x0 + 0.3 * torch.randn(x0.shape, generator=g, dtype=torch.float64)).clamp(-1, 1)
    return S.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=torch.float64))


def force_q_mode(den, t, mode, batch=3):
    """Make the next call at t compute Q by ``mode`` (the cached plan is the one the call uses)."""
    den._plans[(S.at(t).key, batch)] = dataclasses.replace(den.plan(t, batch), q_mode=mode)


def at(den, x, t):
    """x0_hat of a denoiser as float64 [B, n] numbers."""
    return den(x, t).reshape(x.shape[0], -1).double().numpy()


# ------------------------------------------------------------------------------------------------
# Exactness
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tau", [0.005, 0.05, 0.3])
@pytest.mark.parametrize("t", [0, 40, 300, 900])
def test_equals_brute_force(smooth, tau, t, tmp_cache):
    y = flat(smooth)
    masks = plain_masks(plain_gain(y, t), tau)
    x = queries(smooth, t)
    ref = plain_masked(x.reshape(3, -1).numpy(), y, masks, t)
    plans = [dict(path="auto"), dict(path="grouped", tile="2x2"), dict(path="grouped", tile="1x4"),
             dict(path="grouped", tile="4x4"), dict(path="dense")]
    for chunk in (7, 60):
        for opts in plans:
            den = make_denoiser("masked", smooth, device="cpu", tau=tau, chunk=chunk, dtype="float64", **opts)
            np.testing.assert_allclose(at(den, x, t), ref, atol=1e-9, err_msg=f"chunk={chunk} {opts}")
    den32 = make_denoiser("masked", smooth, device="cpu", tau=tau, chunk=16)  # default float32
    x32 = x.float()
    ref32 = plain_masked(x32.reshape(3, -1).double().numpy(), y, masks, t)
    np.testing.assert_allclose(at(den32, x32, t), ref32, atol=1e-5)


@pytest.mark.parametrize("mode", ["dense", "sparse", "runs"])
def test_every_way_of_computing_q_is_exact(smooth, mode, tmp_cache):
    """Q = M^T (Y*Y) by a dense product, a sparse one, or the masks' row runs over cumulative sums: the
    outputs equal the brute force whichever is forced (the cost model picks one per timestep)."""
    y = flat(smooth)
    for t in (40, 600):
        masks = plain_masks(plain_gain(y, t), 0.05)
        x = queries(smooth, t)
        ref = plain_masked(x.reshape(3, -1).numpy(), y, masks, t)
        den = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=9, dtype="float64")
        force_q_mode(den, t, mode)
        np.testing.assert_allclose(at(den, x, t), ref, atol=1e-9, err_msg=f"t={t}")
        q = den._q[S.at(t).key].numpy()  # the cached Q itself, [n, K]
        np.testing.assert_allclose(q, masks.T.astype(np.float64) @ (y * y).T, atol=1e-10)
        # with no room to keep Q, each worker computes it into its own buffer, block by block
        bare = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=9, dtype="float64", cache_mb=0,
                             threads=2)
        force_q_mode(bare, t, mode)
        np.testing.assert_allclose(at(bare, x, t), ref, atol=1e-9, err_msg=f"t={t}, Q not kept")
        assert S.at(t).key not in bare._q


def test_row_runs_sum_the_mask_through_cumulative_sums():
    """D @ cumsum_w(v) == M @ v for masks with runs touching both image edges, several channels."""
    g = torch.Generator().manual_seed(0)
    shape = (2, 3, 7)
    n = 42
    m = torch.rand(9, n, generator=g) < 0.5
    m[0] = True  # every pixel: one run per image row
    m[1] = False
    m[2, ::7] = True  # single pixels at w = 0
    v = torch.randn(n, 5, generator=g, dtype=torch.float64)
    d = row_runs(m, shape).to_dense().double()
    c = torch.cumsum(v.view(6, 7, 5), dim=1).view(n, 5)
    torch.testing.assert_close(d @ c, m.double() @ v, atol=1e-12, rtol=0)
    assert int((d != 0).sum(dim=1)[0]) == 6  # one run per image row: its end only (it starts at w = 0)
    assert int((d != 0).sum(dim=1)[1]) == 0


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_worker_threads_share_blocks_exactly_and_restore_torch_threads(smooth, threads, tmp_cache):
    """The blocks are shared out among worker threads (3 workers: an uneven share of 7 blocks) whose
    softmax states are merged; the result equals the brute force and torch's thread count is unchanged."""
    y = flat(smooth)
    before = torch.get_num_threads()
    for t in (5, 300):  # t = 5: very unequal shifts between the workers' first blocks
        masks = plain_masks(plain_gain(y, t), 0.05)
        x = queries(smooth, t)
        den = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=9, dtype="float64", threads=threads)
        assert den._block_width(den.plan(t, 3), 3) == 9  # as asked: 7 blocks, 3 workers get 3, 2 and 2
        assert den._workers() == threads
        np.testing.assert_allclose(at(den, x, t), plain_masked(x.reshape(3, -1).numpy(), y, masks, t), atol=1e-9)
        assert torch.get_num_threads() == before
    avg = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk_average=9, dtype="float64", threads=threads)
    x = queries(smooth, 300)
    np.testing.assert_allclose(at(avg, x, 300),
                               plain_chunk_average(x.reshape(3, -1).numpy(), y, plain_masks(plain_gain(y, 300), 0.05),
                                                   300, 9), atol=1e-9)


def test_block_widths_follow_the_plan_and_are_shared_evenly(tmp_cache):
    big = smooth_images(num=6000, side=28)
    den = make_denoiser("masked", big, device="cpu", threads=2)
    assert den.settings()["chunk"] == "per timestep"
    widths = {t: den._block_width(den.plan(t, 8), 8) for t in (900, 0)}
    assert 512 <= widths[900] < widths[0] <= 8192  # big masks: narrow blocks; tiny masks: wide ones
    for t, w in widths.items():
        bounds = den.columns.bounds(w, 2)
        assert len(bounds) % 2 == 0 and bounds[0][0] == 0 and bounds[-1][1] == 6000
        assert all(a[1] == b[0] for a, b in zip(bounds, bounds[1:]))  # consecutive, no gaps
    assert len(den.columns.bounds(2674, 3)) == 3 and len(den.columns.bounds(2674, 2)) == 4
    fixed = make_denoiser("masked", big, device="cpu", threads=2, chunk=1000)
    assert fixed._block_width(fixed.plan(900, 8), 8) == 1000 and fixed.settings()["chunk"] == 1000


@pytest.mark.parametrize("tile", [(2, 2), (2, 3), (4, 4)])
def test_tile_counts_equal_plain_set_arithmetic(tile):
    """The planner's per-tile counts (pixels with a mask g, union u, core c), taken from one index_add,
    equal sets built pixel by pixel; two channels and tiles cut off at the image's edges (5 x 7)."""
    shape, n = (2, 5, 7), 70
    gen = torch.Generator().manual_seed(1)
    masks = torch.rand(n, n, generator=gen) < 0.3  # column i = S_i
    masks[:, [3, 40, 41]] = False  # empty masks
    tiles = tiles_of(shape, *tile)
    covered = torch.cat(tiles).sort().values
    assert torch.equal(covered, torch.arange(n))  # a partition of the pixels
    th, tw = tile
    for q in tiles:  # each tile: one th x tw window (fewer at the edges), the same window in each channel
        ch, hw = q // 35, q % 35
        assert torch.equal(ch.bincount(minlength=2)[0], ch.bincount(minlength=2)[1])
        h, w = hw // 7, hw % 7
        assert len(set((h // th).tolist())) == 1 and len(set((w // tw).tolist())) == 1
    g, u, c = tile_stats(masks.float(), masks.any(dim=0), shape, *tile)
    for ti, q in enumerate(tiles):
        sets = [set(torch.nonzero(masks[:, i]).squeeze(1).tolist()) for i in q.tolist() if masks[:, i].any()]
        assert int(g[ti]) == len(sets)
        assert int(u[ti]) == len(set().union(*sets))
        assert int(c[ti]) == (len(set.intersection(*sets)) if sets else 0)


def test_plans_exercise_cores_tiles_and_empty_masks(smooth, tmp_cache):
    den = make_denoiser("masked", smooth, device="cpu", tau=0.05, path="grouped", tile="2x2")
    plans = [den.plan(t, 3) for t in (0, 40, 300, 900)]
    assert all(len(p.empty) == 8 for p in plans)  # the constant top row
    assert any(len(tl.core) for p in plans for tl in p.tiles)
    assert any(len(p.tiles) > 1 and not p.dense for p in plans)
    for p in plans:  # tiles partition the non-empty pixels; core + resid covers each pixel's mask
        covered = torch.cat([tl.out for tl in p.tiles] + [p.empty]).sort().values
        assert torch.equal(covered, torch.arange(den.dim))
        for tl in p.tiles:
            rebuilt = torch.zeros(den.dim, len(tl.out), dtype=torch.bool)
            rebuilt[tl.core] = True
            rebuilt[tl.resid] = tl.sub_t.T
            assert torch.equal(rebuilt, p.masks[:, tl.out])


def test_later_block_much_closer_triggers_exact_rescaling(tmp_cache):
    """At low noise the first block holds only far images and a later one the query's own image:
    the shifted weights would overflow; the block is redone and the result stays exact."""
    data = smooth_images(num=40, seed=3, constant_border=False)
    y = flat(data)
    t = 5
    noise = 0.01 * torch.randn(2, 1, 8, 8, dtype=torch.float64)
    x = S.q_sample(torch.from_numpy(y[30:32]).reshape(2, 1, 8, 8), t, noise)  # images 30, 31: in block 4 of 5
    masks = plain_masks(plain_gain(y, t), 0.005)
    ref = plain_masked(x.reshape(2, -1).numpy(), y, masks, t)
    for dtype, tol in (("float64", 1e-9), ("float32", 1e-5)):
        den = make_denoiser("masked", data, device="cpu", tau=0.005, chunk=8, dtype=dtype)
        xx = x if dtype == "float64" else x.float()
        np.testing.assert_allclose(at(den, xx, t), ref if dtype == "float64" else
                                   plain_masked(xx.reshape(2, -1).double().numpy(), y, masks, t), atol=tol)


def test_tau_zero_equals_optimal(smooth, tmp_cache):
    for t in (10, 500):
        x = queries(smooth, t)
        masked = make_denoiser("masked", smooth, device="cpu", tau=0, dtype="float64", chunk=13)
        optimal = make_denoiser("optimal", smooth, device="cpu")
        assert masked.mask_density(t) == 1.0
        np.testing.assert_allclose(at(masked, x, t), at(optimal, x, t), atol=1e-9)


def test_pixel_masks_give_independent_per_pixel_softmax(smooth, tmp_cache):
    y = flat(smooth)
    t = 200
    a, b2 = S.a(t), S.b2(t)
    x = queries(smooth, t)
    xf = x.reshape(3, -1).numpy()
    logits = -(xf[:, None, :] - a * y[None]) ** 2 / (2 * b2)  # [B, K, n]: pixel i sees only itself
    w = np.exp(logits - logits.max(axis=1, keepdims=True))
    ref = (w * y[None]).sum(1) / w.sum(1)
    # explicit masks
    config = MaskedDenoiser.Config(device="cpu", dtype="float64", chunk=11)
    den = MaskedDenoiser(smooth, config, masks=torch.eye(64, dtype=torch.bool))
    np.testing.assert_allclose(at(den, x, t), ref, atol=1e-9)
    # a diagonal covariance gives identity masks (the constant row has zero variance: empty masks, data mean)
    var = torch.from_numpy(y.var(axis=0))
    spec = Spectrum(torch.from_numpy(y.mean(0)), var, torch.eye(64, dtype=torch.float64), len(y))
    den = MaskedDenoiser(smooth, MaskedDenoiser.Config(device="cpu", dtype="float64", tau=0.05), spectrum=spec)
    m = den.masks(t)
    assert torch.equal(m, torch.diag(var > 1e-9))
    ref[:, var.numpy() <= 1e-9] = y.mean(0)[var.numpy() <= 1e-9]
    np.testing.assert_allclose(at(den, x, t), ref, atol=1e-9)


@pytest.mark.parametrize("chunk", [7, 16, 60])
def test_chunk_average_matches_official_streaming(smooth, chunk, tmp_cache):
    y = flat(smooth)
    t = 300
    x = queries(smooth, t)
    masks = plain_masks(plain_gain(y, t), 0.05)
    ref = plain_chunk_average(x.reshape(3, -1).numpy(), y, masks, t, chunk)
    den = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk_average=chunk, dtype="float64")
    np.testing.assert_allclose(at(den, x, t), ref, atol=1e-9)
    exact = plain_masked(x.reshape(3, -1).numpy(), y, masks, t)
    if chunk < len(y):  # the compatibility mode is a different model
        assert np.abs(ref - exact).max() > 1e-3


def test_masks_follow_the_official_rule(smooth, tmp_cache):
    y = flat(smooth)
    spec = data_spectrum(smooth, progress=False)
    for t in (0, 100, 600, 999):
        G = plain_gain(y, t)
        for tau in (0.005, 0.05, 0.2):
            ours = wiener_masks(spec, S.a(t), S.b2(t), tau).numpy()
            assert (ours == plain_masks(G, tau)).all()
    assert wiener_masks(spec, S.a(500), S.b2(500), 0.0).all()  # tau = 0: every pixel sees the image


def test_sym_normalisation_is_symmetric_and_plain(smooth, tmp_cache):
    y = flat(smooth)
    spec = data_spectrum(smooth, progress=False)
    t, tau = 300, 0.05
    G = plain_gain(y, t)
    d = np.diag(G).copy()
    d[np.abs(d) < 1e-6] = 1.0
    norm = G / np.sqrt(np.outer(d, d))
    ref = np.abs(norm) >= tau * np.abs(norm).max()
    ours = wiener_masks(spec, S.a(t), S.b2(t), tau, normalize="sym")
    assert (ours.numpy() == ref).all() and torch.equal(ours, ours.T)
    den = make_denoiser("masked", smooth, device="cpu", tau=tau, normalize="sym")
    assert torch.equal(den.masks(t), ours)


def test_masks_at_low_noise_are_nearly_the_pixel_itself(tmp_cache):
    from localdiff import load_dataset

    data = load_dataset("digits")  # real 8x8 digits; the corners never change (empty masks)
    den = make_denoiser("masked", data, device="cpu")
    m = den.masks(0)
    var = flat(data).var(axis=0)
    live = torch.from_numpy(var > 1e-6)
    assert torch.diagonal(m)[live].all()
    off = m.clone()
    off.fill_diagonal_(False)
    assert off.sum() <= 1.5 * live.sum()  # mostly the pixel itself (MNIST: 0.43 others per pixel)
    assert den.mask_density(900) > 10 * den.mask_density(0)


def test_temperature(smooth, tmp_cache):
    y = flat(smooth)
    t = 400
    x = queries(smooth, t)
    masks = plain_masks(plain_gain(y, t), 0.05)
    den = make_denoiser("masked", smooth, device="cpu", tau=0.05, temperature=2.5, dtype="float64", chunk=9)
    np.testing.assert_allclose(at(den, x, t), plain_masked(x.reshape(3, -1).numpy(), y, masks, t, 2.5), atol=1e-9)
    hot = make_denoiser("masked", smooth, device="cpu", tau=0.05, temperature=1e9, dtype="float64")
    np.testing.assert_allclose(at(hot, x, t), np.broadcast_to(y.mean(0), (3, 64)), atol=1e-6)


# ------------------------------------------------------------------------------------------------
# Jacobian, autograd, caches, options
# ------------------------------------------------------------------------------------------------

def test_closed_form_jacobian_equals_autograd(smooth, tmp_cache):
    den = make_denoiser("masked", smooth, device="cpu", tau=0.05, dtype="float64", chunk=17)
    t = 300
    x = queries(smooth, t, num=2)
    index = torch.tensor([9, 27, 40, 3])  # 3 is in the constant row: a zero row
    closed = den.jacobian_rows(x, t, index)
    xg = x.clone().requires_grad_(True)
    out = den(xg, t).reshape(2, -1)
    assert np.allclose(out.detach().numpy(), at(den, x, t), atol=1e-12)  # differentiable path == fast path
    auto = torch.stack([torch.autograd.grad(out[:, i].sum(), xg, retain_graph=True)[0].reshape(2, -1)
                        for i in index], dim=1)
    torch.testing.assert_close(closed, auto, atol=1e-9, rtol=1e-7)
    assert closed[:, 3].abs().max() == 0


def test_query_independent_term_is_cached_and_bounded(smooth, tmp_cache):
    t = 700
    x = queries(smooth, t)
    den = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=16)
    first = at(den, x, t)
    assert S.at(t).key in den._q
    np.testing.assert_array_equal(at(den, x, t), first)
    np.testing.assert_allclose(at(den, queries(smooth, t, seed=5), t),
                               at(make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=16),
                                  queries(smooth, t, seed=5), t), atol=1e-6)
    none = make_denoiser("masked", smooth, device="cpu", tau=0.05, cache_mb=0)
    np.testing.assert_allclose(at(none, x, t), first, atol=1e-6)
    assert not none._q
    streamed = make_denoiser("masked", smooth, device="cpu", tau=0.05, chunk=16, resident=False)
    np.testing.assert_allclose(at(streamed, x, t), first, atol=1e-6)


def test_options_defaults_and_sampling(smooth, tmp_cache):
    den = make_denoiser("masked", smooth, device="cpu", tau="0.05", chunk_average="16", normalize="sym",
                        temperature="2")
    assert (den.tau, den.config.chunk_average, den.config.temperature) == (0.05, 16, 2.0)
    s = den.settings()
    assert s["model"] == "masked" and s["tau"] == 0.05 and s["tau_rule"] == "given"
    assert make_denoiser("masked", smooth, device="cpu").settings()["tau"] == 0.005  # one channel, <= 28 px
    assert default_tau((1, 28, 28))[0] == 0.005
    assert default_tau((3, 32, 32))[0] == 0.05
    assert default_tau((3, 64, 64))[0] == 0.02
    for bad in (dict(tau=1.5), dict(tau=-0.1), dict(temperature=0), dict(normalize="rows"), dict(path="fast"),
                dict(chunk=0), dict(chunk_average=0), dict(dtype="float16"), dict(tile="2by2"), dict(threads=0)):
        with pytest.raises(ConfigError):
            make_denoiser("masked", smooth, device="cpu", **bad)
    out = sample(make_denoiser("masked", smooth, device="cpu", tau=0.05), num=2, steps=3, progress=False)
    y = torch.from_numpy(flat(smooth))  # each pixel is a softmax average of the training images' values there
    lo, hi = y.min(0).values.reshape(1, 8, 8), y.max(0).values.reshape(1, 8, 8)
    assert out.shape == (2, 1, 8, 8) and ((out >= lo - 1e-6) & (out <= hi + 1e-6)).all()
    assert (out - out.mean(0)).abs().max() > 0.1  # not the mean image: the two samples differ


def test_degenerate_official_masks_warn_and_sym_does_not(tmp_cache):
    # 2,000 MNIST images leave a few border pixels nearly constant; dividing their gain rows by a tiny
    # diagonal inflates the global maximum, so at t=0 no pixel keeps itself in its mask and every
    # output is the mean image. That must not pass silently; the symmetric normalisation is well posed.
    import warnings

    from localdiff import load_dataset

    data = load_dataset("mnist", subset=2000)
    official = make_denoiser("masked", data, device="cpu")
    with pytest.warns(RuntimeWarning, match="normalize=sym"):
        m = official.masks(0)
    assert not m.diagonal().any()
    sym = make_denoiser("masked", data, device="cpu", normalize="sym")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        for t in (900, 500, 0):
            sym.masks(t)


@pytest.mark.parametrize("normalize", ["diag", "sym"])
@pytest.mark.parametrize("n", [1, 7, 700])
def test_normalized_gain_in_place_equals_the_plain_formula(normalize, n):
    """The row-blocked, in-place normalisation (what wiener_masks uses to keep one [n, n] float64 tensor) gives
    the plain whole-matrix formula bit for bit, tiny diagonals included, and threshold_masks in place too."""
    from localdiff.denoisers.masked import masks as M

    g = torch.Generator().manual_seed(n)
    A = torch.randn(n, n, generator=g, dtype=torch.float64)
    G = A @ A.T / n
    G.diagonal()[:: 3] *= 1e-8  # some |G[m, m]| < 1e-6: replaced by 1
    d = G.diagonal().clone()
    d[d.abs() < M.DIAG_EPS] = 1.0
    plain = G / d[:, None] if normalize == "diag" else G / (d.abs().sqrt()[:, None] * d.abs().sqrt()[None, :])
    assert torch.equal(M.normalized_gain(G, normalize), plain)
    work = G.clone()
    got = M.normalized_gain(work, normalize, inplace=True)
    assert got.data_ptr() == work.data_ptr() and torch.equal(got, plain)
    masks = M.threshold_masks(plain, 0.05)
    assert torch.equal(M.threshold_masks(got, 0.05, inplace=True), masks) and masks.any()
    assert n == 1 or not masks.all()


def test_normalized_gain_row_blocks_cover_every_row():
    """More rows than one block: a matrix wide enough that a 16 MB block holds only some rows."""
    from localdiff.denoisers.masked import masks as M

    n = 2100  # 2,100 float64 columns: 998 rows per block, three blocks
    G = torch.rand(n, n, generator=torch.Generator().manual_seed(0), dtype=torch.float64) + 0.5
    d = G.diagonal().clone()
    assert torch.equal(M.normalized_gain(G.clone(), "diag", inplace=True), G / d[:, None])
