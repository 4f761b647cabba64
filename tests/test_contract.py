"""The contract every registered denoiser meets, checked for each one (test ids name the model).

A new model gets these checks by registering: it is built with its default options (or the faster
ones in ``FAST``) on a small set of 8x8 images, and what it declares in ``capabilities`` decides which
mathematical checks apply: closed-form Jacobians against autograd, batch independence (sensitivity
fields replicate batches), piecewise constancy, the timesteps it was fitted for, and returning the
training image when the training set is that one image.
"""

import json

import numpy as np
import pytest
import torch

from localdiff import available_models, make_denoiser
from localdiff.data.dataset import ImageDataset
from localdiff.denoisers import REGISTRY, Capabilities
from localdiff.diffusion import DEFAULT_SCHEDULE as S
from localdiff.errors import ConfigError

from conftest import save_tiny_unet

MODELS = available_models()
SHAPE = (1, 8, 8)
# faster settings for the tests; a model not listed here is tested with its defaults
FAST = {
    "linear": {"steps": 40, "batch_size": 16, "timesteps": (999, 500, 0), "progress": False},
    "ls": {"patch_size": 3}, "els": {"patch_size": 3}, "els-boundary": {"patch_size": 3}, "pspc": {"patch_size": 3},
    "scfdm": {"num_samples": 4},
}


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


def build(name, data, unet_dir):
    opts = dict(FAST.get(name, {}))
    if name == "unet":
        opts["path"] = str(unet_dir)
    return make_denoiser(name, data, device="cpu", **opts)


@pytest.fixture(scope="module")
def models(unet_dir):
    """Each model built once on the same 30 images (lazily, so a failing build fails only its own tests)."""
    data, cache = smooth_set(30), {}

    def get(name):
        if name not in cache:
            cache[name] = build(name, data, unet_dir)
        return cache[name]

    return get


def inputs(t: int, num: int = 4, dtype=torch.float64, seed: int = 0) -> torch.Tensor:
    """x_t from the forward process on images like the training set's (not the same ones)."""
    x0 = smooth_set(num, seed=100 + seed).tensor(dtype=dtype)
    g = torch.Generator().manual_seed(seed)
    return S.q_sample(x0, t, torch.randn(x0.shape, generator=g, dtype=dtype))


def timesteps(den, wanted=(999, 500, 0)):
    fitted = den.capabilities.fitted_timesteps
    return [t for t in wanted if fitted is None or t in fitted]


@pytest.mark.parametrize("name", MODELS)
def test_declares_its_capabilities(name, models):
    den = models(name)
    assert isinstance(REGISTRY[name].capabilities, Capabilities)  # class-level declaration (the study reads it)
    caps = den.capabilities
    assert isinstance(caps, Capabilities) and den.name == name
    if caps.fitted_timesteps is not None:
        assert caps.fitted_timesteps and all(0 <= t < S.num_train_timesteps for t in caps.fitted_timesteps)
    if caps.piecewise_constant:
        assert not caps.closed_form_jacobian
    settings = json.loads(json.dumps(den.settings(), default=str))
    assert settings["model"] == name and settings["device"] == "cpu"


@pytest.mark.parametrize("name", MODELS)
def test_keeps_shape_dtype_and_device_and_is_deterministic(name, models):
    den = models(name)
    for t in timesteps(den):
        for dtype in (torch.float32, torch.float64):
            x = inputs(t, dtype=dtype)
            out = den(x, t)
            assert out.shape == x.shape and out.dtype == dtype and out.device == x.device
            assert torch.equal(den(x, t), out)  # the same input gives the same output


@pytest.mark.parametrize("name", MODELS)
def test_outputs_are_finite_at_both_ends_of_the_schedule(name, models):
    den = models(name)
    for t in timesteps(den, (999, 0)):
        assert torch.isfinite(den(inputs(t), t)).all()
        assert torch.isfinite(den(10 * inputs(t, seed=1), t)).all()  # far from every training image


