"""What the patch-based models of prior work share (docs/DESIGN.md §2.6): a square patch of side P per
timestep, patch-size schedules written by ``localdiff calibrate-patches``, box sums by prefix sums, and
the block size of the streamed training set. The models live in :mod:`.local_score` (Kamb & Ganguli:
``ls``, ``els``, ``els-boundary``) and :mod:`.pspc` (Niedoba et al.: ``pspc``).

Notation as in docs/DESIGN.md: ``a = sqrt(alpha_bar_t)``, ``b2 = 1 - alpha_bar_t``, ``Pi_i`` the patch
around pixel i. Every softmax is a max-shifted, mergeable :class:`~.softmax.SoftmaxState` streamed over
the training set in blocks whose temporaries stay below ``block`` elements, so the result does not
depend on the chunking (up to rounding) and memory does not grow with the data. The ``||Pi_i x_t||^2``
term of every patch distance is constant over the candidates and cancels. Everything runs on CPU or
CUDA and is differentiable (autograd) for sensitivity fields. In a torchrun job every model streams its
rank's shard and merges the ranks' softmax states (:func:`localdiff.distributed.merge_ranks`) before
using them.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Literal

import torch

from ...errors import ConfigError
from ...schedules import NoiseLevel
from ..schedule_files import nearest_listed, read_schedule_doc
from ..stream import BLOCK_ELEMENTS, StreamedDenoiser, StreamOptions

SCHEDULE_FORMAT = "localdiff.patch-schedule"
Padding = Literal["zeros", "truncate", "circular"]


# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class PatchSchedule:
    """Patch size per timestep; a timestep between the listed ones uses the nearest listed one
    (ties go to the larger timestep, i.e. the noisier calibration point)."""

    sizes: dict[int, int]

    def at(self, t) -> int:
        """The size at the listed timestep nearest to the level ``t`` (a timestep or a NoiseLevel)."""
        return self.sizes[nearest_listed(self.sizes, t)]


def read_patch_schedule(path: str | Path) -> PatchSchedule:
    """Read a schedule JSON: ``{"format": "localdiff.patch-schedule", "patch_sizes": {"900": 27, ...}}``.

    A bare mapping ``{"900": 27, ...}`` is accepted too, so schedules can be written by hand.
    """
    p = Path(path)
    doc = read_schedule_doc(p, "patch-size schedule", SCHEDULE_FORMAT, "patch_sizes", "calibrate-patches")
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"patch-size schedule {p} must map timesteps to patch sizes, e.g. {{\"900\": 27}}")
    sizes = {}
    for key, value in doc.items():
        try:
            t, size = int(key), int(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"patch-size schedule {p}: entry {key!r}: {value!r} is not timestep: size") from exc
        if isinstance(value, bool) or size != value or size < 1 or t < 0:
            raise ConfigError(f"patch-size schedule {p}: entry {key!r}: {value!r} needs a timestep >= 0 and "
                              "an integer patch size >= 1")
        sizes[t] = size
    return PatchSchedule(sizes)



# ------------------------------------------------------------------------------------------------
# Box sums over patches (prefix sums: cost independent of P)
# ------------------------------------------------------------------------------------------------

def _box_sum_axis(v: torch.Tensor, d: int, dim: int, circular: bool) -> torch.Tensor:
    """Sum of ``v`` over the window ``[i - d, i + d]`` along ``dim`` (zero outside, or wrapped)."""
    L = v.shape[dim]
    if (circular and 2 * d + 1 >= L) or d >= L - 1:  # every window covers the whole axis
        return v.sum(dim, keepdim=True).expand_as(v).contiguous()
    # pad by d + 1 before and d after; then sum(v[i-d .. i+d]) = c[i + 2d + 1] - c[i] for c = cumsum
    if circular:
        parts = [v.narrow(dim, L - d - 1, d + 1), v, v.narrow(dim, 0, d)]
    else:
        zeros = v.new_zeros(()).expand(*v.shape[:dim], 1, *v.shape[dim + 1:])
        parts = [zeros.expand(*v.shape[:dim], d + 1, *v.shape[dim + 1:]), v,
                 zeros.expand(*v.shape[:dim], d, *v.shape[dim + 1:])]
    c = torch.cat(parts, dim).cumsum(dim)
    return c.narrow(dim, 2 * d + 1, L) - c.narrow(dim, 0, L)


def box_sum(v: torch.Tensor, d: int, padding: str) -> torch.Tensor:
    """``sum_{m in Pi_i} v[m]`` for every pixel i of ``v`` [..., H, W]; Pi_i the (2d+1)^2 window at i.

    ``zeros``/``truncate``: the window is cut at the border; ``circular``: it wraps around.
    Cost independent of d (prefix sums).
    """
    circular = padding == "circular"
    return _box_sum_axis(_box_sum_axis(v, d, v.ndim - 1, circular), d, v.ndim - 2, circular)


def valid_box_sum(v: torch.Tensor, ph: int, pw: int) -> torch.Tensor:
    """Sums of ``v`` [..., H, W] over every ph x pw window that fits: [..., H - ph + 1, W - pw + 1]."""
    for dim, p in ((v.ndim - 2, ph), (v.ndim - 1, pw)):
        zero = torch.zeros_like(v.narrow(dim, 0, 1))
        c = torch.cat([zero, v.cumsum(dim)], dim)
        n = v.shape[dim] - p + 1
        v = c.narrow(dim, p, n) - c.narrow(dim, 0, n)
    return v


@dataclass
class PatchConfig(StreamOptions):
    patch_size: int = 5  # P, side of the square patch (used at every timestep unless patch_schedule is given)
    patch_schedule: str | None = None  # JSON file timestep -> patch size (calibrate-patches); overrides patch_size
    block: int = BLOCK_ELEMENTS  # elements of the largest temporary (about cache-sized: the speed depends on it)
    dtype: Literal["float32", "float64"] = "float64"  # arithmetic of the patch distances



# ------------------------------------------------------------------------------------------------
# Common base: patch size per timestep
# ------------------------------------------------------------------------------------------------

class PatchDenoiser(StreamedDenoiser):
    """A denoiser whose locality is a square patch of side P chosen per timestep.

    :meth:`denoise_patch` runs it at an explicit patch size (used by calibration).
    """

    Config: ClassVar[type] = PatchConfig
    odd_only: ClassVar[bool] = True

    def __init__(self, data, config: PatchConfig, schedule=None):
        super().__init__(data, config, schedule)
        config = self.config
        if config.block < 1:
            raise ConfigError(f"{self.name}: block must be a positive number of elements, got {config.block}")
        path = config.patch_schedule
        self.size_schedule = read_patch_schedule(path) if path is not None else None
        sizes = [config.patch_size] if self.size_schedule is None else list(self.size_schedule.sizes.values())
        for size in sizes:
            self.check_patch_size(size)

    def patch_size_at(self, t) -> int:
        """P used at the level ``t``: from the schedule (nearest listed level) or the constant patch_size."""
        return self.size_schedule.at(self.schedule.at(t)) if self.size_schedule is not None else self.config.patch_size

    def max_patch_size(self) -> int:
        """The largest meaningful patch size (larger ones give the same result or are not allowed)."""
        return 2 * max(self.shape[1:]) - 1

    def default_sizes(self) -> list[int]:
        """Candidate sizes for calibration: odd sizes 1, 3, ... up to :meth:`max_patch_size`."""
        return list(range(1, self.max_patch_size() + 1, 2))

    def check_patch_size(self, size: int) -> int:
        if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < 1:
            raise ConfigError(f"{self.name}: patch size must be a positive integer, got {size!r}")
        size = int(size)
        if self.odd_only and size % 2 == 0:
            raise ConfigError(f"{self.name}: patch size must be odd (the patch is centred on its pixel), got {size}")
        return size

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        return self.denoise_patch(x_t, level, self.patch_size_at(level))

    def denoise_patch(self, x_t: torch.Tensor, t, patch_size: int) -> torch.Tensor:
        """x0_hat at an explicit patch size (``x_t`` [B, C, H, W] on this denoiser's device) at the level ``t``."""
        level = self.schedule.at(t)
        size = self.check_patch_size(patch_size)
        x = self.rank_input(x_t.to(device=self.device, dtype=self.dtype))  # reaches the output only through
        # the softmax states, which each model merges over the ranks (merge_ranks)
        return self._denoise(x, level.a, level.b2, size).to(x_t.dtype)

    def _denoise(self, x: torch.Tensor, a: float, b2: float, size: int) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError


__all__ = ["PatchSchedule", "read_patch_schedule", "SCHEDULE_FORMAT", "Padding", "PatchConfig", "PatchDenoiser",
           "box_sum", "valid_box_sum"]
