"""Adding a model means one new file and one registration line: ``tests/toy_model.py`` (written with the
public extension points only) and ``register_model(ToyDenoiser)`` (``model_table.added_models``). The
contract (``test_contract.py``), the two-process comparison (``test_distributed.py``, whose torchrun worker
registers it too) and the level-invariance test cover it through ``tests/model_table.py`` without an entry
there; here it is checked against an independent reference and run through a study."""

import numpy as np
import pytest
import torch

import model_table
from localdiff import make_denoiser, sample
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers import REGISTRY
from localdiff.errors import ConfigError
from localdiff.study import StudyConfig, analytical_models, run_study
from toy_model import ToyDenoiser


@pytest.fixture(scope="module")
def added_models():
    with model_table.added_models():
        yield


def blob_set(num: int, seed: int = 0) -> ImageDataset:
    """uint8 1x6x6 images: a shared pattern, a bright square in half of them, noise."""
    rng = np.random.default_rng(seed)
    x = 0.5 * rng.integers(0, 256, size=(1, 1, 6, 6)) + rng.integers(0, 128, size=(num, 1, 6, 6))
    x[: num // 2, :, 1:4, 2:5] += 90
    return ImageDataset(raw=np.clip(x, 0, 255).astype(np.uint8), name=f"toy-{num}-{seed}")


def test_every_table_driven_test_covers_the_toy_without_an_entry_and_the_registry_is_left_clean(added_models):
    assert REGISTRY["toy"] is ToyDenoiser and "toy" not in model_table.TABLE  # tested with its defaults
    assert "toy" in model_table.labels() and "toy" in model_table.labels("torchrun")
    assert "toy" in analytical_models()  # a registered model is one of "every analytical model"


def test_added_models_leave_the_registry_as_they_found_it(monkeypatch):
    """What the other tests see is localdiff's registry: a model the tests add is registered only inside
    ``added_models()``, and one registered already stays registered."""

    class Another(ToyDenoiser):
        name = "toy-another"

    monkeypatch.setattr(model_table, "ADDED", (Another, ToyDenoiser))
    before = dict(REGISTRY)
    with model_table.added_models():
        assert REGISTRY["toy-another"] is Another and REGISTRY["toy"] is ToyDenoiser
        with model_table.added_models():  # nested: nothing new to add, nothing removed on leaving
            pass
        assert REGISTRY["toy-another"] is Another
    assert REGISTRY == before


def test_the_toy_equals_a_dense_float64_reference_and_is_optimal_at_temperature_one(added_models):
    """x0_hat = sum_k softmax_k(-||x_t - a y_k||^2 / (2 b2 T)) y_k computed in one dense step, and its
    Jacobian (a / (b2 T)) Cov_w(y) computed from those weights; at T = 1 the toy is the optimal denoiser."""
    data = blob_set(40)
    y = data.tensor(dtype=torch.float64).reshape(40, -1)  # [K, n]
    x = torch.randn(3, 1, 6, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    for T in (0.5, 2.0, 7.0):
        den = make_denoiser("toy", data, device="cpu", temperature=T, chunk=7)  # several blocks
        for t in (900, 400, 50):
            lv = den.schedule.at(t)
            w = torch.softmax(-((x.reshape(3, 1, -1) - lv.a * y) ** 2).sum(-1) / (2 * lv.b2 * T), dim=1)  # [B, K]
            ref = w @ y  # [B, n]
            torch.testing.assert_close(den(x, t).reshape(3, -1), ref, atol=1e-12, rtol=1e-10)
            index = torch.tensor([0, 14, 35])
            cov = torch.einsum("bk,kq,kn->bqn", w, y[:, index], y) - ref[:, index, None] * ref[:, None, :]
            torch.testing.assert_close(den.jacobian_rows(x, t, index), (lv.a / (lv.b2 * T)) * cov,
                                       atol=1e-12, rtol=1e-9)
    one, optimal = make_denoiser("toy", data, temperature=1.0), make_denoiser("optimal", data)
    torch.testing.assert_close(one(x, 300), optimal(x, 300), atol=1e-12, rtol=0)
    assert (make_denoiser("toy", data)(x, 300) - optimal(x, 300)).abs().max() > 1e-3  # T = 2 differs


def test_bad_toy_options_are_clear_errors(added_models):
    data = blob_set(4)
    for bad in (0, -1.0, float("nan"), float("inf")):
        with pytest.raises(ConfigError, match="temperature must be a positive number"):
            make_denoiser("toy", data, temperature=bad)
    with pytest.raises(ConfigError, match="temprature"):
        make_denoiser("toy", data, temprature=2.0)


def test_a_study_runs_the_toy_like_any_model(added_models, tmp_cache):
    """run_study with the toy among the models: its samples are the ones sampling it directly from the
    study's initial noise on the study's grid gives, with closed-form sensitivity fields."""
    data, held_out = blob_set(30), blob_set(8, seed=1)
    config = StudyConfig(models=("toy", "wiener"), unet=False, num=3, steps=4, field_draws=1,
                         field_timesteps=(500,), held_out=4, reference_check=0, device="cpu")
    results = run_study(data, held_out, config, options={"toy": {"temperature": "3"}}, progress=False)
    run = results.runs["toy"]
    assert results.compared == ["toy", "wiener"]
    assert run.settings["model"] == "toy" and run.settings["temperature"] == 3.0
    direct = sample(make_denoiser("toy", data, device="cpu", temperature=3.0), init_noise=results.init_noise,
                    grid=results.grid, progress=False)
    torch.testing.assert_close(run.samples, direct, atol=0, rtol=0)
    assert run.fields is not None and run.fields.method == "closed" and torch.isfinite(run.fields.mean).all()
    assert run.nearest is not None and "toy" not in results.field_skipped
    assert (run.samples - results.runs["wiener"].samples).abs().max() > 1e-3
