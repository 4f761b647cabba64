"""Image grids as PNG files (Pillow), for samples on the [-1, 1] data scale."""

from __future__ import annotations

import io
import math

import numpy as np
import torch
from PIL import Image

from ..fileio import write_bytes


def image_grid(images, *, nrow: int | None = None, pad: int = 2, min_cell: int = 64) -> Image.Image:
    """Tile ``images`` [N, C, H, W] (data scale [-1, 1], C = 1 or 3) into one RGB image.

    Cells are upscaled by an integer factor (nearest neighbour) to at least ``min_cell`` pixels so
    28x28 digits stay visible; the padding is mid-grey.
    """
    x = images.detach().cpu().numpy() if isinstance(images, torch.Tensor) else np.asarray(images)
    if x.ndim != 4 or x.shape[1] not in (1, 3):
        raise ValueError(f"images must have shape [N, 1|3, H, W], got {x.shape}")
    n, c, h, w = x.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    ncol_rows = math.ceil(n / nrow)
    scale = max(1, math.ceil(min_cell / max(h, w)))
    u8 = np.clip(np.round((x + 1.0) * 127.5), 0, 255).astype(np.uint8)
    if c == 1:
        u8 = np.repeat(u8, 3, axis=1)
    u8 = u8.transpose(0, 2, 3, 1).repeat(scale, axis=1).repeat(scale, axis=2)  # [N, H*s, W*s, 3]
    ch, cw = h * scale, w * scale
    canvas = np.full((ncol_rows * (ch + pad) + pad, nrow * (cw + pad) + pad, 3), 128, np.uint8)
    for i in range(n):
        r, col = divmod(i, nrow)
        y0, x0 = pad + r * (ch + pad), pad + col * (cw + pad)
        canvas[y0 : y0 + ch, x0 : x0 + cw] = u8[i]
    return Image.fromarray(canvas)


def grid_png(images, **kwargs) -> bytes:
    """:func:`image_grid` as PNG bytes, in memory."""
    buf = io.BytesIO()
    image_grid(images, **kwargs).save(buf, format="PNG")
    return buf.getvalue()


def save_grid(images, path, **kwargs) -> bytes:
    """Write :func:`image_grid` to ``path`` as PNG, atomically; returns the PNG bytes written."""
    png = grid_png(images, **kwargs)
    write_bytes(path, png)
    return png
