"""Calibrate the patch size of a patch denoiser per timestep against a target denoiser.

Kamb & Ganguli (arXiv 2412.20292) and Niedoba et al. (arXiv 2411.19339) fit one scale per timestep
by matching a trained network. Here, for each timestep t, held-out images are noised by the forward
process and the patch model's x0_hat at every candidate patch size is compared with the target's x0_hat
(any denoiser: the exact ``optimal`` one, a U-Net, ...); the size with the smallest mean squared error
wins. The result is the JSON schedule that the ``patch_schedule`` option of the patch models reads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import torch

from .denoisers import make_denoiser
from .denoisers.patches.common import SCHEDULE_FORMAT, PatchDenoiser
from .diffusion import timesteps_for
from .errors import ConfigError


def _held_out_images(held_out, num_images: int, seed: int) -> torch.Tensor:
    """``num_images`` float64 images [N, C, H, W] from a dataset (seeded subset) or a tensor (first N)."""
    if isinstance(held_out, torch.Tensor):
        if held_out.ndim != 4 or held_out.shape[0] < num_images:
            raise ConfigError(f"held-out images must be [N>={num_images}, C, H, W], got {tuple(held_out.shape)}")
        return held_out[:num_images].to(torch.float64).cpu()
    if len(held_out) < num_images:
        raise ConfigError(f"asked for {num_images} held-out images but the held-out set has {len(held_out)}")
    return held_out.subset(num_images, seed=seed).tensor(dtype=torch.float64)


def calibrate_patch_sizes(
    model_name: str,
    data,
    target_denoiser: Callable[[torch.Tensor, int], torch.Tensor],
    timesteps: list[int] | None = None,
    sizes: list[int] | None = None,
    num_images: int = 16,
    seed: int = 0,
    *,
    held_out=None,
    model_options: dict | None = None,
    device: str | None = None,
    batch_size: int = 16,
    out: str | Path | None = None,
    overwrite: bool = False,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """Pick, for every timestep, the patch size whose x0_hat best matches ``target_denoiser`` (MSE).

    ``data``: the training set of the patch model ``model_name`` (ls, els, els-boundary, pspc), built
    with ``model_options``. ``held_out``: the images to noise (an ImageDataset, of which a subset of
    ``num_images`` seeded by ``seed`` is used, or a tensor [N, C, H, W] of which the first ``num_images``);
    ``None`` uses ``data`` itself (only sensible for a target that did not see ``data``).
    The noise is drawn, timestep after timestep in the given order, from one CPU ``torch.Generator``
    seeded with ``seed``, so every size and the target see the same x_t (float32, as in sampling). Defaults: the 10 DDIM
    timesteps and the model's own candidate sizes. Ties go to the smaller patch.

    Returns (and, with ``out``, writes atomically; an existing file is refused unless ``overwrite``)::

        {"format": "localdiff.patch-schedule", "model": ..., "patch_sizes": {"900": 27, ...},
         "mse": {"900": {"3": 0.12, ...}, ...}, "timesteps": [...], "sizes": [...], ...}
    """
    from .fileio import write_json

    if out is not None and Path(out).exists() and not overwrite:
        raise ConfigError(f"{out} already exists; choose a new output file (schedules are never overwritten)")
    if num_images < 1 or batch_size < 1:
        raise ConfigError("num_images and batch_size must be positive")
    options = dict(model_options or {})
    options.pop("patch_schedule", None)  # calibration sets the size explicitly
    if device is not None:
        options.setdefault("device", device)
    model = make_denoiser(model_name, data, **options)
    if not isinstance(model, PatchDenoiser):
        raise ConfigError(f"model '{model_name}' has no patch size to calibrate; use ls, els, els-boundary or pspc")
    schedule = model.schedule
    timesteps = [schedule.check_t(t) for t in (timesteps if timesteps is not None else timesteps_for(10))]
    if not timesteps:
        raise ConfigError("no timesteps to calibrate")
    sizes = sorted({model.check_patch_size(int(s)) for s in (sizes if sizes is not None else model.default_sizes())})
    if not sizes:
        raise ConfigError("no patch sizes to try")

    x0 = _held_out_images(data if held_out is None else held_out, num_images, seed)  # [N, C, H, W]
    if tuple(x0.shape[1:]) != tuple(model.shape):
        raise ConfigError(f"held-out images have shape {tuple(x0.shape[1:])}, the training set {model.shape}")
    gen = torch.Generator().manual_seed(int(seed))
    best, mse = {}, {}
    for t in timesteps:
        x_t = schedule.q_sample(x0, t, torch.randn(x0.shape, generator=gen, dtype=torch.float64)).float()
        sq = {s: 0.0 for s in sizes}
        for start in range(0, x_t.shape[0], batch_size):
            xb = x_t[start:start + batch_size]
            ref = target_denoiser(xb, t).detach().to(device="cpu", dtype=torch.float64)
            for s in sizes:
                est = model.denoise_patch(xb.to(model.device), t, s).detach().to("cpu", torch.float64)
                sq[s] += float(((est - ref) ** 2).sum())
        n = x0.numel()
        mse[str(t)] = {str(s): sq[s] / n for s in sizes}
        best[str(t)] = min(sizes, key=lambda s: (sq[s], s))
        if progress is not None:
            progress(f"t={t}: patch size {best[str(t)]} (mse {sq[best[str(t)]] / n:.3g})")

    result = {
        "format": SCHEDULE_FORMAT,
        "version": 1,
        "model": model_name,
        "model_options": {k: v for k, v in model.settings().items() if k != "patch_schedule"},
        "target": target_denoiser.settings() if hasattr(target_denoiser, "settings") else repr(target_denoiser),
        "dataset": data.describe() if hasattr(data, "describe") else None,
        "num_images": int(num_images),
        "seed": int(seed),
        "timesteps": timesteps,
        "sizes": sizes,
        "patch_sizes": best,
        "mse": mse,
    }
    if out is not None:
        if Path(out).exists() and not overwrite:
            raise ConfigError(f"{out} appeared while calibrating; the result was not written")
        write_json(out, result)
    return result

