"""What ``tests/test_distributed.py`` runs under ``torchrun --nproc-per-node 2`` (gloo, CPU), and, on the
whole set in the test's own process, as the one-process reference.

``python -m torch.distributed.run ... distributed_worker.py JOB OUT``:

* ``models``: :func:`results` on this rank's shard for every variant of every model in
  ``tests/model_table.py`` (the toy model registered as a user registers it) -> ``OUT/results.npz``
  (rank 0), plus how far the ranks' results are apart, which rank drew progress bars, which models were
  built on the gathered set and which refused a shard (``OUT/ranks.json``). ``OUT/unet`` is the tiny
  network the ``unet`` entry needs.
* ``train``: 20 DDP steps (2 x 4 images per step), and 10 + a resume to 20, -> ``OUT/train.pt`` (rank 0).
* ``fail``: ``localdiff sample`` in which rank 1 fails in its third denoiser call.
"""

from __future__ import annotations

import json
import os
import sys
import warnings
from pathlib import Path

import numpy as np
import torch

import model_table

torch.set_num_threads(1)

N_IMAGES = 61  # odd: the two shards differ in size (30 and 31 images)
TIMESTEPS = (900, 500, 100)
GATHERED = "does not merge the states of the processes"  # make_denoiser's warning for a model given the whole set


