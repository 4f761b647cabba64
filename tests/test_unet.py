"""The U-Net baseline: the denoiser formula against diffusers' own schedule, exact resume, no pickle,
training that learns, and the train-unet command. Tiny networks (8-16 channels, 8x8 images)."""

import copy
import json
import os
import signal

import numpy as np
import pytest
import torch

from localdiff import DEFAULT_SCHEDULE, make_denoiser, sample
from localdiff.data.dataset import ImageDataset
from localdiff.errors import ConfigError
from localdiff.unet import SMALL, TRAIN_RECIPES, DataOrder, TrainConfig, TrainingInterrupted, UNetConfig, UNetTrainer
from localdiff.unet.training import join_optimizer_state, list_checkpoints, sha256_file, split_optimizer_state

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny networks run 20-100x faster on one thread than on two busy shared cores (no thread spin-waits)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


TINY = UNetConfig(base_channels=8, channel_mult=(1, 2), layers_per_block=1, dropout=0.1, norm_num_groups=4)


def tiny_data(num=10, channels=1, size=8, seed=0, name="tiny"):
    rng = np.random.default_rng(seed)
    return ImageDataset(raw=rng.integers(0, 256, (num, channels, size, size)).astype(np.uint8), name=name)


def tiny_recipe(**kw):
    base = dict(batch_size=4, lr=1e-3, warmup=2, ema_decay=0.9, hflip=True, seed=3, device="cpu")
    return TrainConfig(**{**base, **kw})


@pytest.fixture(scope="module")
def tiny_unet_dir(tmp_path_factory):
    """A randomly initialised diffusers UNet2DModel (1 channel, 8x8) saved with save_pretrained."""
    from diffusers import UNet2DModel

    torch.manual_seed(0)
    model = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 16),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        layers_per_block=1, norm_num_groups=4)
    with torch.no_grad():  # make the output depend visibly on the input (zero-initialised layers are rare here)
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    d = tmp_path_factory.mktemp("unet") / "net"
    model.save_pretrained(d, safe_serialization=True)
    return d, model.eval()


# -- the denoiser ---------------------------------------------------------------------------------

@pytest.mark.parametrize("t", [0, 100, 500, 999])
def test_unet_denoiser_matches_direct_formula(tiny_unet_dir, t):
    from diffusers import DDPMScheduler

    path, model = tiny_unet_dir
    den = make_denoiser("unet", tiny_data(), path=str(path), device="cpu")
    x_t = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(t))
    # Independent reference: diffusers' own DDPM coefficients and the same in-memory network.
    ab = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02,
                       beta_schedule="linear").alphas_cumprod[t].double()
    with torch.no_grad():
        eps = model(x_t, torch.full((3,), t)).sample
    ref = (x_t.double() - (1 - ab).sqrt() * eps.double()) / ab.sqrt()
    out = den(x_t, t)
    assert out.dtype == torch.float32 and out.shape == x_t.shape
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 / ab.sqrt().item())


def test_unet_denoiser_is_differentiable(tiny_unet_dir):
    path, _ = tiny_unet_dir
    den = make_denoiser("unet", tiny_data(), path=str(path), device="cpu", dtype="float64")
    assert not den.model.training and not any(p.requires_grad for p in den.model.parameters())
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64, requires_grad=True)
    i, m, t = 27, 28, 300
    (g,) = torch.autograd.grad(den(x, t).reshape(-1)[i], x)
    h = 1e-6
    e = torch.zeros(64, dtype=torch.float64)
    e[m] = h
    with torch.no_grad():
        fd = (den(x + e.view(1, 1, 8, 8), t).reshape(-1)[i] - den(x - e.view(1, 1, 8, 8), t).reshape(-1)[i]) / (2 * h)
    assert g.reshape(-1)[m].item() == pytest.approx(fd.item(), rel=1e-5, abs=1e-8)


