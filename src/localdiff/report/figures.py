"""Matplotlib figures: sensitivity-field grids (rows = denoisers, columns = timesteps)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..fileio import write_bytes  # noqa: E402


def save_figure(fig, path) -> None:
    """Write a matplotlib figure as PNG atomically, then close it."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    write_bytes(path, buf.getvalue())


def plot_fields(fields_by_model: dict, pixel_index: int = 0, *, title: str | None = None, use_abs: bool = False):
    """One panel per (model, timestep): the field of one output pixel, summed over input channels.

    Each panel has its own symmetric colour range (a diverging map centred on zero), because field
    magnitudes differ by orders of magnitude across noise levels; the output pixel is marked.
    """
    models = list(fields_by_model)
    first = fields_by_model[models[0]]
    ts, pixel = first.timesteps, first.pixels[pixel_index]
    fig, axes = plt.subplots(len(models), len(ts), figsize=(1.7 * len(ts) + 0.6, 1.7 * len(models) + 0.5),
                             squeeze=False)
    for mi, name in enumerate(models):
        f = fields_by_model[name]
        arr = (f.abs_mean if use_abs else f.mean)[:, pixel_index].sum(dim=1).numpy()  # [T, H, W]
        for ti, t in enumerate(ts):
            ax = axes[mi, ti]
            img = arr[ti]
            lim = float(np.abs(img).max()) or 1.0
            ax.imshow(img, cmap="RdBu_r", vmin=-lim, vmax=lim, interpolation="nearest")
            ax.plot(pixel[1], pixel[0], marker="+", color="black", markersize=6, mew=1.0)
            ax.set_xticks([])
            ax.set_yticks([])
            if mi == 0:
                ax.set_title(f"t = {t}", fontsize=9)
            if ti == 0:
                ax.set_ylabel(name, fontsize=9)
    fig.suptitle(title or f"sensitivity field of pixel {pixel} ({'mean |dx0/dxt|' if use_abs else 'mean dx0/dxt'})",
                 fontsize=10)
    fig.tight_layout()
    return fig
