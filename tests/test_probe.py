"""``localdiff probe`` against independent references.

- extents: a stationary Gaussian random field with an exact (not sampled) Gaussian covariance on a
  periodic grid, whose Wiener field is a circulant kernel computed here by FFT, and whose high-noise
  limit (J proportional to Sigma) has the continuum radius ``l sqrt(2 ln 10)``; radii by brute force;
- anisotropy: a sampled rotated Gaussian with known axes;
- permuted MNIST: fields non-local in pixel space, exactly MNIST's after un-permuting;
- the receptive field of a U-Net: the support of autograd's Jacobian of a real diffusers network
  (normalisation removed, no attention);
- the held-out MSE stage: the optimal denoiser on the N/8 subset by a brute-force float64 softmax over
  the images ``ImageDataset.subset`` picks, the noise drawn here, and the paired intervals recomputed;
- the command end to end on MNIST and permuted MNIST, and its error messages.
"""

import contextlib
import io
import json
import math
import sys

import numpy as np
import pytest
import torch

from localdiff import load_dataset
from localdiff.cli import main
from localdiff.data.builtin import mnist_permutation
from localdiff.diffusion import timesteps_for
from localdiff.errors import ConfigError
from localdiff.paired import compare
from localdiff.probing import field_explorer, noise_levels, probe, receptive_field
from localdiff.probing.explorer import colour, display_fields, quantise
from localdiff.probing.fields import geometry, level_fields, mass_radius, second_moments
from localdiff.probing.memorisation import horizon, nested_spectra
from localdiff.sensitivity import energy_radius
from localdiff.stats import data_spectrum, eigendecompose

ALPHA_BAR = np.cumprod(1.0 - np.linspace(1e-4, 0.02, 1000, dtype=np.float64))  # numpy, not the library's table


def run_cli(argv):
    out, err = io.StringIO(), io.StringIO()
    saved = sys.argv
    sys.argv = ["localdiff", *argv]
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            rc = main(argv)
    finally:
        sys.argv = saved
    return rc, out.getvalue(), err.getvalue()


def brute_radius(f: np.ndarray, pixel, fraction: float, power: int) -> float:
    """Smallest distance d from ``pixel`` with sum(|f|^power within d) >= fraction of the total (a loop)."""
    m = np.abs(f) ** power
    rr, cc = np.mgrid[0:f.shape[0], 0:f.shape[1]]
    d = np.hypot(rr - pixel[0], cc - pixel[1])
    for radius in np.unique(d):
        if m[d <= radius].sum() >= fraction * m.sum() * (1 - 1e-12):
            return float(radius)
    raise AssertionError("unreachable")


# -- noise levels ---------------------------------------------------------------------------------

def test_levels_default_to_the_ddim_timesteps_with_their_coefficients():
    levels = noise_levels()
    assert [lv.t for lv in levels] == timesteps_for(10) == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    for lv in levels:
        assert lv.a == pytest.approx(math.sqrt(ALPHA_BAR[lv.t]), rel=1e-12)
        assert lv.b2 == pytest.approx(1 - ALPHA_BAR[lv.t], rel=1e-12)
        assert lv.sigma == pytest.approx(math.sqrt((1 - ALPHA_BAR[lv.t]) / ALPHA_BAR[lv.t]), rel=1e-12)
    assert [lv.t for lv in noise_levels([100, 900, 100])] == [900, 100]
    for bad in ([1000], [-1], [500.0], []):
        with pytest.raises(ConfigError):
            noise_levels(bad)


# -- extents and anisotropy -------------------------------------------------------------------------

def test_vectorised_radii_equal_brute_force_and_the_energy_radius_of_fields():
    rng = np.random.default_rng(0)
    h, w = 7, 9
    geo = geometry(h, w)
    f = rng.standard_normal((h * w, h * w)) * (rng.random((h * w, h * w)) < 0.3)  # sparse: many ties and zeros
    f[5] = 0.0  # a zero field
    for frac in (0.5, 0.9):
        mass = mass_radius(torch.from_numpy(np.abs(f)), geo, frac).numpy()
        energy = mass_radius(torch.from_numpy(f**2), geo, frac).numpy()
        for p in range(h * w):
            pix = divmod(p, w)
            if p == 5:
                assert math.isnan(mass[p]) and math.isnan(energy[p])
                continue
            assert mass[p] == brute_radius(f[p].reshape(h, w), pix, frac, 1)
            assert energy[p] == energy_radius(f[p].reshape(1, h, w), pix, frac)  # the library's own r90 (§3)


