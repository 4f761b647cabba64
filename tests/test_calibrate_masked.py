"""Per-timestep tau and temperature of the masked models: schedules, the calibration, the command."""

import json

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.calibrate_masked import calibrate_masked, held_out_images, noisy_images, per_image_mse
from localdiff.cli import main
from localdiff.denoisers.masked.schedule import read_masked_schedule
from localdiff.errors import ConfigError
from localdiff.evaluate import denoising_mse

from test_masked import smooth_images

MODELS = ("masked", "masked-soft", "masked-equivariant")


@pytest.fixture(scope="module")
def smooth():
    return smooth_images(40, 6, 0, constant_border=False)


def write(path, doc):
    path.write_text(json.dumps(doc))
    return str(path)


def test_schedule_files_are_read_and_checked(tmp_path):
    good = write(tmp_path / "s.json", {"format": "localdiff.masked-schedule",
                                       "params": {"900": {"tau": 0.05, "temperature": 2}, "100": {"tau": 0.01}}})
    s = read_masked_schedule(good)
    assert s.at(900) == (0.05, 2.0) and s.at(100) == (0.01, 1.0)
    assert s.at(0) == (0.01, 1.0) and s.at(700) == (0.05, 2.0) and s.at(500) == (0.05, 2.0)  # ties: the noisier
    assert read_masked_schedule(write(tmp_path / "bare.json", {"300": {"tau": 0.1}})).at(5) == (0.1, 1.0)
    bad = [{"900": {"tau": 2}}, {"900": {"tau": 0.1, "temperature": 0}}, {"x": {"tau": 0.1}}, {"-5": {"tau": 0.1}},
           {"900": {"tau": 0.1, "temp": 1}}, {"900": 0.1}, {}, {"format": "other", "params": {"9": {"tau": 0.1}}},
           {"900": {"tau": True}}]
    for i, doc in enumerate(bad):
        with pytest.raises(ConfigError):
            read_masked_schedule(write(tmp_path / f"bad{i}.json", doc))
    with pytest.raises(ConfigError, match="does not exist"):
        read_masked_schedule(tmp_path / "missing.json")
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="JSON"):
        read_masked_schedule(tmp_path / "junk.json")


@pytest.mark.parametrize("name", MODELS)
def test_a_schedule_equals_the_constant_options_at_each_timestep(name, smooth, tmp_path, tmp_cache):
    path = write(tmp_path / "s.json", {"800": {"tau": 0.3, "temperature": 0.7}, "200": {"tau": 0.05, "temperature": 1.5}})
    sched = make_denoiser(name, smooth, device="cpu", dtype="float64", tau_schedule=path)
    x = smooth.tensor(dtype=torch.float64)[:3] * 0.7
    for t, (tau, temp) in ((900, (0.3, 0.7)), (800, (0.3, 0.7)), (300, (0.05, 1.5)), (0, (0.05, 1.5))):
        const = make_denoiser(name, smooth, device="cpu", dtype="float64", tau=tau, temperature=temp)
        torch.testing.assert_close(sched(x, t), const(x, t), atol=1e-12, rtol=0)
        assert sched.tau_at(t) == tau and sched.temperature_at(t) == temp
    rec = json.loads(json.dumps(sched.settings()))
    assert rec["tau_schedule_params"] == {"200": {"tau": 0.05, "temperature": 1.5},
                                          "800": {"tau": 0.3, "temperature": 0.7}}
    assert make_denoiser(name, smooth, device="cpu").settings()["tau_schedule_params"] is None


def test_held_out_images_follow_evaluates_permutation(smooth):
    first = held_out_images(smooth, 10, seed=3)
    torch.testing.assert_close(first, smooth.subset(10, seed=3).tensor())
    later = held_out_images(smooth, 10, seed=3, skip=10)
    chosen = smooth.subset(20, seed=3).tensor()
    for img in later:  # disjoint from the first 10, and together they are subset(20)
        assert not any(torch.equal(img, f) for f in first)
        assert any(torch.equal(img, c) for c in chosen)
    with pytest.raises(ConfigError):
        held_out_images(smooth, 30, skip=20)


