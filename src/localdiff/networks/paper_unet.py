"""The paper's baseline U-Net, read from its published checkpoints (``ckpt_epoch_200.pt``).

Lukoianov et al. (NeurIPS 2025) compare their analytical denoisers against DDPM U-Nets they trained
(Ho et al. 2020 architecture, epsilon prediction, T = 1000 linear betas 1e-4 -> 0.02, docs/DESIGN.md §1),
published per dataset on the Hugging Face hub (ottogin/locality-diffusion-baselines). This is an own
implementation of that architecture (layers in ``paper_unet_blocks``), whose parameter names match the
published state_dicts so that they load strictly.

Published configurations (verified against the official module): 28 px (MNIST, Fashion-MNIST): ch 64,
multipliers (1, 2, 2), 2 residual blocks per level, 219 tensors, 6,202,369 parameters; 32/64 px (CIFAR-10,
CelebA-HQ, AFHQ): ch 128, (1, 2, 3, 4), 283 tensors, 80,126,339 parameters. Both: self-attention only in
the middle, dropout 0.15 in training.

Files are read with ``torch.load(weights_only=True)`` and nothing else: a file that pickles anything
but tensors and plain containers (a whole ``nn.Module``, a payload) is refused before any of it runs.
The configuration is read from the key names and shapes (``config_from_state_dict``); the image size
is not recorded in a convolutional state_dict, so ``resolution`` stays None there.
"""

from __future__ import annotations

import dataclasses
import hashlib
import numbers
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError
from .paper_unet_blocks import GROUPS, Downsample, ResidualBlock, TimeEmbedding, Upsample, sinusoidal_table
from .paper_unet_files import (STATE_ENTRIES, extract_state_dict, load_checkpoint_safely, locate_state_dict,
                               name_list, strip_prefixes)

__all__ = ["PaperUNetConfig", "PaperUNet", "config_from_state_dict", "is_paper_state_dict", "extract_state_dict",
           "paper_checkpoint_from_object",
           "read_paper_checkpoint", "paper_unet_from_state_dict", "load_state_strict", "load_checkpoint_safely",
           "STATE_ENTRIES"]


