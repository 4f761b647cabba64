"""Denoising error on held-out images: how well each denoiser recovers x0 from x_t at fixed timesteps.

For each timestep t and held-out image x0 one noise draw eps gives ``x_t = a x0 + sqrt(b2) eps``; every
model sees the *same* x_t (paired comparison), and the score is the per-pixel mean squared error
``||x0_hat(x_t, t) - x0||^2 / n`` averaged over images, with its standard error. This is the training
objective of a diffusion model written in x0 units, so a model that generalises must do well on images
it never saw: a trained U-Net should beat the optimal *linear* model (Wiener) at middle noise, and the
empirical optimal denoiser, which only ever returns blends of training images, loses at low noise.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence

import torch

from .schedules import DEFAULT_SCHEDULE, NoiseLevel, NoiseSchedule, level_key
from .distributed import tqdm
from .errors import ConfigError


def denoising_mse(denoisers: Mapping[str, object], images: torch.Tensor, timesteps: Sequence[int], *,
                  generator: torch.Generator, batch_size: int = 64, schedule: NoiseSchedule = DEFAULT_SCHEDULE,
                  progress: bool = True) -> dict[str, dict[int, dict[str, float]]]:
    """``{model: {t: {"mse", "se", "num"}}}`` for held-out ``images`` [N,C,H,W] in [-1, 1].

    The noise is drawn once per (t, image) from ``generator`` on the CPU, so results do not depend on
    the device, the batch size or the order of the models.
    """
    errors = denoising_errors(denoisers, images, timesteps, generator=generator, batch_size=batch_size,
                              schedule=schedule, progress=progress)
    return summarize_errors(errors)


def summarize_errors(errors: Mapping[str, Mapping[int, torch.Tensor]]) -> dict[str, dict[int, dict[str, float]]]:
    """Per-image errors ``{model: {t: [N]}}`` -> ``{model: {t: {"mse", "se", "num"}}}`` (mean, standard error)."""
    out: dict[str, dict[int, dict[str, float]]] = {}
    for name, per_t in errors.items():
        out[name] = {}
        for t, v in per_t.items():
            n_img = v.numel()
            se = float(v.std(unbiased=True) / n_img**0.5) if n_img > 1 else float("nan")
            out[name][t] = {"mse": float(v.mean()), "se": se, "num": n_img}
    return out


def paired_mse_comparisons(errors: Mapping[str, Mapping[int, torch.Tensor]]) -> dict[int, tuple[list, dict]]:
    """Per timestep, the model with the lowest mean error against every other model on the same noisy
    images (:func:`localdiff.paired.best_against_rest`, lower is better)."""
    from .paired import best_against_rest

    timesteps = next(iter(errors.values())).keys() if errors else []
    return {t: best_against_rest({m: errors[m][t].numpy() for m in errors}, f"mse_t{t}", lower_is_better=True)
            for t in timesteps}


def noisy_draws(images: torch.Tensor, timesteps: Sequence, generator: torch.Generator,
                schedule: NoiseSchedule = DEFAULT_SCHEDULE) -> Iterator[tuple[object, torch.Tensor]]:
    """``(t, x_t)`` [N, C, H, W] float32 per level (timestep or NoiseLevel): one noise draw per image and timestep from
    ``generator``, timestep after timestep, one x_t in memory at a time. Every held-out score of the
    toolkit (evaluate, calibrate-masked, benchmarks/heldout_mse.py) noises its images here, so the same
    seed gives the same x_t everywhere."""
    images = images.detach().to("cpu", torch.float32)
    for t in timesteps:
        yield t, schedule.q_sample(images, t, torch.randn(images.shape, generator=generator))


def denoising_errors(denoisers: Mapping[str, object], images: torch.Tensor, timesteps: Sequence[int], *,
                     generator: torch.Generator, batch_size: int = 64, schedule: NoiseSchedule = DEFAULT_SCHEDULE,
                     progress: bool = True) -> dict[str, dict[int, torch.Tensor]]:
    """Per-image per-pixel squared errors ``{model: {t: [N] float64}}`` (see :func:`denoising_mse`) at the levels
    ``timesteps``: integer timesteps of ``schedule`` (the keys) or NoiseLevels (keyed ``"500"`` or ``"s=1.23"``)."""
    if images.ndim != 4 or images.shape[0] < 1:
        raise ConfigError(f"held-out images must be a non-empty [N,C,H,W] tensor, got {tuple(images.shape)}")
    if batch_size < 1:
        raise ConfigError(f"batch_size must be positive, got {batch_size}")
    levels = [schedule.at(t) for t in timesteps]  # validated once
    keys = [level_key(t) if isinstance(t, NoiseLevel) else lv.t for t, lv in zip(timesteps, levels)]
    images = images.detach().to("cpu", torch.float32)
    n_img = images.shape[0]
    sq = {name: {k: torch.empty(n_img, dtype=torch.float64) for k in keys} for name in denoisers}
    bar = tqdm(total=len(levels) * n_img, desc="denoising MSE", unit="img", disable=not progress)
    for k, (level, x_t) in zip(keys, noisy_draws(images, levels, generator, schedule)):  # x_t [N,C,H,W]
        for start in range(0, n_img, batch_size):
            sl = slice(start, start + batch_size)
            for name, den in denoisers.items():
                with torch.no_grad():
                    x0_hat = den(x_t[sl], level).double()
                sq[name][k][sl] = (x0_hat - images[sl].double()).pow(2).flatten(1).mean(1)
            bar.update(x_t[sl].shape[0])
    bar.close()
    return sq