def test_unet_denoiser_refuses_mismatched_networks(tiny_unet_dir, tmp_path):
    path, _ = tiny_unet_dir
    with pytest.raises(ConfigError, match="channels"):
        make_denoiser("unet", tiny_data(channels=3), path=str(path), device="cpu")
    with pytest.raises(ConfigError, match="8x8"):
        make_denoiser("unet", tiny_data(size=16), path=str(path), device="cpu")
    with pytest.raises(ConfigError, match="does not exist"):
        make_denoiser("unet", tiny_data(), path=str(tmp_path / "nowhere"), device="cpu")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="UNet2DModel directory"):
        make_denoiser("unet", tiny_data(), path=str(tmp_path / "empty"), device="cpu")
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text((path / "config.json").read_text())
    (pickled / "diffusion_pytorch_model.bin").write_bytes(b"\x80\x04N.")
    with pytest.raises(ConfigError, match="pickle"):
        make_denoiser("unet", tiny_data(), path=str(pickled), device="cpu")
    other = tmp_path / "vae"
    other.mkdir()
    (other / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    with pytest.raises(ConfigError, match="AutoencoderKL"):
        make_denoiser("unet", tiny_data(), path=str(other), device="cpu")


def test_unet_pipeline_directory_and_schedule_check(tiny_unet_dir, tmp_path):
    import shutil

    pipe = tmp_path / "pipeline"
    shutil.copytree(tiny_unet_dir[0], pipe / "unet")
    (pipe / "scheduler").mkdir()
    sched = {"_class_name": "DDPMScheduler", "num_train_timesteps": 1000, "beta_start": 0.0001, "beta_end": 0.02,
             "beta_schedule": "linear", "prediction_type": "epsilon"}
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps(sched))
    assert make_denoiser("unet", tiny_data(), path=str(pipe), device="cpu").info.subfolder == "unet"
    # a network of another table keeps it: its own timesteps work, the default table's levels (other sigmas) do not,
    # and DDIM on the default table is refused before any step; Heun rounds its grid to the network's levels
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "beta_end": 0.012}))
    den = make_denoiser("unet", tiny_data(), path=str(pipe), device="cpu")
    assert den.schedule.beta_end == 0.012 and den.schedule != DEFAULT_SCHEDULE
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    assert den(x, 500).shape == x.shape
    with pytest.raises(ConfigError, match="none of them"):
        den(x, DEFAULT_SCHEDULE.at(500))
    with pytest.raises(ConfigError, match="none of them"):
        sample(den, init_noise=x, steps=4, schedule=DEFAULT_SCHEDULE, progress=False)
    traj = sample(den, init_noise=x, sampler="heun", steps=6, return_trajectory=True, progress=False)
    assert all(lv.t is not None and lv.schedule == den.schedule.name for lv in traj.levels)
    (pipe / "scheduler" / "scheduler_config.json").write_text(json.dumps({**sched, "beta_schedule": "sigmoid"}))
    with pytest.raises(ConfigError, match="sigmoid"):
        make_denoiser("unet", tiny_data(), path=str(pipe), device="cpu")


def test_unet_default_path_uses_shipped_weights(tiny_unet_dir, tmp_path, monkeypatch):
    import localdiff.denoisers.unet as unet_mod

    with pytest.raises(ConfigError, match="train-unet"):
        make_denoiser("unet", tiny_data(name="no-such-set"), device="cpu")
    monkeypatch.setattr(unet_mod, "shipped_weights_dir", lambda name: tiny_unet_dir[0] if name == "tiny" else tmp_path)
    den = make_denoiser("unet", tiny_data(name="tiny"), device="cpu")
    assert den.path == tiny_unet_dir[0]


# -- training ---------------------------------------------------------------------------------------

