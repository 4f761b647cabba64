"""Bad values (issue 16): one rule for t everywhere it enters, finite inputs only, and no model hands
back NaN/Inf for a finite input without a clear error naming it."""

import numpy as np
import pytest
import torch

from localdiff import make_denoiser
from localdiff.cli import main
from localdiff.denoisers.base import Denoiser, DenoiserConfig
from localdiff.diffusion import DEFAULT_SCHEDULE, Schedule
from localdiff.errors import ConfigError, NumericsError
from localdiff.evaluate import denoising_mse
from localdiff.sensitivity import sensitivity_fields

GOOD_T = [(5, 5), (np.int64(7), 7), (np.uint16(999), 999), (torch.tensor(9), 9), (torch.tensor([3]), 3),
          (np.array(4), 4), (np.array([0], np.int32), 0), (torch.tensor([[12]], dtype=torch.int16), 12)]
BAD_T = [np.float32(1.5), 1.5, 500.0, np.float64(500.0), "500", "abc", True, False, np.bool_(True), None,
         np.array([1.5]), np.array([1, 2]), torch.tensor(5.0), torch.tensor(True), torch.tensor([1, 2]), [500],
         -1, 1000, np.int64(-3), 2**70, torch.tensor(1000)]


@pytest.mark.parametrize("t,want", GOOD_T)
def test_integer_timesteps_are_accepted(t, want):
    got = DEFAULT_SCHEDULE.check_t(t)
    assert got == want and type(got) is int


@pytest.mark.parametrize("t", BAD_T, ids=repr)
def test_everything_else_is_a_config_error(t):
    with pytest.raises(ConfigError, match=r"timestep must be (an integer |a single integer )?in \[0, 999\]"):
        DEFAULT_SCHEDULE.check_t(t)


def test_the_range_follows_the_schedule():
    assert Schedule(num_train_timesteps=50).check_t(49) == 49
    with pytest.raises(ConfigError, match=r"in \[0, 49\], got 50"):
        Schedule(num_train_timesteps=50).check_t(50)


@pytest.fixture
def wiener(small_uint8_data, tmp_cache):
    return make_denoiser("wiener", small_uint8_data, device="cpu")


@pytest.mark.parametrize("t", [np.float32(1.5), "500", True, None, np.array([1.5])], ids=repr)
def test_every_entry_point_uses_the_rule(wiener, small_uint8_data, t):
    x = torch.zeros(2, *small_uint8_data.shape)
    with pytest.raises(ConfigError, match="timestep must be"):
        wiener(x, t)
    with pytest.raises(ConfigError, match="timestep must be"):
        sensitivity_fields(wiener, small_uint8_data, timesteps=[t], draws=1, progress=False)
    with pytest.raises(ConfigError, match="timestep must be"):
        denoising_mse({"w": wiener}, small_uint8_data.tensor(), [t], generator=torch.Generator(), progress=False)


@pytest.mark.parametrize("flag,value", [("--timesteps", "1.5"), ("--timesteps", "1000"), ("--timesteps", "-1")])
def test_cli_timestep_lists_use_the_rule(tmp_path, tmp_cache, capsys, flag, value):
    np.savez(tmp_path / "d.npz", images=np.zeros((4, 1, 4, 4), np.uint8))
    rc = main(["evaluate", "--data", str(tmp_path / "d.npz"), "--models", "wiener", "--device", "cpu",
               flag, value, "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert rc == 2 and flag in err and ("timestep must be" in err or "comma-separated integers" in err)
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------
# finite in, finite out
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["wiener", "optimal", "masked"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_a_non_finite_image_is_a_clear_error_naming_it(small_uint8_data, tmp_cache, model, bad):
    den = make_denoiser(model, small_uint8_data, device="cpu")
    x = torch.randn(4, *small_uint8_data.shape, generator=torch.Generator().manual_seed(0))
    x[2, 0, 1, 1] = bad
    with pytest.raises(ConfigError, match=rf"{model}: x_t holds 1 NaN or Inf values \(in image 2 of the batch\)"):
        den(x, 500)


def test_masked_never_mixes_images_of_a_batch(small_uint8_data, tmp_cache):
    """The clean images' results do not depend on what else is in the batch."""
    den = make_denoiser("masked", small_uint8_data, device="cpu")
    x = torch.randn(4, *small_uint8_data.shape, generator=torch.Generator().manual_seed(1))
    for t in (300, 600):
        alone = torch.cat([den(x[i:i + 1], t) for i in range(4)])
        torch.testing.assert_close(den(x, t), alone, rtol=0, atol=1e-6)


class _Broken(Denoiser):
    name = "broken"

    def denoise(self, x_t, t):
        out = x_t.clone()
        out[0, 0, 0, 0] = float("nan")
        return out


def test_a_model_returning_nan_for_finite_input_is_named():
    den = _Broken((1, 2, 2), DenoiserConfig(device="cpu"))
    with pytest.raises(NumericsError, match=r"broken: the model returned 1 NaN or Inf values at t=10 for a finite x_t"):
        den(torch.zeros(2, 1, 2, 2), 10)


def test_unet_on_a_huge_input_is_a_clear_error(tmp_cache):
    from localdiff.data import load_dataset

    data = load_dataset("mnist", subset=10)
    unet = make_denoiser("unet", data, device="cpu")
    x = torch.randn(1, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(unet(x, 500)).all()
    with pytest.raises(NumericsError, match=r"unet: the model returned .* NaN or Inf values at t=500 for a finite "
                                            r"x_t \(largest \|x_t\| = .*e\+30\); .*rescale x_t"):
        unet(x * 1e30, 500)
