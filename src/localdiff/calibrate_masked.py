"""Choose the mask threshold ``tau`` and the softmax temperature T of a masked model per timestep.

The paper sets ``tau`` by hand, once for every timestep. Here, for every timestep t, held-out images
are noised by the forward process (one draw per image and t, shared by every candidate) and each
candidate ``(tau, T)`` of a grid denoises them; the pair with the smallest mean squared error wins.
The error is measured against the clean images (held-out denoising MSE: no network needed) or against
a target denoiser's ``x0_hat`` (for instance a U-Net, as ``calibrate-patches`` does for patch sizes).
The result is the JSON schedule that the option ``tau_schedule=FILE`` of ``masked``, ``masked-soft``
and ``masked-equivariant`` reads (:mod:`localdiff.denoisers.masked.schedule`).

The held-out images are ``num`` images of a seeded permutation of the held-out split, after the first
``skip`` ones: ``skip=500, seed=0`` keeps them disjoint from ``localdiff evaluate --num 500 --seed 0``,
so a schedule is never chosen on the images it is then scored on.
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy as np
import torch

from .denoisers import REGISTRY, make_denoiser
from .denoisers.masked.schedule import SCHEDULE_FORMAT, check_tau, check_temperature
from .diffusion import timesteps_for
from .schedules import DEFAULT_SCHEDULE, Schedule
from .errors import ConfigError
from .evaluate import noisy_draws


def held_out_images(held_out, num: int, seed: int = 0, skip: int = 0) -> torch.Tensor:
    """Images ``skip .. skip + num - 1`` of a seeded permutation of ``held_out`` as float32 [N, C, H, W].

    ``skip=0`` gives the images of ``held_out.subset(num, seed)`` (what ``localdiff evaluate`` scores);
    ``skip=S`` gives images disjoint from ``held_out.subset(S, seed)``."""
    n = len(held_out)
    if num < 1 or skip < 0 or skip + num > n:
        raise ConfigError(f"need images {skip}..{skip + num - 1} of a held-out set of {n}")
    if skip == 0:
        return held_out.subset(num, seed=seed).tensor()
    idx = np.sort(np.random.default_rng(seed).permutation(n)[skip:skip + num])
    return held_out.select(idx, note=f"permutation(seed={seed})[{skip}:{skip + num}]").tensor()


def noisy_images(images: torch.Tensor, timesteps: Sequence[int], seed: int,
                 schedule: Schedule = DEFAULT_SCHEDULE) -> dict[int, torch.Tensor]:
    """``{t: x_t}`` [N, C, H, W] float32: one draw per image and timestep from one CPU generator seeded
    with ``seed``, timestep after timestep (:func:`localdiff.evaluate.noisy_draws`, which ``localdiff
    evaluate`` uses with the same seed)."""
    return dict(noisy_draws(images, timesteps, torch.Generator().manual_seed(int(seed)), schedule))


@torch.no_grad()
def per_image_mse(den: Callable, x_t: torch.Tensor, reference: torch.Tensor, t: int,
                  batch_size: int = 64) -> torch.Tensor:
    """``||den(x_t) - reference||^2 / n`` per image, float64 [N] (``reference``: clean images or a target)."""
    out = torch.empty(x_t.shape[0], dtype=torch.float64)
    for s in range(0, x_t.shape[0], batch_size):
        est = den(x_t[s:s + batch_size], t).detach().to("cpu", torch.float64)
        out[s:s + batch_size] = (est - reference[s:s + batch_size].double()).pow(2).flatten(1).mean(1)
    return out


def _key(tau: float, temperature: float) -> str:
    return f"tau={tau:g},T={temperature:g}"


def calibrate_masked(
    model_name: str,
    data,
    held_out,
    *,
    timesteps: Sequence[int] | None = None,
    taus: Sequence[float] = (0.005,),
    temperatures: Sequence[float] = (1.0,),
    num_images: int = 64,
    seed: int = 0,
    skip: int = 0,
    target: Callable | None = None,
    model_options: dict | None = None,
    spectrum=None,
    batch_size: int = 64,
    progress: Callable[[str], None] | None = None,
) -> dict:
    """For every timestep, the ``(tau, T)`` of the grid ``taus x temperatures`` whose ``x0_hat`` is
    closest (per-pixel MSE) to the clean held-out images, or to ``target``'s ``x0_hat`` when given.

    ``model_name``: masked, masked-soft or masked-equivariant, built on ``data`` with ``model_options``
    (``tau``, ``temperature`` and ``tau_schedule`` are set by the calibration). ``held_out``: a dataset;
    the images are chosen by :func:`held_out_images` (``num_images``, ``seed``, ``skip``) and noised by
    :func:`noisy_images` with ``seed``. Ties go to the earlier candidate (smaller tau, then smaller T).
    Returns the schedule document (see :mod:`localdiff.denoisers.masked.schedule`) with every
    candidate's MSE and its standard error.
    """
    if not hasattr(REGISTRY.get(model_name), "tau_at"):
        raise ConfigError(f"model '{model_name}' has no mask threshold to calibrate; use masked, masked-soft or "
                          "masked-equivariant")
    options = {k: v for k, v in (model_options or {}).items() if k not in ("tau", "temperature", "tau_schedule")}
    taus = sorted({check_tau(float(v), "a calibration tau") for v in taus})
    temperatures = sorted({check_temperature(float(v), "a calibration temperature") for v in temperatures})
    if not taus or not temperatures:
        raise ConfigError("no tau or temperature to try")
    if batch_size < 1:
        raise ConfigError("batch_size must be positive")
    timesteps = [DEFAULT_SCHEDULE.check_t(t) for t in (timesteps if timesteps is not None else timesteps_for(10))]
    if not timesteps:
        raise ConfigError("no timesteps to calibrate")
    x0 = held_out_images(held_out, num_images, seed, skip)
    if tuple(x0.shape[1:]) != tuple(data.shape):
        raise ConfigError(f"held-out images have shape {tuple(x0.shape[1:])}, the training set {tuple(data.shape)}")
    x_t = noisy_images(x0, timesteps, seed)
    refs = {t: x0 for t in timesteps}
    if target is not None:
        refs = {t: torch.cat([target(x_t[t][s:s + batch_size], t).detach().to("cpu", torch.float32)
                              for s in range(0, len(x0), batch_size)]) for t in timesteps}
    scores: dict[int, dict[str, torch.Tensor]] = {t: {} for t in timesteps}
    settings = None
    for tau in taus:
        for temp in temperatures:
            den = make_denoiser(model_name, data, spectrum=spectrum, tau=tau, temperature=temp, **options)
            settings = settings or {k: v for k, v in den.settings().items()
                                    if k not in ("tau", "temperature", "tau_rule", "tau_schedule_params")}
            for t in timesteps:
                scores[t][_key(tau, temp)] = per_image_mse(den, x_t[t], refs[t], t, batch_size)
                if progress is not None:
                    progress(f"tau={tau:g} T={temp:g} t={t}: mse {float(scores[t][_key(tau, temp)].mean()):.5f}")
            del den
    params, mse = {}, {}
    n = len(x0)
    for t in timesteps:
        best = min(((tau, temp) for tau in taus for temp in temperatures),
                   key=lambda p: float(scores[t][_key(*p)].mean()))
        params[str(t)] = {"tau": best[0], "temperature": best[1]}
        mse[str(t)] = {k: {"mse": float(v.mean()), "se": float(v.std(unbiased=True) / n ** 0.5) if n > 1 else None}
                       for k, v in scores[t].items()}
    return {
        "format": SCHEDULE_FORMAT,
        "version": 1,
        "model": model_name,
        "model_options": settings,
        "against": "target" if target is not None else "clean held-out images",
        "target": (target.settings() if hasattr(target, "settings") else repr(target)) if target is not None else None,
        "dataset": data.describe() if hasattr(data, "describe") else None,
        "num_images": int(num_images), "seed": int(seed), "skip": int(skip),
        "timesteps": timesteps, "taus": taus, "temperatures": temperatures,
        "params": params,
        "mse": mse,
    }


__all__ = ["calibrate_masked", "held_out_images", "noisy_images", "per_image_mse"]