def test_data_order_is_a_seeded_permutation_per_epoch():
    order = DataOrder(7, seed=5)
    seen = torch.cat([order.take(3) for _ in range(7)])  # 21 indices = 3 epochs, batches cross epochs
    for e in range(3):
        assert sorted(seen[7 * e:7 * e + 7].tolist()) == list(range(7))
    assert not torch.equal(seen[:7], seen[7:14])
    again = DataOrder(7, seed=5, epoch=1, position=2)  # restart mid-epoch from the state alone
    torch.testing.assert_close(again.take(5), seen[9:14])


def test_optimizer_state_round_trips_without_pickle():
    p = torch.nn.Parameter(torch.randn(3, 2))
    opt = torch.optim.AdamW([p], lr=0.1, betas=(0.8, 0.95))
    p.grad = torch.randn(3, 2)
    opt.step()
    tensors, rest = split_optimizer_state(opt.state_dict())
    json.dumps(rest)
    back = join_optimizer_state(tensors, json.loads(json.dumps(rest)))
    ref = opt.state_dict()
    assert back["param_groups"] == ref["param_groups"]
    for k, v in ref["state"][0].items():
        torch.testing.assert_close(back["state"][0][k], v, rtol=0, atol=0)


def _assert_same_training_state(a: UNetTrainer, b: UNetTrainer):
    assert a.step == b.step and a.order.state() == b.order.state()
    for x, y in zip(a.params, b.params):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    for x, y in zip(a.ema, b.ema):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-6)
    sa, sb = a.optimizer.state_dict(), b.optimizer.state_dict()
    assert sa["param_groups"] == sb["param_groups"]
    for i, st in sa["state"].items():
        for k, v in st.items():
            torch.testing.assert_close(sb["state"][i][k], v, rtol=0, atol=1e-6)
    assert a.loss_ema == pytest.approx(b.loss_ema, rel=1e-6)
    torch.testing.assert_close(a.gen.get_state(), b.gen.get_state())


@pytest.fixture(scope="module")
def straight_run():
    """Six uninterrupted steps; the batches of 4 from 10 images cross epoch boundaries."""
    return UNetTrainer(tiny_data(), TINY, tiny_recipe()).fit(6, progress=False)


def test_resume_equals_uninterrupted_run(straight_run, tmp_path):
    data = tiny_data()
    first = UNetTrainer(data, TINY, tiny_recipe()).fit(3, total_steps=6, checkpoint_dir=tmp_path, checkpoint_every=3,
                                                       progress=False)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000003"]
    resumed = UNetTrainer.from_checkpoint(tmp_path, data).fit(6, checkpoint_dir=tmp_path, progress=False)
    _assert_same_training_state(straight_run, resumed)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-0000006"]  # the older one is removed
    assert first.step == 3


def test_ctrl_c_checkpoints_current_step_and_resumes_exactly(straight_run, tmp_path):
    data = tiny_data()

    def interrupt_after_step_4(trainer):
        if trainer.step == 4:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted) as info:
        UNetTrainer(data, TINY, tiny_recipe()).fit(6, checkpoint_dir=tmp_path, checkpoint_every=100,
                                                   progress=False, callback=interrupt_after_step_4)
    assert info.value.step == 4 and info.value.checkpoint == tmp_path / "step-0000004"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # handlers restored
    resumed = UNetTrainer.from_checkpoint(tmp_path, data).fit(6, progress=False)
    _assert_same_training_state(straight_run, resumed)


def test_incomplete_checkpoints_are_ignored(tmp_path):
    from localdiff.unet import find_checkpoint

    UNetTrainer(tiny_data(), TINY, tiny_recipe()).fit(1, checkpoint_dir=tmp_path / "checkpoints", progress=False)
    (tmp_path / "checkpoints" / ".step-0000009.x.partial").mkdir()  # a write that was cut short
    (tmp_path / "checkpoints" / "step-0000010").mkdir()  # no state.json: not complete
    assert find_checkpoint(tmp_path) == tmp_path / "checkpoints" / "step-0000001"
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        find_checkpoint(tmp_path / "checkpoints" / "step-0000010")


