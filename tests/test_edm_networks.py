"""EDM's networks (issue 21 item 4): localdiff's SongUNet / DhariwalUNet and the four preconditionings give
EDM's own D(x; sigma) on networks made by NVlabs/edm's code (tests/fixtures/edm, made by
scripts/fixtures/make_edm_fixtures.py), and the preconditioning coefficients are the EDM paper's Table 1.

Tolerance: rtol = atol = 1e-5. On the machine that made the fixtures the outputs are bit-identical (same
operations in the same order); the tolerance leaves room for other CPUs' BLAS, relative because a random
network's D at sigma = 80 reaches a few hundred.
"""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from localdiff.errors import ConfigError
from localdiff.networks.edm import (EDMNetwork, edm_network_from_parts, infer_precond, load_edm_network,
                                    network_record, read_edm_snapshot)

FIXTURES = Path(__file__).parent / "fixtures" / "edm"
NETWORKS = {"vp_ddpmpp": ("VPPrecond", "SongUNet"), "ve_ncsnpp": ("VEPrecond", "SongUNet"),
            "iddpm_adm": ("iDDPMPrecond", "DhariwalUNet"), "edm_songskip": ("EDMPrecond", "SongUNet")}


def fixture_io(name):
    z = np.load(FIXTURES / f"{name}.npz")
    return {k: torch.from_numpy(z[k]) for k in z.files}