def dataset(num: int = N_IMAGES):
    """``num`` structured 1x6x6 uint8 images (a shared blob, two classes, noise)."""
    from localdiff.data.dataset import ImageDataset

    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, size=(1, 1, 6, 6))
    x = base * 0.5 + rng.integers(0, 128, size=(num, 1, 6, 6))
    x[: num // 2, :, 1:4, 2:5] += 90
    return ImageDataset(raw=np.clip(x, 0, 255).astype(np.uint8), name="dist-test", meta={"made_by": "worker"})


def queries(shape, num: int = 4) -> torch.Tensor:
    g = torch.Generator().manual_seed(7)
    return torch.randn((num, *shape), generator=g, dtype=torch.float64) * 0.8


def results(data, unet_dir, built: dict | None = None) -> dict[str, np.ndarray]:
    """Every quantity compared between one process and two: statistics, each variant's x0_hat at three
    timesteps, closed-form and autograd Jacobian rows, sampled trajectories, nearest-image distances and a
    subset's fingerprint. ``data`` is the whole set or this rank's shard (collective then). ``built``, when
    given, receives per variant label whether the model was built on the whole set gathered from the
    shards, or the error with which it refused the shard."""
    from localdiff import make_denoiser, sample
    from localdiff.errors import ConfigError
    from localdiff.metrics import nearest_training_distances
    from localdiff.sensitivity import jacobian_rows
    from localdiff.stats import data_spectrum, moments

    out: dict[str, np.ndarray] = {}
    built = {} if built is None else built
    state = moments(data, progress=False)
    out["moments/count"] = np.array(float(state.count))
    out["moments/mean"], out["moments/m2"] = state.mean.numpy(), state.m2.numpy()
    spec = data_spectrum(data, cache=False, progress=False)
    out["spectrum/eigvals"], out["spectrum/cov"] = spec.eigvals.numpy(), spec.covariance().numpy()
    x = queries(data.shape)
    pixels = [(2, 3), (0, 5)]
    for v in model_table.variants():
        options = v.build_options(unet_dir)
        if not v.torchrun:  # it must refuse a shard, with a clear error
            try:
                make_denoiser(v.model, data, spectrum=spec, **options)
                built[v.label] = "built"
            except ConfigError as exc:
                built[v.label] = f"refused: {exc}"
            continue
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            den = make_denoiser(v.model, data, spectrum=spec, **options)
        built[v.label] = "gathered" if any(GATHERED in str(w.message) for w in caught) else "own data"
        caps = den.capabilities
        for t in (t for t in TIMESTEPS if caps.accepts(t)):
            with torch.no_grad():
                out[f"{v.label}/x0/{t}"] = den(x, t).numpy()
        t = 500 if caps.accepts(500) else caps.fitted_timesteps[0]
        if caps.closed_form_jacobian:
            out[f"{v.label}/rows"] = jacobian_rows(den, x[:2], t, pixels, method="closed").numpy()
        if v.autograd and not caps.piecewise_constant:
            out[f"{v.label}/grad"] = jacobian_rows(den, x[:2], t, pixels, method="autograd").numpy()
        if v.trajectory and caps.fitted_timesteps is None:  # a model fitted at some timesteps has no DDIM grid
            traj = sample(den, num=3, steps=10, seed=0, return_trajectory=True, progress=False)
            out[f"{v.label}/trajectory"] = traj.x0_hat.numpy()
    near = nearest_training_distances(x[:, :, :, :].clamp(-1, 1), data)
    out["nearest_images/distance"], out["nearest_images/second"] = near.distance.numpy(), near.second.numpy()
    out["nearest_images/index"], out["nearest_images/image"] = near.index.numpy(), near.image.numpy()
    sub = data.subset(20, seed=3)
    out["subset/fingerprint"] = np.frombuffer(bytes.fromhex(sub.fingerprint), dtype=np.uint8)
    out["subset/mean"] = data_spectrum(sub, cache=False, progress=False).mean.numpy()
    out["dataset/fingerprint"] = np.frombuffer(bytes.fromhex(data.fingerprint), dtype=np.uint8)
    return out


def tiny_unet_config():
    from localdiff.unet import UNetConfig

    return UNetConfig(base_channels=8, channel_mult=(1, 2), layers_per_block=1, dropout=0.0, norm_num_groups=4)


def train_config(batch_size: int):
    from localdiff.unet import TrainConfig

    return TrainConfig(batch_size=batch_size, lr=1e-3, warmup=2, device="cpu", seed=0)


def training_images():
    return dataset(16)


def parameters(trainer) -> torch.Tensor:
    return torch.cat([p.detach().reshape(-1) for p in trainer.model.parameters()])


def job_models(out: Path) -> None:
    from localdiff import distributed
    from localdiff.data.shards import shard_dataset

    distributed.init_from_env()
    built: dict[str, str] = {}
    with model_table.added_models():  # the toy model, registered as a user registers it
        res = results(shard_dataset(dataset()), out / "unet", built)
    flat = np.concatenate([v.astype(np.float64).reshape(-1) for _, v in sorted(res.items())])
    spread = [float(np.abs(f.numpy() - flat).max()) for f in distributed.gather(torch.from_numpy(flat))]
    bars = distributed.gather(int(distributed.tqdm([], disable=False).disable))
    if distributed.is_main():
        np.savez(out / "results.npz", **res)
        (out / "ranks.json").write_text(json.dumps({"spread": spread, "bar_disabled": bars, "built": built}))
    distributed.shutdown()


def job_train(out: Path) -> None:
    from localdiff import distributed
    from localdiff.unet.distributed import DistributedTrainer

    distributed.init_from_env()
    data, mc, tc = training_images(), tiny_unet_config(), train_config(4)
    straight = DistributedTrainer(data, mc, tc).fit(20, progress=False, handle_signals=False)
    first = DistributedTrainer(data, mc, tc).fit(10, total_steps=20, checkpoint_dir=out / "ckpt", progress=False,
                                                 handle_signals=False)
    ckpt = out / "ckpt" / "step-0000010"
    resumed = DistributedTrainer.from_checkpoint(ckpt, data).fit(20, progress=False, handle_signals=False)
    if distributed.is_main():
        torch.save({"straight": parameters(straight), "resumed": parameters(resumed), "first": parameters(first),
                    "loss": straight.loss_ema, "images_per_s": straight.images_per_s,
                    "listing": sorted(p.name for p in (out / "ckpt").iterdir())}, out / "train.pt")
    distributed.shutdown()


def job_fail(out: Path) -> None:
    """``localdiff sample`` on ``OUT/data.npz`` in which rank 1's third optimal call raises (rank 0 is then
    in a collective)."""
    from localdiff import cli
    from localdiff.denoisers.empirical import OptimalDenoiser

    if os.environ.get("RANK") == "1":
        calls = {"n": 0}
        denoise = OptimalDenoiser.denoise

        def failing(self, x_t, t):
            calls["n"] += 1
            if calls["n"] == 3:
                raise RuntimeError("injected failure on purpose")
            return denoise(self, x_t, t)

        OptimalDenoiser.denoise = failing
    sys.exit(cli.main(["sample", "--data", str(out / "data.npz"), "--model", "optimal", "--num", "2",
                       "--out", str(out / "run")]))


if __name__ == "__main__":
    job, where = sys.argv[1], Path(sys.argv[2])
    {"models": job_models, "train": job_train, "fail": job_fail}[job](where)
