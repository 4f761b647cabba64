"""The probe's self-contained HTML page: one file, every figure a data URI, the field explorer's data
inline and inflated by the browser (no network, no external file)."""

from __future__ import annotations

import html
import json

from ..report.page import CHECK_SCRIPT, CSS, data_uri
from . import plots
from .explorer import field_explorer


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _f(x, fmt: str = "{:.2f}") -> str:
    return "–" if x is None else fmt.format(x)


def _table(header: list[str], rows: list[list[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _figure(png: bytes | None, alt: str, caption: str) -> str:
    if png is None:
        return ""
    return f"<figure><img src=\"{data_uri(png)}\" alt=\"{_e(alt)}\"><figcaption>{_e(caption)}</figcaption></figure>"


def _locality_table(rec: dict) -> str:
    rows = []
    for label, d in rec["datasets"].items():
        for lv in rec["levels"]:
            s = d["levels"][str(lv["t"])]
            r90, er, ar, mr = s["extent_r90"], s["energy_r90"], s["axis_ratio"], s["mask_radius"]
            cover = "; ".join(f"{_e(k)} {_f(v['mask'], '{:.0%}')}" for k, v in s["receptive_field_covers"].items())
            rows.append([_e(label), str(lv["t"]), _f(lv["sigma"], "{:.3g}"),
                         f"{_f(r90.get('median'))} [{_f(r90.get('p25'))}, {_f(r90.get('p75'))}]",
                         f"{_f(er.get('median'))} [{_f(er.get('p25'))}, {_f(er.get('p75'))}]",
                         f"{_f(ar.get('median'))} [{_f(ar.get('p25'))}, {_f(ar.get('p75'))}]",
                         _f(s["stationarity"]["r90_iqr"]), _f(s["mask_size"].get("median"), "{:.0f}"),
                         f"{_f(mr.get('median'), '{:.0f}')} / {_f(mr.get('max'), '{:.0f}')}", cover])
    return _table(["dataset", "t", "σ", "r90 of |field| mass, px: median [IQR]", "r90 of energy, px: median [IQR]",
                   "axis ratio: median [IQR]",
                   "stationarity: IQR of r90", "mask size (px, median)", "mask radius median / max",
                   "masks inside the U-Net's conv field"], rows)


def _spectrum_table(rec: dict) -> str:
    rows = []
    for label, d in rec["datasets"].items():
        s = d["spectrum"]
        top = ", ".join(f"{k}: {v:.0%}" for k, v in s["top_k_fraction"].items() if v is not None)
        rows.append([_e(label), f"{d['dataset'].get('num_images', 0):,}", "x".join(map(str, d["shape"])),
                     _f(s["effective_rank"], "{:.1f}"), _f(s["participation_ratio"], "{:.1f}"),
                     str(s["components_for_90pct"]), str(s["components_for_99pct"]), top])
    return _table(["dataset", "training images", "shape", "effective rank", "participation ratio",
                   "components for 90%", "for 99%", "variance in the top k"], rows)


def _memorisation_section(rec: dict) -> str:
    rows, nets = [], []
    for label, d in rec["datasets"].items():
        memo = d.get("memorisation") or {}
        if "per_size" not in memo:
            continue
        for size in memo["sizes"]:
            ps = memo["per_size"][str(size)]
            best = ", ".join(f"t={t}: {c['mean_diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}]"
                             for t, c in ps["optimal_minus_wiener"].items() if c["ci95"] is not None
                             and int(t) in (ps["horizon_t"], *ps["loses_below_horizon"][-1:]))
            rows.append([_e(label), f"{size:,}", "never" if ps["horizon_t"] is None else f"t = {ps['horizon_t']}",
                         _f(ps["horizon_sigma"], "{:.3g}"), ", ".join(map(str, ps["beats_at"])) or "–",
                         ", ".join(map(str, ps["loses_at"])) or "–", _e(best)])
        for t, c in (memo.get("unet") or {}).get("minus_wiener", {}).items():
            co = memo["unet"]["minus_optimal"][t]
            nets.append([_e(label), t, f"{c['mean_diff']:+.4f} [{c['ci95'][0]:+.4f}, {c['ci95'][1]:+.4f}] {c['verdict']}",
                         f"{co['mean_diff']:+.4f} [{co['ci95'][0]:+.4f}, {co['ci95'][1]:+.4f}] {co['verdict']}"])
    if not rows:
        return "<p>The held-out MSE stage was skipped.</p>"
    out = (f"<p>{_e(rec['definitions']['memorisation_horizon'])}. Paired over the same noisy held-out images "
           "(mean of optimal − wiener per image, 95% Student-t interval).</p>"
           + _table(["dataset", "training images", "memorisation horizon", "σ there", "optimal lower at t",
                     "wiener lower at t", "optimal − wiener at the horizon and just below it"], rows))
    if nets:
        out += "<p>The given network on the same images (paired):</p>" + _table(
            ["dataset", "t", "network − wiener", "network − optimal"], nets)
    return out


def _receptive_table(rec: dict) -> str:
    rows = []
    for label, d in rec["datasets"].items():
        for name, rf in d["receptive_fields"].items():
            rows.append([_e(label), _e(name), f"{rf['size']} x {rf['size']}", str(rf["radius"]), str(rf["levels"]),
                         _e("; ".join(rf["global_layers"]))])
    return _table(["dataset", "U-Net", "conv receptive field", "radius (px)", "resolution levels",
                   "layers that see the whole image anyway"], rows)


def probe_page(result) -> str:
    """The page of a :class:`~localdiff.probing.run.ProbeResult`."""
    rec = result.record
    names = list(rec["datasets"])
    lead = "".join(f"<li>{_e(line)}.</li>" for line in result.summary_lines())
    explorer = field_explorer(
        {label: d.display_fields() for label, d in result.datasets.items()},
        {label: d.shape for label, d in result.datasets.items()}, [lv.label for lv in result.levels],
        masks={label: d.position_masks() for label, d in result.datasets.items()},
        backgrounds={label: d.mean_image() for label, d in result.datasets.items()},
        element_id="probe-explorer", title="Wiener field explorer", mask_label="mask")
    taus = ", ".join(f"{_e(k)}: {d['tau']['value']:g}" for k, d in rec["datasets"].items())
    parts = [
        f"<h1>localdiff probe: {_e(', '.join(names))}</h1>",
        f"<p class=\"lead\">What these datasets' pixel statistics imply for a denoiser, before any network is "
        f"trained. The Wiener filter (the best linear denoiser, computed exactly from the mean and covariance) "
        f"shows where a denoiser of these data looks at each noise level.</p><ul>{lead}</ul>",
        "<h2>How local, at each noise level</h2>",
        _figure(plots.locality_figure(rec), "locality", "Every dataset on the same axes, noise growing to the right. "
                "Extent: the radius around a pixel holding 90% of its Wiener field's absolute mass, or of its energy "
                "(squared values, the r90 of `localdiff fields`); median over pixels, band: middle half. The mass "
                "counts the field's faint long-range tail at full weight, the energy hardly at all. Axis ratio: elongation of the field (1 = round). Stationarity: how much "
                "the extent varies across the image. Mask radius: half-width of the square holding the paper's mask "
                f"(tau {taus}); dashed lines: the U-Nets' convolutional reach."),
        _locality_table(rec),
        "<h2>Where each pixel looks: the field explorer</h2>",
        "<p>Hover over a dataset's mean image (left) to pick a pixel; click to hold it, then move it with the arrow "
        "keys (Esc releases). Each row shows that pixel's Wiener field at every noise level (red: the output rises "
        "with that input pixel, blue: falls; each panel on its own scale, its largest |value| written under it, "
        "unless the box above asks for one scale per level), and under it the paper's mask (dark: compared "
        f"pixels; red: the pixel itself). Values are quantised: {_e(rec['definitions']['explorer_quantisation'])}.</p>",
        explorer,
        "<h2>Across the image</h2>",
        _figure(plots.maps_figure(rec, "r90", "extent r90 (px) of every pixel's field"), "r90 maps",
                "Extent of each pixel's field, per dataset (rows) and noise level (columns, high noise left). A "
                "uniform map means stationary statistics; structure means locality depends on where you are."),
        _figure(plots.maps_figure(rec, "energy_r90", "energy r90 (px) of every pixel's field"), "energy r90 maps",
                "The same for the radius holding 90% of the field's energy (squared values), which ignores the "
                "field's faint long-range tail."),
        _figure(plots.maps_figure(rec, "axis_ratio", "axis ratio of every pixel's field", cmap="magma"),
                "axis ratio maps", "Elongation of each pixel's field (1 = round); angles are in probe.json."),
        "<h2>The statistics behind it</h2>",
        _figure(plots.spectrum_figure(rec), "spectrum", "Covariance eigenvalues, normalised by the total variance, "
                "and the share of variance held by the leading components."),
        _spectrum_table(rec),
        _figure(plots.components_figure({k: d.components for k, d in result.datasets.items()}), "components",
                "The leading principal components (red positive, blue negative). At high noise every field moves "
                "into their span."),
        "<h2>How much is second order, and when memorisation wins</h2>",
        _figure(plots.memorisation_figure(rec), "memorisation", "Held-out denoising MSE of the exact optimal "
                "(memorising) denoiser at each training-set size and of Wiener at the full size; dotted: the "
                "memorisation horizon at the full size."),
        _memorisation_section(rec),
        "<h2>Receptive fields</h2>", _receptive_table(rec),
        "<h2>Definitions</h2><dl>" + "".join(f"<dt><b>{_e(k)}</b></dt><dd>{_e(v)}</dd>"
                                            for k, v in rec["definitions"].items()) + "</dl>",
        "<h2>Run details</h2>",
        f"<pre>{_e(rec.get('command', ''))}</pre>",
        f"<pre>{_e(json.dumps({'config': rec['config'], 'seconds': rec['seconds'], 'versions': rec.get('versions')}, indent=1))}</pre>",
        "<p>Every number on this page is in <code>probe.json</code> next to this file.</p>",
        "<footer>Generated by localdiff probe. <span id=\"image-check\">(image check needs JavaScript)</span></footer>",
    ]
    body = "\n".join(p for p in parts if p)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>localdiff probe: {_e(', '.join(names))}</title>\n<style>{CSS}</style>\n"
            f"<script>{CHECK_SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


__all__ = ["probe_page"]
