"""Noise levels of every family, the samplers on one grid, and the field's networks through the CLI
(docs/DESIGN.md §10), each against an independent reference: closed forms (the Gaussian probability-flow
ODE, the level identity), diffusers' own tables, and fixtures made by the paper's code and NVlabs/edm."""

import json
import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import model_table
from localdiff import make_denoiser, sample
from localdiff.data.dataset import ImageDataset
from localdiff.diffusion import grid_for
from localdiff.errors import ConfigError
from localdiff.samplers import SamplerConfig, karras_sigmas, make_grid
from localdiff.schedules import DEFAULT_SCHEDULE, ContinuousSchedule, NoiseLevel, Schedule, schedule_named

from conftest import save_tiny_unet

FIXTURES = Path(__file__).parent / "fixtures"


def smooth_set(num: int, seed: int = 0, size: int = 8) -> ImageDataset:
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num, size + 4, size + 4))
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.2) ** 2)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, z)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 2, z)
    return ImageDataset(raw=np.clip(127.5 + 60 * z / z.std(), 0, 255).astype(np.uint8)[:, None], name=f"lv-{num}")


# -- levels -------------------------------------------------------------------------------------------------

def test_tables_equal_diffusers_and_levels_validate_once():
    from diffusers import DDPMScheduler

    for name, kind in (("ddpm-linear", "linear"), ("ddpm-cosine", "squaredcos_cap_v2"),
                       ("ddpm-scaled-linear", "scaled_linear")):
        ours = schedule_named(name)
        theirs = DDPMScheduler(**ours.scheduler_kwargs())
        assert ours.beta_schedule == kind
        np.testing.assert_allclose(ours.alpha_bar.numpy(), theirs.alphas_cumprod.double().numpy(), rtol=2e-5)  # float32
        lv = ours.at(500)
        assert lv.t == 500 and ours.owns(lv) and math.isclose(lv.sigma, float(ours.sigmas[500]), rel_tol=1e-12)
    assert DEFAULT_SCHEDULE.at(DEFAULT_SCHEDULE.at(7)) is DEFAULT_SCHEDULE.at(7)  # a level passes through
    other = Schedule(beta_end=0.012)
    assert not other.owns(DEFAULT_SCHEDULE.at(500)) and other.timestep_of(DEFAULT_SCHEDULE.at(500)) is None
    for bad in (500.0, "500", None, -1, 1000):
        with pytest.raises(ConfigError):
            DEFAULT_SCHEDULE.at(bad)
    for a, b2 in ((0.0, 1.0), (1.0, 0.0), (float("nan"), 1.0), (1.0, float("inf"))):
        with pytest.raises(ConfigError, match="noise level"):
            NoiseLevel(a, b2)
    with pytest.raises(ConfigError, match="continuous"):
        ContinuousSchedule("edm").at(500)
    vp, ve = NoiseLevel.vp(2.5), NoiseLevel.ve(2.5)
    assert math.isclose(vp.sigma, 2.5, rel_tol=1e-14) and ve.sigma == 2.5 and ve.a == 1.0
    assert math.isclose(vp.a ** 2 + vp.b2, 1.0, rel_tol=1e-14)


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return save_tiny_unet(tmp_path_factory.mktemp("levels") / "unet", 8)


@pytest.fixture(scope="module")
def added_models():
    with model_table.added_models():  # the toy model of tests/toy_model.py
        yield


@pytest.mark.parametrize("label", model_table.labels())
def test_every_model_gives_the_same_x0_hat_at_matched_levels(label, unet_dir, added_models, tmp_path, monkeypatch):
    """x0_hat(a y, (a, a^2 s^2)) = x0_hat(y, (1, s^2)): a VP level and a VE level at the same sigma, and a
    DDPM timestep against the VE level at its sigma (for models fitted at timesteps, the only ones they take),
    for every variant of every model in tests/model_table.py."""
    monkeypatch.setenv("LOCALDIFF_CACHE", str(tmp_path / "cache"))
    data = smooth_set(30)
    v = model_table.variant(label)
    den = make_denoiser(v.model, data, device="cpu", **v.build_options(unet_dir))
    y = smooth_set(3, seed=5).tensor(dtype=torch.float64) + 0.3 * torch.randn(3, 1, 8, 8, dtype=torch.float64,
                                                                             generator=torch.Generator().manual_seed(1))
    for t in (900, 500, 100):
        table = den.schedule.at(t)
        s = table.sigma
        ve = NoiseLevel.ve(s)
        with torch.no_grad():
            ref = den(y, ve)
            vp = NoiseLevel.vp(s)
            torch.testing.assert_close(den(vp.a * y, vp), ref, rtol=1e-6, atol=1e-6)
            torch.testing.assert_close(den(table.a * y, t), ref, rtol=1e-6, atol=1e-6)


# -- samplers -----------------------------------------------------------------------------------------------

