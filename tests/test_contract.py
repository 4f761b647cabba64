"""The contract every registered denoiser meets, checked for each one (test ids name the model or variant
and the device).

The models and their options come from the one table, ``tests/model_table.py``: every registered model
(and ``toy``, added by the tests the way a user adds one) is built on a small set of 8x8 images with its
fast options, and so is each of its variants; a model not in the table is built with its defaults. What
the built model declares in ``capabilities`` decides which mathematical checks apply: closed-form
Jacobians against autograd, batch independence (sensitivity fields replicate batches), piecewise
constancy, the timesteps it was fitted for, and returning the training image when the training set is
that one image. Every check runs on the CPU and, where there is one, on a CUDA device, where the
outputs must also equal the CPU's (docs/STYLE.md principle 7).
"""

import dataclasses
import json
import time

import numpy as np
import pytest
import torch

import model_table
from localdiff import make_denoiser
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers import REGISTRY, Capabilities
from localdiff.denoisers.options import parse_options
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError

from conftest import save_tiny_unet

LABELS = model_table.labels()  # every variant of every covered model
SHAPE = (1, 8, 8)
CUDA = pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device"))
DEVICES = ["cpu", CUDA]
BUILD_BUDGET_S = 20.0  # building a model on the 30 contract images (0.01-2.5 s today on two busy CPU cores)


@pytest.fixture(scope="module", autouse=True)
def added_models():
    with model_table.added_models():
        yield


def smooth_set(num: int, seed: int = 0) -> ImageDataset:
    """uint8 8x8 images of blurred noise (correlated neighbours, every pixel varying)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(num, 12, 12))
    k = np.exp(-0.5 * (np.arange(-2, 3) / 1.2) ** 2)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 1, z)
    z = np.apply_along_axis(lambda v: np.convolve(v, k, "valid"), 2, z)
    img = np.clip(127.5 + 60 * z / z.std(), 0, 255).astype(np.uint8)
    return ImageDataset(raw=img[:, None], name=f"contract-{num}-{seed}")


@pytest.fixture(scope="module")
def unet_dir(tmp_path_factory):
    return save_tiny_unet(tmp_path_factory.mktemp("contract") / "unet", 8)


def build(label, data, unet_dir, device="cpu"):
    v = model_table.variant(label)
    return make_denoiser(v.model, data, device=device, **v.build_options(unet_dir))


@pytest.fixture(scope="module")
def models(unet_dir):
    """Each variant built once per device on the same 30 images (lazily, so a failing build fails only its
    own tests); ``models.seconds`` records how long each build took."""
    data, cache, seconds = smooth_set(30), {}, {}

    def get(label, device="cpu"):
        if (label, device) not in cache:
            start = time.perf_counter()
            cache[label, device] = build(label, data, unet_dir, device)
            seconds[label, device] = time.perf_counter() - start
        return cache[label, device]

    get.seconds = seconds
    return get


def inputs(t: int, num: int = 4, dtype=torch.float64, seed: int = 0, device="cpu") -> torch.Tensor:
    """x_t from the forward process on images like the training set's (not the same ones)."""
    x0 = smooth_set(num, seed=100 + seed).tensor(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return S.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=dtype)).to(device)


def timesteps(den, wanted=(999, 500, 0)):
    fitted = den.capabilities.fitted_timesteps
    return [t for t in wanted if fitted is None or t in fitted]


# -- the table itself --------------------------------------------------------------------------------------

def test_the_table_covers_every_registered_model_and_names_only_real_options():
    """Every registered model has at least its default variant; every entry names a registered model, its
    options are fields of the model's Config and what it declares are Capabilities fields."""
    from localdiff.denoisers.registry import MODELS

    covered = {model_table.variant(label).model for label in LABELS}
    assert covered == set(REGISTRY) | {cls.name for cls in model_table.ADDED}
    assert set(model_table.TABLE) <= {cls.name for cls in MODELS}, "an entry names no registered model"
    assert not set(model_table.TABLE) & {cls.name for cls in model_table.ADDED}  # the toy runs on its defaults
    assert len(set(LABELS)) == len(LABELS)
    caps = {f.name for f in dataclasses.fields(Capabilities)}
    for v in model_table.variants():
        assert set(v.declares) <= caps, v.label
        parse_options(model_table.model_class(v.model).Config, v.build_options("unet-dir"), model=v.model)


