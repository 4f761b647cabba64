"""Layers of the paper's baseline U-Net (the DDPM architecture of Ho et al. 2020 as the paper trained it).

The attribute names and the positions inside each ``nn.Sequential`` are a file format: they reproduce the
key names of the published ``ckpt_epoch_200.pt`` state_dicts (``block1.2.weight``, ``temb_proj.1.weight``,
``time_embedding.timembedding.0.weight`` ...), so that those files load strictly. Parameter-free
positions (the SiLU, the dropout) sit where the published layout leaves a gap in the numbering.

Every residual block: ``h = conv(SiLU(GN(x))) + W_t SiLU(temb)``, ``h = conv(dropout(SiLU(GN(h))))``,
``out = h + skip(x)`` (skip: identity, or a 1x1 convolution where the width changes), then an optional
single-head self-attention. GroupNorm always uses 32 groups.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

GROUPS = 32  # GroupNorm groups everywhere in the published networks


def sinusoidal_table(num_timesteps: int, dim: int) -> torch.Tensor:
    """The frozen time table [T, dim]: row t is ``(sin(t f_0), cos(t f_0), sin(t f_1), cos(t f_1), ...)``
    with ``f_k = 10000^(-2k/dim)`` (Vaswani et al. 2017), sine and cosine interleaved.

    Computed in float32 on purpose: the published checkpoints store the table made that way, and the
    float32 rounding of ``t f_k`` (up to ~3e-5 at t = 999) is part of what they hold.
    """
    if dim % 2:
        raise ValueError(f"the time table needs an even width, got {dim}")
    freqs = torch.exp(-(torch.arange(0, dim, 2, dtype=torch.float32) / dim) * math.log(10000.0))  # [dim/2]
    angles = torch.arange(num_timesteps, dtype=torch.float32)[:, None] * freqs[None, :]  # [T, dim/2]
    return torch.stack([angles.sin(), angles.cos()], dim=-1).reshape(num_timesteps, dim)  # [T, dim]


class TimeEmbedding(nn.Module):
    """``t [B] int64 -> temb [B, 4 ch]``: frozen sinusoidal row, then Linear, SiLU, Linear."""

    def __init__(self, num_timesteps: int, ch: int, dim: int):
        super().__init__()
        table = nn.Embedding(num_timesteps, ch)
        table.weight.requires_grad_(False)
        with torch.no_grad():
            table.weight.copy_(sinusoidal_table(num_timesteps, ch))
        self.timembedding = nn.Sequential(table, nn.Linear(ch, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        return self.timembedding(t)  # [B, dim]


class SelfAttention(nn.Module):
    """Single-head self-attention over the H*W positions, added to its input (1x1 convolutions for q, k, v)."""

    def __init__(self, channels: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(GROUPS, channels)
        self.proj_q = nn.Conv2d(channels, channels, 1)
        self.proj_k = nn.Conv2d(channels, channels, 1)
        self.proj_v = nn.Conv2d(channels, channels, 1)
        self.proj = nn.Conv2d(channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, h, w = x.shape
        normed = self.group_norm(x)
        q = self.proj_q(normed).reshape(b, c, h * w)  # [B, C, N]
        k = self.proj_k(normed).reshape(b, c, h * w)  # [B, C, N]
        v = self.proj_v(normed).reshape(b, c, h * w)  # [B, C, N]
        weights = torch.softmax(torch.einsum("bci,bcj->bij", q, k) / math.sqrt(c), dim=-1)  # [B, N(query), N(key)]
        out = torch.einsum("bij,bcj->bci", weights, v).reshape(b, c, h, w)  # [B, C, H, W]
        return x + self.proj(out)


class ResidualBlock(nn.Module):
    """GroupNorm-SiLU-conv twice, the time embedding added between, a skip connection; optional attention."""

    def __init__(self, in_ch: int, out_ch: int, temb_dim: int, dropout: float, attention: bool):
        super().__init__()
        self.block1 = nn.Sequential(nn.GroupNorm(GROUPS, in_ch), nn.SiLU(), nn.Conv2d(in_ch, out_ch, 3, padding=1))
        self.temb_proj = nn.Sequential(nn.SiLU(), nn.Linear(temb_dim, out_ch))
        self.block2 = nn.Sequential(nn.GroupNorm(GROUPS, out_ch), nn.SiLU(), nn.Dropout(dropout),
                                    nn.Conv2d(out_ch, out_ch, 3, padding=1))
        self.shortcut = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()
        self.attn = SelfAttention(out_ch) if attention else nn.Identity()

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        h = self.block1(x)  # [B, out, H, W]
        h = h + self.temb_proj(temb)[:, :, None, None]
        h = self.block2(h)
        return self.attn(h + self.shortcut(x))


class Downsample(nn.Module):
    """Halve H and W with a stride-2 3x3 convolution (padding 1: ``ceil(H / 2)``)."""

    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(x)


class Upsample(nn.Module):
    """Double H and W by nearest-neighbour repetition, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.main = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        return self.main(F.interpolate(x, scale_factor=2.0, mode="nearest"))