@dataclass(frozen=True)
class PaperUNetConfig:
    """Everything the architecture needs. ``attn_levels``: levels (0 = full resolution) whose residual
    blocks end in self-attention (the middle block always has one); ``resolution``: the image side if
    known (None: any side divisible by ``2**(len(ch_mult) - 1)``)."""

    in_channels: int
    ch: int
    ch_mult: tuple[int, ...]
    num_res_blocks: int
    attn_levels: tuple[int, ...]
    resolution: int | None
    num_timesteps: int
    dropout: float = 0.0

    def __post_init__(self):
        for name in ("ch_mult", "attn_levels"):
            value = getattr(self, name)
            if isinstance(value, (list, tuple)):
                object.__setattr__(self, name, tuple(value))
        self.validate()

    @property
    def temb_dim(self) -> int:
        return 4 * self.ch

    @property
    def num_levels(self) -> int:
        return len(self.ch_mult)

    @property
    def size_multiple(self) -> int:
        """Image height and width must be multiples of this (each down step halves them, each up step doubles)."""
        return 2 ** (self.num_levels - 1)

    def validate(self) -> None:
        def positive_int(name, value):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"paper U-Net config: {name} must be a positive integer, got {value!r}")

        for name in ("in_channels", "ch", "num_res_blocks", "num_timesteps"):
            positive_int(name, getattr(self, name))
        if not isinstance(self.ch_mult, tuple) or not self.ch_mult:
            raise ConfigError(f"paper U-Net config: ch_mult must be a non-empty list of integers, got {self.ch_mult!r}")
        for m in self.ch_mult:
            positive_int("every ch_mult entry", m)
        if self.ch % GROUPS:
            raise ConfigError(f"paper U-Net config: ch must be a multiple of {GROUPS} (the GroupNorm groups), "
                              f"got {self.ch}")
        if not isinstance(self.attn_levels, tuple) or any(
                isinstance(i, bool) or not isinstance(i, int) for i in self.attn_levels):
            raise ConfigError(f"paper U-Net config: attn_levels must be a list of integers, got {self.attn_levels!r}")
        if list(self.attn_levels) != sorted(set(self.attn_levels)) or any(
                not 0 <= i < self.num_levels for i in self.attn_levels):
            raise ConfigError(f"paper U-Net config: attn_levels must be distinct increasing levels in "
                              f"0..{self.num_levels - 1}, got {list(self.attn_levels)}")
        if self.resolution is not None:
            positive_int("resolution", self.resolution)
            if self.resolution % self.size_multiple:
                raise ConfigError(f"paper U-Net config: resolution {self.resolution} is not a multiple of "
                                  f"{self.size_multiple} (2 ** (levels - 1)), so the skip connections would not align")
        drop = self.dropout
        if isinstance(drop, bool) or not isinstance(drop, (int, float)) or not 0.0 <= drop < 1.0:
            raise ConfigError(f"paper U-Net config: dropout must be a number in [0, 1), got {self.dropout!r}")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["ch_mult"], d["attn_levels"] = list(self.ch_mult), list(self.attn_levels)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "PaperUNetConfig":
        if not isinstance(d, Mapping):
            raise ConfigError(f"paper U-Net config must be a mapping, got {type(d).__name__}")
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(d) - set(names))
        missing = [f.name for f in dataclasses.fields(cls)
                   if f.name not in d and f.default is dataclasses.MISSING]
        if unknown or missing:
            faults = [f"unknown fields {unknown}"] if unknown else []
            faults += [f"missing fields {missing}"] if missing else []
            raise ConfigError(f"paper U-Net config: {', '.join(faults)}; expected {names}")
        d = dict(d)
        for name in ("ch_mult", "attn_levels"):
            if not isinstance(d[name], (list, tuple)):
                raise ConfigError(f"paper U-Net config: {name} must be a list of integers, got {d[name]!r}")
        return cls(**d)