def test_noisy_images_are_the_draws_of_evaluate(smooth, tmp_cache):
    """per_image_mse on noisy_images averages to denoising_mse's numbers (same seed, same x_t)."""
    images = held_out_images(smooth, 12, seed=1)
    den = make_denoiser("wiener", smooth, device="cpu")
    ts = [700, 100]
    ref = denoising_mse({"wiener": den}, images, ts, generator=torch.Generator().manual_seed(1), progress=False)
    x_t = noisy_images(images, ts, seed=1)
    for t in ts:
        v = per_image_mse(den, x_t[t], images, t, batch_size=5)
        assert v.shape == (12,) and abs(float(v.mean()) - ref["wiener"][t]["mse"]) < 1e-7


@pytest.mark.parametrize("name", ["masked", "masked-equivariant"])
def test_calibration_picks_the_smallest_error_per_timestep(name, smooth, tmp_cache):
    taus, temps, ts = (0.01, 0.2), (0.5, 1.0), [600, 200]
    res = calibrate_masked(name, smooth, smooth, timesteps=ts, taus=taus, temperatures=temps, num_images=8,
                           seed=2, skip=5, model_options={"device": "cpu", "dtype": "float64"}, batch_size=3)
    images = held_out_images(smooth, 8, seed=2, skip=5)
    x_t = noisy_images(images, ts, seed=2)
    for t in ts:
        errs = {}
        for tau in taus:
            for temp in temps:
                den = make_denoiser(name, smooth, device="cpu", dtype="float64", tau=tau, temperature=temp)
                errs[(tau, temp)] = float(((den(x_t[t], t).double() - images.double()) ** 2).mean())
                assert abs(res["mse"][str(t)][f"tau={tau:g},T={temp:g}"]["mse"] - errs[(tau, temp)]) < 1e-9
        best = min(errs, key=errs.get)
        assert res["params"][str(t)] == {"tau": best[0], "temperature": best[1]}
    assert res["format"] == "localdiff.masked-schedule" and res["against"] == "clean held-out images"


def test_calibration_against_a_target_uses_its_outputs(smooth, tmp_cache):
    target = make_denoiser("masked", smooth, device="cpu", dtype="float64", tau=0.2)
    res = calibrate_masked("masked", smooth, smooth, timesteps=[400], taus=(0.01, 0.2), num_images=6, skip=0,
                           target=target, model_options={"device": "cpu", "dtype": "float64"})
    assert res["params"]["400"]["tau"] == 0.2 and res["mse"]["400"]["tau=0.2,T=1"]["mse"] < 1e-20
    assert res["against"] == "target" and res["target"]["tau"] == 0.2
    with pytest.raises(ConfigError, match="mask threshold"):
        calibrate_masked("wiener", smooth, smooth, timesteps=[400], num_images=4)


def test_calibrate_masked_command_writes_a_schedule_the_models_read(tmp_path, tmp_cache, capsys):
    img = smooth_images(50, 6, 4, constant_border=False).raw
    path = tmp_path / "toy.npz"
    np.savez(path, images=img)
    sched = tmp_path / "tau.json"
    argv = ["calibrate-masked", "--data", str(path), "--held-out-split", "train", "--model", "masked-soft",
            "--taus", "0.01,0.2", "--temperatures", "1,0.5", "--timesteps", "700,100", "--num", "6", "--skip", "10",
            "--device", "cpu", "--out", str(sched)]
    assert main(argv) == 0, capsys.readouterr().err
    doc = json.loads(sched.read_text())
    assert set(doc["params"]) == {"700", "100"} and doc["model"] == "masked-soft" and doc["skip"] == 10
    assert doc["command"] and doc["seconds"] > 0
    assert main(argv) == 2 and "already exists" in capsys.readouterr().err  # never overwritten
    out = tmp_path / "eval"
    assert main(["evaluate", "--data", str(path), "--held-out-split", "train", "--models", "masked,masked-soft",
                 "--opt", f"masked-soft.tau_schedule={sched}", "--timesteps", "100", "--num", "5",
                 "--device", "cpu", "--out", str(out)]) == 0
    rec = json.loads((out / "evaluate.json").read_text())
    assert rec["models"]["masked-soft"]["tau_schedule_params"] == {t: doc["params"][t] for t in ("100", "700")}
    assert main(["calibrate-masked", "--data", str(path), "--taus", "x", "--out", str(tmp_path / "b.json")]) == 2
