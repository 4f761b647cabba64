"""The one denoiser interface ``(x_t, t) -> x0_hat`` shared by every model, and what each model declares
about itself (:class:`Capabilities`). Models are listed by name in :mod:`.registry`."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..device import resolve_device
from ..schedules import DEFAULT_SCHEDULE, NoiseLevel, NoiseSchedule
from ..errors import ConfigError
from ..finite import check_finite_input, check_finite_output
from .options import check_config


@dataclass(frozen=True)
class Capabilities:
    """What a denoiser guarantees, declared by the model itself (checked for every registered model by
    ``tests/test_contract.py``); callers read these instead of probing attributes or keeping name lists.

    A class declares its defaults as ``capabilities = Capabilities(...)``; a model whose guarantees
    depend on its options replaces them per instance in ``__init__`` (``dataclasses.replace``).
    """

    closed_form_jacobian: bool = False  # jacobian_rows(x_t, t, index) returns exact rows d x0_hat[index] / d x_t
    constant_jacobian: bool = False  # the Jacobian does not depend on x_t (an affine map): one evaluation per t
    fitted_timesteps: tuple[int, ...] | None = None  # the only timesteps (of its schedule) it accepts, and
    # the levels at their sigmas (None: every level)
    batch_independent: bool = True  # each output depends on its own input only (batches may be split/replicated)
    piecewise_constant: bool = False  # x0_hat is piecewise constant in x_t: the Jacobian is zero almost everywhere
    slow_autograd: bool = False  # autograd through it over a full-size training set takes minutes per t on a CPU
    trained: bool = False  # fitted by optimisation (a network, SGD), not computed in closed form from the data
    single_image_exact: bool = False  # fitted on one image, it returns that image for every x_t and t

    def accepts(self, t) -> bool:
        """Whether a timestep (or a level carrying one) is among the fitted ones."""
        if self.fitted_timesteps is None:
            return True
        t = t.t if isinstance(t, NoiseLevel) else t
        return t is not None and int(t) in self.fitted_timesteps


@dataclass
class DenoiserConfig:
    """Options every denoiser accepts."""

    device: torch.device | str = "auto"  # resolved once (localdiff.device.resolve_device)


class Denoiser:
    """A map ``(x_t [B,C,H,W], t) -> x0_hat [B,C,H,W]``, the posterior-mean estimate of the clean image.

    Subclasses set ``name``, implement :meth:`denoise` on a validated input (float tensor on
    ``self.device``, int t), declare their options as a ``Config`` dataclass and their guarantees as
    ``capabilities``, and are listed in :mod:`.registry`; :func:`make_denoiser` builds them by name. A model that reads the data's statistics sets
    ``uses_statistics`` and takes a precomputed ``spectrum=`` keyword. A model that merges the states of
    the ranks of a torchrun job exactly sets ``merges_shards`` in its own class body (it is not inherited:
    a subclass that computes differently gets the whole set until it says it merges) and is given this
    rank's shard of the training set; any other is given the whole set, gathered on every rank.
    """

    name: ClassVar[str] = "denoiser"
    Config: ClassVar[type] = DenoiserConfig
    capabilities: Capabilities = Capabilities()
    uses_statistics: ClassVar[bool] = False
    merges_shards: ClassVar[bool] = False

    def __init__(self, shape: tuple[int, int, int], config: Any, schedule: NoiseSchedule | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.config = check_config(config, model=self.name)
        self.schedule = schedule if schedule is not None else DEFAULT_SCHEDULE
        self.device = resolve_device(getattr(self.config, "device", None))

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """``x0_hat`` [B, C, H, W] (in ``x_t``'s dtype and device) at the noise level ``t``: a timestep of
        this model's schedule or a :class:`~localdiff.schedules.NoiseLevel` (validated here, once)."""
        level = self.schedule.at(t)
        self._checked(x_t)
        out = self.denoise(x_t.to(self.device), level)
        check_finite_output(self.name, out, x_t, level.label)
        return out.to(dtype=x_t.dtype, device=x_t.device)

    def _checked(self, x_t) -> torch.Tensor:
        """``x_t`` if it is a finite float tensor [B, *shape]; ConfigError naming what is wrong otherwise."""
        if not isinstance(x_t, torch.Tensor):
            raise ConfigError(f"x_t must be a torch.Tensor of shape [B, {', '.join(map(str, self.shape))}]")
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.shape:
            raise ConfigError(
                f"{self.name}: x_t must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x_t.shape)}"
            )
        if not x_t.is_floating_point():
            raise ConfigError(f"{self.name}: x_t must be a floating-point tensor, got {x_t.dtype}")
        check_finite_input(self.name, x_t)
        return x_t

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:  # pragma: no cover - interface
        """``x0_hat`` for a validated ``x_t`` (on ``self.device``) at a validated ``level``."""
        raise NotImplementedError

    def jacobian_rows(self, x_t: torch.Tensor, t, index) -> torch.Tensor:
        """Rows ``index`` [Q] of ``d x0_hat / d x_t`` at each input ``x_t`` [B, C, H, W]: [B, Q, n] float64 on the
        model's device, at the level ``t`` (a timestep or a NoiseLevel, validated here once), for the models whose
        ``capabilities.closed_form_jacobian`` is true (they implement :meth:`closed_form_rows`)."""
        if not self.capabilities.closed_form_jacobian:
            raise ConfigError(self.why_no_closed_form())
        level = self.schedule.at(t)
        x = self._checked(x_t).to(self.device)
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1).to(self.device)
        if len(index) and not (0 <= int(index.min()) and int(index.max()) < self.dim):
            raise ConfigError(f"{self.name}: Jacobian row indices must lie in 0..{self.dim - 1}")
        return self.closed_form_rows(x, level, index).to(torch.float64)

    def closed_form_rows(self, x_t: torch.Tensor, level: NoiseLevel, index: torch.Tensor) -> torch.Tensor:
        """The closed-form rows ``index`` [Q] (long, on the device) at a validated ``x_t`` [B, C, H, W] and
        ``level``: [B, Q, n] (cast to float64 by :meth:`jacobian_rows`)."""
        raise ConfigError(self.why_no_closed_form())  # pragma: no cover - declared but not implemented

    def why_no_closed_form(self) -> str:
        """What the error says when this model (with its options) has no closed-form Jacobian."""
        return f"model '{self.name}' has no closed-form Jacobian; use autograd"

    # -- the levels it can be evaluated at (samplers read these; docs/DESIGN.md §10) --------------------
    discrete_levels: ClassVar[bool] = False  # trained at discrete levels only (a network on integer timesteps)

    def snap_sigma(self, sigma: float) -> float:
        """The sigma of the level nearest to ``sigma`` at which this model can be evaluated (the identity
        unless ``discrete_levels``)."""
        return sigma

    def sigma_range(self) -> tuple[float, float] | None:
        """The range of sigma the model was trained on (None: any)."""
        return None

    @classmethod
    def takes_shards(cls) -> bool:
        """Whether this very class declares ``merges_shards`` (see the class docstring)."""
        return bool(cls.__dict__.get("merges_shards", False))

    def settings(self) -> dict:
        """The options this denoiser was built with (for run records)."""
        out = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        out["device"] = str(self.device)
        return {"model": self.name, **out}


__all__ = ["Capabilities", "Denoiser", "DenoiserConfig"]