@pytest.mark.parametrize("name", MODELS)
def test_batch_independence(name, models):
    """Each output depends on its own input only: any split, order or replication of a batch gives the
    same outputs (sensitivity fields replicate the batch once per Jacobian row)."""
    den = models(name)
    if not den.capabilities.batch_independent:
        pytest.skip(f"{name} declares that its outputs depend on the whole batch")
    for t in timesteps(den, (900, 100)):
        x = inputs(t, num=5)
        full = den(x, t)
        tol = dict(atol=1e-4, rtol=1e-4)  # float32 products may round differently at another batch size
        torch.testing.assert_close(torch.cat([den(x[i:i + 1], t) for i in range(5)]), full, **tol)
        perm = torch.tensor([3, 0, 4, 2, 1])
        torch.testing.assert_close(den(x[perm], t), full[perm], **tol)
        torch.testing.assert_close(den(torch.cat([x[:2], x[:2], x[:2]]), t), full[:2].repeat(3, 1, 1, 1), **tol)


@pytest.mark.parametrize("name", MODELS)
def test_timesteps_are_validated(name, models):
    den = models(name)
    x = inputs(500)
    for bad in (-1, 1000, 1e6, 2.5, 499.5):  # out of range, or not an integer
        with pytest.raises(ConfigError):
            den(x, bad)
    fitted = den.capabilities.fitted_timesteps
    if fitted is not None:  # a model fitted at some timesteps refuses the others
        other = next(t for t in (998, 501, 1) if t not in fitted)
        with pytest.raises(ConfigError):
            den(x, other)


@pytest.mark.parametrize("name", MODELS)
def test_closed_form_jacobian_equals_autograd(name, models):
    den = models(name)
    caps = den.capabilities
    index = torch.tensor([0, 9, 27, 36, 63])
    if not caps.closed_form_jacobian:
        with pytest.raises(ConfigError):
            den.jacobian_rows(inputs(500, num=1), 500, index)
        return
    for t in timesteps(den, (900, 500, 0)):
        x = inputs(t, num=2)
        rows = den.jacobian_rows(x, t, index)  # [B, Q, n]
        assert rows.shape == (2, len(index), 64) and rows.dtype == torch.float64
        for b in range(2):
            J = torch.autograd.functional.jacobian(lambda v: den(v, t).reshape(-1), x[b:b + 1]).reshape(64, 64)
            torch.testing.assert_close(rows[b], J[index], atol=1e-8, rtol=1e-6)
        if caps.constant_jacobian:
            torch.testing.assert_close(den.jacobian_rows(inputs(t, num=1, seed=7), t, index)[0], rows[0],
                                       atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", MODELS)
def test_differentiable_unless_piecewise_constant(name, models):
    den = models(name)
    t = timesteps(den, (500,))[0] if timesteps(den, (500,)) else den.capabilities.fitted_timesteps[0]
    x = inputs(t, num=2)
    if den.capabilities.piecewise_constant:  # a small move of x_t leaves the output where it was
        torch.testing.assert_close(den(x + 1e-6 * torch.randn_like(x), t), den(x, t), atol=0, rtol=0)
        return
    xg = x.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(den(xg, t)[:, 0, 3, 4].sum(), xg)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


@pytest.mark.parametrize("name", MODELS)
def test_one_image_training_set_returns_that_image(name, unet_dir):
    if not REGISTRY[name].capabilities.single_image_exact:
        pytest.skip(f"{name} does not reduce to its training image (not its mathematics)")
    data = smooth_set(1, seed=5)
    den = build(name, data, unet_dir)
    if not den.capabilities.single_image_exact:
        pytest.skip(f"{name} with these options does not reduce to its training image")
    image = data[0].double()
    for t in timesteps(den, (999, 500, 0)):
        x = 3 * inputs(t, num=3)
        torch.testing.assert_close(den(x, t), image.expand(3, *SHAPE), atol=1e-6, rtol=0)
