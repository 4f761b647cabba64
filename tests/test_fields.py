"""Sensitivity fields and locality measures against independent references.

Every number here is recomputed by hand: the noisy inputs are drawn in the test at the field's own
timestep (with its own float64 alpha_bar table), Jacobians come from ``torch.autograd.functional``,
radii and windows from brute-force loops over pixels, cosines from numpy, expectations in closed form
or by quadrature. The data are chosen so that each known way of getting the science wrong (noise at
another timestep, |mean| for the mean of |.|, another quantile for r90, one pixel for a multi-pixel
cosine) changes the result by far more than the tolerances.
"""

import math

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.denoisers import Capabilities, Denoiser
from localdiff.denoisers.base import DenoiserConfig
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError
from localdiff.experiment import compare
from localdiff.sensitivity import (Fields, cosine, energy_radius, field_similarity, full_jacobian, jacobian_rows,
                                   locality_measures, sensitivity_fields, window_energy)

from conftest import make_float_dataset

# alpha_bar of the DDPM linear schedule, computed here in numpy (not by the library)
ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))


def a_b2(t: int) -> tuple[float, float]:
    return math.sqrt(ALPHA_BAR[t]), 1.0 - ALPHA_BAR[t]


class Nonlinear(Denoiser):
    """A test model with a non-symmetric, input- and t-dependent Jacobian on colour, non-square images:
    ``x0_hat = tanh(W (a x) + c)`` for a fixed random W. Not registered."""

    name = "nonlinear"

    def __init__(self, shape=(2, 4, 5), seed=0):
        super().__init__(shape, DenoiserConfig(device="cpu"))
        g = torch.Generator().manual_seed(seed)
        n = self.dim
        self.W = torch.randn(n, n, generator=g, dtype=torch.float64) / math.sqrt(n) * 2
        self.c = 0.3 * torch.randn(n, generator=g, dtype=torch.float64)

    def denoise(self, x_t, t):
        x = x_t.reshape(x_t.shape[0], -1).double()
        return torch.tanh((self.schedule.a(t) * x) @ self.W.T + self.c).reshape(x_t.shape)


class Cubic(Denoiser):
    """Pixel-wise ``x0_hat = x^3 - x``: its Jacobian is ``diag(3 x^2 - 1)``, whose sign depends on x_t."""

    name = "cubic"

    def __init__(self, shape):
        super().__init__(shape, DenoiserConfig(device="cpu"))

    def denoise(self, x_t, t):
        return x_t ** 3 - x_t


def held_out_colour(num=9, shape=(2, 4, 5), seed=3):
    rng = np.random.default_rng(seed)
    return make_float_dataset(rng.uniform(-0.9, 0.9, size=(num, *shape)).astype(np.float32), name="held-out")


def by_hand_draws(data, t: int, draws: int, seed: int) -> torch.Tensor:
    """x_t [D, C, H, W] drawn as documented: held-out images without replacement and standard normal
    noise, from ``torch.Generator().manual_seed(seed * 1000 + t)``; x_t = a x0 + sqrt(b2) eps at t
    (float32 like the library, so the draws are the same numbers; a and b2 checked against ALPHA_BAR)."""
    gen = torch.Generator().manual_seed(seed * 1000 + t)
    idx = torch.randperm(len(data), generator=gen)[:draws]
    x0 = torch.stack([data[int(i)] for i in idx])
    eps = torch.randn(x0.shape, generator=gen)
    assert (S.a(t), S.b2(t)) == pytest.approx(a_b2(t), abs=1e-12)
    return S.a(t) * x0 + S.b2(t) ** 0.5 * eps


def autograd_rows(den, x: torch.Tensor, t: int, pixels, out_channel=None) -> torch.Tensor:
    """Rows [P, C, H, W] of one input's Jacobian (mean over the output channels, or one of them)."""
    C, H, W = x.shape
    J = torch.autograd.functional.jacobian(lambda v: den(v[None], t)[0], x.double())  # [C, H, W, C, H, W]
    chans = range(C) if out_channel is None else [out_channel]
    return torch.stack([torch.stack([J[ch, r, c] for ch in chans]).mean(0) for r, c in pixels])


