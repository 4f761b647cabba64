"""The paper's baseline U-Net (localdiff.networks.paper_unet) against fixtures made with the official code.

tests/fixtures/paper_unet/ was written by scripts/fixtures/make_paper_unet_fixtures.py, which ran the
official module (ottogin/locality-in-diffusion-models, commit in meta.json) and its sampling loop:
tiny_ckpt.pt (a reduced network in the published checkpoint layout), tiny_ref.npz (its noise predictions
and the official loop's samples), layouts.json (key names and shapes of the published configurations).
"""

from __future__ import annotations

import builtins
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from localdiff.diffusion import DEFAULT_SCHEDULE, sample
from localdiff.errors import ConfigError
from localdiff.networks.paper_unet import (
    PaperUNet,
    PaperUNetConfig,
    config_from_state_dict,
    extract_state_dict,
    is_paper_state_dict,
    read_paper_checkpoint,
)
from localdiff.networks.paper_unet_blocks import sinusoidal_table

FIX = Path(__file__).parent / "fixtures" / "paper_unet"
CKPT = FIX / "tiny_ckpt.pt"
TINY = PaperUNetConfig(in_channels=1, ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_levels=(1,), resolution=None,
                       num_timesteps=1000)
# The published configurations (issue 21; DESIGN.md facts), checked here against the official module's layout.
PUBLISHED = {"28px": (219, 6_202_369, PaperUNetConfig(1, 64, (1, 2, 2), 2, (), None, 1000)),
             "32px_64px": (283, 80_126_339, PaperUNetConfig(3, 128, (1, 2, 3, 4), 2, (), None, 1000))}


@pytest.fixture(scope="module")
def ref():
    return dict(np.load(FIX / "tiny_ref.npz"))


@pytest.fixture(scope="module")
def tiny_state():
    """The fixture's state_dict as stored (float16 tensors)."""
    return torch.load(CKPT, map_location="cpu", weights_only=True)["model_state_dict"]


@pytest.fixture(scope="module")
def tiny():
    return read_paper_checkpoint(CKPT)


def eps_of(model, ref, dtype=torch.float32):
    with torch.no_grad():
        return model.to(dtype)(torch.from_numpy(ref["x"]).to(dtype), torch.from_numpy(ref["t"])).numpy()


# -- the network against the official one ----------------------------------------------------------------------


def test_tiny_checkpoint_gives_the_official_noise_prediction_at_every_timestep(ref):
    model, _, _ = read_paper_checkpoint(CKPT)
    eps32 = eps_of(model, ref)
    for i, t in enumerate(ref["t"]):  # one image per timestep, 0 and 999 included
        assert np.abs(eps32[i] - ref["eps32"][i]).max() < 1e-5, f"t={t}"
    # In float64 both implementations compute the same function up to round-off.
    assert np.abs(eps_of(model, ref, torch.float64) - ref["eps64"]).max() < 1e-10
    # The reference depends on t and on x: the timesteps reversed, or another x, miss it by far.
    with torch.no_grad():
        flipped = model.float()(torch.from_numpy(ref["x"]), torch.from_numpy(ref["t"][::-1].copy())).numpy()
        other = model(torch.from_numpy(ref["x"][::-1].copy()), torch.from_numpy(ref["t"])).numpy()
    assert np.abs(flipped - ref["eps32"]).max() > 1e-2 and np.abs(other - ref["eps32"]).max() > 1e-2
    assert set(ref["t"].tolist()) >= {0, 999}


def test_config_read_from_the_state_dict_is_the_one_used(tiny, tiny_state):
    model, config, info = tiny
    meta = json.loads((FIX / "meta.json").read_text())["tiny_config"]
    assert config == TINY == config_from_state_dict(tiny_state)
    assert (config.ch, list(config.ch_mult), list(config.attn_levels), config.num_res_blocks, config.num_timesteps) \
        == (meta["ch"], meta["ch_mult"], meta["attn"], meta["num_res_blocks"], meta["T"])
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert info["entry"] == "model_state_dict" and info["metadata"] == {"epoch": 200}
    assert info["num_tensors"] == len(tiny_state) == 145
    assert info["num_params"] == sum(p.numel() for p in model.parameters()) == 733_345
    assert info["stored_dtypes"] == ["float16"]
    assert info["sha256"] == hashlib.sha256(CKPT.read_bytes()).hexdigest()
    assert info["time_table_max_deviation"] > 1e-3  # the fixture's table was perturbed, and is used as stored


