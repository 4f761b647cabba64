"""A trained network from anywhere, as one function ``x0_hat(x_t, level)`` (docs/DESIGN.md §2.7, §10).

Two kinds of networks exist in the field:

* :class:`TimestepNetwork` — a network of ``(x_t, t)`` trained on the integer timesteps of a DDPM table
  (diffusers' ``UNet2DModel``, the paper's U-Net): it predicts epsilon, v or the clean image on the
  variance-preserving ``x_t`` of its table. At another family's level of the same sigma it is called on
  ``x_t a_t / a`` (the same unscaled state); a sigma that is none of its trained levels is an error
  (the samplers round their grid to its levels first).
* :class:`SigmaNetwork` — EDM's preconditioned ``D(x; sigma)`` on the variance-exploding ``x = y + sigma n``:
  called on ``x_t / a`` at any level (iDDPM networks: at their table's levels).

Both hold the class label of a class-conditional network (one-hot, the same for every image).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

from ..errors import ConfigError
from ..schedules import ContinuousSchedule, NoiseLevel, NoiseSchedule, Schedule

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names


@dataclass
class ReferenceNetwork:
    """What every loaded network offers the ``unet`` denoiser."""

    module: torch.nn.Module
    in_channels: int
    resolution: int | None  # the image side it was built for (None: any that its down-sampling allows)
    schedule: NoiseSchedule  # the family its integer timesteps (or its sigma range) belong to
    info: dict = field(default_factory=dict)  # format, path, sha256, architecture, ... (for run records)
    label_dim: int = 0
    class_label: int | None = None
    min_multiple: int = 1  # image sides must be multiples of this (down-sampling steps)

    discrete: bool = False
    prediction_type: str = "epsilon"

    @property
    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.module.parameters())

    def labels(self, batch: int, device) -> torch.Tensor | None:
        """One-hot class labels [batch, label_dim] (None for an unconditional network)."""
        if not self.label_dim:
            return None
        onehot = torch.zeros(batch, self.label_dim, device=device)
        onehot[:, int(self.class_label)] = 1.0
        return onehot

    def check(self, shape: tuple[int, int, int], where: str) -> None:
        """ConfigError unless the network takes images of ``shape`` (and has its class label)."""
        c, h, w = shape
        if self.in_channels != c:
            raise ConfigError(f"the network in {where} takes {self.in_channels}-channel images, but the data have {c}; "
                              f"use data with {self.in_channels} channels (--channels) or another network")
        if self.resolution is not None and (h, w) != (self.resolution, self.resolution):
            raise ConfigError(f"the network in {where} was built for {self.resolution}x{self.resolution} images, but "
                              f"the data are {h}x{w}; resize the data (--resolution {self.resolution}) or use another "
                              "network")
        if self.resolution is None and (h % self.min_multiple or w % self.min_multiple):
            raise ConfigError(f"the network in {where} halves the image {self.min_multiple.bit_length() - 1} times, so "
                              f"image sides must be multiples of {self.min_multiple}; the data are {h}x{w}")
        if self.label_dim and self.class_label is None:
            raise ConfigError(f"the network in {where} is class-conditional ({self.label_dim} classes): choose the class "
                              "to sample with --class-label K (model option class_label=K); the analytical models are "
                              "then fitted on that class's training images")
        if self.class_label is not None and not 0 <= self.class_label < max(self.label_dim, 1):
            raise ConfigError(f"class label {self.class_label} is outside 0..{self.label_dim - 1}" if self.label_dim else
                              f"the network in {where} is unconditional: drop --class-label")

    def snap_sigma(self, sigma: float) -> float:
        return sigma

    def sigma_range(self) -> tuple[float, float]:
        return self.schedule.sigma_min, self.schedule.sigma_max

    def x0(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError


@dataclass
class TimestepNetwork(ReferenceNetwork):
    """A network ``out = net(x_t, t)`` on the integer timesteps of a DDPM table (module docstring).
    ``forward(module, x, t [B] long, labels)`` runs it; ``dtype`` is its arithmetic."""

    forward: Callable | None = None
    dtype: torch.dtype = torch.float32
    discrete: bool = True

    def __post_init__(self):
        if self.prediction_type not in PREDICTION_TYPES:
            raise ConfigError(f"the network predicts {self.prediction_type!r}; supported: {', '.join(PREDICTION_TYPES)}")
        if not isinstance(self.schedule, Schedule):
            raise ConfigError("a network on integer timesteps needs a discrete (DDPM) schedule")

    def snap_sigma(self, sigma: float) -> float:
        """The sigma of the trained timestep nearest to ``sigma`` in log sigma."""
        return float(self.schedule.sigmas[self.schedule.nearest_timestep(sigma)])

    def timestep(self, level: NoiseLevel) -> tuple[int, float]:
        """The trained timestep at ``level``'s sigma and the scale ``a_t / a`` that brings ``x_t`` to it."""
        ts = self.schedule.timestep_of(level)
        if ts is None:
            near = self.schedule.nearest_timestep(level.sigma)
            raise ConfigError(f"unet: the network was trained at the {self.schedule.num_train_timesteps} discrete levels "
                              f"of its {self.schedule.name} schedule; {level.label} is none of them (nearest: t={near}, "
                              f"sigma={float(self.schedule.sigmas[near]):.6g}); sample with --sampler euler or heun, "
                              "whose grid is rounded to the network's levels")
        return ts, self.schedule.at(ts).a / level.a

    def output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The raw output (eps, v or x0 by ``prediction_type``) [B, C, H, W], in the network's dtype."""
        ts = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        return self.forward(self.module, x_t.to(self.dtype), ts, self.labels(x_t.shape[0], x_t.device))

    def x0(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        t, scale = self.timestep(level)
        out = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        x = x_t.to(out) if scale == 1.0 else x_t.to(out) * scale  # the network's own scaling of x_t
        y = self.output(x, t).to(out)
        if self.prediction_type == "v_prediction":
            return self.schedule.x0_from_v(x, y, t)
        if self.prediction_type == "sample":
            return y
        return self.schedule.x0_from_eps(x, y, t)


@dataclass
class SigmaNetwork(ReferenceNetwork):
    """EDM's preconditioned ``D(x; sigma)`` (:class:`localdiff.networks.edm.EDMNetwork`) on ``x = x_t / a``."""

    prediction_type: str = "edm"

    def __post_init__(self):
        table = getattr(self.module, "discrete_sigmas", None)
        self.discrete = table is not None

    def snap_sigma(self, sigma: float) -> float:
        """EDM's ``round_sigma``: the nearest entry of an iDDPM network's table (else ``sigma``)."""
        if not self.discrete:
            return sigma
        return float(self.module.round_sigma(torch.tensor([sigma], dtype=torch.float64))[0])

    def sigma_range(self) -> tuple[float, float]:
        return float(self.module.sigma_min), float(self.module.sigma_max)

    def x0(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        out = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        y = x_t if level.a == 1.0 else x_t / level.a  # EDM's x = y + sigma n
        sigma = torch.full((x_t.shape[0],), level.sigma, dtype=torch.float64, device=x_t.device)
        return self.module(y, sigma, self.labels(x_t.shape[0], x_t.device)).to(out)


def edm_schedule(net) -> ContinuousSchedule:
    """The default family of an EDM network's runs: EDM's (``a = 1``) on its sampler range, [0.002, 80]
    clipped to the network's."""
    lo, hi = max(0.002, float(net.sigma_min)), min(80.0, float(net.sigma_max))
    return ContinuousSchedule("edm", lo, hi)


__all__ = ["ReferenceNetwork", "TimestepNetwork", "SigmaNetwork", "PREDICTION_TYPES", "edm_schedule"]
