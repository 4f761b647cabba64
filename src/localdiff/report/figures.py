"""Matplotlib figures: sensitivity-field grids (rows = denoisers, columns = timesteps)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..fileio import write_bytes  # noqa: E402


def figure_png(fig) -> bytes:
    """A matplotlib figure rendered once, in memory, as PNG bytes; the figure is closed."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def save_figure(fig, path) -> bytes:
    """Write a matplotlib figure as PNG atomically (and close it); returns the PNG bytes written."""
    png = figure_png(fig)
    write_bytes(path, png)
    return png


def field_panels(fields_by_model: dict, pixel_index: int = 0, *, use_abs: bool = False) -> dict:
    """``{model: [T, H, W]}``: the field of one output pixel per timestep, summed over input channels."""
    return {name: (f.abs_mean if use_abs else f.mean)[:, pixel_index].sum(dim=1).numpy()
            for name, f in fields_by_model.items()}


def field_scales(fields_by_model: dict, pixel_index: int = 0, *, use_abs: bool = False) -> dict[str, dict[str, float]]:
    """The colour scale of each panel of :func:`plot_fields`: ``{t: {model: max |field|}}``."""
    panels = field_panels(fields_by_model, pixel_index, use_abs=use_abs)
    ts = next(iter(fields_by_model.values())).timesteps
    return {str(t): {name: float(np.abs(p[ti]).max()) for name, p in panels.items()} for ti, t in enumerate(ts)}


def level_label(t) -> str:
    """``t = 500`` for a timestep, ``σ = 1.23`` for a continuous level's key (``"s=1.23"``)."""
    return f"σ = {t[2:]}" if isinstance(t, str) and t.startswith("s=") else f"t = {t}"


def plot_fields(fields_by_model: dict, pixel_index: int = 0, *, title: str | None = None, use_abs: bool = False):
    """One panel per (timestep, model): rows are timesteps, columns are models, the output pixel is marked.

    Every panel has its own symmetric colour scale (a diverging map centred on zero), printed in its corner
    as the largest |value|, so every field is readable whatever its magnitude: fields differ by orders of
    magnitude across noise levels and between models (the optimal denoiser's are nearly zero where it has
    memorised one image); compare shapes within a row and magnitudes by the printed scales
    (:func:`field_scales` gives them).
    """
    models = list(fields_by_model)
    first = fields_by_model[models[0]]
    ts, pixel = first.timesteps, first.pixels[pixel_index]
    panels = field_panels(fields_by_model, pixel_index, use_abs=use_abs)
    scales = field_scales(fields_by_model, pixel_index, use_abs=use_abs)
    fig, axes = plt.subplots(len(ts), len(models), figsize=(1.75 * len(models) + 1.2, 1.75 * len(ts) + 0.6),
                             squeeze=False, layout="constrained")
    im = None
    for ti, t in enumerate(ts):
        for mi, name in enumerate(models):
            ax = axes[ti, mi]
            lim = scales[str(t)][name]
            im = ax.imshow(panels[name][ti] / (lim or 1.0), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
            ax.plot(pixel[1], pixel[0], marker="+", color="black", markersize=6, mew=1.0)
            ax.text(0.02, 0.02, f"±{lim:.2g}", transform=ax.transAxes, fontsize=6.5, va="bottom", ha="left",
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.75))
            ax.set_xticks([])
            ax.set_yticks([])
            if ti == 0:
                ax.set_title(name, fontsize=9, color=model_colour(name))
            if mi == 0:
                ax.set_ylabel(level_label(t), fontsize=9)
    cb = fig.colorbar(im, ax=axes.ravel().tolist(), shrink=0.6, pad=0.02, aspect=24)
    cb.ax.tick_params(labelsize=7)
    cb.set_label("field / its panel's max |value| (printed ± in each panel)", fontsize=7)
    colour = first.mean.shape[2] > 1
    channels = ("; colour: the pixel's output is the mean of its channels, the field summed over the input "
                "channels" if colour else "")
    fig.suptitle((title or f"sensitivity field of pixel {pixel} ({'mean |dx0/dxt|' if use_abs else 'mean dx0/dxt'});"
                           " each panel on its own symmetric scale") + channels, fontsize=10)
    return fig


# -- study figures --------------------------------------------------------------------------------

MODE_TITLES = {"own_trajectory": "along each model's own trajectory",
               "single_step": "single step (U-Net applied to the model's x_t)"}


