"""The layers EDM's U-Nets are made of (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based
Generative Models", code NVlabs/edm), re-implemented so that EDM's state_dicts load into them strictly.

Attribute and buffer names are EDM's (``weight``, ``bias``, ``resample_filter``, ``norm0`` ... ``proj``),
so a state_dict key of EDM names the same tensor here. The arithmetic follows EDM's order where rounding
could differ, and each layer casts its weights to the dtype of its input, so a network run in float16
on CUDA (``use_fp16``) computes what EDM computes; attention logits and softmax are always float32.
There is no weight initialisation scheme: these networks are loaded, not trained (a fresh one is filled
with scaled Gaussian noise so that it computes something non-trivial).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _placeholder(shape: Sequence[int], fan_in: int) -> nn.Parameter:
    """A parameter of ``shape`` holding N(0, 1/fan_in) noise (overwritten when weights are loaded)."""
    return nn.Parameter(torch.randn(*shape) / math.sqrt(max(fan_in, 1)))


class Linear(nn.Module):
    """``y = x W^T + b``: ``weight`` [out, in], ``bias`` [out] (or None)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _placeholder([out_features, in_features], in_features)
        self.bias = nn.Parameter(torch.zeros(out_features)) if bias else None

    def forward(self, x: Tensor) -> Tensor:  # [B, in] -> [B, out]
        y = x @ self.weight.to(x.dtype).t()
        if self.bias is not None:
            y = y + self.bias.to(x.dtype)
        return y


def resampling_filter(taps: Sequence[float]) -> Tensor:
    """The separable 2-D filter of 1-D ``taps``, normalised to sum 1: [1, 1, k, k] float32."""
    f = torch.as_tensor(list(taps), dtype=torch.float32)
    return torch.outer(f, f).unsqueeze(0).unsqueeze(1) / f.sum().square()


class Conv2d(nn.Module):
    """A ``kernel`` x ``kernel`` convolution (``kernel`` = 0: none) with optional 2x up- or downsampling.

    Resampling is a depthwise convolution with ``resample_filter`` (stride 2; transposed and scaled by 4
    for upsampling), applied before the convolution, or fused with it (``fused_resample``: downsampling
    after a convolution padded by the filter's radius too, upsampling before a reduced padding).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel: int, bias: bool = True, up: bool = False,
                 down: bool = False, resample_filter: Sequence[float] = (1, 1), fused_resample: bool = False):
        super().__init__()
        if up and down:
            raise ValueError("a convolution resamples up or down, not both")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.up, self.down, self.fused_resample = up, down, fused_resample
        fan_in = in_channels * kernel * kernel
        self.weight = _placeholder([out_channels, in_channels, kernel, kernel], fan_in) if kernel else None
        self.bias = nn.Parameter(torch.zeros(out_channels)) if kernel and bias else None
        self.register_buffer("resample_filter", resampling_filter(resample_filter) if up or down else None)

    def forward(self, x: Tensor) -> Tensor:  # [B, in, H, W] -> [B, out, H', W'] (H' = 2H, H/2 or H)
        w = None if self.weight is None else self.weight.to(x.dtype)
        f = None if self.resample_filter is None else self.resample_filter.to(x.dtype)
        w_pad = 0 if w is None else w.shape[-1] // 2
        f_pad = 0 if f is None else (f.shape[-1] - 1) // 2
        if self.fused_resample and self.up and w is not None:
            up = f.mul(4).tile([self.in_channels, 1, 1, 1])
            x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=max(f_pad - w_pad, 0))
            x = F.conv2d(x, w, padding=max(w_pad - f_pad, 0))
        elif self.fused_resample and self.down and w is not None:
            x = F.conv2d(x, w, padding=w_pad + f_pad)
            x = F.conv2d(x, f.tile([self.out_channels, 1, 1, 1]), groups=self.out_channels, stride=2)
        else:
            if self.up:
                up = f.mul(4).tile([self.in_channels, 1, 1, 1])
                x = F.conv_transpose2d(x, up, groups=self.in_channels, stride=2, padding=f_pad)
            if self.down:
                x = F.conv2d(x, f.tile([self.in_channels, 1, 1, 1]), groups=self.in_channels, stride=2, padding=f_pad)
            if w is not None:
                x = F.conv2d(x, w, padding=w_pad)
        if self.bias is not None:
            x = x + self.bias.to(x.dtype).reshape(1, -1, 1, 1)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with ``min(num_groups, C // min_channels_per_group)`` groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight.to(x.dtype), self.bias.to(x.dtype), self.eps)


def attention_weights(q: Tensor, k: Tensor) -> Tensor:
    """``softmax_k(q^T k / sqrt(c))`` computed in float32: q, k [N, c, L] -> [N, L_q, L_k] in q's dtype."""
    logits = torch.einsum("ncq,nck->nqk", q.to(torch.float32), (k / math.sqrt(k.shape[1])).to(torch.float32))
    return logits.softmax(dim=2).to(q.dtype)


