"""The probe page's static figures (matplotlib, PNG bytes): locality against noise level for every dataset
on shared axes, maps over the image, the covariance spectrum and principal components, and held-out MSE."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

DATASET_COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf")


def png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return buf.getvalue()


def _colour(i: int) -> str:
    return DATASET_COLOURS[i % len(DATASET_COLOURS)]


def _curve(record: dict, key: str, stat: str, ts: list[str]) -> np.ndarray:
    return np.asarray([record["levels"][t][key].get(stat, np.nan) if isinstance(record["levels"][t][key], dict)
                       else np.nan for t in ts], dtype=np.float64)


def locality_figure(record: dict) -> bytes:
    """Six panels against the timestep, one line per dataset (bands: spread over pixels): extent r90 of the
    absolute mass and of the energy (median, interquartile band), axis ratio (median, IQR), stationarity
    (IQR of the extents across pixels; dashed: energy), mask size and the mask's Chebyshev radius (median,
    10th-90th percentile band) with the U-Net radii that fit the axis."""
    ts = [str(lv["t"]) for lv in record["levels"]]
    x = np.asarray([int(t) for t in ts])
    fig, axes = plt.subplots(2, 3, figsize=(15, 7), layout="constrained")
    axes = axes.ravel()
    panels = [("energy_r90", "p25", "p75", "r90 of field energy (px)", "extent: 90% of the energy within"),
              ("extent_r90", "p25", "p75", "r90 of |field| mass (px)", "extent: 90% of the absolute mass within"),
              ("axis_ratio", "p25", "p75", "axis ratio (1 = isotropic)", "anisotropy"),
              (None, None, None, "IQR of r90 across pixels (px)", "stationarity (0 = same everywhere)"),
              ("mask_size", "p10", "p90", "mask size (pixels)", "the paper's mask: size"),
              ("mask_radius", "p10", "p90", "mask radius (px, Chebyshev)", "the paper's mask: radius")]
    rf_lines = {}
    for i, (label, d) in enumerate(record["datasets"].items()):
        for ax, (key, lo, hi, ylab, title) in zip(axes, panels):
            if key is None:
                st = [d["levels"][t]["stationarity"] for t in ts]
                ax.plot(x, [s["r90_iqr"] if s["r90_iqr"] is not None else np.nan for s in st], marker="o", ms=3.5,
                        color=_colour(i), label=f"{label}: mass")
                ax.plot(x, [s["energy_r90_iqr"] if s["energy_r90_iqr"] is not None else np.nan for s in st],
                        ls="--", color=_colour(i), label=f"{label}: energy")
            else:
                ax.plot(x, _curve(d, key, "median", ts), marker="o", ms=3.5, color=_colour(i), label=label)
                ax.fill_between(x, _curve(d, key, lo, ts), _curve(d, key, hi, ts), color=_colour(i), alpha=0.15)
            ax.set_ylabel(ylab)
            ax.set_title(title, fontsize=10)
        for name, rf in d["receptive_fields"].items():
            rf_lines[f"{name} ({'x'.join(map(str, d['shape'][1:]))})"] = rf["radius"]
    top = axes[5].get_ylim()[1]
    off = []
    for name, r in sorted(rf_lines.items(), key=lambda kv: kv[1]):
        if r <= 1.3 * top:
            axes[5].axhline(r, ls="--", lw=1, color="0.4")
            axes[5].text(x.min(), r, f" U-Net {name}: {r} px", fontsize=7, va="bottom", color="0.3")
        else:
            off.append(f"{name} {r} px")
    if off:
        axes[5].set_title("the paper's mask: radius\n(U-Net conv radius " + ", ".join(off) + ": off scale)", fontsize=9)
    for ax in axes:
        ax.set_xlabel("timestep t (noise grows to the right)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[3].legend(fontsize=7)
    return png(fig)


def maps_figure(record: dict, name: str, title: str, cmap: str = "viridis") -> bytes:
    """One map per (dataset, level) in one mosaic: rows are datasets, columns levels (high noise left), one
    colour scale (0 to the 99th percentile); white: undefined (a pixel whose field is zero)."""
    ts = [str(lv["t"]) for lv in record["levels"]]
    sets = list(record["datasets"])
    maps = {s: np.asarray(record["datasets"][s]["maps"][name], dtype=np.float64) for s in sets}  # [T, H, W]
    vals = np.concatenate([m[np.isfinite(m)].ravel() for m in maps.values()])
    vmax = float(np.percentile(vals, 99)) if vals.size else 1.0
    h = max(m.shape[1] for m in maps.values())
    w = max(m.shape[2] for m in maps.values())
    gap = max(2, h // 8)
    mosaic = np.full((len(sets) * (h + gap), len(ts) * (w + gap)), np.nan)
    for i, s in enumerate(sets):
        for j in range(len(ts)):
            m = maps[s][j]
            mosaic[i * (h + gap): i * (h + gap) + m.shape[0], j * (w + gap): j * (w + gap) + m.shape[1]] = m
    fig, ax = plt.subplots(figsize=(1.1 * len(ts) + 1.6, 1.1 * len(sets) + 0.8))
    im = ax.imshow(np.ma.masked_invalid(mosaic), cmap=cmap, vmin=0, vmax=vmax or 1.0, interpolation="nearest")
    ax.set_xticks([j * (w + gap) + w / 2 for j in range(len(ts))], [f"t = {t}" for t in ts], fontsize=8)
    ax.set_yticks([i * (h + gap) + h / 2 for i in range(len(sets))], sets, fontsize=8)
    ax.tick_params(length=0)
    for side in ax.spines.values():
        side.set_visible(False)
    fig.colorbar(im, ax=ax, shrink=0.8, aspect=25)
    ax.set_title(title, fontsize=10)
    return png(fig)


def spectrum_figure(record: dict) -> bytes:
    """Eigenvalue decay (normalised by the total variance) and the cumulative share of variance."""
    fig, axes = plt.subplots(1, 2, figsize=(11, 3.6), layout="constrained")
    for i, (label, d) in enumerate(record["datasets"].items()):
        lam = np.asarray(d["spectrum"]["eigenvalues"], dtype=np.float64)
        total = lam.sum()
        if not total > 0:
            continue
        k = np.arange(1, lam.size + 1)
        ls = ("-", "--", ":", "-.")[i % 4]  # datasets with equal spectra (a permuted set) stay visible
        axes[0].loglog(k, np.maximum(lam / total, 1e-12), color=_colour(i), ls=ls, label=label)
        axes[1].semilogx(k, np.cumsum(lam) / total, color=_colour(i), ls=ls, label=label)
    axes[0].set(xlabel="component k", ylabel="lam_k / total variance", title="eigenvalue decay")
    axes[1].set(xlabel="components kept", ylabel="share of variance", title="cumulative variance", ylim=(0, 1.01))
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[0].legend(fontsize=8)
    return png(fig)


def components_figure(components: dict[str, np.ndarray]) -> bytes:
    """The top principal components of each dataset (rows), diverging colours centred on zero."""
    sets = list(components)
    k = max(c.shape[0] for c in components.values())
    fig, axes = plt.subplots(len(sets), k, figsize=(1.2 * k + 1, 1.3 * len(sets) + 0.3), squeeze=False,
                             layout="constrained")
    for i, s in enumerate(sets):
        pcs = components[s]
        for j in range(k):
            ax = axes[i, j]
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= pcs.shape[0]:
                ax.axis("off")
                continue
            img = pcs[j]
            if img.shape[0] == 3:  # colour: map [-m, m] to [0, 1] per component
                m = np.abs(img).max() or 1.0
                ax.imshow(np.clip(img.transpose(1, 2, 0) / (2 * m) + 0.5, 0, 1), interpolation="nearest")
            else:
                m = np.abs(img[0]).max() or 1.0
                ax.imshow(img[0], cmap="RdBu_r", vmin=-m, vmax=m, interpolation="nearest")
            if i == 0:
                ax.set_title(f"PC {j + 1}", fontsize=8)
            if j == 0:
                ax.set_ylabel(s, fontsize=8)
    return png(fig)


def memorisation_figure(record: dict) -> bytes | None:
    """Held-out MSE against the timestep per dataset: Wiener and optimal at every training-set size."""
    sets = [s for s, d in record["datasets"].items() if "per_size" in (d.get("memorisation") or {})]
    if not sets:
        return None
    ts = [str(lv["t"]) for lv in record["levels"]]
    x = np.asarray([int(t) for t in ts])
    fig, axes = plt.subplots(1, len(sets), figsize=(5.2 * len(sets), 3.6), squeeze=False, layout="constrained")
    for ax, s in zip(axes[0], sets):
        memo = record["datasets"][s]["memorisation"]
        sizes = memo["sizes"]
        for j, size in enumerate(sizes):
            mse = memo["per_size"][str(size)]["mse"]
            ax.plot(x, [mse["optimal"][t]["mean"] for t in ts], marker="o", ms=3,
                    color=plt.get_cmap("Greens")(0.35 + 0.65 * (j + 1) / len(sizes)), label=f"optimal, N = {size:,}")
            if j == len(sizes) - 1:
                ax.plot(x, [mse["wiener"][t]["mean"] for t in ts], marker="s", ms=3, color="#1f77b4",
                        label=f"wiener, N = {size:,}")
                if "unet" in mse:
                    ax.plot(x, [mse["unet"][t]["mean"] for t in ts], marker="^", ms=3, color="black", label="network")
            h = memo["per_size"][str(size)]["horizon_t"]
            if h is not None and j == len(sizes) - 1:
                ax.axvline(h, ls=":", color="0.3")
        ax.set_yscale("log")
        ax.set(xlabel="timestep t", ylabel="held-out MSE per pixel", title=f"{s} ({memo['held_out_images']} held-out images)")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return png(fig)


__all__ = ["locality_figure", "maps_figure", "spectrum_figure", "components_figure", "memorisation_figure", "png"]