def assert_matches(net, io):
    labels = io["labels"] if io["labels"].shape[1] else None
    with torch.no_grad():
        d = net(io["x"], io["sigma"], labels)
        assert d.dtype == torch.float32 and d.shape == io["x"].shape
        torch.testing.assert_close(d, io["D"], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(net(io["x"], io["sigma_scalar"], labels), io["D_scalar"], rtol=1e-5, atol=1e-5)
        if "D_nolabels" in io:
            torch.testing.assert_close(net(io["x"], io["sigma"], None), io["D_nolabels"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name", NETWORKS)
def test_torch_kwargs_file_gives_edms_denoiser(name):
    net, info = load_edm_network(FIXTURES / f"{name}.pt")
    assert (net.class_name, net.architecture) == NETWORKS[name]
    assert info["format"] == "torch-kwargs" and info["class_name"] == NETWORKS[name][0]
    meta = torch.load(FIXTURES / f"{name}.pt", weights_only=True)["meta"]
    assert net.sigma_min == meta["sigma_min"] and net.sigma_max == meta["sigma_max"]  # EDM's own float32 values
    assert info["num_params"] == sum(p.numel() for p in net.parameters())
    assert_matches(net, fixture_io(name))


def test_a_kwargs_file_in_torchs_legacy_format_loads_too(tmp_path):
    blob = torch.load(FIXTURES / "ve_ncsnpp.pt", weights_only=True)
    torch.save(blob, tmp_path / "legacy.pt", _use_new_zipfile_serialization=False)
    net, info = load_edm_network(tmp_path / "legacy.pt")
    assert info["format"] == "torch-kwargs" and net.class_name == "VEPrecond"
    assert_matches(net, fixture_io("ve_ncsnpp"))


def test_the_outputs_depend_on_every_input():
    """The fixtures are sensitive: other labels, other weights or another sigma change D."""
    net, _ = load_edm_network(FIXTURES / "edm_songskip.pt")
    io = fixture_io("edm_songskip")
    with torch.no_grad():
        d = net(io["x"], io["sigma"], io["labels"])
        assert (d - net(io["x"], io["sigma"], io["labels"].roll(1, dims=1))).abs().max() > 1e-3
        assert (d - net(io["x"], io["sigma"] * 1.01, io["labels"])).abs().max() > 1e-3
        net.model.dec["16x16_aux_conv"].weight.mul_(1.01)
        assert (d - net(io["x"], io["sigma"], io["labels"])).abs().max() > 1e-4


def test_iddpm_rounds_sigma_to_its_table_as_edm_does():
    net, _ = load_edm_network(FIXTURES / "iddpm_adm.pt")
    io = fixture_io("iddpm_adm")
    out = net.round_sigma(io["round_in"])
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, io["round_out"], rtol=0, atol=0)
    table = net.discrete_sigmas
    assert table.dtype == torch.float64 and table.shape == (1000,) and (table.diff() > 0).all()
    assert table[0] == net.sigma_min and table[-1] == net.sigma_max
    r = net.round_sigma(torch.tensor([1.0], dtype=torch.float64))
    assert r.item() != 1.0 and r.item() in set(table.tolist())
    plain, _ = load_edm_network(FIXTURES / "vp_ddpmpp.pt")
    assert plain.discrete_sigmas is None and torch.equal(plain.round_sigma(torch.tensor([0.123])), torch.tensor([0.123]))


# -- Table 1 of the EDM paper, written out independently in float64 ------------------------------------


def table1(precond, sigma, h, u=None):
    """(c_skip, c_out, c_in, c_noise) from the paper's Table 1 (sigma a float64 array)."""
    if precond == "vp":
        t = (np.sqrt(h["beta_min"] ** 2 + 2 * h["beta_d"] * np.log(sigma ** 2 + 1)) - h["beta_min"]) / h["beta_d"]
        return np.ones_like(sigma), -sigma, 1 / np.sqrt(sigma ** 2 + 1), (h["M"] - 1) * t
    if precond == "ve":
        return np.ones_like(sigma), sigma, np.ones_like(sigma), np.log(sigma / 2)
    if precond == "iddpm":
        j = np.abs(u[None, :] - sigma[:, None]).argmin(1)
        return np.ones_like(sigma), -sigma, 1 / np.sqrt(sigma ** 2 + 1), h["M"] - 1 - j
    sd = h["sigma_data"]
    norm = np.sqrt(sigma ** 2 + sd ** 2)
    return sd ** 2 / norm ** 2, sigma * sd / norm, 1 / norm, np.log(sigma) / 4


def iddpm_table64(M=1000, C_1=0.001, C_2=0.008):
    """u_M = 0, u_{j-1} = sqrt((u_j^2 + 1) / max(abar(j-1)/abar(j), C_1) - 1), abar(j) = sin^2(pi j / (2 M (C_2 + 1)))."""
    abar = np.sin(0.5 * np.pi * np.arange(M + 1) / M / (C_2 + 1)) ** 2
    u = np.zeros(M + 1)
    for j in range(M, 0, -1):
        u[j - 1] = np.sqrt((u[j] ** 2 + 1) / max(abar[j - 1] / abar[j], C_1) - 1)
    return u


SIGMAS = np.array([0.002, 0.0137, 0.2, 0.5, 1.0, 3.3, 20.0, 80.0])


@pytest.mark.parametrize("precond,hyper", [
    ("vp", dict(beta_d=19.9, beta_min=0.1, M=1000)), ("vp", dict(beta_d=12.0, beta_min=0.3, M=500)),
    ("ve", {}), ("edm", dict(sigma_data=0.5)), ("edm", dict(sigma_data=0.25)), ("iddpm", dict(M=1000))])
def test_coefficients_are_table_1(precond, hyper):
    kwargs = dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1], num_blocks=1,
                  attn_resolutions=[], **hyper)
    if precond == "iddpm":
        kwargs["model_type"] = "SongUNet"
    net = EDMNetwork(precond, kwargs)
    got = [c.double().numpy() for c in net.coefficients(torch.tensor(SIGMAS))]
    u = iddpm_table64() if precond == "iddpm" else None
    if u is not None:  # EDM runs the recursion in float32: 5e-4 relative from the float64 one at the low end
        np.testing.assert_allclose(net.u.double().numpy(), u, rtol=1e-3, atol=1e-7)
        np.testing.assert_allclose(net.u.double().numpy()[:900], u[:900], rtol=2e-5)
    # VP's c_noise takes log(1 + sigma^2) in float32, as EDM does: near sigma = 0.002 that loses 1e-3 absolute
    noise_atol = 1.5e-3 if precond == "vp" else 1e-4
    for name, mine, ref in zip(("c_skip", "c_out", "c_in", "c_noise"), got, table1(precond, SIGMAS, hyper, u)):
        np.testing.assert_allclose(mine, ref, rtol=2e-6, atol=2e-6 if name != "c_noise" else noise_atol, err_msg=name)
    if precond == "vp":  # the VP noise label is (M-1) t with sigma(t) = sigma: round trip through the forward map
        t = got[3] / (hyper["M"] - 1)
        s = np.sqrt(np.exp(0.5 * hyper["beta_d"] * t ** 2 + hyper["beta_min"] * t) - 1)
        np.testing.assert_allclose(s, SIGMAS, rtol=2e-2)