def gaussian_flow(spec, y0: torch.Tensor, s0: float, s1: float) -> torch.Tensor:
    """The probability-flow ODE of N(mu, Sigma) from sigma s0 to s1, exactly: in the eigenbasis
    y_k(s) - mu_k = (y_k(s0) - mu_k) sqrt((lam_k + s^2) / (lam_k + s0^2))."""
    c = (y0 - spec.mean) @ spec.eigvecs
    return spec.mean + (c * ((spec.eigvals + s1 ** 2) / (spec.eigvals + s0 ** 2)).sqrt()) @ spec.eigvecs.T


@pytest.mark.parametrize("schedule", ["edm", "ddpm-linear", "vp", "ddpm-cosine"])
def test_heun_and_euler_follow_the_gaussian_flow_with_orders_two_and_one(schedule, tmp_cache):
    """With the Wiener denoiser, the probability-flow ODE of the data's Gaussian is solved in closed form:
    the state before the last step (at the grid's smallest sigma) converges with the step size like h^2
    (Heun) and h (Euler); and one Euler step is the closed form y + (s' - s) (y - D(y)) / s."""
    data = smooth_set(60)
    den = make_denoiser("wiener", data, device="cpu", schedule=schedule_named(schedule))
    spec = den.spectrum
    z = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    errors = {}
    for name in ("euler", "heun"):
        for steps in (16, 32, 64):
            traj = sample(den, init_noise=z, sampler=name, steps=steps, return_trajectory=True, progress=False)
            lv0, last = traj.levels[0], traj.levels[-1]
            y_last = traj.xt[-1].double().reshape(4, -1) / last.a
            exact = gaussian_flow(spec, z.double().reshape(4, -1) * lv0.sigma, lv0.sigma, last.sigma)
            errors[name, steps] = float((y_last - exact).abs().max())
    for steps in (16, 32):
        assert 1.6 < errors["euler", steps] / errors["euler", 2 * steps] < 2.4, errors
        assert errors["heun", steps] / errors["heun", 2 * steps] > 3.2, errors
    assert errors["heun", 64] < errors["euler", 64] / 5, errors
    grid = make_grid("euler", den.schedule, steps=5)
    y0 = z.double() * grid.levels[0].sigma
    one = make_grid(SamplerConfig("euler", steps=1), den.schedule)  # one step: straight to sigma 0, i.e. D(y0)
    out = sample(den, init_noise=z, grid=one, progress=False)
    lv = one.levels[0]
    torch.testing.assert_close(out.double(), den(lv.a * y0, lv).double(), rtol=1e-5, atol=1e-5)
    traj = sample(den, init_noise=z, grid=grid, return_trajectory=True, progress=False)
    s0, s1 = grid.levels[0].sigma, grid.levels[1].sigma
    d = (y0 - den(grid.levels[0].a * y0, grid.levels[0])) / s0
    torch.testing.assert_close(traj.xt[1].double() / grid.levels[1].a, y0 + (s1 - s0) * d, rtol=1e-5, atol=1e-5)


def test_karras_grid_and_snapping():
    s = karras_sigmas(18, 0.002, 80.0)
    assert float(s[0]) == 80.0 and math.isclose(float(s[-1]), 0.002, rel_tol=1e-12)
    assert bool((s[1:] < s[:-1]).all())
    table = DEFAULT_SCHEDULE
    snap = lambda v: float(table.sigmas[table.nearest_timestep(v)])  # noqa: E731
    grid = make_grid("heun", table, steps=400, snap=snap)
    assert grid.snapped and all(table.owns(lv) for lv in grid.levels)
    ts = [lv.t for lv in grid.levels]
    assert ts == sorted(set(ts), reverse=True) and len(ts) < 400  # repeats at low noise dropped
    assert grid.levels[0].t == 930 and grid.levels[-1].t == 0  # 80 rounds to t = 930 (sigma 80.3); 0.002 to t = 0
    with pytest.raises(ConfigError, match="continuous"):
        make_grid("ddim", schedule_named("edm"))


# -- the field's networks through the command line -----------------------------------------------------------

