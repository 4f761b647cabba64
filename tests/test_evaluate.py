"""Denoising MSE on held-out images: checked against the Wiener filter's closed-form posterior error."""

import json

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.cli import main
from localdiff.data.synthetic import gaussian_random_field
from localdiff.diffusion import DEFAULT_SCHEDULE
from localdiff.evaluate import denoising_mse
from localdiff.stats import data_spectrum


@pytest.fixture(scope="module")
def grf_sets():
    train = gaussian_random_field(6000, 8, alpha=3.0, seed=0)
    test = gaussian_random_field(1500, 8, alpha=3.0, seed=1)
    return train, test


@pytest.mark.parametrize("t", [100, 500, 800])
def test_wiener_mse_matches_closed_form_posterior_error(grf_sets, t, tmp_cache):
    # On Gaussian data the Wiener filter is the posterior mean and its expected error is
    # (1/n) sum_k lam_k b2 / (a^2 lam_k + b2); the measured MSE must agree within sampling error.
    train, test = grf_sets
    den = make_denoiser("wiener", train, device="cpu")
    res = denoising_mse({"wiener": den}, test.tensor(), [t], generator=torch.Generator().manual_seed(0),
                        progress=False)["wiener"][t]
    spec = data_spectrum(train, progress=False)
    a2, b2 = DEFAULT_SCHEDULE.a(t) ** 2, DEFAULT_SCHEDULE.b2(t)
    lam = spec.eigvals
    expected = float((lam * b2 / (a2 * lam + b2)).mean())
    # quantisation to 8 bits and the finite training set add a little on top of the sampling error
    assert abs(res["mse"] - expected) < 4 * res["se"] + 0.02 * expected, (res, expected)
    assert res["num"] == len(test)


def test_results_are_paired_and_independent_of_batching(grf_sets, tmp_cache):
    train, test = grf_sets
    images = test.tensor()[:100]
    dens = {"wiener": make_denoiser("wiener", train, device="cpu"),
            "nearest": make_denoiser("nearest", train.subset(500), device="cpu")}
    a = denoising_mse(dens, images, [300, 600], generator=torch.Generator().manual_seed(3), batch_size=7,
                      progress=False)
    b = denoising_mse(dict(reversed(list(dens.items()))), images, [300, 600],
                      generator=torch.Generator().manual_seed(3), batch_size=100, progress=False)
    for name in dens:
        for t in (300, 600):
            assert a[name][t]["mse"] == pytest.approx(b[name][t]["mse"], rel=1e-6)
    # a model that returns zeros scores exactly mean(x0^2)
    r = denoising_mse({"zero": _Zero()}, images, [500], generator=torch.Generator().manual_seed(0), progress=False)
    assert r["zero"][500]["mse"] == pytest.approx(float(images.double().pow(2).mean()), rel=1e-9)


class _Zero:
    """A stand-in model returning zeros (its error is exactly the images' mean square)."""

    def __call__(self, x_t, t):
        return torch.zeros_like(x_t)


def test_bad_input_is_a_clear_error():
    from localdiff.errors import ConfigError

    with pytest.raises(ConfigError, match="N,C,H,W"):
        denoising_mse({}, torch.zeros(3, 4), [10], generator=torch.Generator())


def test_evaluate_command(tmp_path, tmp_cache, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(60, 1, 6, 6)).astype(np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, images=x)
    out = tmp_path / "run"
    rc = main(["evaluate", "--data", str(path), "--held-out-split", "train", "--models", "wiener,optimal",
               "--timesteps", "100,700", "--num", "20", "--samples", "6", "--sample-steps", "5",
               "--device", "cpu", "--out", str(out)])
    assert rc == 0
    rec = json.loads((out / "evaluate.json").read_text())
    assert set(rec["mse"]) == {"wiener", "optimal"}
    # held-out = training images here: the optimal denoiser recovers them almost exactly at low noise
    assert rec["mse"]["optimal"]["100"]["mse"] < 1e-3 < rec["mse"]["wiener"]["100"]["mse"]
    assert "| wiener |" in (out / "mse.md").read_text()
    memo = rec["memorisation"]
    # held-out images here are training images (distance 0); optimal samples copy training images too
    assert memo["held_out"]["max"] < 1e-5 and memo["optimal"]["mean"] < 1e-3 < memo["wiener"]["mean"]
    assert main(["evaluate", "--data", str(path), "--out", str(out)]) == 2  # never overwritten
    assert "already exists" in capsys.readouterr().err