class PaperUNet(nn.Module):
    """``(x [B,C,H,W], t [B] int64) -> eps_hat [B,C,H,W]``, the paper's DDPM U-Net."""

    def __init__(self, config: PaperUNetConfig):
        super().__init__()
        config.validate()
        self.config = config
        ch, tdim, drop = config.ch, config.temb_dim, config.dropout
        self.time_embedding = TimeEmbedding(config.num_timesteps, ch, tdim)
        self.head = nn.Conv2d(config.in_channels, ch, 3, padding=1)

        # Down path: every module's output is kept for the up path, the head's included.
        skip_widths, width = [ch], ch
        down: list[nn.Module] = []
        for level, mult in enumerate(config.ch_mult):
            for _ in range(config.num_res_blocks):
                down.append(ResidualBlock(width, ch * mult, tdim, drop, level in config.attn_levels))
                width = ch * mult
                skip_widths.append(width)
            if level < config.num_levels - 1:
                down.append(Downsample(width))
                skip_widths.append(width)
        self.downblocks = nn.ModuleList(down)
        self.middleblocks = nn.ModuleList([ResidualBlock(width, width, tdim, drop, True),
                                           ResidualBlock(width, width, tdim, drop, False)])

        # Up path: one more block per level than on the way down, each consuming one kept output.
        up: list[nn.Module] = []
        for level in reversed(range(config.num_levels)):
            for _ in range(config.num_res_blocks + 1):
                out = ch * config.ch_mult[level]
                up.append(ResidualBlock(width + skip_widths.pop(), out, tdim, drop, level in config.attn_levels))
                width = out
            if level > 0:
                up.append(Upsample(width))
        assert not skip_widths
        self.upblocks = nn.ModuleList(up)
        self.tail = nn.Sequential(nn.GroupNorm(GROUPS, width), nn.SiLU(),
                                  nn.Conv2d(width, config.in_channels, 3, padding=1))

    def forward(self, x: torch.Tensor, t) -> torch.Tensor:
        """eps_hat [B,C,H,W] for ``x`` [B,C,H,W] and integer timesteps ``t`` ([B], a scalar, or an int)."""
        t = self._timesteps(x, t)
        temb = self.time_embedding(t)  # [B, 4 ch]
        h = self.head(x)  # [B, ch, H, W]
        kept = [h]
        for layer in self.downblocks:
            h = layer(h, temb)
            kept.append(h)
        for layer in self.middleblocks:
            h = layer(h, temb)
        for layer in self.upblocks:
            if isinstance(layer, ResidualBlock):
                h = torch.cat([h, kept.pop()], dim=1)  # [B, width + skip width, h, w]
            h = layer(h, temb)
        return self.tail(h)

    def _timesteps(self, x: torch.Tensor, t) -> torch.Tensor:
        """Check ``x`` and ``t``; ``t`` as an int64 tensor [B] on ``x``'s device."""
        cfg = self.config
        if x.ndim != 4 or x.shape[1] != cfg.in_channels:
            raise ConfigError(f"the paper U-Net takes images [B, {cfg.in_channels}, H, W], got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        if h % cfg.size_multiple or w % cfg.size_multiple:
            raise ConfigError(f"the paper U-Net with {cfg.num_levels} levels needs H and W divisible by "
                              f"{cfg.size_multiple}, got {h}x{w}")
        if cfg.resolution is not None and (h, w) != (cfg.resolution, cfg.resolution):
            raise ConfigError(f"this paper U-Net was built for {cfg.resolution}x{cfg.resolution} images, got {h}x{w}")
        if isinstance(t, bool) or not isinstance(t, (numbers.Integral, torch.Tensor)):
            raise ConfigError(f"timesteps must be an int or an integer tensor, got {type(t).__name__}")
        t = torch.as_tensor(int(t) if isinstance(t, numbers.Integral) else t, device=x.device)
        if t.dtype.is_floating_point or t.dtype.is_complex or t.dtype == torch.bool:
            raise ConfigError(f"timesteps must be integers, got a {str(t.dtype).replace('torch.', '')} tensor")
        if t.ndim == 0:
            t = t.expand(x.shape[0])
        if t.shape != (x.shape[0],):
            raise ConfigError(f"timesteps must have shape [{x.shape[0]}] (one per image), got {tuple(t.shape)}")
        lo, hi = int(t.min()), int(t.max())
        if lo < 0 or hi >= cfg.num_timesteps:
            raise ConfigError(f"timesteps must be in [0, {cfg.num_timesteps - 1}], got values in [{lo}, {hi}]")
        return t.long()


# -- reading the configuration from a state_dict ---------------------------------------------------------

TABLE_KEY = "time_embedding.timembedding.0.weight"
_ANCHORS = (TABLE_KEY, "time_embedding.timembedding.1.weight", "head.weight", "tail.2.weight")
_WIDTH_KEYS = ("block1.2.weight", "block2.3.weight", "block2.0.weight", "temb_proj.1.weight", "block1.2.bias")
_BLOCK_KEY = re.compile(r"(downblocks|middleblocks|upblocks)\.(\d+)\.")


def is_paper_state_dict(state) -> bool:
    """Whether ``state`` (a state_dict, possibly with a ``module.`` prefix) has the paper U-Net's key names."""
    if not isinstance(state, Mapping):
        return False
    keys = set(strip_prefixes({k: None for k in state if isinstance(k, str)}))
    return all(k in keys for k in _ANCHORS) and any(k.startswith("middleblocks.0.attn.") for k in keys)


def config_from_state_dict(state: Mapping[str, torch.Tensor]) -> PaperUNetConfig:
    """The configuration implied by the key names and shapes of a paper U-Net state_dict.

    T and ch come from the time table [T, ch], the input channels from the head convolution, the levels
    from the positions of the down-sampling convolutions among ``downblocks``, the multipliers from the
    residual blocks' widths, the attention levels from which of them hold ``attn`` weights.
    ``resolution`` is None (not recorded) and ``dropout`` 0 (inactive at inference).
    """
    state = strip_prefixes(dict(state))
    if not is_paper_state_dict(state):
        raise ConfigError(_not_paper_message(state))
    odd = [k for k, v in state.items() if not isinstance(v, torch.Tensor)]
    if odd:
        raise ConfigError(f"a state_dict maps names to tensors; these entries are not tensors: {name_list(odd)}")
    table, head, tail = state[TABLE_KEY], state["head.weight"], state["tail.2.weight"]
    if table.ndim != 2 or head.ndim != 4 or tail.ndim != 4:
        raise ConfigError(f"not the paper U-Net: {TABLE_KEY} has shape {tuple(table.shape)} (expected [T, ch]), "
                          f"head.weight {tuple(head.shape)} and tail.2.weight {tuple(tail.shape)} (expected 4-D)")
    num_timesteps, ch = (int(s) for s in table.shape)
    in_channels = int(head.shape[1])
    if int(tail.shape[0]) != in_channels:
        raise ConfigError(f"this U-Net maps {in_channels} input channels to {int(tail.shape[0])} output channels; "
                          "an epsilon-predicting network returns as many channels as it takes")

    indices = sorted({int(m.group(2)) for k in state if (m := _BLOCK_KEY.match(k)) and m.group(1) == "downblocks"})
    if indices != list(range(len(indices))) or not indices:
        raise ConfigError(f"not the paper U-Net: downblocks are numbered {indices[:8]}, expected 0, 1, 2, ...")
    levels: list[list[tuple[int, bool]]] = [[]]  # per level: (output width, has attention) of each block
    for i in indices:
        prefix = f"downblocks.{i}."
        # The width is read from whichever of its tensors is there, so that a missing one is named by the
        # strict load below rather than misread here.
        width = next((int(state[prefix + k].shape[0]) for k in _WIDTH_KEYS if prefix + k in state), None)
        if prefix + "main.weight" in state or prefix + "main.bias" in state:
            levels.append([])
        elif width is not None:
            levels[-1].append((width, any(k.startswith(prefix + "attn.") for k in state)))
        else:
            found = sorted(k for k in state if k.startswith(prefix))[:4]
            raise ConfigError(f"not the paper U-Net: downblocks.{i} is neither a residual block nor a down-sampling "
                              f"convolution (its keys: {found})")
    counts = {len(blocks) for blocks in levels}
    if len(counts) != 1 or 0 in counts:
        raise ConfigError(f"not the paper U-Net: its levels hold {[len(b) for b in levels]} residual blocks; "
                          "the architecture has the same number at every level")
    mults, attn = [], []
    for level, blocks in enumerate(levels):
        widths, flags = {w for w, _ in blocks}, {a for _, a in blocks}
        if len(widths) != 1 or next(iter(widths)) % ch:
            raise ConfigError(f"not the paper U-Net: level {level} has block widths {sorted(widths)}, expected one "
                              f"multiple of ch = {ch}")
        if len(flags) != 1:
            raise ConfigError(f"not the paper U-Net: only some residual blocks of level {level} have attention")
        mults.append(next(iter(widths)) // ch)
        if flags == {True}:
            attn.append(level)
    return PaperUNetConfig(in_channels=in_channels, ch=ch, ch_mult=tuple(mults), num_res_blocks=counts.pop(),
                           attn_levels=tuple(attn), resolution=None, num_timesteps=num_timesteps)


def _not_paper_message(state: Mapping) -> str:
    keys = [k for k in state if isinstance(k, str)]
    missing = [k for k in _ANCHORS if k not in state]
    hint = ""
    if "conv_in.weight" in state and any(k.startswith("down_blocks.") for k in keys):
        hint = ("; it looks like a diffusers UNet2DModel: save it with save_pretrained() and pass the directory, "
                "which the `unet` model reads")
    return (f"not the paper's U-Net state_dict: missing {missing or ['middleblocks.0.attn.*']} among its "
            f"{len(keys)} keys (first: {keys[:5]}){hint}")


# -- strict loading ----------------------------------------------------------------------------------------


def load_state_strict(model: PaperUNet, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into ``model``; ConfigError naming any missing or unexpected key, wrong shape,
    non-float or non-finite tensor (nothing is copied then)."""
    want = model.state_dict()
    missing = [k for k in want if k not in state]
    unexpected = [k for k in state if k not in want]
    if missing or unexpected:
        parts = ([f"missing keys ({name_list(missing)})"] if missing else []) + \
                ([f"unexpected keys ({name_list(unexpected)})"] if unexpected else [])
        raise ConfigError(f"the state_dict does not fit the paper U-Net {model.config.to_dict()}: " + "; ".join(parts))
    wrong = [f"{k}: file {tuple(state[k].shape)}, network {tuple(v.shape)}"
             for k, v in want.items() if tuple(state[k].shape) != tuple(v.shape)]
    if wrong:
        raise ConfigError(f"shape mismatch in {len(wrong)} tensors of the paper U-Net state_dict: "
                          + "; ".join(wrong[:5]) + (f"; ... {len(wrong) - 5} more" if len(wrong) > 5 else ""))
    for k, v in state.items():
        if not v.dtype.is_floating_point:
            raise ConfigError(f"tensor {k} of the state_dict has dtype {v.dtype}; the network's weights are floats")
        if not bool(torch.isfinite(v).all()):
            raise ConfigError(f"tensor {k} of the state_dict holds NaN or Inf values; the checkpoint is damaged")
    model.load_state_dict(dict(state), strict=True)


def paper_unet_from_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[PaperUNet, PaperUNetConfig]:
    """A PaperUNet at the configuration read from ``state``, loaded strictly, in eval mode with grads off."""
    state = strip_prefixes(dict(state))
    config = config_from_state_dict(state)
    model = PaperUNet(config)
    load_state_strict(model, state)
    model.eval().requires_grad_(False)
    return model, config


def read_paper_checkpoint(path: str | Path, *, entry: str | None = None) -> tuple[PaperUNet, PaperUNetConfig, dict]:
    """Load a paper U-Net checkpoint file (``ckpt_epoch_200.pt`` or any layout ``extract_state_dict`` takes).

    Returns (network in eval mode with grads off, float32 on the CPU; its configuration; info) where info
    holds ``path``, ``sha256``, ``entry`` (the checkpoint entry read, None for a bare state_dict),
    ``num_params``, ``num_tensors``, ``stored_dtypes``, ``metadata`` (the file's top-level scalars, such
    as ``epoch``) and ``time_table_max_deviation`` (largest difference of the stored time table from the
    sinusoidal formula; ~0 for the published files).
    """
    path = Path(path)
    return paper_checkpoint_from_object(load_checkpoint_safely(path), path, entry=entry)


def paper_checkpoint_from_object(obj, path: str | Path, *, entry: str | None = None
                                 ) -> tuple[PaperUNet, PaperUNetConfig, dict]:
    """:func:`read_paper_checkpoint` on what ``torch.load(path, weights_only=True)`` returned (``obj``)."""
    path = Path(path)
    state, used = locate_state_dict(obj, entry)
    if not is_paper_state_dict(state):
        raise ConfigError(f"{path}: " + _not_paper_message(state))
    model, config = paper_unet_from_state_dict(state)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    table = state[TABLE_KEY].double()
    info = {
        "path": str(path.resolve()),
        "sha256": digest.hexdigest(),
        "entry": used,
        "num_params": sum(v.numel() for v in state.values()),
        "num_tensors": len(state),
        "stored_dtypes": sorted({str(v.dtype).replace("torch.", "") for v in state.values()}),
        "metadata": {k: v for k, v in obj.items() if isinstance(k, str) and isinstance(v, (bool, int, float, str))}
        if isinstance(obj, Mapping) else {},
        "time_table_max_deviation": float((table - sinusoidal_table(*table.shape).double()).abs().max()),
    }
    return model, config, info