# ------------------------------------------------------------------------------------------------
# Jacobian rows and fields
# ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("out_channel", [None, 1])
def test_autograd_rows_match_a_full_jacobian(out_channel):
    """Ragged groups of rows per backward pass, several inputs, colour, a non-square image."""
    den = Nonlinear()
    x = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    pixels = [(0, 0), (3, 4), (1, 2), (2, 0), (0, 3)]
    for rows_per_pass in (1, 4, 7, 64):
        rows = jacobian_rows(den, x, 400, pixels, method="autograd", out_channel=out_channel,
                             rows_per_pass=rows_per_pass)
        assert rows.shape == (3, 5, 2, 4, 5)
        for d in range(3):
            torch.testing.assert_close(rows[d], autograd_rows(den, x[d], 400, pixels, out_channel),
                                       atol=1e-12, rtol=1e-10)
    full = full_jacobian(den, x[:1], 400)  # every pixel, row-major
    every = [(r, c) for r in range(4) for c in range(5)]
    torch.testing.assert_close(full, autograd_rows(den, x[0], 400, every), atol=1e-12, rtol=1e-10)


def test_models_that_mix_the_batch_are_differentiated_one_input_at_a_time():
    class Mixing(Nonlinear):  # each output also sees the batch mean: not batch-independent
        capabilities = Capabilities(batch_independent=False)

        def denoise(self, x_t, t):
            return super().denoise(x_t, t) + 0.5 * x_t.mean(0, keepdim=True) ** 2

    den = Mixing()
    x = torch.randn(3, 2, 4, 5, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    rows = jacobian_rows(den, x, 300, [(1, 1), (2, 3)], method="autograd")
    for d in range(3):  # the Jacobian of the model applied to that input alone
        torch.testing.assert_close(rows[d], autograd_rows(den, x[d], 300, [(1, 1), (2, 3)]), atol=1e-12, rtol=1e-10)


@pytest.mark.parametrize("model", ["nonlinear", "optimal", "masked"])
def test_fields_are_the_mean_and_mean_absolute_jacobian_over_noise_drawn_at_t(model, tmp_cache):
    """``sensitivity_fields`` against draws made here at each t and autograd Jacobians averaged by hand
    (closed forms for optimal and masked: an independent route to the same numbers)."""
    if model == "nonlinear":
        den, data = Nonlinear(), held_out_colour()
    else:
        rng = np.random.default_rng(0)
        y = np.clip(rng.normal(0, 0.5, size=(25, 1, 5, 6)) + np.linspace(-0.4, 0.4, 6), -1, 1).astype(np.float32)
        den = make_denoiser(model, make_float_dataset(y), device="cpu", **({"tau": 0.05} if model == "masked" else {}))
        data = make_float_dataset(rng.normal(0, 0.5, size=(7, 1, 5, 6)).clip(-1, 1).astype(np.float32))
    pixels = [(1, 2), (3, 0), (0, 4)]
    ts, draws, seed = [60, 400, 850], 5, 3
    f = sensitivity_fields(den, data, pixels, ts, draws, seed, progress=False)
    assert f.timesteps == ts and f.pixels == pixels and f.mean.shape == (3, 3, *data.shape)
    sign_changes = 0.0
    for ti, t in enumerate(ts):
        x_t = by_hand_draws(data, t, draws, seed)
        rows = torch.stack([autograd_rows(den, x, t, pixels) for x in x_t])  # [D, P, C, H, W]
        torch.testing.assert_close(f.mean[ti], rows.mean(0), atol=1e-9, rtol=1e-7)
        torch.testing.assert_close(f.abs_mean[ti], rows.abs().mean(0), atol=1e-9, rtol=1e-7)
        sign_changes = max(sign_changes, float((rows.mean(0).abs() - rows.abs().mean(0)).abs().max()))
        if ti:  # the fields change with t by far more than the tolerance
            assert (f.mean[ti] - f.mean[ti - 1]).abs().max() > 1e-4
    assert sign_changes > 1e-6  # signs change between draws: |mean| is not the mean of |.| here


def test_fields_match_closed_form_expectations_of_a_pixelwise_model():
    """``x0_hat = x^3 - x`` at pixel i has the field ``E[3 x_t[i]^2 - 1] e_i``; with one held-out image y,
    ``x_t[i] ~ N(a y_i, b2)``: the mean is ``3 (a^2 y_i^2 + b2) - 1`` and the mean absolute value is
    ``E|3 X^2 - 1|`` (by quadrature). Independent of how the draws are made, only of where."""
    shape = (1, 3, 4)
    y = np.array([0.9, -0.6, 0.2, 0.7, -0.95, 0.4, 0.0, -0.3, 0.55, 0.8, -0.7, 0.1], dtype=np.float32)
    data = make_float_dataset(np.tile(y.reshape(1, *shape), (6, 1, 1, 1)))  # the same image six times
    den = Cubic(shape)
    pixels = [(0, 0), (1, 0), (2, 3)]
    draws = 20000
    ts = [30, 250, 600]
    f = sensitivity_fields(den, data, pixels, ts, draws, seed=0, rows_per_pass=1, progress=False)
    grid = np.linspace(-8, 8, 20001)
    phi = np.exp(-0.5 * grid ** 2) / math.sqrt(2 * math.pi)
    for ti, t in enumerate(ts):
        a, b2 = a_b2(t)
        for pi, (r, c) in enumerate(pixels):
            yi = float(y[r * 4 + c])
            mean = 3 * (a * a * yi * yi + b2) - 1
            X = a * yi + math.sqrt(b2) * grid
            abs_mean = float(np.trapezoid(np.abs(3 * X ** 2 - 1) * phi, grid))
            var = 18 * b2 * (b2 + 2 * a * a * yi * yi)  # Var(3 X^2): the Monte Carlo error below
            tol = 5 * math.sqrt(var / draws) + 1e-9
            field = f.mean[ti, pi, 0].numpy()
            assert field[r, c] == pytest.approx(mean, abs=tol), (t, r, c)
            assert f.abs_mean[ti, pi, 0, r, c].item() == pytest.approx(abs_mean, abs=tol), (t, r, c)
            off = field.copy()
            off[r, c] = 0
            assert np.abs(off).max() == 0  # a pixelwise model looks only at its own pixel


def test_constant_jacobians_are_evaluated_once_and_fitted_timesteps_are_checked(tmp_cache):
    rng = np.random.default_rng(1)
    data = make_float_dataset(rng.normal(0, 0.4, size=(40, 1, 4, 4)).clip(-1, 1).astype(np.float32))
    wiener = make_denoiser("wiener", data, device="cpu")
    f = sensitivity_fields(wiener, data, "1,2;3,3", [100, 700], draws=6, progress=False)
    for ti, t in enumerate([100, 700]):
        J = wiener.jacobian(t)
        torch.testing.assert_close(f.mean[ti, 0, 0].reshape(-1), J[1 * 4 + 2])
        torch.testing.assert_close(f.abs_mean[ti, 1, 0].reshape(-1), J[15].abs())
    lin = make_denoiser("linear", data, device="cpu", timesteps=(700,), steps=20, batch_size=8, progress=False)
    with pytest.raises(ConfigError, match="fitted at timesteps 700 only, not at 100"):
        sensitivity_fields(lin, data, "center", [700, 100], draws=2, progress=False)
    nearest = make_denoiser("nearest", data, device="cpu")
    with pytest.raises(ConfigError, match="piecewise constant"):
        sensitivity_fields(nearest, data, "center", [500], draws=2, progress=False)


# ------------------------------------------------------------------------------------------------
# Locality measures
# ------------------------------------------------------------------------------------------------

def brute_radius(fld: np.ndarray, pixel, fraction: float) -> float:
    """The smallest distance r from ``pixel`` such that the pixels within r hold ``fraction`` of the
    energy (sum over channels of squares), by trying every distance in increasing order."""
    energy = (np.asarray(fld, dtype=np.float64) ** 2).sum(0)
    H, W = energy.shape
    dist = {(r, c): math.hypot(r - pixel[0], c - pixel[1]) for r in range(H) for c in range(W)}
    total = energy.sum()
    for radius in sorted(set(dist.values())):
        inside = sum(energy[p] for p, d in dist.items() if d <= radius)
        if inside >= fraction * total * (1 - 1e-12):
            return radius
    raise AssertionError("unreachable")


def brute_window(fld: np.ndarray, pixel, k: int) -> float:
    energy = (np.asarray(fld, dtype=np.float64) ** 2).sum(0)
    H, W = energy.shape
    inside = sum(energy[r, c] for r in range(H) for c in range(W)
                 if abs(r - pixel[0]) <= k // 2 and abs(c - pixel[1]) <= k // 2)
    return inside / energy.sum()


def test_energy_radii_of_an_asymmetric_field_with_known_quantiles():
    """Energy 10 around (2, 1) of a 1-row-per-distance field: 3 at distance 0, 2 at 1, 2 at 2, 1.5 at 3,
    0.7 at 4, 0.8 at 5, all to the right (one-sided), split over two channels."""
    fld = np.zeros((2, 5, 8))
    energies = [3.0, 2.0, 2.0, 1.5, 0.7, 0.8]  # at columns 1..6 of row 2
    for d, e in enumerate(energies):
        fld[d % 2, 2, 1 + d] = math.sqrt(e)
    p = (2, 1)
    expected = {0.25: 0.0, 0.5: 1.0, 0.6: 2.0, 0.8: 3.0, 0.9: 4.0, 0.95: 5.0, 1.0: 5.0}
    for fraction, radius in expected.items():
        assert energy_radius(fld, p, fraction) == radius == brute_radius(fld, p, fraction), fraction
    assert len({energy_radius(fld, p, q) for q in (0.8, 0.9, 0.95)}) == 3  # r90 is neither r80 nor r95
    assert window_energy(fld, p, 3) == pytest.approx(0.5) and window_energy(fld, p, 5) == pytest.approx(0.7)


def test_locality_measures_equal_brute_force_on_random_asymmetric_fields():
    rng = np.random.default_rng(7)
    T, P, C, H, W = 2, 3, 2, 7, 9
    pixels = [(0, 0), (3, 6), (6, 2)]  # a corner, the interior, the bottom edge
    rr, cc = np.mgrid[0:H, 0:W]
    mean = np.zeros((T, P, C, H, W))
    for ti in range(T):
        for pi, (r, c) in enumerate(pixels):  # a blob stretched to one side plus noise, sign-changing
            blob = np.exp(-((rr - r) ** 2 / (1 + 3 * ti) + (cc - c - 2) ** 2 / 6.0))
            mean[ti, pi] = blob * rng.normal(1, 0.5, size=(C, H, W)) * np.where(rng.random((C, H, W)) < 0.3, -1, 1)
    f = Fields(torch.from_numpy(mean), torch.from_numpy(np.abs(mean)), [100, 700], pixels, 4, "test")
    m = locality_measures(f, windows=(3, 5))
    other_quantiles = set()
    for ti, t in enumerate([100, 700]):
        for pi, p in enumerate(pixels):
            rec = m[str(t)][f"{p[0]},{p[1]}"]
            fld = mean[ti, pi]
            assert rec["r50"] == brute_radius(fld, p, 0.5) and rec["r90"] == brute_radius(fld, p, 0.9)
            other_quantiles |= {q for q in (0.8, 0.85, 0.95) if brute_radius(fld, p, q) != rec["r90"]}
            assert rec["energy_3x3"] == pytest.approx(brute_window(fld, p, 3), rel=1e-12)
            assert rec["energy_5x5"] == pytest.approx(brute_window(fld, p, 5), rel=1e-12)
            assert rec["norm"] == pytest.approx(math.sqrt((fld ** 2).sum()), rel=1e-12)
    assert other_quantiles == {0.8, 0.85, 0.95}  # another quantile gives another r90 somewhere


def test_multi_pixel_cosines_average_every_pixel():
    """field_similarity: per timestep the mean over pixels of the cosine of the two models' fields."""
    rng = np.random.default_rng(3)
    T, P, shape = 2, 4, (2, 5, 5)
    a = rng.normal(size=(T, P, *shape))
    b = a + rng.normal(size=(T, P, *shape)) * np.array([0.1, 1.0, 3.0, 0.5])[None, :, None, None, None]
    b[1, 2] = -a[1, 2]  # one pixel pointing the other way
    pixels = [(0, 0), (1, 1), (2, 2), (4, 3)]
    fa = Fields(torch.from_numpy(a), torch.from_numpy(np.abs(a)), [10, 20], pixels, 1, "a")
    fb = Fields(torch.from_numpy(b), torch.from_numpy(np.abs(b)), [10, 20], pixels, 1, "b")
    sim = field_similarity({"a": fa, "b": fb})
    for ti, t in enumerate([10, 20]):
        per_pixel = [float(a[ti, p].ravel() @ b[ti, p].ravel() / np.linalg.norm(a[ti, p]) / np.linalg.norm(b[ti, p]))
                     for p in range(P)]
        assert sim["a|b"][str(t)] == pytest.approx(np.mean(per_pixel), rel=1e-12)
        assert abs(np.mean(per_pixel) - per_pixel[0]) > 0.05  # the first pixel alone is another number
        assert cosine(a[ti, 1], b[ti, 1]) == pytest.approx(per_pixel[1], rel=1e-12)
    assert math.isnan(cosine(a[0, 0], 0 * a[0, 0]))  # undefined against a zero field
    with pytest.raises(ConfigError, match="different timesteps or pixels"):
        field_similarity({"a": fa, "c": Fields(fb.mean, fb.abs_mean, [10, 30], pixels, 1, "c")})


def test_experiment_comparison_uses_the_right_quantiles_and_every_pixel():
    """experiment.compare: r50/r90 of every model's field and per-pixel cosines, by brute force."""
    rng = np.random.default_rng(11)
    T, P, shape = 2, 2, (1, 9, 9)
    pixels = [(4, 4), (2, 6)]
    rr, cc = np.mgrid[0:9, 0:9]

    def fields(scale, label):
        m = np.zeros((T, P, *shape))
        for ti in range(T):
            for pi, (r, c) in enumerate(pixels):
                m[ti, pi, 0] = np.exp(-((rr - r) ** 2 + (cc - c - ti) ** 2) / scale) * rng.normal(1, 0.3, (9, 9))
        return Fields(torch.from_numpy(m), torch.from_numpy(np.abs(m)), [100, 500], pixels, 2, label)

    fields_by_model = {"unet": fields(4.0, "unet"), "wiener": fields(8.0, "wiener")}
    cov = fields(20.0, "cov")
    out = compare(fields_by_model, cov)
    for ti, t in enumerate([100, 500]):
        for pi, p in enumerate(pixels):
            rec = out[str(t)][f"{p[0]},{p[1]}"]
            fu, fw = fields_by_model["unet"].mean[ti, pi].numpy(), fields_by_model["wiener"].mean[ti, pi].numpy()
            assert rec["r90_unet"] == brute_radius(fu, p, 0.9) and rec["r50_wiener"] == brute_radius(fw, p, 0.5)
            assert rec["cos_wiener"] == pytest.approx(float(fu.ravel() @ fw.ravel() / np.linalg.norm(fu)
                                                            / np.linalg.norm(fw)), rel=1e-12)