def test_resume_refuses_other_data(tmp_path):
    UNetTrainer(tiny_data(), TINY, tiny_recipe()).fit(1, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(ConfigError, match="data differ"):
        UNetTrainer.from_checkpoint(tmp_path, tiny_data(seed=1))


def test_checkpoint_and_export_hold_no_pickle(tmp_path):
    from safetensors import safe_open

    trainer = UNetTrainer(tiny_data(), TINY, tiny_recipe()).fit(2, checkpoint_dir=tmp_path / "ck", progress=False)
    trainer.export(tmp_path / "export", dtype="fp16")
    files = sorted(p for p in tmp_path.rglob("*") if p.is_file())
    assert {p.suffix for p in files} == {".safetensors", ".json"}
    for f in files:
        head = f.read_bytes()[:2]
        assert head not in (b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05") and head != b"PK"  # pickle, torch zip
        if f.suffix == ".json":
            json.loads(f.read_text())
        else:
            with safe_open(str(f), framework="pt") as st:
                assert list(st.keys())
    manifest = json.loads((tmp_path / "export" / "localdiff_unet.json").read_text())
    assert manifest["weights"]["sha256"] == sha256_file(tmp_path / "export" / "diffusion_pytorch_model.safetensors")
    with safe_open(str(tmp_path / "export" / "diffusion_pytorch_model.safetensors"), framework="pt") as st:
        assert st.get_tensor(next(iter(st.keys()))).dtype == torch.float16
    # the fp16 export is the EMA network, loadable as a float32 denoiser
    den = make_denoiser("unet", tiny_data(), path=str(tmp_path / "export"), device="cpu")
    ema = trainer.ema_model()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        out_ref = ema(x, torch.full((2,), 400)).sample
        torch.testing.assert_close(den.output(x, 400), out_ref, rtol=0, atol=2e-2)


@pytest.mark.parametrize("prediction", ["v", "epsilon"])
def test_small_config_learns_two_images(prediction):
    data = tiny_data(num=2)
    recipe = {**TRAIN_RECIPES["small"].recipe(), "warmup": 5, "batch_size": 8, "device": "cpu",
              "prediction": prediction}
    trainer = UNetTrainer(data, SMALL, TrainConfig(**recipe))
    gen = torch.Generator().manual_seed(0)
    x0 = data.tensor().repeat(32, 1, 1, 1)  # [64, 1, 8, 8]
    t = torch.randint(0, 1000, (64,), generator=gen)
    eps = torch.randn(x0.shape, generator=gen)
    ab = trainer.schedule.alpha_bar[t].float().view(-1, 1, 1, 1)
    x_t = ab.sqrt() * x0 + (1 - ab).sqrt() * eps  # fixed noisy inputs, reused before and after training
    # what the network must predict, from diffusers' own formula for v
    from diffusers import DDPMScheduler

    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    target = sched.get_velocity(x0, eps, t) if prediction == "v" else eps

    def held_out_loss():
        trainer.model.eval()
        with torch.no_grad():
            loss = torch.mean((trainer.model(x_t, t).sample - target) ** 2).item()
        trainer.model.train()
        return loss

    # v starts closer to its target (v ~ -x0 at high noise) and learns more slowly in so few steps;
    # a wrong target (sign, coefficients) leaves the loss against diffusers' v where it was
    before = held_out_loss()
    trainer.fit(40, progress=False)
    after = held_out_loss()
    assert after < (0.7 if prediction == "v" else 0.5) * before, (before, after)


# -- the command ------------------------------------------------------------------------------------

def test_train_unet_command(tmp_path, capsys):
    from localdiff.cli import main

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, images=rng.integers(0, 256, (12, 8, 8)).astype(np.uint8))
    out = tmp_path / "run"
    cmd = ["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--steps", "3", "--out", str(out),
           "--batch-size", "4", "--warmup", "2", "--checkpoint-every", "2", "--device", "cpu", "--no-progress"]
    assert main(cmd) == 0
    assert {"config.json", "diffusion_pytorch_model.safetensors", "localdiff_unet.json"} <= set(os.listdir(out))
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000003"]
    manifest = json.loads((out / "localdiff_unet.json").read_text())
    assert manifest["steps"] == 3 and manifest["epochs"] == pytest.approx(1.0)
    assert manifest["command"].startswith("localdiff") and manifest["data"]["fingerprint"]
    assert manifest["final_loss"] > 0 and manifest["wall_time_s"] > 0
    assert manifest["schedule"]["beta_end"] == 0.02 and manifest["schedule"]["prediction_type"] == "v_prediction"
    assert manifest["prediction"] == "v" and manifest["lr_schedule"] == {"decay": "cosine", "total_steps": 3,
                                                                         "warmup_steps": 1}
    assert manifest["device"] == "cpu" and manifest["images_per_s"] > 0 and manifest["stopped_early"] is False
    assert manifest["weights"]["sha256"] == sha256_file(out / "diffusion_pytorch_model.safetensors")

    before = sha256_file(out / "diffusion_pytorch_model.safetensors")
    assert main(cmd) == 2  # an existing --out is never overwritten
    assert "already exists" in capsys.readouterr().err
    assert sha256_file(out / "diffusion_pytorch_model.safetensors") == before

    assert main(cmd[:-1] + ["--lr", "0.5", "--no-progress", "--resume", str(out)]) == 2  # the recipe is fixed
    with pytest.warns(RuntimeWarning, match="re-fitted to 5 steps"):  # extending a cosine run re-fits its decay
        assert main([*cmd[:7], "--steps", "5", *cmd[9:], "--resume", str(out)]) == 0  # continue in place
    manifest = json.loads((out / "localdiff_unet.json").read_text())
    assert manifest["steps"] == 5 and len(manifest["commands"]) == 2

    from localdiff.data import load_dataset

    den = make_denoiser("unet", load_dataset(str(npz)), path=str(out), device="cpu")
    assert den(torch.zeros(1, 1, 8, 8), 500).shape == (1, 1, 8, 8)


SHIPPED = ("mnist", "fashion-mnist")


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_weights_are_the_default_and_denoise_better_than_wiener(name, tmp_cache):
    # The shipped network must match its manifest (sha256, fp16, <= 16 MiB) and be a useful model:
    # on held-out images at t = 300 it beats the optimal linear denoiser by a wide margin, and at t = 900
    # it is no worse than it.
    from localdiff.data import load_dataset
    from localdiff.denoisers.unet import MANIFEST_NAME, WEIGHTS_NAME, shipped_weights_dir
    from localdiff.evaluate import denoising_mse

    d = shipped_weights_dir(name)
    if not (d / "config.json").is_file():
        pytest.fail(f"no weights shipped for {name} in {d}")
    manifest = json.loads((d / MANIFEST_NAME).read_text())
    assert manifest["weights"]["sha256"] == sha256_file(d / WEIGHTS_NAME)
    assert manifest["weights"]["dtype"] == "fp16" and (d / WEIGHTS_NAME).stat().st_size <= 16 * 2**20
    # the training loss (EMA) well below what predicting zero costs: 1 for epsilon, about 1.2 for v on these sets
    loss_bound = {"epsilon": 0.05, "v": 0.25}[manifest.get("prediction", "epsilon")]
    assert manifest["data"]["name"] == name and manifest["steps"] > 0 and manifest["final_loss"] < loss_bound
    train = load_dataset(name, split="train", subset=5000)
    test = load_dataset(name, split="test", subset=64)
    unet = make_denoiser("unet", train, device="cpu")
    assert unet.path == d
    res = denoising_mse({"unet": unet, "wiener": make_denoiser("wiener", train, device="cpu")}, test.tensor(),
                        [300, 900], generator=torch.Generator().manual_seed(0), progress=False)
    assert res["unet"][300]["mse"] < 0.75 * res["wiener"][300]["mse"]
    # and not worse than Wiener at high noise (the epsilon networks shipped before were 3-5x worse at t=900)
    assert res["unet"][900]["mse"] < 1.05 * res["wiener"][900]["mse"]


# -- v-prediction, the learning-rate schedule, time budgets ------------------------------------------

def _with_records(src, dst, manifest_prediction=None, scheduler_prediction=None):
    import shutil

    shutil.copytree(src, dst)
    kw = dict(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear")
    if manifest_prediction is not None:
        (dst / "localdiff_unet.json").write_text(json.dumps({"schedule": {**kw, "prediction_type": manifest_prediction}}))
    if scheduler_prediction is not None:
        (dst / "scheduler").mkdir()
        (dst / "scheduler" / "scheduler_config.json").write_text(
            json.dumps({"_class_name": "DDPMScheduler", **kw, "prediction_type": scheduler_prediction}))
    return dst


@pytest.mark.parametrize("prediction", ["v_prediction", "sample", "epsilon"])
def test_unet_denoiser_follows_the_recorded_prediction_type(tiny_unet_dir, tmp_path, prediction):
    from diffusers import DDPMScheduler

    path, model = tiny_unet_dir
    d = _with_records(path, tmp_path / "net", manifest_prediction=prediction)
    den = make_denoiser("unet", tiny_data(), path=str(d), device="cpu", dtype="float64")
    assert den.prediction_type == prediction
    # Independent reference: diffusers' own scheduler turns the same network output into x0.
    sched = DDPMScheduler(num_train_timesteps=1000, beta_start=1e-4, beta_end=0.02, beta_schedule="linear",
                          prediction_type=prediction, clip_sample=False)
    net = copy.deepcopy(model).double()
    for t in (10, 500, 990):
        x_t = torch.randn(2, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(t))
        with torch.no_grad():
            out = net(x_t, torch.full((2,), t)).sample
        ref = sched.step(out, t, x_t).pred_original_sample
        torch.testing.assert_close(den(x_t, t), ref, rtol=1e-5, atol=1e-5)  # diffusers' tables are float32
        # eps_hat consistent with x0_hat: x_t = a x0_hat + sqrt(b2) eps_hat
        a, b2 = den.schedule.a(t), den.schedule.b2(t)
        torch.testing.assert_close(a * den(x_t, t) + b2 ** 0.5 * den.eps(x_t, t), x_t, rtol=1e-9, atol=1e-9)


def test_unet_prediction_records_must_agree_and_be_known(tiny_unet_dir, tmp_path):
    path, _ = tiny_unet_dir
    both = _with_records(path, tmp_path / "both", manifest_prediction="v_prediction", scheduler_prediction="epsilon")
    with pytest.raises(ConfigError, match="contradictory"):
        make_denoiser("unet", tiny_data(), path=str(both), device="cpu")
    odd = _with_records(path, tmp_path / "odd", scheduler_prediction="flow")
    with pytest.raises(ConfigError, match="'flow'"):
        make_denoiser("unet", tiny_data(), path=str(odd), device="cpu")
    agree = _with_records(path, tmp_path / "agree", manifest_prediction="v_prediction",
                          scheduler_prediction="v_prediction")
    assert make_denoiser("unet", tiny_data(), path=str(agree), device="cpu").prediction_type == "v_prediction"


def test_cosine_learning_rate_matches_torch_and_warms_up():
    from localdiff.unet.training import lr_at, warmup_for

    cfg = tiny_recipe(lr=3e-3, warmup=0)
    total = 37
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=cfg.lr)
    ref = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total, eta_min=0.0)  # independent formula
    for step in range(total + 1):
        assert lr_at(step, cfg, total) == pytest.approx(ref._get_closed_form_lr()[0], rel=1e-12, abs=1e-15)
        opt.step()
        ref.step()
    cfg = tiny_recipe(lr=1.0, warmup=50)
    assert warmup_for(cfg, 200) == 20 and warmup_for(cfg, 10_000) == 50  # at most a tenth of the run
    assert lr_at(4, cfg, 200, 20) == pytest.approx(5 / 20 * 0.5 * (1 + np.cos(np.pi * 4 / 200)))
    assert lr_at(199, cfg, 200, 20) < 1e-3 and lr_at(200, cfg, 200, 20) == pytest.approx(0.0, abs=1e-15)
    const = tiny_recipe(lr=1.0, warmup=50, lr_decay="constant")
    assert warmup_for(const, 200) == 50 and lr_at(150, const, 200, 50) == 1.0