def test_colour_fields_and_masks_are_the_wiener_filters_and_the_masked_models(tmp_cache):
    from localdiff.denoisers.masked.masks import wiener_masks
    from localdiff.denoisers.wiener import wiener_jacobian

    data = load_dataset("natural-patches", resolution=6, num=800)  # 3 x 6 x 6
    spec = data_spectrum(data, progress=False)
    for lv in noise_levels([700, 100]):
        lf = level_fields(spec, (3, 6, 6), lv, tau=0.05)
        J = wiener_jacobian(spec, lv.a, lv.b2).numpy()  # [108, 108], row = (c, r, col)
        M = wiener_masks(spec, lv.a, lv.b2, 0.05).numpy()  # column i = S_i
        for p in range(36):
            rows = [c * 36 + p for c in range(3)]
            field = J[rows].mean(axis=0).reshape(3, 36)  # mean over output channels
            assert np.allclose(lf.display[p].numpy(), field.sum(axis=0), rtol=1e-5, atol=1e-7)
            inside = M[:, rows].any(axis=1).reshape(3, 36).any(axis=0)  # any channel, any output channel
            assert np.array_equal(lf.masks[p].numpy(), inside)
            assert lf.r90[p].item() == brute_radius(np.abs(field).sum(axis=0).reshape(6, 6), divmod(p, 6), 0.9, 1)


def test_second_moments_recover_a_rotated_gaussian():
    h = w = 41
    geo = geometry(h, w)
    p = 20 * w + 20
    theta = math.radians(30.0)
    R = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    cov = R @ np.diag([3.0**2, 1.2**2]) @ R.T  # x right, y up
    rr, cc = np.mgrid[0:h, 0:w]
    x, y = cc - 20, -(rr - 20)
    q = np.linalg.inv(cov)
    g = np.exp(-0.5 * (q[0, 0] * x * x + 2 * q[0, 1] * x * y + q[1, 1] * y * y))
    mass = torch.zeros(h * w, h * w, dtype=torch.float64)
    mass[p] = torch.from_numpy(g.ravel())
    ratio, angle = second_moments(mass, geo)
    assert ratio[p].item() == pytest.approx(3.0 / 1.2, rel=1e-6)
    assert angle[p].item() == pytest.approx(30.0, abs=1e-4)
    mass[p] = torch.from_numpy(g.T.ravel())  # transposed: the major axis mirrors to 60 degrees from vertical
    assert second_moments(mass, geo)[1][p].item() == pytest.approx(60.0, abs=1e-4)
    assert math.isnan(ratio[0].item())  # no mass


def _periodic_gaussian(size: int, ell: float, var: float = 0.1):
    """Exact covariance [n, n] of a stationary field with covariance var exp(-d^2 / 2 ell^2) on a torus, and
    its eigenvalues on the FFT grid (the covariance is circulant)."""
    k = np.minimum(np.arange(size), size - np.arange(size)).astype(np.float64)
    acf = var * np.exp(-(k[:, None] ** 2 + k[None, :] ** 2) / (2 * ell**2))
    r, c = np.divmod(np.arange(size * size), size)
    cov = acf[(r[:, None] - r[None, :]) % size, (c[:, None] - c[None, :]) % size]
    return cov, acf, np.real(np.fft.fft2(acf))


