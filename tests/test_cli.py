"""The command line, run as a user would: files written, never overwritten, clear errors."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from localdiff.cli import main


@pytest.fixture
def npz_data(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(30, 1, 6, 6)).astype(np.uint8)
    path = tmp_path / "toy.npz"
    np.savez(path, images=x)
    return path


def test_sample_writes_everything(npz_data, tmp_path, tmp_cache, capsys):
    out = tmp_path / "run"
    rc = main(["sample", "--data", str(npz_data), "--model", "optimal", "--opt", "chunk=7", "--num", "5",
               "--steps", "4", "--seed", "3", "--trajectory", "--device", "cpu", "--out", str(out)])
    assert rc == 0
    samples = np.load(out / "samples.npy")
    assert samples.shape == (5, 1, 6, 6) and samples.dtype == np.float32
    train = np.load(npz_data)["images"].astype(np.float64) / 127.5 - 1.0  # the optimal model's last step (t = 0)
    gaps = np.abs(samples[:, None].astype(np.float64) - train[None]).max(axis=(2, 3, 4)).min(axis=1)
    assert gaps.max() < 1e-3  # memorises: every sample is one of the training images
    traj = np.load(out / "trajectory.npz")
    assert list(traj["timesteps"]) == [750, 500, 250, 0]
    assert traj["xt"].shape == traj["x0_hat"].shape == (4, 5, 1, 6, 6)
    np.testing.assert_array_equal(traj["x0_hat"][-1], samples)
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["model"] == "optimal" and run["model"]["chunk"] == 7
    assert run["sampler"]["timesteps"] == [750, 500, 250, 0] and len(run["timings_s"]["per_step"]) == 4
    assert run["dataset"]["fingerprint"] and run["versions"]["torch"]
    img = Image.open(out / "grid.png")
    assert img.size[0] > 56 and img.mode == "RGB"
    # the same seed through --init-noise gives the same samples
    noise = np.asarray(traj["xt"][0], dtype=np.float32)
    np.save(tmp_path / "noise.npy", noise)
    out2 = tmp_path / "run2"
    assert main(["sample", "--data", str(npz_data), "--model", "optimal", "--steps", "4", "--device", "cpu",
                 "--init-noise", str(tmp_path / "noise.npy"), "--out", str(out2)]) == 0
    np.testing.assert_allclose(np.load(out2 / "samples.npy"), samples, atol=1e-6)


def test_existing_output_is_never_overwritten(npz_data, tmp_path, tmp_cache, capsys):
    out = tmp_path / "run"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    rc = main(["sample", "--data", str(npz_data), "--model", "wiener", "--num", "2", "--steps", "2",
               "--device", "cpu", "--out", str(out)])
    assert rc == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "precious" and len(list(out.iterdir())) == 1


def test_failed_run_leaves_nothing(npz_data, tmp_path, capsys):
    out = tmp_path / "run"
    rc = main(["sample", "--data", str(npz_data), "--model", "optimal", "--opt", "tau=1", "--device", "cpu",
               "--out", str(out)])
    assert rc == 2
    err = capsys.readouterr().err
    assert "no option 'tau'" in err and "chunk" in err
    assert not out.exists() and not list(tmp_path.glob(".run.*"))


@pytest.mark.parametrize("argv,msg", [
    (["--model", "nope"], "unknown model"),
    (["--model", "wiener", "--init-noise", "missing.npy"], "does not exist"),
    (["--model", "wiener", "--opt", "novalue"], "key=value"),
])
def test_bad_arguments(npz_data, tmp_path, capsys, argv, msg):
    rc = main(["sample", "--data", str(npz_data), "--device", "cpu", "--out", str(tmp_path / "o"), *argv])
    assert rc == 2 and msg in capsys.readouterr().err


@pytest.mark.parametrize("command,argv,msg", [
    ("fields", ["--timesteps", "100,abc"], "--timesteps must be comma-separated integers"),
    ("fields", ["--models", " , "], "--models is empty"),
    ("evaluate", ["--opt", "wiener=1"], "MODEL.KEY=VALUE"),
    ("evaluate", ["--opt", "masked.tau=1"], "not in --models"),
    ("evaluate", ["--held-out-split", "nope"], "split must be one of"),
    ("experiment", ["locality-follows-data", "--sets", ","], "--sets is empty"),
])
def test_shared_argument_errors(npz_data, tmp_path, capsys, command, argv, msg):
    # every command parses lists, model options and held-out splits the same way, with the flag named
    data = [] if command == "experiment" else ["--data", str(npz_data)]
    rc = main([command, *data, "--out", str(tmp_path / "o"), *argv])
    assert rc == 2 and msg in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


def test_held_out_errors_say_what_the_images_are_for():
    from localdiff.commands.common import load_held_out
    from localdiff.errors import DataError

    def load(split):
        raise DataError(f"no {split} split here")

    with pytest.raises(DataError, match=r"no test split here\n\(held-out images to denoise; choose another"):
        load_held_out(load, "test", "to denoise")
    assert load_held_out(lambda split: split.upper(), "test", "x") == "TEST"


def test_missing_data_path(tmp_path, capsys):
    rc = main(["sample", "--data", str(tmp_path / "nothing"), "--model", "wiener", "--out", str(tmp_path / "o")])
    assert rc == 2 and "nothing" in capsys.readouterr().err


def test_wrong_init_noise_shape(npz_data, tmp_path, capsys):
    np.save(tmp_path / "n.npy", np.zeros((2, 1, 5, 5), np.float32))
    rc = main(["sample", "--data", str(npz_data), "--model", "optimal", "--device", "cpu",
               "--init-noise", str(tmp_path / "n.npy"), "--out", str(tmp_path / "o")])
    assert rc == 2 and "init_noise must have shape [N, 1, 6, 6]" in capsys.readouterr().err


def test_fields_command(npz_data, tmp_path, tmp_cache):
    out = tmp_path / "fields"
    rc = main(["fields", "--data", str(npz_data), "--held-out-split", "train", "--models", "wiener,optimal",
               "--pixels", "2,2;0,5", "--timesteps", "100,900", "--draws", "3", "--device", "cpu",
               "--out", str(out)])
    assert rc == 0
    f = np.load(out / "fields.npz")
    assert f["wiener"].shape == f["optimal_abs"].shape == (2, 2, 1, 6, 6)
    assert list(f["timesteps"]) == [100, 900] and f["pixels"].tolist() == [[2, 2], [0, 5]]
    loc = json.loads((out / "locality.json").read_text())
    m = loc["models"]["wiener"]["measures"]["100"]["2,2"]
    assert {"r50", "r90", "energy_3x3", "energy_5x5"} <= set(m)
    assert loc["models"]["optimal"]["method"] == "closed"
    assert set(loc["cosine_similarity"]["wiener|optimal"]) == {"100", "900"}
    assert Image.open(out / "fields.png").size[0] > 100 and (out / "fields_pixel1.png").exists()


def test_console_script_installed():
    r = subprocess.run([sys.executable, "-m", "localdiff.cli", "--help"], capture_output=True, text=True)
    assert r.returncode == 0 and "sample" in r.stdout and "fields" in r.stdout


def test_opt_strings_reach_typed_options(npz_data, tmp_path, tmp_cache):
    """--opt keeps its key=value strings; the option parser turns them into the typed fields."""
    out = tmp_path / "masked"
    assert main(["sample", "--data", str(npz_data), "--model", "masked", "--opt", "tile=2x3", "--opt", "path=grouped",
                 "--opt", "tau=0.05", "--num", "2", "--steps", "2", "--device", "cpu", "--out", str(out)]) == 0
    run = json.loads((out / "run.json").read_text())
    assert run["model"]["tile"] == [2, 3] and run["model"]["path"] == "grouped" and run["model"]["tau"] == 0.05


def test_every_command_takes_the_same_running_flags():
    """--no-progress on every command; --device and --seed on every command that computes with models; the
    same help wording for --device."""
    import argparse

    from localdiff.cli import build_parser
    from localdiff.commands import COMMANDS

    parser = build_parser()
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    assert len(subs) == len(COMMANDS)  # one sub-command per module
    for name, sub in subs.items():
        flags = {o for a in sub._actions for o in a.option_strings}
        assert "--no-progress" in flags, name
        if name not in ("convert-network", "pack", "noise"):
            assert {"--device", "--seed"} <= flags, name
            device = next(a for a in sub._actions if "--device" in a.option_strings)
            assert device.help.startswith("cpu, cuda or auto"), (name, device.help)
