"""Real data at real size: the paper's denoiser on the full MNIST training set against the formula."""

import pytest
import torch

from localdiff import load_dataset, make_denoiser
from localdiff.diffusion import DEFAULT_SCHEDULE


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", split="train"), load_dataset("mnist", split="test")


@pytest.mark.parametrize("t", [900, 300])
def test_masked_on_full_mnist_equals_the_formula(mnist, t, tmp_cache):
    train, test = mnist
    den = make_denoiser("masked", train, device="cpu")
    assert den.settings()["tau"] == 0.005
    g = torch.Generator().manual_seed(t)
    x0 = torch.stack([test[0], test[1]])
    x_t = DEFAULT_SCHEDULE.q_sample(x0, t, torch.randn(x0.shape, generator=g))
    out = den(x_t, t).reshape(2, -1).double()
    masks = den.masks(t)  # bool [n, n], column i = S_i
    assert masks.shape == (784, 784) and 0.1 < masks.double().mean() < 0.6
    Y = train.tensor(dtype=torch.float64, flat=True)  # [60000, 784]
    a, b2 = DEFAULT_SCHEDULE.a(t), DEFAULT_SCHEDULE.b2(t)
    x = x_t.reshape(2, -1).double()
    for i in (14 * 28 + 14, 9 * 28 + 20, 20 * 28 + 7):  # pixels with non-empty masks
        S = masks[:, i].nonzero().squeeze(1)
        assert len(S) > 0
        d = ((x[:, None, S] - a * Y[None][:, :, S]) ** 2).sum(-1)  # [2, K]
        w = torch.softmax(-d / (2 * b2), dim=1)
        ref = w @ Y[:, i]
        torch.testing.assert_close(out[:, i], ref, atol=1e-4, rtol=0)


def test_optimal_on_full_mnist_memorises(mnist):
    """At low noise the exact optimal denoiser returns (a blend of) training images, not the held-out
    image it was given: its output is much closer to the nearest training image than to the input."""
    train, test = mnist
    x_t = DEFAULT_SCHEDULE.q_sample(test[3][None], 50, torch.zeros(1, 1, 28, 28))
    out = make_denoiser("optimal", train, device="cpu")(x_t, 50)
    near = make_denoiser("nearest", train, device="cpu")(x_t, 50)
    to_near = float(((out - near) ** 2).mean())
    to_input = float(((out - test[3]) ** 2).mean())
    assert to_near < 0.25 * to_input