def test_ve_and_edm_ranges_and_vp_float32_range():
    assert EDMNetwork("ve", dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1])).sigma_max == 100.0
    edm = EDMNetwork("EDMPrecond", dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1],
                                        model_type="SongUNet"))
    assert edm.sigma_min == 0.0 and math.isinf(edm.sigma_max) and edm.sigma_data == 0.5
    vp = EDMNetwork("training.networks.VPPrecond",
                    dict(img_resolution=8, img_channels=1, model_channels=8, channel_mult=[1]))
    # EDM evaluates sigma(epsilon_t = 1e-5) in float32: 9.77e-4, not the exact 3.16e-3; localdiff reports EDM's value
    assert vp.sigma_min == pytest.approx(0.0009765625) and vp.sigma_max == pytest.approx(152.16697, rel=1e-6)


# -- the pickle, the record, and what goes wrong -----------------------------------------------------------


def test_snapshot_pickle_gives_the_same_network_as_its_kwargs_file():
    net, info = load_edm_network(FIXTURES / "snapshot_vp.pkl")
    assert info["format"] == "edm-pickle" and info["key"] == "ema" and net.class_name == "VPPrecond"
    assert info["snapshot"]["loss_fn"]["class_name"] == "VPLoss"
    assert info["snapshot"]["augment_pipe"] is None and info["snapshot"]["dataset_kwargs"]["use_labels"] is False
    assert info["source_known"] is False  # the fixture's embedded source is a placeholder, not EDM's file
    assert {"VPPrecond", "SongUNet", "UNetBlock", "Conv2d"} <= set(info["classes"])
    assert_matches(net, fixture_io("vp_ddpmpp"))
    ref = torch.load(FIXTURES / "vp_ddpmpp.pt", weights_only=True)
    parts = read_edm_snapshot(FIXTURES / "snapshot_vp.pkl").networks["ema"]
    assert parts.init_kwargs == ref["init_kwargs"]
    assert sorted(parts.state_dict) == sorted(ref["state_dict"])
    assert all(torch.equal(parts.state_dict[k], ref["state_dict"][k]) for k in parts.state_dict)


@pytest.mark.parametrize("name", ["iddpm_adm", "edm_songskip"])
def test_record_round_trip_through_safetensors(tmp_path, name):
    net, _ = load_edm_network(FIXTURES / f"{name}.pt")
    config, state = network_record(net)
    json.dumps(config)
    (tmp_path / "net.json").write_text(json.dumps(config))
    save_file(state, str(tmp_path / "net.safetensors"))
    again, info = load_edm_network(tmp_path / "net.safetensors")
    assert info["format"] == "localdiff-safetensors" and again.class_name == net.class_name
    assert_matches(again, fixture_io(name))
    assert config["num_params"] == info["num_params"] and config["sigma_max"] == net.sigma_max