# One colour per model in every plot of every run (a model keeps its colour whatever else is plotted).
MODEL_COLOURS = {
    "unet": "#000000", "wiener": "#1f77b4", "masked": "#d62728", "optimal": "#2ca02c", "nearest": "#7f7f7f",
    "linear": "#17becf", "ls": "#9467bd", "els": "#8c564b", "els-boundary": "#e377c2", "pspc": "#bcbd22",
    "scfdm": "#ff7f0e", "masked-soft": "#ff9896", "masked-equivariant": "#c49c94", "wiener-quadratic": "#f7b6d2",
    "blob": "#aec7e8", "data": "#98df8a",
}


def model_colour(name: str):
    """The colour of model ``name``: fixed for the built-in models, a stable pick from tab20 otherwise."""
    if name in MODEL_COLOURS:
        return MODEL_COLOURS[name]
    import zlib

    return plt.get_cmap("tab20")(zlib.crc32(name.encode()) % 20)


def _colours(names):
    return {n: model_colour(n) for n in names}


def plot_per_step(curves: dict, timesteps, *, ylabel: str = "R² vs U-Net", modes=tuple(MODE_TITLES),
                  floor: float | None = -1.0, log: bool = False):
    """One panel per comparison mode: ``curves[model][mode]`` (one value per step) against the timestep (ints)
    or the noise level sigma (floats, a log axis).

    The x axis runs from the noisiest step to the last, as sampling does. With ``floor``, values below
    it are drawn at the floor (marked with a triangle) so one very negative R² does not squash the rest.
    """
    names = list(curves)
    colours = _colours(names)
    sigma_axis = any(isinstance(t, float) for t in timesteps)  # continuous levels: sigma on a log axis
    ts = list(timesteps)
    fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 3.6), squeeze=False, sharey=True)
    clipped = False
    for ax, mode in zip(axes[0], modes):
        for name in names:
            y = np.asarray(curves[name].get(mode, []), dtype=np.float64)
            if y.size == 0:
                continue
            low = floor is not None and not log
            shown = np.maximum(y, floor) if low else y
            ax.plot(ts, shown, marker="o", markersize=3.5, lw=1.5, color=colours[name], label=name)
            if low and (y < floor).any():
                clipped = True
                ax.plot(np.asarray(ts)[y < floor], np.full(int((y < floor).sum()), floor), "v", color=colours[name],
                        markersize=7)
        if sigma_axis:
            ax.set_xscale("log")
            ax.set_xlim(max(ts) * 1.3, min(ts) / 1.3)
            ax.set_xlabel("noise level σ (sampling runs left to right)")
        else:
            ax.set_xlim(max(ts) + 0.03 * (max(ts) - min(ts) or 1), min(ts) - 0.03 * (max(ts) - min(ts) or 1))
            ax.set_xlabel("timestep t (sampling runs left to right)")
        ax.set_title(MODE_TITLES.get(mode, mode), fontsize=10)
        ax.grid(alpha=0.3)
        if log:
            ax.set_yscale("log")
    axes[0, 0].set_ylabel(ylabel)
    if floor is not None and not log:
        top = axes[0, 0].get_ylim()[1]
        axes[0, 0].set_ylim(floor - 0.05, max(top, 1.02) if "R²" in ylabel else top)
    axes[0, -1].legend(fontsize=8, loc="best")
    if clipped:
        fig.text(0.01, 0.01, f"triangles: values below {floor:g}, drawn at {floor:g}", fontsize=8)
    fig.tight_layout()
    return fig


def _row_image(images, cols: int) -> np.ndarray:
    from .grid import image_grid

    return np.asarray(image_grid(images[:cols], nrow=cols, pad=2, min_cell=28))


def plot_sample_rows(samples: dict, *, max_cols: int = 8):
    """One row per model, one column per initial noise (the same noise in every row)."""
    names = list(samples)
    cols = min(max_cols, min(int(s.shape[0]) for s in samples.values()))
    rows = [_row_image(samples[n], cols) for n in names]
    h, w = rows[0].shape[:2]
    width = min(max(1.0 * cols, 4.0), 11.0)  # inches for the images; about one inch per sample
    fig, axes = plt.subplots(len(names), 1, figsize=(width + 1.3, len(names) * width * h / w + 0.6), squeeze=False)
    for ax, name, img in zip(axes[:, 0], names, rows):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=10)
        for s in ax.spines.values():
            s.set_visible(False)
    axes[0, 0].set_title("final samples: each column starts from the same initial noise", fontsize=10)
    fig.tight_layout()
    return fig


