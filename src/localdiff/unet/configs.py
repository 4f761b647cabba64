"""Architectures of the U-Net baseline: one dataclass, a few named instances, and the diffusers model.

``paper`` follows the official baseline (``ottogin/locality-in-diffusion-models``,
``src/local_diffusion/models/baseline_unet.py``): 64 base channels and multipliers (1, 2, 2) at 28 px,
128 channels and (1, 2, 3, 4) at 32 and 64 px, two residual blocks per level, no attention except a
single-head attention in the middle block, dropout 0.15. ``small`` trains on a laptop CPU in minutes.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import ConfigError


def _check_fields(cls, d: dict, what: str) -> dict:
    """A copy of ``d`` after checking that every key is a field of the dataclass ``cls``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise ConfigError(f"unknown {what} fields {unknown}; known: {sorted(names)}")
    return dict(d)


@dataclass(frozen=True)
class UNetConfig:
    """A diffusers ``UNet2DModel`` with plain DownBlock2D/UpBlock2D levels and an attention middle block."""

    base_channels: int = 128
    channel_mult: tuple[int, ...] = (1, 2, 3, 4)
    layers_per_block: int = 2  # residual blocks per level (the up path has one more, as in DDPM)
    dropout: float = 0.15
    mid_attention: bool = True  # self-attention in the middle block (the only attention layer)
    attention_head_dim: int | None = None  # None: one head over all middle-block channels (as DDPM)
    norm_num_groups: int = 32

    @property
    def block_out_channels(self) -> tuple[int, ...]:
        return tuple(self.base_channels * m for m in self.channel_mult)

    def validate(self) -> None:
        if self.base_channels < 1 or not self.channel_mult or min(self.channel_mult) < 1:
            raise ConfigError(f"U-Net channels must be positive, got {self.base_channels} x {self.channel_mult}")
        if self.layers_per_block < 1:
            raise ConfigError(f"layers_per_block must be >= 1, got {self.layers_per_block}")
        if not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"dropout must be in [0, 1), got {self.dropout}")
        bad = [c for c in self.block_out_channels if c % self.norm_num_groups]
        if bad:
            raise ConfigError(f"every block width must be divisible by norm_num_groups={self.norm_num_groups}; "
                              f"{bad} are not")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["channel_mult"] = list(self.channel_mult)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "UNetConfig":
        d = _check_fields(cls, d, "U-Net config")
        if "channel_mult" in d:
            d["channel_mult"] = tuple(int(m) for m in d["channel_mult"])
        return cls(**d)


# The official baseline at 28 px (MNIST, Fashion-MNIST) and at 32/64 px (CIFAR-10, FFHQ, CelebA-HQ, AFHQ).
PAPER_28 = UNetConfig(base_channels=64, channel_mult=(1, 2, 2))
PAPER_32 = UNetConfig(base_channels=128, channel_mult=(1, 2, 3, 4))
# A U-Net small enough to train on two CPU cores in minutes (0.65 M parameters; paper: 6.1 M at 28 px, 80 M at 32 px).
SMALL = UNetConfig(base_channels=32, channel_mult=(1, 2), layers_per_block=1, dropout=0.0, norm_num_groups=8)

CONFIG_NAMES = ("paper", "small")


# What the network predicts: our name -> diffusers' ``prediction_type``.
PREDICTIONS = {"epsilon": "epsilon", "v": "v_prediction"}
LR_DECAYS = ("cosine", "constant")