class FakeClock:
    """A wall clock that advances ``dt`` seconds per reading, so a budget run plans the same way twice."""

    def __init__(self, dt=0.05, jump_after=None, jump=0.0):
        self.now, self.dt, self.calls, self.jump_after, self.jump = 0.0, dt, 0, jump_after, jump

    def __call__(self):
        self.calls += 1
        self.now += self.dt + (self.jump if self.calls == self.jump_after else 0.0)
        return self.now


def test_budget_run_plans_its_steps_and_resumes_exactly(tmp_path):
    data = tiny_data()

    def run(root, **kw):
        tr = UNetTrainer(data, TINY, tiny_recipe(warmup=30))
        tr.clock = FakeClock()
        return tr.fit(budget_s=10.0, checkpoint_dir=root, checkpoint_every=1000, progress=False, **kw)

    straight = run(tmp_path / "a")
    plan = straight.plan
    # 2 s of calibration (two clock readings, 0.1 s of fake time, per step), a checkpoint, then the rest
    assert plan["calibration_s"] == pytest.approx(2.0, abs=0.2) and plan["steps_per_s"] == pytest.approx(10.0)
    assert plan["calibration_steps"] == 19 and plan["checkpoint_s"] == pytest.approx(0.05)
    assert straight.step == straight.total_steps == plan["planned_steps"] > 30
    assert straight.warmup_steps == straight.total_steps // 10  # warm-up shrunk to a tenth of the run
    assert straight.clock.now <= 10.0 and not straight.history[-1]["stopped_early"]
    from localdiff.unet.training import lr_at

    last_lr = lr_at(straight.step - 1, straight.config, straight.total_steps, straight.warmup_steps)
    assert straight.optimizer.param_groups[0]["lr"] == last_lr < 1e-3 * straight.config.lr  # the decay ran out

    def interrupt(trainer):
        if trainer.step == 25:
            os.kill(os.getpid(), signal.SIGINT)

    with pytest.raises(TrainingInterrupted):
        run(tmp_path / "b", callback=interrupt)
    resumed = UNetTrainer.from_checkpoint(tmp_path / "b", data)
    assert resumed.total_steps == straight.total_steps and resumed.plan == plan
    resumed.fit(progress=False)  # no steps, no budget: the planned length
    _assert_same_training_state(straight, resumed)


