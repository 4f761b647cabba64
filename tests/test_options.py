"""Typed model options, precomputed statistics and the device resolved once on the study path."""

import sys

import numpy as np
import pytest
import torch

import localdiff.denoisers.base as base
import localdiff.study as study
from localdiff import data_spectrum, make_denoiser
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers import REGISTRY
from localdiff.denoisers.masked import MaskedConfig, MaskedDenoiser
from localdiff.denoisers.options import coerce
from localdiff.errors import ConfigError


@pytest.fixture
def toy():
    rng = np.random.default_rng(0)
    base_img = rng.integers(0, 256, size=(1, 1, 8, 8))
    x = np.clip(0.6 * base_img + rng.integers(0, 100, size=(40, 1, 8, 8)), 0, 255).astype(np.uint8)
    return ImageDataset(raw=x, name="toy")


def test_strings_are_converted_to_the_declared_types():
    pair, ints = tuple[int, int] | None, tuple[int, ...] | None
    assert coerce("2x4", pair) == (2, 4) and coerce(" 3 x 1 ", pair) == (3, 1) and coerce([2, 4], pair) == (2, 4)
    assert coerce("none", pair) is None and coerce(None, ints) is None
    assert coerce("900, 500,0", ints) == (900, 500, 0) and coerce("[900 500]", ints) == (900, 500)
    assert coerce(700, ints) == (700,) and coerce(range(3), ints) == (0, 1, 2)
    assert coerce("", ints) is None  # an empty --opt value means none
    for bad, tp in (("2by2", pair), ("2x4x5", pair), ("2,3,4", pair), ("9x", ints), ("", tuple[int, ...]),
                    ("1.5", ints)):
        with pytest.raises(ValueError):
            coerce(bad, tp)
    from typing import Literal

    assert coerce(" sym ", Literal["diag", "sym"]) == "sym"
    with pytest.raises(ValueError):
        coerce("rows", Literal["diag", "sym"])
    assert coerce("false", bool | None) is False and coerce("8", int) == 8
    with pytest.raises(TypeError):
        coerce(True, int)


def test_models_take_typed_options_or_their_strings(toy, tmp_cache):
    a = make_denoiser("masked", toy, device="cpu", tile="2x4", path="grouped", normalize="sym", tau="0.05")
    b = make_denoiser("masked", toy, device="cpu", tile=(2, 4), path="grouped", normalize="sym", tau=0.05)
    assert a.config == b.config and a.config.tile == (2, 4) and a.plan(300, 3).tile_shape == (2, 4)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a(x, 300), b(x, 300))
    assert a.settings()["tile"] == (2, 4)
    # a config built directly is checked and converted the same way
    direct = MaskedDenoiser(toy, MaskedConfig(device="cpu", tile="4x2", tau=0.05))
    assert direct.config.tile == (4, 2) and direct.plan(300, 3).tile_shape == (4, 2)
    for bad, msg in ((dict(normalize="rows"), "option normalize must be one of diag, sym, got 'rows'"),
                     (dict(tile="2by2"), "option tile must be 2 integers such as 2x4 or none"),
                     (dict(tile=(0, 2)), "tile must be two positive integers"),
                     (dict(path="fast"), "option path must be one of auto, grouped, dense")):
        with pytest.raises(ConfigError, match=msg):
            make_denoiser("masked", toy, device="cpu", **bad)
    with pytest.raises(ConfigError, match="option normalize must be one of"):
        MaskedDenoiser(toy, MaskedConfig(device="cpu", normalize="rows"))
    lin = make_denoiser("linear", toy, device="cpu", timesteps="500, 900", steps=5, batch_size=8, progress=False)
    assert lin.timesteps == (900, 500) and lin.capabilities.fitted_timesteps == (900, 500)
    assert lin.config.timesteps == (900, 500)


@pytest.mark.parametrize("name", ["wiener", "masked", "linear"])
def test_precomputed_statistics_are_used_instead_of_the_cache(name, toy, tmp_cache, monkeypatch):
    opts = {"steps": 5, "batch_size": 8, "timesteps": (500,), "progress": False} if name == "linear" else {}
    reference = make_denoiser(name, toy, device="cpu", **opts)
    spec = data_spectrum(toy, progress=False)
    module = sys.modules[REGISTRY[name].__module__]  # where the model's class reads its statistics

    def no_reading(*args, **kwargs):
        raise AssertionError("the statistics were read again")

    monkeypatch.setattr(module, "data_spectrum", no_reading)
    given = make_denoiser(name, toy, device="cpu", spectrum=spec, **opts)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    assert torch.equal(given(x, 500), reference(x, 500))
    other = data_spectrum(toy.subset(20, seed=1), progress=False)
    with pytest.raises(ConfigError, match="other data"):
        make_denoiser(name, toy, device="cpu", spectrum=other, **opts)
    make_denoiser("optimal", toy, device="cpu", spectrum=other)  # models without statistics ignore them


def test_study_resolves_the_device_once_and_hands_models_its_statistics(toy, tmp_cache, monkeypatch):
    calls = []

    def counting(resolve):
        def wrapped(device):
            calls.append(str(device))
            return resolve(device)
        return wrapped

    monkeypatch.setattr(study, "resolve_device", counting(study.resolve_device))
    monkeypatch.setattr(base, "resolve_device", counting(base.resolve_device))
    for name in ("wiener", "masked"):
        module = sys.modules[REGISTRY[name].__module__]  # where the model's class reads its statistics
        monkeypatch.setattr(module, "data_spectrum", lambda *a, **k: pytest.fail("a model re-read the statistics"))
    config = study.StudyConfig(models=("wiener", "masked", "nearest"), unet=False, num=2, steps=2, field_draws=1,
                               field_timesteps=(500,), held_out=4, device="auto")
    results = study.run_study(toy, toy, config, options={"masked": {"tau": "0.05"}}, progress=False)
    assert calls.count("auto") == 1 and set(calls) <= {"auto", "cpu"}
    assert all(run.settings["device"] == "cpu" for run in results.runs.values())
    assert results.runs["nearest"].fields is None and "piecewise constant" in results.field_skipped["nearest"]
    assert results.runs["masked"].fields.method == "closed" and results.runs["wiener"].fields is not None


def test_every_analytical_model_comes_from_the_registry():
    from localdiff.denoisers import REGISTRY

    assert study.analytical_models() == ("wiener", "optimal", "nearest", "masked", "masked-soft", "ls", "els",
                                         "els-boundary", "masked-equivariant", "wiener-quadratic", "pspc", "scfdm")
    assert all(REGISTRY[m].capabilities.trained for m in ("linear", "unet"))
    assert study.GPU.models == study.analytical_models()