@pytest.mark.parametrize("label", LABELS)
def test_is_practical_to_test(label, models):
    """A model whose defaults are too slow for these tests needs faster options in tests/model_table.py."""
    models(label)
    took = models.seconds[label, "cpu"]
    listed = model_table.variant(label).model in model_table.TABLE
    assert took < BUILD_BUDGET_S, (f"building {label} on 30 8x8 images took {took:.1f} s; "
                                   + ("make its options in" if listed else "give it fast options in")
                                   + " tests/model_table.py faster")


# -- the contract ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_declares_its_capabilities(label, device, models):
    v = model_table.variant(label)
    den = models(label, device)
    cls_caps = model_table.model_class(v.model).capabilities
    assert isinstance(cls_caps, Capabilities)  # class-level declaration (the study reads it)
    caps = den.capabilities
    assert isinstance(caps, Capabilities) and den.name == v.model
    # what the options change, and nothing else (the table says what; a model that drops a guarantee
    # for some options must say so per instance)
    assert caps == dataclasses.replace(cls_caps, **v.declares)
    if caps.fitted_timesteps is not None:
        assert caps.fitted_timesteps and all(0 <= t < S.num_train_timesteps for t in caps.fitted_timesteps)
    if caps.piecewise_constant:
        assert not caps.closed_form_jacobian
    settings = json.loads(json.dumps(den.settings(), default=str))
    assert settings["model"] == v.model and settings["device"] == device and den.device.type == device


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_keeps_shape_dtype_and_device_and_is_deterministic(label, device, models):
    den = models(label, device)
    for t in timesteps(den):
        for dtype in (torch.float32, torch.float64):
            x = inputs(t, dtype=dtype, device=device)
            out = den(x, t)
            assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
            assert torch.equal(den(x, t), out)  # the same input gives the same output


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_outputs_are_finite_at_both_ends_of_the_schedule(label, device, models):
    den = models(label, device)
    for t in timesteps(den, (999, 0)):
        assert torch.isfinite(den(inputs(t, device=device), t)).all()
        assert torch.isfinite(den(10 * inputs(t, seed=1, device=device), t)).all()  # far from every training image


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_batch_independence(label, device, models):
    """Each output depends on its own input only: any split, order or replication of a batch gives the
    same outputs (sensitivity fields replicate the batch once per Jacobian row)."""
    den = models(label, device)
    if not den.capabilities.batch_independent:
        pytest.skip(f"{label} declares that its outputs depend on the whole batch")
    for t in timesteps(den, (900, 100)):
        x = inputs(t, num=5, device=device)
        full = den(x, t)
        tol = dict(atol=1e-4, rtol=1e-4)  # float32 products may round differently at another batch size
        torch.testing.assert_close(torch.cat([den(x[i:i + 1], t) for i in range(5)]), full, **tol)
        perm = torch.tensor([3, 0, 4, 2, 1], device=device)
        torch.testing.assert_close(den(x[perm], t), full[perm], **tol)
        torch.testing.assert_close(den(torch.cat([x[:2], x[:2], x[:2]]), t), full[:2].repeat(3, 1, 1, 1), **tol)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_timesteps_are_validated(label, device, models):
    den = models(label, device)
    x = inputs(500, device=device)
    for bad in (-1, 1000, 1e6, 2.5, 499.5):  # out of range, or not an integer
        with pytest.raises(ConfigError):
            den(x, bad)
    fitted = den.capabilities.fitted_timesteps
    if fitted is not None:  # a model fitted at some timesteps refuses the others
        other = next(t for t in (998, 501, 1) if t not in fitted)
        with pytest.raises(ConfigError):
            den(x, other)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_closed_form_jacobian_equals_autograd(label, device, models):
    den = models(label, device)
    caps = den.capabilities
    index = torch.tensor([0, 9, 27, 36, 63])
    if not caps.closed_form_jacobian:
        with pytest.raises(ConfigError):
            den.jacobian_rows(inputs(500, num=1, device=device), 500, index)
        return
    tol = dict(atol=1e-8, rtol=1e-6) if model_table.variant(label).dtype == "float64" else dict(atol=1e-6, rtol=1e-4)
    dtypes = set()
    for t in timesteps(den, (900, 500, 0)):
        x = inputs(t, num=2, device=device)
        rows = den.jacobian_rows(x, t, index)  # [B, Q, n]
        assert rows.shape == (2, len(index), 64)
        dtypes.add(rows.dtype)
        for b in range(2):
            J = torch.autograd.functional.jacobian(lambda v: den(v, t).reshape(-1), x[b:b + 1]).reshape(64, 64)
            torch.testing.assert_close(rows[b].cpu().double(), J[index].cpu(), **tol)
        if caps.constant_jacobian:
            torch.testing.assert_close(den.jacobian_rows(inputs(t, num=1, seed=7, device=device), t, index)[0], rows[0],
                                       atol=1e-12, rtol=0)
    assert dtypes == {torch.float64}  # Denoiser.jacobian_rows: [B, Q, n] float64, whatever the arithmetic


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_differentiable_unless_piecewise_constant(label, device, models):
    den = models(label, device)
    t = timesteps(den, (500,))[0] if timesteps(den, (500,)) else den.capabilities.fitted_timesteps[0]
    x = inputs(t, num=2, device=device)
    if den.capabilities.piecewise_constant:  # a small move of x_t leaves the output where it was
        torch.testing.assert_close(den(x + 1e-6 * torch.randn_like(x), t), den(x, t), atol=0, rtol=0)
        return
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(den(xg, t)[:, 0, 3, 4].sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("label", LABELS)
def test_one_image_training_set_returns_that_image(label, device, unet_dir):
    v = model_table.variant(label)
    if not model_table.model_class(v.model).capabilities.single_image_exact:
        pytest.skip(f"{v.model} does not reduce to its training image (not its mathematics)")
    data = smooth_set(1, seed=5)
    den = build(label, data, unet_dir, device)
    if not den.capabilities.single_image_exact:
        pytest.skip(f"{label} with these options does not reduce to its training image")
    image = data[0].double().to(device)
    for t in timesteps(den, (999, 500, 0)):
        x = 3 * inputs(t, num=3, device=device)
        torch.testing.assert_close(den(x, t), image.expand(3, *SHAPE), atol=1e-6, rtol=0)


@pytest.fixture
def no_tf32():
    """Full float32 products on the GPU while a test compares with the CPU (cuDNN convolutions default to TF32)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


@pytest.mark.parametrize("device", [CUDA])
@pytest.mark.parametrize("label", LABELS)
def test_the_gpu_gives_the_cpus_outputs(label, device, models, no_tf32):
    """The same model on the GPU and on the CPU: x0_hat, and closed-form Jacobian rows where declared, equal
    to float round-off (1e-9 in float64 arithmetic, 1e-4 in float32)."""
    cpu, gpu = models(label, "cpu"), models(label, device)
    tol = 1e-4 if model_table.variant(label).dtype != "float64" else 1e-9
    for t in timesteps(cpu, (900, 500, 100)):
        x = inputs(t, num=3)
        torch.testing.assert_close(gpu(x.to(device), t).cpu(), cpu(x, t), atol=tol, rtol=tol)
        if cpu.capabilities.closed_form_jacobian:
            index = torch.tensor([0, 27, 63])
            torch.testing.assert_close(gpu.jacobian_rows(x.to(device), t, index).cpu(), cpu.jacobian_rows(x, t, index),
                                       atol=tol, rtol=tol)