def test_config_round_trips_and_refuses_nonsense():
    assert PaperUNetConfig.from_dict(TINY.to_dict()) == TINY
    assert json.loads(json.dumps(TINY.to_dict()))["ch_mult"] == [1, 2]
    good = TINY.to_dict()
    for change, word in [({"ch": 48}, "multiple of 32"), ({"ch_mult": []}, "ch_mult"), ({"ch_mult": [1, 0]}, "ch_mult"),
                         ({"attn_levels": [2]}, "attn_levels"), ({"attn_levels": [1, 0]}, "attn_levels"),
                         ({"resolution": 27}, "multiple of 2"), ({"num_res_blocks": 0}, "num_res_blocks"),
                         ({"dropout": 1.0}, "dropout"), ({"in_channels": True}, "in_channels"),
                         ({"heads": 4}, r"unknown fields \['heads'\]")]:
        with pytest.raises(ConfigError, match=word):
            PaperUNetConfig.from_dict({**good, **change})
    with pytest.raises(ConfigError, match=r"missing fields \['num_timesteps'\]"):
        PaperUNetConfig.from_dict({k: v for k, v in good.items() if k != "num_timesteps"})


def test_time_table_is_the_official_one():
    rows = json.loads((FIX / "layouts.json").read_text())["time_table_rows"]
    for ch, table in rows.items():
        ours = sinusoidal_table(1000, int(ch))
        for r, values in table.items():
            assert torch.allclose(ours[int(r)], torch.tensor(values), atol=1e-6, rtol=0), (ch, r)
    fresh = PaperUNet(TINY)
    assert not fresh.time_embedding.timembedding[0].weight.requires_grad
    assert torch.equal(fresh.time_embedding.timembedding[0].weight, sinusoidal_table(1000, 32))


# -- the published configurations ---------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_published_key_layouts(name):
    layout = json.loads((FIX / "layouts.json").read_text())[name]
    tensors, params, config = PUBLISHED[name]
    official = [(k, list(s)) for k, s in layout["keys"]]
    assert (layout["num_tensors"], layout["num_params"]) == (tensors, params)
    with torch.device("meta"):
        state = {k: torch.empty(s) for k, s in official}
        assert config_from_state_dict(state) == config
        ours = PaperUNet(config).state_dict()
    assert [(k, list(v.shape)) for k, v in ours.items()] == official
    assert len(ours) == tensors and sum(v.numel() for v in ours.values()) == params


def test_a_checkpoint_with_the_published_mnist_layout_loads_and_runs(tmp_path):
    layout = json.loads((FIX / "layouts.json").read_text())["28px"]
    gen = torch.Generator().manual_seed(0)
    state = {"module." + k: 0.02 * torch.randn(s, generator=gen) for k, s in layout["keys"]}
    torch.save({"epoch": 200, "model_state_dict": state, "optimizer_state_dict": {"state": {}, "param_groups": []}},
               tmp_path / "ckpt_epoch_200.pt")
    model, config, info = read_paper_checkpoint(tmp_path / "ckpt_epoch_200.pt")
    assert config == PUBLISHED["28px"][2] and info["num_params"] == 6_202_369 and info["num_tensors"] == 219
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28, generator=gen), torch.tensor([0, 999]))
    assert out.shape == (2, 1, 28, 28) and torch.isfinite(out).all()


# -- checkpoint layouts ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("layout, entry", [
    (lambda sd: sd, None),
    (lambda sd: {"module." + k: v for k, v in sd.items()}, None),
    (lambda sd: {"ema": {"module." + k: v for k, v in sd.items()}, "step": 5}, "ema"),
    (lambda sd: {"net_model": sd, "optim": {"lr": 1e-4}}, "net_model"),
    (lambda sd: {"state_dict": {"ema": {"_orig_mod." + k: v for k, v in sd.items()}}}, "state_dict.ema"),
])
def test_checkpoint_layouts_load(tmp_path, ref, tiny_state, layout, entry):
    torch.save(layout(dict(tiny_state)), tmp_path / "c.pt")
    model, config, info = read_paper_checkpoint(tmp_path / "c.pt")
    assert config == TINY and info["entry"] == entry
    assert np.abs(eps_of(model, ref) - ref["eps32"]).max() < 1e-5


