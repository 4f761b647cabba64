"""The patch models of prior work (docs/DESIGN.md §2.6): what they share (:mod:`.common`: patch sizes,
schedules, box sums), candidate-patch banks (:mod:`.bank`), Kamb & Ganguli's ``ls``, ``els`` and
``els-boundary`` (:mod:`.local_score`) and Niedoba et al.'s ``pspc`` (:mod:`.pspc`)."""

from .bank import PatchBank, bank_state
from .common import PatchConfig, PatchDenoiser, PatchSchedule, box_sum, read_patch_schedule, valid_box_sum
from .local_score import BoundaryELSDenoiser, ELSDenoiser, LSDenoiser
from .pspc import PSPCDenoiser

__all__ = ["PatchBank", "bank_state", "PatchConfig", "PatchDenoiser", "PatchSchedule", "box_sum",
           "read_patch_schedule", "valid_box_sum", "LSDenoiser", "ELSDenoiser", "BoundaryELSDenoiser", "PSPCDenoiser"]