class UNetBlock(nn.Module):
    """EDM's residual block (the union of DDPM++, NCSN++ and ADM's): GroupNorm, SiLU, a 3x3 convolution
    (resampling when ``up``/``down``), the embedding added (``adaptive_scale=False``) or as scale and
    shift (``True``), GroupNorm, SiLU, dropout, a 3x3 convolution, the (projected) input added, times
    ``skip_scale``; then optional multi-head self-attention (``num_heads`` heads, or ``out // channels_per_head``)."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int, up: bool = False, down: bool = False,
                 attention: bool = False, num_heads: int | None = None, channels_per_head: int = 64,
                 dropout: float = 0.0, skip_scale: float = 1.0, eps: float = 1e-5,
                 resample_filter: Sequence[float] = (1, 1), resample_proj: bool = False, adaptive_scale: bool = True):
        super().__init__()
        self.in_channels, self.out_channels, self.emb_channels = in_channels, out_channels, emb_channels
        heads = num_heads if num_heads is not None else out_channels // channels_per_head
        self.num_heads = heads if attention else 0
        self.dropout, self.skip_scale, self.adaptive_scale = dropout, float(skip_scale), adaptive_scale

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, 3, up=up, down=down, resample_filter=resample_filter)
        self.affine = Linear(emb_channels, out_channels * (2 if adaptive_scale else 1))
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, 3)
        self.skip = None
        if out_channels != in_channels or up or down:
            kernel = 1 if resample_proj or out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel, up=up, down=down, resample_filter=resample_filter)
        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, 1)
            self.proj = Conv2d(out_channels, out_channels, 1)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:  # x [B, in, H, W], emb [B or 1, E] -> [B, out, H', W']
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))
        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)  # [B, out or 2 out, 1, 1]
        if self.adaptive_scale:
            scale, shift = params.chunk(chunks=2, dim=1)
            x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))
        else:
            x = F.silu(self.norm1(x + params))
        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale
        if self.num_heads:
            b, c = x.shape[:2]
            # channels are laid out as (head, channel of the head, q/k/v): [B*heads, c/heads, 3, H*W]
            q, k, v = self.qkv(self.norm2(x)).reshape(b * self.num_heads, c // self.num_heads, 3, -1).unbind(2)
            w = attention_weights(q, k)  # [B*heads, HW, HW]
            a = torch.einsum("nqk,nck->ncq", w, v)  # [B*heads, c/heads, HW]
            x = self.proj(a.reshape(*x.shape)) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a noise label: [cos(x f_i), sin(x f_i)], f_i = max_positions^(-i/(n/2 - endpoint))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False):
        super().__init__()
        self.num_channels, self.max_positions, self.endpoint = num_channels, max_positions, endpoint

    def forward(self, x: Tensor) -> Tensor:  # [N] -> [N, num_channels]
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = (1 / self.max_positions) ** (freqs / (half - (1 if self.endpoint else 0)))
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class FourierEmbedding(nn.Module):
    """Random Fourier features of a noise label: [cos(2 pi f x), sin(2 pi f x)], buffer ``freqs`` [n/2]."""

    def __init__(self, num_channels: int, scale: float = 16):
        super().__init__()
        self.register_buffer("freqs", torch.randn(num_channels // 2) * scale)

    def forward(self, x: Tensor) -> Tensor:  # [N] -> [N, num_channels]
        x = torch.outer(x, (2 * math.pi * self.freqs).to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)
