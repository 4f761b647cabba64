"""The theoretical receptive field of a U-Net, computed from its layers (kernel sizes, strides, padding,
down- and upsampling, skip connections), for localdiff's ``small`` and ``paper`` configurations and for
diffusers ``UNet2DModel`` configurations in general.

Exact by construction: the network's forward pass is replayed along one image axis on intervals. Each
position of each intermediate tensor holds the interval ``[lo, hi]`` of input positions it depends on
through the convolutions and resampling; a convolution unions the intervals under its kernel, nearest
upsampling copies them, residual sums and skip concatenations union two tensors. Every kernel of a
``UNet2DModel`` is square, so the receptive field is the square ``size x size`` of that one-axis result;
``radius`` is the farthest input pixel any output pixel reaches on one side (its half-width). Positions
far from the border are read (an unbounded image), and the largest value over their alignments with
the down-sampling grid is kept.

Not counted, and listed in ``global_layers``: self-attention (every position sees every other) and the
statistics of GroupNorm (a mean and variance over the whole image). Both make a real network's output
depend on every input pixel a little; the receptive field here is the reach of its convolutions.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import ConfigError

DOWN_TYPES = ("DownBlock2D", "AttnDownBlock2D", "ResnetDownsampleBlock2D")
UP_TYPES = ("UpBlock2D", "AttnUpBlock2D", "ResnetUpsampleBlock2D")
# UNet2DModel's own defaults, for keys a config.json leaves out
DIFFUSERS_DEFAULTS = {"down_block_types": ("DownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D", "AttnDownBlock2D"),
                      "up_block_types": ("AttnUpBlock2D", "AttnUpBlock2D", "AttnUpBlock2D", "UpBlock2D"),
                      "layers_per_block": 2, "mid_block_type": "UNetMidBlock2D", "add_attention": True,
                      "downsample_padding": 1, "downsample_type": "conv", "upsample_type": "conv"}


class _Axis:
    """Intervals of input positions ``lo``, ``hi`` [L] (int64) that each position of a tensor depends on."""

    def __init__(self, lo: np.ndarray, hi: np.ndarray):
        self.lo, self.hi = lo, hi

    @classmethod
    def input(cls, length: int) -> "_Axis":
        idx = np.arange(length, dtype=np.int64)
        return cls(idx, idx.copy())

    def conv(self, k: int, stride: int = 1, pad: tuple[int, int] = (None, None)) -> "_Axis":
        """A convolution of kernel ``k``, ``stride``, zero padding ``pad`` (left, right; default (k-1)//2)."""
        left = (k - 1) // 2 if pad[0] is None else pad[0]
        right = left if pad[1] is None else pad[1]
        length = (self.lo.size + left + right - k) // stride + 1
        base = np.arange(length, dtype=np.int64) * stride - left
        lo = np.full(length, np.iinfo(np.int64).max)
        hi = np.full(length, np.iinfo(np.int64).min)
        for m in range(k):
            i = base + m
            ok = (i >= 0) & (i < self.lo.size)
            lo[ok] = np.minimum(lo[ok], self.lo[i[ok]])
            hi[ok] = np.maximum(hi[ok], self.hi[i[ok]])
        return _Axis(lo, hi)

    def upsample(self) -> "_Axis":
        """Nearest-neighbour upsampling by 2."""
        return _Axis(np.repeat(self.lo, 2), np.repeat(self.hi, 2))

    def union(self, other: "_Axis") -> "_Axis":
        if other.lo.size != self.lo.size:
            raise ConfigError(f"skip connection of length {other.lo.size} meets a tensor of length {self.lo.size}")
        return _Axis(np.minimum(self.lo, other.lo), np.maximum(self.hi, other.hi))


def _resnet(x: _Axis, resample: str | None = None) -> _Axis:
    """diffusers ``ResnetBlock2D``: [resample] conv3 conv3, plus a shortcut ([resample], identity or 1x1)."""
    if resample == "down":  # Downsample2D(use_conv=False): 2x2 average pooling, stride 2
        x = x.conv(2, 2, (0, 0))
    elif resample == "up":
        x = x.upsample()
    return x.conv(3).conv(3).union(x)


def _downsample(x: _Axis, kind: str, padding: int) -> _Axis:
    if kind == "resnet":
        return _resnet(x, "down")
    if padding == 0:  # diffusers pads (0, 1) itself, then a valid convolution
        return x.conv(3, 2, (0, 1))
    return x.conv(3, 2, (padding, padding))


def _upsample(x: _Axis, kind: str) -> _Axis:
    return _resnet(x, "up") if kind == "resnet" else x.upsample().conv(3)


@dataclass(frozen=True)
class ReceptiveField:
    """A U-Net's convolutional receptive field: ``size`` x ``size`` pixels, reaching ``radius`` pixels to
    each side; ``global_layers`` names what sees the whole image regardless."""

    name: str
    size: int
    radius: int
    levels: int
    global_layers: tuple[str, ...] = ()
    config: dict = field(default_factory=dict)

    def covers(self, half_width: float) -> bool:
        """Whether a square window of half-width ``half_width`` (pixels) fits inside the receptive field."""
        return half_width <= self.radius

    def record(self) -> dict:
        return {"name": self.name, "size": self.size, "radius": self.radius, "levels": self.levels,
                "global_layers": list(self.global_layers), "config": self.config}


def diffusers_config(cfg) -> dict:
    """The keys of a diffusers ``UNet2DModel`` config that the receptive field depends on, for a localdiff
    :class:`~localdiff.unet.configs.UNetConfig` (as ``build_unet`` builds it)."""
    levels = len(cfg.channel_mult)
    return {"down_block_types": ["DownBlock2D"] * levels, "up_block_types": ["UpBlock2D"] * levels,
            "layers_per_block": cfg.layers_per_block, "mid_block_type": "UNetMidBlock2D",
            "add_attention": cfg.mid_attention, "downsample_padding": 1, "downsample_type": "conv",
            "upsample_type": "conv"}


def _resolve(spec, shape) -> tuple[str, dict]:
    """``(name, diffusers config)`` of ``spec``: 'small' / 'paper', a UNetConfig, a config dict, a
    ``UNet2DModel`` (its ``.config``) or a directory / config.json path."""
    from ..unet.configs import UNetConfig, unet_config

    if isinstance(spec, str) and spec in ("small", "paper"):
        if shape is None:
            raise ConfigError(f"the '{spec}' U-Net depends on the image size: pass the image shape (C, H, W)")
        return spec, diffusers_config(unet_config(spec, tuple(shape)))
    if isinstance(spec, UNetConfig):
        return "config", diffusers_config(spec)
    if hasattr(spec, "config") and not isinstance(spec, (str, Path, dict)):
        return type(spec).__name__, dict(spec.config)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        for cand in (path, path / "config.json", path / "unet" / "config.json"):
            if cand.is_file():
                try:
                    return str(spec), json.loads(cand.read_text())
                except (OSError, ValueError) as exc:
                    raise ConfigError(f"{cand} is not readable JSON ({exc})") from exc
        raise ConfigError(f"U-Net config '{spec}' is neither 'small', 'paper' nor a directory or config.json of a "
                          "diffusers UNet2DModel")
    if isinstance(spec, dict):
        return str(spec.get("_name_or_path") or "config"), dict(spec)
    raise ConfigError(f"cannot read a U-Net configuration from {type(spec).__name__}: pass 'small', 'paper', a "
                      "UNetConfig, a diffusers config dict, a UNet2DModel or a directory")


def receptive_field(spec, shape: tuple[int, int, int] | None = None) -> ReceptiveField:
    """The convolutional receptive field of the U-Net ``spec`` (see :func:`_resolve` for what it may be)."""
    name, cfg = _resolve(spec, shape)
    get = lambda k: cfg[k] if k in cfg else DIFFUSERS_DEFAULTS[k]  # noqa: E731
    down, up = list(get("down_block_types")), list(get("up_block_types"))
    if cfg.get("_class_name", "UNet2DModel") != "UNet2DModel":
        raise ConfigError(f"receptive fields are computed for diffusers UNet2DModel configs, not {cfg['_class_name']}")
    bad = [b for b in down if b not in DOWN_TYPES] + [b for b in up if b not in UP_TYPES]
    if bad or len(down) != len(up) or not down:
        raise ConfigError(f"unsupported U-Net blocks {bad or (down, up)}: supported down blocks {', '.join(DOWN_TYPES)}, "
                          f"up blocks {', '.join(UP_TYPES)}, as many of each")
    mid = get("mid_block_type")
    if mid not in (None, "UNetMidBlock2D"):
        raise ConfigError(f"unsupported mid block '{mid}': UNetMidBlock2D or None")
    layers = int(get("layers_per_block"))
    pad, dtype, utype = int(get("downsample_padding")), get("downsample_type"), get("upsample_type")
    levels = len(down)
    length = 2 ** levels * 96  # long enough that the centre never sees the border
    x = _Axis.input(length).conv(3)  # conv_in
    skips = [x]
    global_layers = {"GroupNorm statistics (every ResnetBlock2D and the output)"}
    for i, kind in enumerate(down):
        for _ in range(layers):
            x = _resnet(x)
            skips.append(x)
        if kind.startswith("Attn"):
            global_layers.add(f"self-attention in {kind}")
        if i < levels - 1:
            x = _downsample(x, "resnet" if kind == "ResnetDownsampleBlock2D" else
                            (dtype if kind == "AttnDownBlock2D" else "conv"), pad)
            skips.append(x)
    if mid is not None:
        x = _resnet(_resnet(x))
        if get("add_attention"):
            global_layers.add("self-attention in the middle block")
    for i, kind in enumerate(up):
        for _ in range(layers + 1):
            x = _resnet(x.union(skips.pop()))
        if kind.startswith("Attn"):
            global_layers.add(f"self-attention in {kind}")
        if i < levels - 1:
            x = _upsample(x, "resnet" if kind == "ResnetUpsampleBlock2D" else
                          (utype if kind == "AttnUpBlock2D" else "conv"))
    x = x.conv(3)  # conv_out
    if x.lo.size != length:
        raise ConfigError(f"the U-Net's output has {x.lo.size} positions for {length} inputs; check its blocks")
    centre = np.arange(length // 4, 3 * length // 4)
    pos = centre.astype(np.int64)
    size = int((x.hi[centre] - x.lo[centre] + 1).max())
    radius = int(np.maximum(pos - x.lo[centre], x.hi[centre] - pos).max())
    used = {k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in
            {k: get(k) for k in DIFFUSERS_DEFAULTS}.items()}
    return ReceptiveField(name, size, radius, levels, tuple(sorted(global_layers)), used)


__all__ = ["ReceptiveField", "receptive_field", "diffusers_config", "DOWN_TYPES", "UP_TYPES"]
