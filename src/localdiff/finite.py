"""Finite in, finite out: the checks ``Denoiser.__call__`` applies around every model.

A NaN or Inf in one image of a batch must never reach the models (several mix the images of a batch
in shared products, so it would spread to the clean images); and no model may hand NaN or Inf back
for a finite input without saying so.
"""

from __future__ import annotations

import torch

from .errors import ConfigError, NumericsError


def check_finite_input(name: str, x_t: torch.Tensor) -> None:
    """ConfigError naming the images of ``x_t`` [B, C, H, W] that hold NaN or Inf."""
    bad = ~torch.isfinite(x_t.detach())
    if bool(bad.any()):
        images = bad.flatten(1).any(dim=1).nonzero().flatten().tolist()
        shown = ", ".join(map(str, images[:8])) + (", ..." if len(images) > 8 else "")
        raise ConfigError(f"{name}: x_t holds {int(bad.sum())} NaN or Inf values (in image {shown} of the batch); "
                          "denoisers need finite inputs: check what produced x_t, or drop those images")


def check_finite_output(name: str, out: torch.Tensor, x_t: torch.Tensor, where: str) -> None:
    """NumericsError when a model returned NaN or Inf for the finite ``x_t`` at the level ``where`` (``t=500``)."""
    bad = ~torch.isfinite(out.detach())
    if bool(bad.any()):
        peak = float(x_t.detach().abs().max())
        raise NumericsError(
            f"{name}: the model returned {int(bad.sum())} NaN or Inf values at {where} for a finite x_t (largest "
            f"|x_t| = {peak:.3g}); "
            + ("x_t is far outside the scale of the forward process (|x_t| of a few units), so the model's "
               "arithmetic overflowed: rescale x_t" if peak > 1e4 else
               "please report this with the model's settings and the input")
        )
