"""The paper's Wiener-masked local denoiser and the variants beyond the paper (docs/DESIGN.md §2.5, §2.8):
masks from the Wiener gain (:mod:`.masks`), the tiling and cost model (:mod:`.plan`), the streamed
kernel (:mod:`.kernel`), the model ``masked`` (:mod:`.model`), soft masks ``masked-soft`` (:mod:`.soft`),
one stencil with candidates from every position ``masked-equivariant`` (:mod:`.equivariant`) and
per-timestep tau and temperature (:mod:`.schedule`)."""

from .equivariant import MaskedEquivariantConfig, MaskedEquivariantDenoiser
from .masks import default_tau, masked_logits, normalized_gain, threshold_masks, wiener_masks
from .model import MaskedConfig, MaskedDenoiser
from .schedule import MaskedSchedule, read_masked_schedule
from .soft import MaskedSoftConfig, MaskedSoftDenoiser

__all__ = ["MaskedConfig", "MaskedDenoiser", "MaskedSoftConfig", "MaskedSoftDenoiser", "MaskedEquivariantConfig",
           "MaskedEquivariantDenoiser", "MaskedSchedule", "read_masked_schedule", "default_tau", "masked_logits",
           "normalized_gain", "threshold_masks", "wiener_masks"]
