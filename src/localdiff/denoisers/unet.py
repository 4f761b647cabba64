"""A trained network as a denoiser, ``unet`` (docs/DESIGN.md §2.7, §10): a diffusers ``UNet2DModel``
directory (what ``localdiff train-unet`` writes; the networks shipped for MNIST and Fashion-MNIST are the
default), the paper's U-Net checkpoint (``ckpt_epoch_200.pt``), an EDM snapshot (``.pkl``), or a file of
``localdiff convert-network``, loaded safely by :func:`localdiff.networks.load_network`.

Its levels are its own: a network on integer timesteps keeps the DDPM table it was trained on (read from
its records) as its schedule and is evaluated at any family's level of one of its trained sigmas
(``discrete_levels``: the samplers round their grid to them); an EDM network takes any sigma.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..device import resolve_dtype
from ..errors import ConfigError
from ..networks import load_network
from ..networks.diffusers_dir import MANIFEST_NAME, WEIGHTS_NAME, data_match, foreign_message  # noqa: F401
from ..schedules import NoiseLevel
from .base import Capabilities, Denoiser, DenoiserConfig


def shipped_weights_dir(dataset_name: str) -> Path:
    """Where weights shipped with localdiff for ``dataset_name`` live: ``localdiff/weights/<name>/``."""
    return Path(__file__).resolve().parent.parent / "weights" / dataset_name


def resolve_unet_path(path: str | None, dataset_name: str) -> Path:
    """``path``, or the shipped weights for ``dataset_name`` when ``path`` is None."""
    if path is not None and str(path).strip():
        return Path(path).expanduser()
    shipped = shipped_weights_dir(dataset_name)
    if (shipped / "config.json").is_file():
        return shipped
    raise ConfigError(
        f"no trained U-Net ships with localdiff for dataset '{dataset_name}'; train one with "
        f"`localdiff train-unet --dataset {dataset_name} --steps 100000 --out runs/unet-{dataset_name}` "
        f"and pass it as --unet runs/unet-{dataset_name} (or make_denoiser('unet', data, path=...)), or pass a "
        "network file (the paper's ckpt_epoch_200.pt, an EDM .pkl)")


@dataclass
class UNetDenoiserConfig(DenoiserConfig):
    path: str | None = None  # a network: diffusers directory, paper .pt, EDM .pkl, converted .safetensors
    # (default: the weights shipped for the dataset)
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"  # network arithmetic (EDM: float32)
    allow_foreign: bool = False  # use a network whose manifest names other training data (refused otherwise)
    class_label: int | None = None  # the class of a class-conditional network (its one-hot label)
    key: str = "ema"  # which network of an EDM snapshot


class UNetDenoiser(Denoiser):
    """A trained network; ``x0_hat`` from its output (module docstring). Differentiable in ``x_t`` (weights
    frozen, eval mode), so sensitivity fields come from autograd."""

    name = "unet"
    Config = UNetDenoiserConfig
    capabilities = Capabilities(trained=True)
    merges_shards = True  # it reads no training images (only their shape and the dataset's name)

    def __init__(self, data, config: UNetDenoiserConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        config = self.config
        self.dtype = resolve_dtype(config.dtype)
        self.path = resolve_unet_path(config.path, data.name)
        self.network, self.info = load_network(self.path, dtype=self.dtype, device=self.device,
                                               class_label=config.class_label, key=config.key)
        self.network.check(self.shape, str(self.path))
        self.schedule = self.network.schedule  # its own levels; other families reach it through sigma
        self.discrete_levels = self.network.discrete
        self.data_match = data_match(self.info, data) if self.info is not None else "unknown"
        if self.data_match == "foreign" and not config.allow_foreign:
            raise ConfigError(f"{foreign_message(self.info, data)}; use a network trained on these data, or pass "
                              "--allow-foreign-unet (model option allow_foreign=true) to compare with it anyway")

    @property
    def model(self) -> torch.nn.Module:
        return self.network.module

    @property
    def prediction_type(self) -> str:
        return self.network.prediction_type

    def snap_sigma(self, sigma: float) -> float:
        return self.network.snap_sigma(sigma)

    def sigma_range(self) -> tuple[float, float]:
        return self.network.sigma_range()

    def output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The raw output of a network on integer timesteps (eps, v or x0) [B, C, H, W] at its timestep ``t``."""
        if not hasattr(self.network, "output"):
            raise ConfigError("unet: an EDM network has no raw output at an integer timestep; use den(x_t, level)")
        return self.network.output(x_t, self.schedule.check_t(t))

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network's noise prediction ``eps_hat = (x_t - a x0_hat) / sqrt(b2)`` [B, C, H, W] at the level ``t``."""
        level = self.schedule.at(t)
        if self.prediction_type == "epsilon" and self.schedule.owns(level):
            return self.network.output(x_t, level.t)
        out = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        return self.schedule.eps_from_x0(x_t.to(out), self.denoise(x_t, level), level)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        return self.network.x0(x_t, level)

    def settings(self) -> dict:
        out = super().settings()
        out["path"] = str(self.path)
        out.update({k: v for k, v in self.network.info.items() if k in ("format", "architecture", "sha256",
                                                                        "trained_on", "train_steps", "entry",
                                                                        "class_name", "precond")})
        out["weights_sha256"] = self.network.info.get("sha256")
        out["prediction_type"] = self.prediction_type
        out["schedule"] = self.schedule.record()
        out["data_match"] = self.data_match
        out["num_parameters"] = self.network.num_parameters
        return out


__all__ = ["UNetDenoiser", "UNetDenoiserConfig", "shipped_weights_dir", "resolve_unet_path"]