@dataclass(frozen=True)
class TrainConfig:
    """The training recipe. Defaults are the DDPM/official recipe (Adam 2e-4, 5,000 warm-up steps,
    batch 128, gradient clipping 1.0, EMA 0.9999); ``weight_decay=0`` makes AdamW plain Adam.

    Two departures from the DDPM recipe, both measured (docs/RESULTS.md): the network predicts
    ``v = a eps - sqrt(b2) x0`` (Salimans & Ho 2022) instead of ``eps``, whose error is multiplied by
    ``sqrt(b2)/a`` (57 at t = 900) when turned into ``x0_hat``; and the learning rate decays to zero
    along a cosine over the run (its length fixed by ``--steps`` or planned from ``--minutes``).
    Checkpoints written before these fields existed load as ``epsilon`` / ``constant``.
    """

    batch_size: int = 128
    lr: float = 2e-4
    warmup: int = 5000  # linear learning-rate warm-up over this many steps (at most a tenth of a cosine run)
    prediction: str = "v"  # "v" (v-prediction) or "epsilon" (noise prediction, as DDPM)
    lr_decay: str = "cosine"  # "cosine": to zero at the run's last step; "constant": flat after warm-up
    weight_decay: float = 0.0
    ema_decay: float = 0.9999  # capped by (1 + step) / (10 + step) early on, as diffusers' EMAModel
    grad_clip: float = 1.0  # max global gradient norm (0 disables clipping)
    hflip: bool = False  # random horizontal flips (CIFAR-style augmentation; wrong for digits)
    seed: int = 0  # initial weights, data order, timesteps, noise and dropout all derive from it
    # Runtime choices: they change speed, not the recipe, and may differ when a run is resumed.
    device: str = "auto"
    amp: bool = True  # bf16 autocast on CUDA (ignored on the CPU)
    channels_last: bool = True  # channels-last memory format on CUDA (ignored on the CPU)
    compile: bool = False  # torch.compile the network's forward pass

    RUNTIME_FIELDS = ("device", "amp", "channels_last", "compile")

    def validate(self) -> None:
        if self.batch_size < 1:
            raise ConfigError(f"batch size must be positive, got {self.batch_size}")
        if not self.lr > 0:
            raise ConfigError(f"learning rate must be positive, got {self.lr}")
        if self.warmup < 0 or self.weight_decay < 0 or self.grad_clip < 0:
            raise ConfigError("warmup, weight_decay and grad_clip must be >= 0")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ConfigError(f"EMA decay must be in [0, 1), got {self.ema_decay}")
        if self.prediction not in PREDICTIONS:
            raise ConfigError(f"prediction must be one of {', '.join(PREDICTIONS)}, got {self.prediction!r}")
        if self.lr_decay not in LR_DECAYS:
            raise ConfigError(f"lr_decay must be one of {', '.join(LR_DECAYS)}, got {self.lr_decay!r}")

    def recipe(self) -> dict:
        """The fields that determine the result (everything but the runtime choices)."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in self.RUNTIME_FIELDS}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**_check_fields(cls, d, "training config"))


# Training recipes that go with the named architectures; command-line flags override single fields.
TRAIN_RECIPES = {
    "paper": TrainConfig(),
    "small": TrainConfig(batch_size=64, lr=1e-3, warmup=100, ema_decay=0.999),
}


def unet_config(name: str, shape: tuple[int, int, int]) -> UNetConfig:
    """The named architecture for images of ``shape`` (C, H, W): ``paper`` depends on the resolution."""
    _, h, w = shape
    if name == "paper":
        cfg = PAPER_28 if max(h, w) <= 28 else PAPER_32
    elif name == "small":
        cfg = SMALL
    else:
        raise ConfigError(f"unknown U-Net config '{name}': choose one of {', '.join(CONFIG_NAMES)}")
    check_resolution(cfg, shape)
    return cfg


def check_resolution(cfg: UNetConfig, shape: tuple[int, int, int]) -> None:
    """Every downsampling must see an even size, or the skip connections do not line up."""
    _, h, w = shape
    factor = 2 ** (len(cfg.channel_mult) - 1)
    if h % factor or w % factor:
        raise ConfigError(
            f"images of {h}x{w} pixels do not fit a U-Net with {len(cfg.channel_mult)} levels: height and width "
            f"must be divisible by {factor}; resize the data (--resolution) or use fewer levels")


def build_unet(cfg: UNetConfig, shape: tuple[int, int, int]):
    """A freshly initialised diffusers ``UNet2DModel`` for images of ``shape`` (C, H, W)."""
    from diffusers import UNet2DModel

    cfg.validate()
    check_resolution(cfg, shape)
    c, h, w = shape
    levels = len(cfg.channel_mult)
    return UNet2DModel(
        sample_size=h if h == w else (h, w),
        in_channels=c,
        out_channels=c,
        down_block_types=("DownBlock2D",) * levels,
        up_block_types=("UpBlock2D",) * levels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        dropout=cfg.dropout,
        add_attention=cfg.mid_attention,
        attention_head_dim=cfg.attention_head_dim,
        norm_num_groups=cfg.norm_num_groups,
    )


def schedule_record(schedule, prediction: str = "epsilon") -> dict:
    """The noise schedule and parametrisation as stored in checkpoints and manifests (diffusers
    scheduler keywords; ``prediction_type`` is ``epsilon`` or ``v_prediction``)."""
    return {**schedule.scheduler_kwargs(), "prediction_type": PREDICTIONS[prediction]}