def plot_nearest_pairs(pairs: dict, *, max_cols: int = 8):
    """Per model, its samples (top row) above their nearest training images (bottom row)."""
    names = list(pairs)
    cols = min(max_cols, min(int(s.shape[0]) for s, _ in pairs.values()))
    imgs = [np.concatenate([_row_image(pairs[n][0], cols), _row_image(pairs[n][1], cols)[2:]], axis=0) for n in names]
    h, w = imgs[0].shape[:2]
    width = min(max(1.0 * cols, 4.0), 11.0)
    fig, axes = plt.subplots(len(names), 1, figsize=(width + 1.6, len(names) * (width * h / w + 0.15) + 0.6),
                             squeeze=False)
    for ax, name, img in zip(axes[:, 0], names, imgs):
        ax.imshow(img, interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_ylabel(f"{name}\nsample\nnearest train", rotation=0, ha="right", va="center", fontsize=9)
        for sp in ax.spines.values():
            sp.set_visible(False)
    axes[0, 0].set_title("each sample (upper row) and its nearest training image (lower row)", fontsize=10)
    fig.tight_layout()
    return fig


def plot_nearest_distances(distances: dict, reference=None):
    """Distance of each sample to its nearest training image, one row per model (dots and median bar).

    ``reference`` = (label, distances) of held-out real images: the distance a new image typically has.
    """
    names = list(distances)
    rows = ([reference[0]] if reference is not None else []) + names
    colours = _colours(names)
    fig, ax = plt.subplots(figsize=(7.5, 0.42 * len(rows) + 1.3))
    rng = np.random.default_rng(0)
    for i, label in enumerate(rows):
        is_ref = reference is not None and i == 0
        d = np.asarray(reference[1] if is_ref else distances[label], dtype=np.float64)
        y = len(rows) - 1 - i
        colour = "0.45" if is_ref else colours[label]
        ax.scatter(d, y + rng.uniform(-0.15, 0.15, d.size), s=14, color=colour, alpha=0.8, lw=0)
        ax.plot([np.median(d)] * 2, [y - 0.3, y + 0.3], color="black", lw=2)
        if is_ref:
            ax.axvspan(np.percentile(d, 5), np.percentile(d, 95), color="0.85", zorder=0)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows[::-1])
    ax.set_xlabel("L2 distance to the nearest training image (data scale [-1, 1])")
    ax.set_xlim(left=0)
    ax.grid(axis="x", alpha=0.3)
    title = "memorisation: 0 = a copy of a training image"
    if reference is not None:
        title += f"; grey band: 5-95% of {reference[0]}"
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return fig


def plot_final_r2(per_sample: dict):
    """Mean R² of each model's final samples against the U-Net's (bars) with every sample's R² (dots)."""
    names = list(per_sample)
    colours = _colours(names)
    fig, ax = plt.subplots(figsize=(0.8 * len(names) + 2.5, 3.4))
    rng = np.random.default_rng(0)
    for i, name in enumerate(names):
        v = np.asarray(per_sample[name], dtype=np.float64)
        mean = float(np.nanmean(v))
        ax.bar(i, max(mean, -1.0), color=colours[name], alpha=0.55, width=0.7)
        ax.text(i, 0.93, f"{mean:.2f}", ha="center", va="top", fontsize=8)
        ax.scatter(i + rng.uniform(-0.2, 0.2, v.size), np.maximum(v, -1.0), s=12, color=colours[name], zorder=3)
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_ylim(-1.05, 1.02)
    ax.set_ylabel("R² vs U-Net (final samples)")
    ax.set_title("bars and numbers: mean over samples; dots: single samples (below -1 drawn at -1)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_spectrum(eigvals, *, title: str = "covariance spectrum of the training set"):
    """Eigenvalues of the data covariance (log-log), with the components holding 90% / 99% of the variance."""
    lam = np.asarray(eigvals, dtype=np.float64)
    frac = np.cumsum(lam) / lam.sum()
    keep = lam > lam.max() * 1e-7  # the rest is round-off (e.g. constant border pixels)
    k = np.arange(1, lam.size + 1)
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    ax.loglog(k[keep], lam[keep], lw=1.6)
    if (~keep).any():
        ax.text(0.02, 0.04, f"{int((~keep).sum())} components below 1e-7 x the largest not shown",
                transform=ax.transAxes, fontsize=8)
    for p, style in ((0.9, "--"), (0.99, ":")):
        c = int(np.searchsorted(frac, p) + 1)
        ax.axvline(c, color="0.4", ls=style, lw=1)
        ax.text(c, lam.max(), f" {int(p * 100)}%: {c}", fontsize=8, va="top")
    ax.set_xlabel("component (sorted by variance)")
    ax.set_ylabel("eigenvalue (variance)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3, which="both")
    fig.tight_layout()
    return fig