def run_cli(*args, cwd):
    r = subprocess.run([sys.executable, "-m", "localdiff.cli", *args, "--no-progress"], cwd=cwd,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def images_npy(path: Path, shape, labels=None) -> Path:
    c, h, w = shape
    x = np.random.default_rng(0).integers(0, 256, (12, h, w, c)).astype(np.uint8)
    if labels is None:
        np.save(path, x)
    else:
        np.savez(path, x=x, y=np.asarray(labels, np.int64))
    return path


def test_paper_checkpoint_samples_equal_the_paper_loop(tmp_path):
    """`localdiff sample --model unet --unet ckpt.pt --steps 10 --init-noise N` gives the samples of the paper's
    own sampling loop (diffusers DDIM, its defaults, epsilon prediction) on a network in the published layout."""
    ref = np.load(FIXTURES / "paper_unet" / "tiny_ref.npz")
    np.save(tmp_path / "noise.npy", ref["init_noise"].astype(np.float32))
    data = images_npy(tmp_path / "data.npy", (1, 28, 28))
    run_cli("sample", "--data", str(data), "--model", "unet", "--unet", str(FIXTURES / "paper_unet" / "tiny_ckpt.pt"),
            "--steps", "10", "--init-noise", "noise.npy", "--out", "run", cwd=tmp_path)
    ours = np.load(tmp_path / "run" / "samples.npy")
    np.testing.assert_allclose(ours, ref["samples"], atol=1e-4, rtol=0)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["sampler"]["name"] == "ddim" and record["sampler"]["timesteps"] == ref["timesteps"].tolist()
    assert record["model"]["format"] == "paper-checkpoint" and record["model"]["prediction_type"] == "epsilon"


@pytest.mark.parametrize("fixture, network, label, rows", [
    ("sampler_vp_ddpmpp", "vp_ddpmpp.pt", None, [0, 1, 2, 3]),
    ("sampler_edm_songskip", "edm_songskip.pt", 2, [0, 2]),
    ("sampler_iddpm_adm", "iddpm_adm.pt", 7, [1, 2]),
])
def test_heun_on_edm_networks_equals_edms_own_sampler(fixture, network, label, rows, tmp_path):
    """`localdiff sample --model unet --unet NET --sampler heun --steps 18 --init-noise N` equals EDM's
    deterministic sampler (S_churn = 0) run by NVlabs/edm's code on the same network; the iDDPM network's grid
    is rounded to its table as EDM rounds it. A class-conditional network samples one class per run."""
    ref = np.load(FIXTURES / "edm" / f"{fixture}.npz")
    np.save(tmp_path / "noise.npy", ref["latents"][rows].astype(np.float32))
    data = images_npy(tmp_path / "data.npz", ref["latents"].shape[1:], labels=[label or 0] * 12)
    extra = ["--class-label", str(label)] if label is not None else []
    run_cli("sample", "--data", str(data), "--model", "unet", "--unet", str(FIXTURES / "edm" / network),
            "--sampler", "heun", "--steps", "18", "--init-noise", "noise.npy", "--out", "run", *extra, cwd=tmp_path)
    ours = np.load(tmp_path / "run" / "samples.npy")
    np.testing.assert_allclose(ours, ref["images"][rows], atol=1e-4, rtol=1e-6)
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    np.testing.assert_allclose(record["sampler"]["sigmas"], ref["t_steps"][:-1], rtol=1e-12)
    assert record["sampler"]["schedule"]["family"] == "edm"


def test_convert_network_round_trips_without_pickle(tmp_path):
    """convert-network writes safetensors + JSON from a paper checkpoint and an EDM pickle; the converted files
    give the same x0_hat, and existing outputs are never overwritten."""
    for src, shape in ((FIXTURES / "paper_unet" / "tiny_ckpt.pt", (1, 28, 28)),
                       (FIXTURES / "edm" / "snapshot_vp.pkl", None)):
        out = tmp_path / src.stem
        run_cli("convert-network", str(src), str(out), cwd=tmp_path)
        assert (tmp_path / f"{src.stem}.safetensors").is_file() and (tmp_path / f"{src.stem}.json").is_file()
        from localdiff.networks import load_network

        a, _ = load_network(src)
        b, _ = load_network(tmp_path / f"{src.stem}.safetensors")
        shape = shape or (a.in_channels, a.resolution, a.resolution)
        x = torch.randn(2, *shape, generator=torch.Generator().manual_seed(0))
        level = a.schedule.at(400) if a.discrete else NoiseLevel.ve(3.0)
        torch.testing.assert_close(b.x0(x, level), a.x0(x, level), rtol=0, atol=0)
        r = subprocess.run([sys.executable, "-m", "localdiff.cli", "convert-network", str(src), str(out)], cwd=tmp_path,
                           capture_output=True, text=True, timeout=300)
        assert r.returncode == 2 and "already exists" in r.stderr


def test_a_class_conditional_network_needs_its_class(tmp_path):
    data = ImageDataset(raw=np.zeros((4, 3, 16, 16), np.uint8), name="cond")
    with pytest.raises(ConfigError, match="class-conditional"):
        make_denoiser("unet", data, path=str(FIXTURES / "edm" / "edm_songskip.pt"), device="cpu")
    with pytest.raises(ConfigError, match="outside"):
        make_denoiser("unet", data, path=str(FIXTURES / "edm" / "edm_songskip.pt"), device="cpu", class_label=9)
    den = make_denoiser("unet", data, path=str(FIXTURES / "edm" / "edm_songskip.pt"), device="cpu", class_label=1)
    grid = grid_for(den, "heun", 6)
    assert grid.schedule.name == "edm" and not den.discrete_levels
