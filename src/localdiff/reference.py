"""The reference network's quality, shown beside every comparison with it.

A study compares analytical models with a trained U-Net; that comparison means something only where
the network is a good denoiser. :func:`check_reference` sets its held-out denoising MSE beside the
optimal linear model's (Wiener) and the empirical optimum's on the same noisy images, with paired
intervals, and names the steps where the network is worse than Wiener (or than optimal); a network worse than
Wiener at most of the non-trivial steps is flagged too weak to judge the analytical models (``too_weak``).
"""

from __future__ import annotations

import torch

from .denoisers import make_denoiser

REFERENCE = "unet"


def overlapping(data, held_out) -> bool:
    """The held-out images are (or include) training images: same data, or the same source and split."""
    if data.fingerprint == held_out.fingerprint:
        return True
    a, b = data.meta or {}, held_out.meta or {}
    if a.get("source") is None or a.get("source") != b.get("source"):
        return False
    splits = {a.get("split"), b.get("split")}
    return len(splits) == 1 or "all" in splits


TRIVIAL_SIGMA = 0.0101  # noise-to-signal at or below DDPM's t = 0 (0.0100): every model returns about x_t


def _step(key: str):
    return int(key) if key.isdigit() else key


def _steps_text(steps: list) -> str:
    ints = [s for s in steps if isinstance(s, int)]
    if len(ints) == len(steps):
        return "t = " + ", ".join(map(str, sorted(ints, reverse=True)))
    return "levels " + ", ".join(map(str, steps))


def check_reference(unet, fit_data, spectrum, held_out, grid, config, device, *,
                    progress: bool = True) -> dict:
    """The reference's quality, shown: the U-Net's held-out denoising MSE at the study's levels (``grid``) beside
    wiener's and optimal's on the same noisy images, paired differences (U-Net minus each), the timesteps
    where the U-Net is worse than Wiener by an interval that excludes 0, and its manifest summary."""
    from .evaluate import denoising_errors, summarize_errors
    from .paired import compare

    n = min(config.reference_check, len(held_out))
    images = (held_out.subset(n, seed=config.seed) if n < len(held_out) else held_out).tensor()
    dens = {REFERENCE: unet}
    for name in ("wiener", "optimal"):
        dens[name] = make_denoiser(name, fit_data, spectrum=spectrum, device=device, schedule=grid.schedule)
    levels, keys = list(grid.levels), grid.keys()
    errors = denoising_errors(dens, images, levels, generator=torch.Generator().manual_seed(config.seed),
                              batch_size=config.batch_size or 64, schedule=grid.schedule, progress=progress)
    vs = {other: {k: compare(errors[REFERENCE][k].numpy(), errors[other][k].numpy(), a=REFERENCE, b=other,
                             metric=f"mse_t{k}", lower_is_better=True) for k in keys}
          for other in ("wiener", "optimal")}
    # the lowest levels (sigma at most that of DDPM's t = 0) are trivial: every denoiser returns ~x_t there
    judged = [k for k, lv in zip(keys, levels) if lv.sigma > TRIVIAL_SIGMA]
    worse = [_step(k) for k in judged if vs["wiener"][k].b_better]
    worse_opt = [_step(k) for k in judged if vs["optimal"][k].b_better]
    too_weak = bool(judged) and len(worse) > len(judged) / 2
    warnings = []
    if worse:
        warnings.append(f"the reference U-Net denoises held-out images worse than Wiener at "
                        f"{_steps_text(worse)} (paired MSE on {n} images, 95% intervals above 0): comparisons at those "
                        "steps are against an undertrained network")
    if too_weak:
        warnings.append(f"the reference is too weak to judge the analytical models: it is worse than the optimal linear "
                        f"denoiser at {len(worse)} of the {len(judged)} non-trivial steps, so being close to it does not "
                        "mean being close to a good network; use a better-trained network (--unet)")
    manifest = (unet.info.manifest if unet.info is not None else None) or {}
    return {
        "num_images": n,
        "timesteps": grid.timesteps,
        "steps": keys,
        "judged_steps": judged,
        "mse": {name: {str(t): v for t, v in per_t.items()} for name, per_t in summarize_errors(errors).items()},
        "unet_minus": {other: {t: c.to_dict() for t, c in per_t.items()} for other, per_t in vs.items()},
        "worse_than_wiener": worse,
        "worse_than_optimal": worse_opt,
        "too_weak": too_weak,
        "network": {
            "path": str(unet.path), "prediction_type": unet.prediction_type, "data_match": unet.data_match,
            "num_parameters": sum(p.numel() for p in unet.model.parameters()),
            "model_config": manifest.get("model_config"), "steps": manifest.get("steps"),
            "epochs": manifest.get("epochs"), "device": manifest.get("device"),
            "trained_on": (manifest.get("data") or {}).get("name"),
            "data_fingerprint": (manifest.get("data") or {}).get("fingerprint"),
            "interim": manifest.get("interim"),
        },
        "warnings": warnings,
    }


__all__ = ["check_reference", "overlapping"]