def test_missing_unexpected_and_misshapen_keys_are_named(tmp_path):
    blob = torch.load(FIXTURES / "vp_ddpmpp.pt", weights_only=True)
    sd = dict(blob["state_dict"])
    del sd["model.enc.8x8_block0.conv1.weight"]
    sd["model.extra.weight"] = torch.zeros(3)
    sd["model.map_layer0.bias"] = torch.zeros(5)
    with pytest.raises(ConfigError, match=r"1 missing: model\.enc\.8x8_block0\.conv1\.weight; 1 unexpected: "
                                          r"model\.extra\.weight; 1 mismatched: model\.map_layer0\.bias \(5,\) "
                                          r"\(expected \(32,\)\)"):
        edm_network_from_parts(blob["init_kwargs"], sd, "VPPrecond")
    torch.save({**blob, "state_dict": {k: v for k, v in blob["state_dict"].items() if k != "model.map_layer1.bias"}},
               tmp_path / "cut.pt")
    with pytest.raises(ConfigError, match=r"missing: model\.map_layer1\.bias"):
        load_edm_network(tmp_path / "cut.pt")


def test_bad_keyword_arguments_are_named():
    with pytest.raises(ConfigError, match=r"does not take \['channel_mults'\]"):
        EDMNetwork("vp", dict(img_resolution=8, img_channels=1, channel_mults=[1]))
    with pytest.raises(ConfigError, match=r"unknown EDM model_type 'UNet2D'"):
        EDMNetwork("vp", dict(img_resolution=8, img_channels=1, model_type="UNet2D"))
    with pytest.raises(ConfigError, match=r"unknown EDM preconditioning class 'Precond'"):
        EDMNetwork("Precond", dict(img_resolution=8, img_channels=1))
    with pytest.raises(ConfigError, match=r"lack 'img_channels'"):
        EDMNetwork("edm", dict(img_resolution=8))


def test_preconditioning_of_a_kwargs_file_is_inferred_or_refused(tmp_path):
    """The converter's file records no class: u, class-specific kwargs, then meta's sigma range decide."""
    vp = torch.load(FIXTURES / "vp_ddpmpp.pt", weights_only=True)
    ve = torch.load(FIXTURES / "ve_ncsnpp.pt", weights_only=True)
    assert infer_precond(vp["init_kwargs"], vp["state_dict"], vp["meta"])[0] == "vp"
    assert infer_precond(ve["init_kwargs"], ve["state_dict"], ve["meta"])[0] == "ve"
    assert infer_precond({**ve["init_kwargs"], "beta_d": 19.9}, {}, {})[0] == "vp"
    assert infer_precond(ve["init_kwargs"], {}, {})[0] == "edm"  # no evidence: the converter's loader's choice
    assert infer_precond(ve["init_kwargs"], {}, {**ve["meta"], "class_name": "EDMPrecond"})[0] == "edm"
    with pytest.raises(ConfigError, match="fits none of"):
        infer_precond(ve["init_kwargs"], {}, {"sigma_min": 0.5, "sigma_max": 7.0})
    torch.save(vp, tmp_path / "vp.pt")
    with pytest.raises(ConfigError, match=r"meta says sigma_min=.* pass precond"):
        load_edm_network(tmp_path / "vp.pt", precond="edm")
    torch.save({"state_dict": vp["state_dict"]}, tmp_path / "bare.pt")
    with pytest.raises(ConfigError, match=r"not an EDM network record: it holds \['state_dict'\]"):
        load_edm_network(tmp_path / "bare.pt")


def test_a_fresh_network_broadcasts_one_sigma_like_a_batch_of_them():
    torch.manual_seed(0)
    net = EDMNetwork("edm", dict(img_resolution=8, img_channels=2, label_dim=3, model_type="DhariwalUNet",
                                 model_channels=16, channel_mult=[1, 4], num_blocks=1, attn_resolutions=[4])).eval()
    x, labels = torch.randn(3, 2, 8, 8), torch.eye(3)
    with torch.no_grad():
        one = net(x, torch.tensor(0.7), labels)
        many = net(x, torch.full((3,), 0.7), labels)
        assert torch.allclose(one, many, atol=1e-6) and one.shape == x.shape
        with pytest.raises(ConfigError, match="2 noise levels for a batch of 3"):
            net(x, torch.ones(2), labels)
        with pytest.raises(ConfigError, match=r"class labels of shape \(3,\); this network takes one-hot labels \[B, 3\]"):
            net(x, torch.ones(3), torch.tensor([0, 1, 2]))