def test_preferred_entry_and_explicit_entry(tmp_path, ref, tiny_state):
    broken = {k: v * 0.5 for k, v in tiny_state.items()}
    torch.save({"net_model": broken, "ema_model": dict(tiny_state)}, tmp_path / "c.pt")
    model, _, info = read_paper_checkpoint(tmp_path / "c.pt")  # EMA weights before the raw ones
    assert info["entry"] == "ema_model" and np.abs(eps_of(model, ref) - ref["eps32"]).max() < 1e-5
    model, _, info = read_paper_checkpoint(tmp_path / "c.pt", entry="net_model")
    assert info["entry"] == "net_model" and np.abs(eps_of(model, ref) - ref["eps32"]).max() > 1e-2
    with pytest.raises(ConfigError, match="no entry 'ema'"):
        read_paper_checkpoint(tmp_path / "c.pt", entry="ema")
    assert extract_state_dict({"model": {"module.a": torch.ones(1)}}) == {"a": torch.ones(1)}
    with pytest.raises(ConfigError, match="no state_dict found"):
        extract_state_dict({"epoch": 3, "weights": [1, 2]})


def test_recognition_by_key_names(tiny_state):
    assert is_paper_state_dict(tiny_state)
    assert is_paper_state_dict({"module." + k: v for k, v in tiny_state.items()})
    diffusers_like = {"conv_in.weight": torch.zeros(1), "down_blocks.0.resnets.0.conv1.weight": torch.zeros(1)}
    assert not is_paper_state_dict(diffusers_like) and not is_paper_state_dict([1, 2])
    with pytest.raises(ConfigError, match="diffusers UNet2DModel"):
        config_from_state_dict(diffusers_like)


# -- strict loading: every fault named ---------------------------------------------------------------------------


def _save(tmp_path, state):
    torch.save({"model_state_dict": state}, tmp_path / "bad.pt")
    return tmp_path / "bad.pt"


def test_missing_key_is_named(tmp_path, tiny_state):
    state = {k: v for k, v in tiny_state.items() if k != "downblocks.0.block2.3.weight"}
    with pytest.raises(ConfigError, match=r"missing keys \(1: downblocks\.0\.block2\.3\.weight\)"):
        read_paper_checkpoint(_save(tmp_path, state))
    state = {k: v for k, v in tiny_state.items() if k != "head.weight"}
    with pytest.raises(ConfigError, match="missing .*head.weight"):
        read_paper_checkpoint(_save(tmp_path, state))


def test_unexpected_key_is_named(tmp_path, tiny_state):
    state = {**tiny_state, "upblocks.1.extra.weight": torch.zeros(3)}
    with pytest.raises(ConfigError, match=r"unexpected keys \(1: upblocks\.1\.extra\.weight\)"):
        read_paper_checkpoint(_save(tmp_path, state))


def test_wrong_shape_is_named_with_both_shapes(tmp_path, tiny_state):
    state = {**tiny_state, "upblocks.0.block2.3.weight": torch.zeros(64, 64, 1, 1)}
    named = r"upblocks\.0\.block2\.3\.weight: file \(64, 64, 1, 1\), network \(64, 64, 3, 3\)"
    with pytest.raises(ConfigError, match=named):
        read_paper_checkpoint(_save(tmp_path, state))


def test_non_finite_and_non_float_weights_are_refused(tmp_path, tiny_state):
    bad = tiny_state["tail.2.bias"].clone()
    bad[0] = float("nan")
    with pytest.raises(ConfigError, match="tail.2.bias .*NaN"):
        read_paper_checkpoint(_save(tmp_path, {**tiny_state, "tail.2.bias": bad}))
    with pytest.raises(ConfigError, match="tail.2.bias .*int64"):
        read_paper_checkpoint(_save(tmp_path, {**tiny_state, "tail.2.bias": torch.zeros(1, dtype=torch.int64)}))