def test_budget_run_stops_at_the_deadline(tmp_path):
    tr = UNetTrainer(tiny_data(), TINY, tiny_recipe())
    tr.clock = FakeClock(jump_after=60, jump=8.0)  # the machine stalls for 8 s after planning
    tr.fit(budget_s=10.0, checkpoint_dir=tmp_path, progress=False)
    assert tr.history[-1]["stopped_early"] and tr.step < tr.total_steps
    assert list_checkpoints(tmp_path)[-1].name == f"step-{tr.step:07d}"  # the stop is checkpointed


def test_train_unet_minutes_budget(tmp_path):
    import time

    from localdiff.cli import main

    rng = np.random.default_rng(0)
    npz = tmp_path / "tiny.npz"
    np.savez(npz, images=rng.integers(0, 256, (12, 8, 8)).astype(np.uint8))
    out = tmp_path / "run"
    start = time.perf_counter()
    assert main(["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--minutes", "0.15", "--out", str(out),
                 "--batch-size", "4", "--device", "cpu", "--no-progress"]) == 0
    wall = time.perf_counter() - start
    assert wall <= 9.0 + 1.5, wall  # the whole command inside its 9 s budget (a little slack for a busy machine)
    m = json.loads((out / "localdiff_unet.json").read_text())
    assert m["plan"]["budget_s"] < 9.0 and m["plan"]["images_per_s"] > 0
    assert m["steps"] == m["lr_schedule"]["total_steps"] == m["plan"]["planned_steps"] or m["stopped_early"]
    assert m["wall_time_s"] < 9.0 and m["images_per_s"] > 0 and m["device"] == "cpu"
    assert m["epochs"] == pytest.approx(m["steps"] * 4 / 12)