def test_gaussian_random_field_extent_equals_the_closed_form():
    """J_t = Sigma (a^2 Sigma + b2 I)^-1 a is circulant: its field at pixel p is the FFT kernel
    a S / (a^2 S + b2) rolled to p. Every pixel's extent (mass and energy) equals the brute-force radius of
    that kernel; at the highest noise J is proportional to Sigma, and the centre pixel's extent is the
    continuum r90 of a Gaussian, ell sqrt(2 ln 10), to within the lattice's spacing of distances."""
    size, ell = 24, 2.0
    cov, acf, S = _periodic_gaussian(size, ell)
    spec = eigendecompose(torch.zeros(size * size, dtype=torch.float64), torch.from_numpy(cov), 1000)
    for t in (10, 300, 999):
        a, b2 = math.sqrt(ALPHA_BAR[t]), 1 - ALPHA_BAR[t]
        lf = level_fields(spec, (1, size, size), noise_levels([t])[0], tau=0.005)
        kern = np.real(np.fft.ifft2(a * S / (a * a * S + b2)))  # the field of pixel (0, 0)
        for p in range(0, size * size, 5):
            pix = divmod(p, size)
            f = np.roll(kern, pix, axis=(0, 1))
            assert lf.r90[p].item() == brute_radius(f, pix, 0.9, 1), (t, pix)
            assert lf.energy_r90[p].item() == brute_radius(f, pix, 0.9, 2), (t, pix)
            assert np.allclose(lf.display[p].numpy(), f.ravel(), atol=1e-6 * np.abs(f).max())
    centre = (size // 2) * size + size // 2
    assert lf.r90[centre].item() == brute_radius(np.roll(acf, (12, 12), axis=(0, 1)), (12, 12), 0.9, 1)  # J ∝ Sigma
    assert abs(lf.r90[centre].item() - ell * math.sqrt(2 * math.log(10))) < 0.25
    interior = [r * size + c for r in range(8, 16) for c in range(8, 16)]  # stationary: the same everywhere inside
    assert len(set(lf.r90[interior].tolist())) == 1


def test_probe_of_a_sampled_grf_comes_close_to_its_exact_covariance(tmp_cache):
    """The API on the built-in ``grf`` (20,000 sampled images) against the field of its exact covariance."""
    from localdiff.data.synthetic import grf_covariance

    res = probe(load_dataset("grf", num=20000), timesteps=[900, 300], memorise=False, progress=False)
    exact = grf_covariance(16, 3.0, scale=0.25)
    spec = eigendecompose(torch.zeros(256, dtype=torch.float64), torch.from_numpy(exact), 1)
    for lf in res.datasets["grf"].levels:
        ref = level_fields(spec, (1, 16, 16), lf.level, 0.005)
        assert abs(np.nanmedian(lf.energy_r90) - np.nanmedian(ref.energy_r90)) <= 0.5
        assert abs(np.nanmedian(lf.r90) - np.nanmedian(ref.r90)) <= 0.5


def test_permuted_mnist_is_non_local_in_pixel_space_and_mnist_after_unpermuting():
    mnist = load_dataset("mnist", subset=10000)
    perm_set = load_dataset("mnist-permuted", subset=10000)  # the same images, pixels permuted
    sa, sb = data_spectrum(mnist, cache=False, progress=False), data_spectrum(perm_set, cache=False, progress=False)
    inv = np.argsort(mnist_permutation(0))  # permuted pixel j is original pixel perm[j]
    geo = geometry(28, 28)
    for lv in noise_levels([100, 300]):
        fa, fb = level_fields(sa, (1, 28, 28), lv, 0.005), level_fields(sb, (1, 28, 28), lv, 0.005)
        # in pixel space: far from local (energy and half-mass radii several times MNIST's)
        assert np.nanmedian(fb.energy_r90) > 2 * np.nanmedian(fa.energy_r90)
        assert np.nanmedian(fb.r50) > 2 * np.nanmedian(fa.r50)
        # un-permuted: MNIST's fields, hence MNIST's extents, pixel for pixel
        F = fb.display.double()[inv][:, inv]
        assert torch.allclose(F, fa.display.double(), atol=1e-5)
        live = torch.isfinite(fa.r90)
        un_r90 = mass_radius(F.abs(), geo)
        un_energy = mass_radius(F.square(), geo)
        assert torch.equal(un_r90[live], fa.r90[live]) and torch.equal(un_energy[live], fa.energy_r90[live])
        assert torch.equal(torch.isfinite(fb.r90)[inv], live)  # the same pixels never vary


# -- receptive fields ---------------------------------------------------------------------------------

def _strip_norms(module):
    for name, child in module.named_children():
        if isinstance(child, torch.nn.GroupNorm):
            setattr(module, name, torch.nn.Identity())
        else:
            _strip_norms(child)


@pytest.mark.parametrize("blocks", [
    dict(down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"), layers_per_block=1),
    dict(down_block_types=("ResnetDownsampleBlock2D", "DownBlock2D", "DownBlock2D"),
         up_block_types=("UpBlock2D", "ResnetUpsampleBlock2D", "UpBlock2D"), layers_per_block=2, downsample_padding=0),
])
def test_receptive_field_is_the_support_of_the_networks_jacobian(blocks):
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    levels = len(blocks["down_block_types"])
    net = UNet2DModel(sample_size=64, in_channels=1, out_channels=1, block_out_channels=(8,) * levels,
                      norm_num_groups=4, add_attention=False, **blocks)
    _strip_norms(net)  # GroupNorm statistics see the whole image; without them only the convolutions reach
    rf = receptive_field(dict(net.config))
    size, width, reach = 256, 0, 0
    for i in range(2 ** levels):  # every alignment with the down-sampling grid
        r = size // 2 + i
        x = torch.randn(1, 1, size, size, requires_grad=True)
        (g,) = torch.autograd.grad(net(x, 10).sample[0, 0, r, r], x)
        rows = g[0, 0].abs().sum(1).nonzero()[:, 0]
        width = max(width, int(rows.max() - rows.min() + 1))
        reach = max(reach, int(r - rows.min()), int(rows.max() - r))
    assert (rf.size, rf.radius) == (width, reach)
    assert rf.global_layers == ("GroupNorm statistics (every ResnetBlock2D and the output)",)


def test_receptive_fields_of_the_shipped_configs():
    from localdiff.unet.configs import SMALL, build_unet
    from localdiff.probing.receptive import diffusers_config

    built = build_unet(SMALL, (1, 28, 28)).config
    for key, value in diffusers_config(SMALL).items():
        assert (list(built[key]) if isinstance(value, list) else built[key]) == value, key
    small, paper = receptive_field("small", (1, 28, 28)), receptive_field("paper", (1, 28, 28))
    assert (small.size, small.radius, small.levels) == (61, 31, 2)
    assert (paper.levels, receptive_field("paper", (3, 32, 32)).levels) == (3, 4)
    assert paper.radius > small.radius and any("attention" in g for g in paper.global_layers)
    shipped = receptive_field("src/localdiff/weights/mnist")  # the shipped network's config.json
    assert (shipped.size, shipped.radius) == (small.size, small.radius)
    with pytest.raises(ConfigError, match="small"):
        receptive_field("medium", (1, 28, 28))
    with pytest.raises(ConfigError, match="unsupported"):
        receptive_field({"down_block_types": ["SkipDownBlock2D"], "up_block_types": ["SkipUpBlock2D"]})


# -- memorisation ---------------------------------------------------------------------------------------

def test_nested_subset_spectra_equal_each_subsets_own():
    data = load_dataset("digits")
    spectra = nested_spectra(data, [len(data) // 8, len(data) // 2, len(data)], seed=3, progress=False)
    for size, spec in spectra.items():
        ref = data_spectrum(data.subset(size, seed=3), cache=False, progress=False)
        assert spec.count == size and spec.fingerprint == data.subset(size, seed=3).fingerprint
        assert torch.allclose(spec.covariance(), ref.covariance(), atol=1e-10)
        assert torch.allclose(spec.mean, ref.mean, atol=1e-12)


def test_one_pass_over_the_nested_subsets_equals_the_optimal_denoiser_of_each():
    from localdiff import make_denoiser
    from localdiff.calibrate_masked import per_image_mse
    from localdiff.evaluate import noisy_draws
    from localdiff.probing.memorisation import nested_optimal

    data = load_dataset("digits")
    images = load_dataset("digits", split="test").subset(15, seed=2).tensor()
    levels = noise_levels([900, 300, 10, 0])
    x_t = dict(noisy_draws(images, [lv.t for lv in levels], torch.Generator().manual_seed(1)))
    sizes = [100, 359, 700, len(data)]  # ends inside and at the end of chunks of 128
    out = nested_optimal(data, sizes, 4, images, x_t, levels, chunk=128, progress=False)
    for size in sizes:
        den = make_denoiser("optimal", data.subset(size, seed=4))
        for lv in levels:
            assert torch.allclose(out[size][lv.t], per_image_mse(den, x_t[lv.t], images, lv.t), rtol=1e-12, atol=0)


def test_horizon_is_the_lowest_level_where_optimal_is_significantly_lower():
    levels = noise_levels([900, 500, 300, 100])
    v = lambda verdict: {"verdict": verdict}  # noqa: E731
    comps = {900: v("tied"), 500: v("optimal lower"), 300: v("optimal lower"), 100: v("wiener lower")}
    h = horizon(comps, levels)
    assert h["horizon_t"] == 300 and h["beats_at"] == [300, 500] and h["loses_below_horizon"] == [100]
    assert h["horizon_sigma"] == pytest.approx(levels[2].sigma)
    assert horizon({t: v("tied") for t in comps}, levels)["horizon_t"] is None


def test_memorisation_stage_against_a_brute_force_optimal_denoiser(tmp_cache):
    data = load_dataset("digits")
    held = load_dataset("digits", split="test")
    res = probe(data, held_out=[held], labels=["digits"], timesteps=[700, 300, 50], held_out_num=12, seed=5,
                progress=False)
    d = res.datasets["digits"]
    memo = res.record["datasets"]["digits"]["memorisation"]
    n = len(data)
    assert memo["sizes"] == [n // 8, n // 4, n // 2, n]
    images = held.subset(12, seed=5).tensor().double().reshape(12, -1).numpy()
    gen = torch.Generator().manual_seed(5)
    noise = {t: torch.randn((12, 1, 8, 8), generator=gen).double().reshape(12, -1).numpy() for t in (700, 300, 50)}
    sub = data.subset(n // 8, seed=5).tensor().double().reshape(n // 8, -1).numpy()
    for ti, t in enumerate((700, 300, 50)):
        a, b2 = math.sqrt(ALPHA_BAR[t]), 1 - ALPHA_BAR[t]
        x_t = a * images + math.sqrt(b2) * noise[t]
        logit = -((x_t[:, None, :] - a * sub[None]) ** 2).sum(-1) / (2 * b2)  # [12, K]
        w = np.exp(logit - logit.max(1, keepdims=True))
        x0 = (w @ sub) / w.sum(1, keepdims=True)
        mse = ((x0 - images) ** 2).mean(1)
        assert np.allclose(d.errors[f"{n // 8}/optimal"][ti], mse, rtol=1e-4, atol=1e-6)
        for size in memo["sizes"]:  # every paired interval recomputed from the stored per-image errors
            c = compare(d.errors[f"{size}/optimal"][ti], d.errors[f"{size}/wiener"][ti], a="optimal", b="wiener",
                        metric="m", lower_is_better=True)
            rec = memo["per_size"][str(size)]["optimal_minus_wiener"][str(t)]
            assert rec["mean_diff"] == pytest.approx(c.mean_diff) and rec["ci95"] == pytest.approx(list(c.ci95))
    assert res.record["datasets"]["digits"]["held_out"]["rule"] == "held-out images given by the caller"


def test_a_given_network_is_scored_on_the_same_noisy_images(tmp_path, tmp_cache):
    from conftest import save_tiny_unet
    from localdiff import make_denoiser
    from localdiff.calibrate_masked import per_image_mse
    from localdiff.evaluate import noisy_draws

    unet = save_tiny_unet(tmp_path / "unet", 8)
    data, held = load_dataset("digits"), load_dataset("digits", split="test")
    res = probe(data, held_out=[held], timesteps=[600, 200], held_out_num=10, divisors=(2, 1), unets={"digits": str(unet)},
                progress=False)
    d, memo = res.datasets["digits"], res.record["datasets"]["digits"]["memorisation"]
    images = held.subset(10, seed=0).tensor()
    x_t = dict(noisy_draws(images, [600, 200], torch.Generator().manual_seed(0)))
    net = make_denoiser("unet", data, path=str(unet))
    for ti, t in enumerate((600, 200)):
        mse = per_image_mse(net, x_t[t], images, t)
        assert np.allclose(d.errors[f"{len(data)}/unet"][ti], mse.numpy(), rtol=1e-6)
        c = compare(mse.numpy(), d.errors[f"{len(data)}/wiener"][ti], a="unet", b="wiener", metric="m",
                    lower_is_better=True)
        assert memo["unet"]["minus_wiener"][str(t)]["mean_diff"] == pytest.approx(c.mean_diff)
    assert "unet" not in memo["per_size"][str(len(data) // 2)]["mse"]  # the network is trained on all N
    assert any(k.startswith("given") for k in res.record["datasets"]["digits"]["receptive_fields"])


def test_images_in_memory_hold_out_every_tenth_image(tmp_cache):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 1, 6, 6)).astype(np.uint8)
    res = probe(x, timesteps=[500], held_out_num=4, divisors=(2, 1), progress=False)
    rec = res.record["datasets"]["array"]
    assert rec["dataset"]["num_images"] == 54 and rec["held_out"]["dataset"]["num_images"] == 6
    assert "every 10th image" in rec["held_out"]["rule"] and rec["held_out"]["overlaps_training"] is False
    assert rec["memorisation"]["sizes"] == [27, 54]


# -- the explorer's data ----------------------------------------------------------------------------------

def test_quantisation_error_and_display_fields():
    rng = np.random.default_rng(1)
    f = rng.standard_normal((3, 5, 40)) * np.logspace(-6, 2, 5)[None, :, None]
    q, s = quantise(f)
    assert q.dtype == np.int8 and s.dtype == np.float32 and np.abs(q).max() == 127
    assert (np.abs(q * s[..., None].astype(np.float64) - f) <= s[..., None] / 2 * (1 + 1e-6)).all()
    # the page's payload: per position, level differences mod 256 of the codes, deflated; summing them back
    import base64
    import zlib

    from localdiff.probing.explorer import encode_model

    fields = rng.standard_normal((4, 9, 9)) * np.logspace(-3, 1, 4)[:, None, None]
    enc = encode_model(fields, (1, 3, 3))
    steps = np.frombuffer(zlib.decompress(base64.b64decode(enc["fields"])), np.int8).reshape(9, 4, 9)
    codes = np.cumsum(steps.astype(np.int64), axis=1)
    codes = ((codes + 128) % 256 - 128).transpose(1, 0, 2)  # int8 wrap-around, as Int8Array stores it
    scales = np.frombuffer(zlib.decompress(base64.b64decode(enc["scales"])), "<f4").reshape(4, 9)
    assert np.array_equal(codes, quantise(fields)[0])
    assert (np.abs(codes * scales[..., None].astype(np.float64) - fields) <= scales[..., None] / 2 * (1 + 1e-6)).all()
    J = rng.standard_normal((2, 12, 12))  # colour 3 x 2 x 2: n = 12, P = 4
    shown = display_fields(J, (3, 2, 2))
    manual = J.reshape(2, 3, 4, 3, 4).mean(axis=1).sum(axis=2)  # mean over output, sum over input channels
    assert np.allclose(shown, manual)
    assert colour(1.0) == (178, 24, 43) and colour(-1.0) == (33, 102, 172) and colour(0.0) == (247, 247, 247)
    with pytest.raises(ConfigError, match="fields must be"):
        field_explorer({"x": np.zeros((2, 5, 7))}, (1, 2, 2), ["a", "b"])
    with pytest.raises(ConfigError, match="labels"):
        field_explorer({"x": np.zeros((2, 4, 4))}, (1, 2, 2), ["a"])


# -- the command ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def cli_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("probe") / "run"
    rc, stdout, stderr = run_cli(["probe", "mnist", "mnist-permuted", "--subset", "3000", "--held-out", "16",
                                  "--timesteps", "900,500,100", "--no-progress", "--no-cache", "--out", str(out)])
    assert rc == 0, stderr
    return out, stdout, json.loads((out / "probe.json").read_text())


def test_cli_writes_every_number_for_each_dataset(cli_run):
    out, stdout, rec = cli_run
    assert rec["format"] == "localdiff-probe-v1" and list(rec["datasets"]) == ["mnist", "mnist-permuted"]
    assert [lv["t"] for lv in rec["levels"]] == [900, 500, 100]
    assert rec["command"].startswith("localdiff probe mnist mnist-permuted")
    for key in ("extent", "energy_extent", "anisotropy", "stationarity", "mask", "memorisation_horizon",
                "explorer_quantisation", "receptive_field"):
        assert key in rec["definitions"]
    arrays = np.load(out / "probe.npz")
    for label, d in rec["datasets"].items():
        assert d["dataset"]["num_images"] == 3000 and d["tau"]["value"] == 0.005
        assert d["held_out"]["split"] == "test" and not d["held_out"]["overlaps_training"]
        assert set(d["receptive_fields"]) == {"small", "paper"}
        for ti, t in enumerate(("900", "500", "100")):
            r90 = np.asarray(d["maps"]["r90"][ti], dtype=np.float64)  # null -> nan
            assert r90.shape == (28, 28)
            assert np.allclose(r90, arrays[f"{label}/r90"][ti], rtol=1e-5, equal_nan=True)
            assert d["levels"][t]["extent_r90"]["median"] == pytest.approx(np.nanmedian(r90), rel=1e-5)
        assert len(d["sample_fields"]["pixels"]) == 3
        memo = d["memorisation"]
        assert memo["sizes"] == [375, 750, 1500, 3000] and memo["held_out_images"] == 16
        assert arrays[f"{label}/mse/375/optimal"].shape == (3, 16)
    assert "mnist: from t = 100 to t = 900" in stdout and (out / "probe.html").stat().st_size > 100_000


def test_cli_locality_differs_between_mnist_and_its_permutation(cli_run):
    _, _, rec = cli_run
    a, b = rec["datasets"]["mnist"]["levels"]["100"], rec["datasets"]["mnist-permuted"]["levels"]["100"]
    assert b["energy_r90"]["median"] > 4 * a["energy_r90"]["median"]
    # the same statistics up to the permutation: the spectrum, hence the mask sizes, are the same
    sa, sb = rec["datasets"]["mnist"]["spectrum"], rec["datasets"]["mnist-permuted"]["spectrum"]
    assert sa["effective_rank"] == pytest.approx(sb["effective_rank"], rel=1e-6)


@pytest.mark.parametrize("argv, msg", [
    (["probe", "mnist", "fashion-mnist", "--unet", "runs/x"], "DATA=DIR"),
    (["probe", "mnist", "--data-opt", "num=3"], "DATA.KEY=VALUE"),
    (["probe", "mnist", "--data-opt", "grf.num=3"], "not among the datasets"),
    (["probe", "mnist", "--timesteps", "1000"], "--timesteps"),
    (["probe", "mnist", "--held-out", "1"], "--held-out"),
    (["probe", "no-such-set"], "neither a built-in dataset"),
])
def test_cli_errors_name_the_problem(argv, msg, tmp_path):
    rc, _, err = run_cli([*argv, "--out", str(tmp_path / "x"), "--no-progress"])
    assert rc == 2 and msg in err, err
    assert not (tmp_path / "x").exists()


def test_api_errors():
    with pytest.raises(ConfigError, match="at least one dataset"):
        probe()
    with pytest.raises(ConfigError, match="tau"):
        probe("digits", tau=2.0)
    with pytest.raises(ConfigError, match="labels"):
        probe("digits", "digits", labels=["a", "a"])
    with pytest.raises(ConfigError, match="unets names"):
        probe("digits", unets={"mnist": None})
    with pytest.raises(ConfigError, match="held_out_num"):
        probe("digits", held_out_num=1)