def test_paths_that_are_not_checkpoint_files(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        read_paper_checkpoint(tmp_path / "nope.pt")
    with pytest.raises(ConfigError, match="is a directory"):
        read_paper_checkpoint(tmp_path)
    (tmp_path / "junk.pt").write_bytes(os.urandom(1000))
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_paper_checkpoint(tmp_path / "junk.pt")
    (tmp_path / "junk.pt").write_bytes(b"PK\x03\x04" + os.urandom(1000))  # a damaged zip
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_paper_checkpoint(tmp_path / "junk.pt")
    np.save(tmp_path / "array.npy", np.zeros(3))  # another format
    with pytest.raises(ConfigError, match="not a readable PyTorch checkpoint"):
        read_paper_checkpoint(tmp_path / "array.npy")
    if hasattr(os, "mkfifo"):
        os.mkfifo(tmp_path / "fifo.pt")
        with pytest.raises(ConfigError, match="not a regular file"):
            read_paper_checkpoint(tmp_path / "fifo.pt")


# -- nothing in a file runs --------------------------------------------------------------------------------------


class _Payload:
    """Pickles as a call of builtins.exec on code that writes a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return builtins.exec, (f"open({str(self.marker)!r}, 'w').write('ran')",)


class _ShellPayload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.parametrize("zipped", [True, False])
def test_a_code_running_payload_loads_nothing_and_runs_nothing(tmp_path, tiny_state, zipped):
    marker = tmp_path / "marker"
    path = tmp_path / "evil.pt"
    torch.save({"model_state_dict": dict(tiny_state), "extra": _Payload(marker)}, path,
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(ConfigError, match=r"\((builtins\.)?exec\).*weights_only=True.*ran none of it"):
        read_paper_checkpoint(path)
    assert not marker.exists()
    # The payload is live: plain unpickling does run it (so the test above could have failed).
    torch.load(path, weights_only=False)
    assert marker.read_text() == "ran"

    shell_marker = tmp_path / "shell_marker"
    torch.save({"model_state_dict": dict(tiny_state), "x": _ShellPayload(shell_marker)}, tmp_path / "evil2.pt",
               _use_new_zipfile_serialization=zipped)
    with pytest.raises(ConfigError, match=r"(posix|nt)\.system"):
        read_paper_checkpoint(tmp_path / "evil2.pt")
    assert not shell_marker.exists()


def test_a_pickled_whole_network_is_refused_with_the_conversion(tmp_path):
    torch.save(PaperUNet(TINY), tmp_path / "whole.pt")
    named = r"localdiff\.networks\.paper_unet\.PaperUNet.*torch\.save\(m\.state_dict\(\)"
    with pytest.raises(ConfigError, match=named):
        read_paper_checkpoint(tmp_path / "whole.pt")


# -- forward-pass arguments --------------------------------------------------------------------------------------


def test_forward_checks_its_inputs(tiny, ref):
    model = tiny[0].float()
    x = torch.from_numpy(ref["x"][:2])
    with torch.no_grad():
        assert torch.equal(model(x, 999), model(x, torch.tensor([999, 999])))
        assert torch.equal(model(x, np.int64(3)), model(x, torch.tensor([3, 3])))
        assert torch.equal(model(x, torch.tensor(5)), model(x, torch.tensor([5, 5], dtype=torch.int32)))
    for bad_x, t, word in [(x, 1000, r"\[0, 999\]"), (x, -1, r"\[0, 999\]"), (x, torch.tensor([1.0, 2.0]), "integers"),
                           (x, 0.5, "int"), (x, torch.tensor([1, 2, 3]), r"shape \[2\]"),
                           (x[:, :, :27, :27], 0, "divisible by 2"), (torch.zeros(2, 3, 28, 28), 0, r"\[B, 1, H, W\]")]:
        with pytest.raises(ConfigError, match=word):
            model(bad_x, t)


# -- the paper's own sampling loop -------------------------------------------------------------------------------


class PaperUNetDenoiser:
    """The network as a localdiff denoiser ``(x_t, t) -> x0_hat`` (epsilon prediction, docs/DESIGN.md §1)."""

    shape = (1, 28, 28)
    device = torch.device("cpu")

    def __init__(self, model):
        self.model = model

    def __call__(self, x_t, t):
        with torch.no_grad():
            eps = self.model(x_t, t)
        return DEFAULT_SCHEDULE.x0_from_eps(x_t, eps, t)


def test_localdiff_ddim_gives_the_samples_of_the_paper_loop(tiny, ref):
    model = tiny[0].float()
    traj = sample(PaperUNetDenoiser(model), init_noise=torch.from_numpy(ref["init_noise"]), steps=10,
                  return_trajectory=True, progress=False)
    assert traj.timesteps == ref["timesteps"].tolist() == [900, 800, 700, 600, 500, 400, 300, 200, 100, 0]
    # The paper's loop returns the last step's x0 prediction (not the scheduler's clipped prev_sample).
    assert np.abs(traj.samples.numpy() - ref["samples"]).max() < 1e-4
    assert np.abs(traj.xt.numpy() - ref["xt_steps"]).max() < 1e-4
    # x0 predictions per step, on the scale of x_t (x0 = (x_t - sqrt(b2) eps) / a magnifies eps's round-off 1/a).
    a = np.array([DEFAULT_SCHEDULE.a(t) for t in traj.timesteps])[:, None, None, None, None]
    assert np.abs(a * (traj.x0_hat.numpy() - ref["x0_steps"])).max() < 1e-5
    # The samples are not trivial: far from the initial noise, and not the same for every start.
    assert np.abs(ref["samples"] - ref["init_noise"]).mean() > 0.3 and np.std(ref["samples"], axis=0).mean() > 0.05