# -- damaged checkpoints, killed runs ------------------------------------------------------------------

def test_every_checkpoint_file_is_checksummed_and_damage_names_the_last_good_one(tmp_path):
    from localdiff.unet.checkpoints import CHECKPOINT_FILES, CheckpointError

    data = tiny_data()
    tr = UNetTrainer(data, TINY, tiny_recipe())
    tr.fit(2, total_steps=4, checkpoint_dir=tmp_path, keep_checkpoints=0, progress=False)
    tr.fit(4, checkpoint_dir=tmp_path, keep_checkpoints=0, progress=False)
    good, newest = list_checkpoints(tmp_path)
    assert UNetTrainer.from_checkpoint(newest, data).step == 4
    rng = np.random.default_rng(0)
    for name in (*CHECKPOINT_FILES, "checksums.json"):
        f = newest / name
        original = f.read_bytes()
        for bit in rng.choice(len(original) * 8, size=3, replace=False):  # one bit flipped anywhere, metadata too
            damaged = bytearray(original)
            damaged[bit // 8] ^= 1 << (bit % 8)
            f.write_bytes(bytes(damaged))
            with pytest.raises(CheckpointError, match=f"corrupt.*last good checkpoint is {good}"):
                UNetTrainer.from_checkpoint(newest, data)
        f.write_bytes(original[: len(original) // 2])  # truncated
        with pytest.raises(CheckpointError, match="step-0000004.*corrupt"):
            UNetTrainer.from_checkpoint(newest, data)
        f.write_bytes(original)
    assert UNetTrainer.from_checkpoint(newest, data).step == 4  # intact again


def test_partials_of_dead_processes_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (tmp_path / f".step-0000003.pid{dead.pid}.abc.partial").mkdir()  # killed during a write
    (tmp_path / ".step-0000002.xyz.partial").mkdir()  # from before PIDs were recorded
    live = tmp_path / f".step-0000005.pid{os.getppid()}.def.partial"  # a process that still runs
    live.mkdir()
    UNetTrainer(tiny_data(), TINY, tiny_recipe()).fit(1, checkpoint_dir=tmp_path, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, "step-0000001"])


def test_run_killed_before_its_first_checkpoint_does_not_block_a_rerun(tmp_path, capsys):
    from localdiff.cli import main

    npz = tmp_path / "tiny.npz"
    np.savez(npz, images=np.random.default_rng(0).integers(0, 256, (12, 8, 8)).astype(np.uint8))
    out = tmp_path / "run"
    (out / "checkpoints" / ".step-0000001.pid999999999.x.partial").mkdir(parents=True)  # SIGKILL mid-write
    cmd = ["train-unet", "--data", str(npz), "--split", "all", "--config", "small", "--steps", "2", "--out", str(out),
           "--batch-size", "4", "--device", "cpu", "--no-progress"]
    assert main([*cmd, "--resume", str(out)]) == 2
    assert "without --resume" in capsys.readouterr().err
    assert main(cmd) == 0
    assert "starting afresh" in capsys.readouterr().err
    assert [p.name for p in list_checkpoints(out / "checkpoints")] == ["step-0000002"]
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")  # anything else is never removed
    assert main([str(tmp_path / "other") if a == str(out) else a for a in cmd]) == 2
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"
