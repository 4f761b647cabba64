"""The reference network's quality, shown beside every comparison with it.

A study compares analytical models with a trained U-Net; that comparison means something only where
the network is a good denoiser. :func:`check_reference` sets its held-out denoising MSE beside the
optimal linear model's (Wiener) and the empirical optimum's on the same noisy images, with paired
intervals, and names the timesteps where the network is worse than Wiener.
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


def check_reference(unet, fit_data, spectrum, held_out, timesteps, config, device, *,
                    progress: bool = True) -> dict:
    """The reference's quality, shown: the U-Net's held-out denoising MSE at the study's timesteps beside
    wiener's and optimal's on the same noisy images, paired differences (U-Net minus each), the timesteps
    where the U-Net is worse than Wiener by an interval that excludes 0, and its manifest summary."""
    from .evaluate import denoising_errors, summarize_errors
    from .paired import compare

    n = min(config.reference_check, len(held_out))
    images = (held_out.subset(n, seed=config.seed) if n < len(held_out) else held_out).tensor()
    dens = {REFERENCE: unet}
    for name in ("wiener", "optimal"):
        dens[name] = make_denoiser(name, fit_data, spectrum=spectrum, device=str(device))
    errors = denoising_errors(dens, images, timesteps, generator=torch.Generator().manual_seed(config.seed),
                              batch_size=config.batch_size or 64, progress=progress)
    vs = {other: {str(t): compare(errors[REFERENCE][t].numpy(), errors[other][t].numpy(), a=REFERENCE, b=other,
                                  metric=f"mse_t{t}", lower_is_better=True) for t in timesteps}
          for other in ("wiener", "optimal")}
    worse = [int(t) for t, c in vs["wiener"].items() if c.b_better]
    warnings = []
    if worse:
        warnings.append(f"the reference U-Net denoises held-out images worse than Wiener at t = "
                        f"{', '.join(map(str, sorted(worse, reverse=True)))} (paired MSE on {n} images, 95% intervals "
                        "above 0): comparisons at those steps are against an undertrained network")
    manifest = (unet.info.manifest if unet.info is not None else None) or {}
    return {
        "num_images": n,
        "timesteps": [int(t) for t in timesteps],
        "mse": {name: {str(t): v for t, v in per_t.items()} for name, per_t in summarize_errors(errors).items()},
        "unet_minus": {other: {t: c.to_dict() for t, c in per_t.items()} for other, per_t in vs.items()},
        "worse_than_wiener": worse,
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
