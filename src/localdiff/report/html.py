"""A self-contained HTML page for a study: every image embedded as a base64 data URI, no external files.

The page carries a tiny inline script that, once the page has loaded, checks that every ``<img>``
decoded (``naturalWidth > 0``) and records the result on the root element
(``data-image-check="ok"|"broken"``, ``data-images="loaded/total"``) and in the footer; a broken image
is also reported with ``console.error``. On success the page logs nothing to the console.
"""

from __future__ import annotations

import base64
import html
import json
import math

FIGURE_TEXT = {
    "r2_per_step": (
        "R² against the U-Net at every sampling step",
        "Each line is one model. Left: the model's estimate of the clean image (x0_hat) at each step of its own "
        "sampling run, compared with the U-Net's estimate at the same step of the U-Net's own run from the same "
        "starting noise; this is how the paper compares models. Right: at each step the U-Net is given exactly "
        "the noisy image the model is looking at, so the comparison measures one denoising call without the "
        "two runs drifting apart. R² = 1 means identical to the U-Net; 0 means no better than a flat image at "
        "the U-Net's mean brightness; negative is worse than that."),
    "mse_per_step": (
        "Mean squared error against the U-Net at every step",
        "The same two comparisons as above, as mean squared pixel error on the [-1, 1] scale (log scale; lower "
        "is closer to the U-Net)."),
    "final_r2": (
        "R² of the final samples",
        "How closely each model's finished images match the U-Net's finished images from the same noise. Bars "
        "are means over samples; dots are single samples."),
    "samples": (
        "Samples side by side",
        "Every row is one model; every column starts from the same random noise, so images in one column can be "
        "compared directly. A model that behaves like the U-Net produces similar images in the same column."),
    "fields": (
        "Sensitivity fields: where each denoiser looks",
        "For one output pixel (marked +), how much its denoised value changes when each input pixel of the noisy "
        "image changes (the average Jacobian row over noisy held-out images). Red: positive influence, blue: "
        "negative. Rows are noise levels (little noise at the top), columns are models; each row has one colour "
        "scale, shown by its colour bar, so the models of a row compare directly. The paper's claim: the "
        "U-Net's fields are local and resemble those of the Wiener filter, which come from the pixel "
        "correlations of the data."),
    "nearest_distances": (
        "Distance to the nearest training image",
        "For each generated image, the distance to the most similar image in the training set. Zero means the "
        "model reproduced a training image exactly (memorisation). The grey row shows real held-out test "
        "images: a model that creates new images should sit near that row."),
    "nearest_pairs": (
        "Samples and their nearest training images",
        "Upper row of each pair: generated samples; lower row: the closest training image to each."),
    "spectrum": (
        "Data statistics",
        "The variances of the training images along their principal components. The Wiener filter and the "
        "masks of the paper's analytical model are built from exactly these statistics (the mean and the "
        "covariance of the pixels)."),
}

_CSS = """
body{font-family:system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;margin:0 auto;max-width:1180px;padding:18px 26px;
color:#1d1d1f;line-height:1.45}
h1{font-size:1.6em;margin-bottom:.2em} h2{font-size:1.25em;margin-top:1.6em;border-bottom:1px solid #ddd;padding-bottom:.2em}
p.lead{font-size:1.05em;background:#f3f6fb;border-left:4px solid #3b6fb6;padding:.6em .9em}
table{border-collapse:collapse;margin:.6em 0;font-size:.92em} th,td{border:1px solid #d6d6d6;padding:.3em .6em;text-align:right}
th{background:#f2f2f2} td:first-child,th:first-child{text-align:left} tr.best td{background:#eaf6e6;font-weight:600}
figure{margin:1em 0} figure img{max-width:100%;height:auto;border:1px solid #eee}
figcaption{color:#444;font-size:.93em;max-width:900px}
.grids{display:flex;flex-wrap:wrap;gap:14px} .grids figure{margin:0;text-align:center} .grids img{image-rendering:pixelated}
pre{background:#f6f6f6;padding:.6em;overflow-x:auto;font-size:.85em;white-space:pre-wrap;word-break:break-all}
.note{color:#8a5a00} footer{margin-top:2em;color:#666;font-size:.85em}
.warn{background:#fff4e5;border-left:4px solid #d9822b;padding:.5em .9em;color:#6b3d00}
"""

_CHECK_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  var bad = imgs.filter(function (img) { return !(img.complete && img.naturalWidth > 0); });
  var root = document.documentElement;
  root.setAttribute('data-images', (imgs.length - bad.length) + '/' + imgs.length);
  root.setAttribute('data-image-check', bad.length ? 'broken' : 'ok');
  var status = document.getElementById('image-check');
  if (status) {
    status.textContent = bad.length ? bad.length + ' of ' + imgs.length + ' images failed to load'
                                    : 'all ' + imgs.length + ' images loaded';
  }
  if (bad.length) {
    console.error('localdiff report: broken images: ' + bad.map(function (img) { return img.alt; }).join(', '));
  }
});
"""


def data_uri(png: bytes) -> str:
    """A PNG as a ``data:image/png;base64,...`` URI."""
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


def _e(x) -> str:
    return html.escape(str(x), quote=True)


def _num(x, fmt: str = "{:.3f}") -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return fmt.format(x)


# Without a U-Net the captions drop what refers to it.
NO_UNET_TEXT = {
    "samples": "Every row is one model; every column starts from the same random noise, so images in one column "
               "can be compared directly.",
    "fields": "For one output pixel (marked +), how much its denoised value changes when each input pixel of the "
              "noisy image changes (the average Jacobian row over noisy held-out images). Red: positive influence, "
              "blue: negative. Rows are noise levels (little noise at the top), columns are models; each row has "
              "one colour scale, shown by its colour bar, so the models of a row compare directly.",
}


def _figure(images: dict, key: str, *, title: bool = True, unet: bool = True, extra: str = "") -> str:
    if key not in images:
        return ""
    head, text = FIGURE_TEXT.get(key, (key, ""))
    if not unet:
        text = NO_UNET_TEXT.get(key, text)
    return (f"{'<h2>' + _e(head) + '</h2>' if title else ''}<figure><img src=\"{data_uri(images[key])}\" "
            f"alt=\"{_e(key)}\"><figcaption>{_e(text)}{' ' + extra if extra else ''}</figcaption></figure>")


def _table(header: list[str], rows: list[list[str]], classes: list[str] | None = None) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "".join(f"<tr class=\"{classes[i] if classes else ''}\">" + "".join(f"<td>{c}</td>" for c in row) + "</tr>"
                   for i, row in enumerate(rows))
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _results_table(m: dict) -> str:
    best = (m.get("closest_to_unet") or {}).get("model")
    rows, classes = [], []
    if m.get("reference") is None:  # no U-Net: no comparison columns
        for r in m["table"]:
            rows.append([_e(r["model"]), _num(r["nearest_train_median"], "{:.2f}"), _num(r["seconds"], "{:.1f}")])
        ho = m["held_out_nearest_train"]["summary"]["median"]
        rows.append(["<i>held-out test images</i>", _num(ho, "{:.2f}"), ""])
        return _table(["model", "median distance to nearest training image", "build + sampling time (s)"], rows)
    for r in m["table"]:
        ref = r["model"] == m.get("reference")
        rows.append([
            _e(r["model"]) + (" (reference)" if ref else ""),
            "1 (itself)" if ref else (f"{_num(r['final_r2'])} ± {_num(r['final_r2_sd'], '{:.2f}')}"
                                      if r["final_r2"] is not None else "–"),
            "0" if ref else _num(r["final_mse"], "{:.4f}"),
            "1 (itself)" if ref else _num(r["single_step_r2_mean"]),
            _num(r["nearest_train_median"], "{:.2f}"),
            _num(r["seconds"], "{:.1f}"),
        ])
        classes.append("best" if r["model"] == best else "")
    ho = m["held_out_nearest_train"]["summary"]["median"]
    rows.append(["<i>held-out test images</i>", "", "", "", _num(ho, "{:.2f}"), ""])
    classes.append("")
    return _table(["model", "final R² vs U-Net (mean ± sd)", "final MSE", "single-step R² (mean over steps)",
                   "median distance to nearest training image", "build + sampling time (s)"], rows, classes)


METRIC_NAMES = {"final_r2": "final R²", "single_step_r2": "single-step R² (mean over steps)",
                "final_mse": "final MSE (lower is closer)"}


def _comparisons(m: dict) -> str:
    """The paired comparisons: the best model of each metric against every other, on the same noise."""
    comps = m.get("comparisons") or {}
    rows = []
    for metric, records in comps.items():
        for c in records:
            ci = c["ci95"]
            a_better = ci is not None and (ci[1] < 0 if metric == "final_mse" else ci[0] > 0)
            verdict = f"{_e(c['a'])} closer" if a_better else "tied (interval includes 0)"
            rows.append([_e(METRIC_NAMES.get(metric, metric)), f"{_e(c['a'])} − {_e(c['b'])}",
                         f"{c['mean_diff']:+.3f}",
                         f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else "–",
                         f"{c['wins_a']}/{c['n']}", verdict])
    if not rows:
        return ""
    return ("<h2>Paired comparisons</h2><p>Each model is compared with the best model of each metric on the same "
            "initial noise, sample by sample: the mean of the per-sample differences, its 95% interval (Student "
            "t over samples) and how often the best model is closer to the U-Net. A model is named closest only "
            "when every interval against it lies on one side of zero; otherwise the models are tied.</p>"
            + _table(["metric", "difference", "mean", "95% interval", "wins", "verdict"], rows))


def _reference_quality(m: dict) -> str:
    """The U-Net's own held-out denoising error beside Wiener's and optimal's, and what it was trained on."""
    q = m.get("reference_quality")
    if not q:
        return ""
    rows = []
    for t in q["timesteps"]:
        t = str(t)
        mse = {k: q["mse"][k][t] for k in q["mse"]}
        cw = q["unet_minus"]["wiener"][t]
        ci = cw["ci95"]
        verdict = ("<b>worse than Wiener</b>" if ci is not None and ci[0] > 0 else
                   "better than Wiener" if ci is not None and ci[1] < 0 else "tied with Wiener")
        rows.append([t] + [f"{mse[k]['mse']:.4f} ± {mse[k]['se']:.4f}" for k in ("unet", "wiener", "optimal")]
                    + [f"{cw['mean_diff']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "–", verdict])
    net = q["network"]
    cfg = net.get("model_config") or {}
    about = (f"Network: {_e(net['path'])}; {net['num_parameters'] / 1e6:.2f} M parameters"
             + (f", {cfg.get('base_channels')} base channels x {cfg.get('channel_mult')}" if cfg else "")
             + f", {_e(net.get('prediction_type'))} prediction"
             + (f", {net['steps']:,} steps ({net['epochs']:.1f} epochs)" if net.get("steps") else "")
             + (f" on {_e(net['device'])}" if net.get("device") else "")
             + (f"; trained on {_e(net['trained_on'])} (data fingerprint {_e(str(net['data_fingerprint'])[:12])}, "
                f"{_e(net['data_match'])} as these data)" if net.get("trained_on") else "; no manifest")
             + (" <b>(an interim network)</b>" if net.get("interim") else "") + ".")
    return ("<h2>How good is the reference?</h2><p>Every comparison above is with this U-Net, so it is only as "
            f"meaningful as the network is good. Its denoising error on {q['num_images']} held-out images at the "
            "study's timesteps, beside the best linear denoiser (Wiener) and the exact optimum on the training set "
            "(optimal), on the same noisy images (per-pixel MSE ± standard error; the difference is paired).</p>"
            + _table(["t", "U-Net MSE", "Wiener MSE", "optimal MSE", "U-Net − Wiener [95% interval]", ""], rows)
            + f"<p>{about}</p>")


def _warnings(m: dict) -> str:
    ws = m.get("warnings") or []
    return "".join(f"<p class=\"warn\">Warning: {_e(w)}.</p>" for w in ws)


def _field_note(m: dict) -> str:
    """Row scales of the field figure, and a line where every analytical model's field coincides."""
    scales = m.get("field_scales") or {}
    parts = []
    if scales:
        parts.append("Row scales (largest |field| of the row): "
                     + ", ".join(f"t = {t}: {v:.3g}" for t, v in scales.items()) + ".")
    sim = m.get("field_similarity") or {}
    ref = m.get("reference")
    pairs = {k: v for k, v in sim.items() if ref is None or ref not in k.split("|")}
    if pairs:
        ts = next(iter(pairs.values())).keys()
        same = [t for t in ts if min(v[t] for v in pairs.values()) >= 0.99]
        if same:
            parts.append(f"At t = {', '.join(same)} every analytical model's field is the same (cosines ≥ 0.99): at "
                         "high noise every posterior-mean estimate is dominated by the data covariance (the Wiener "
                         "gain tends to (a²/b²) Σ), so the fields of wiener, optimal and masked coincide there and "
                         "cannot tell the models apart.")
    if ref is not None:
        anti = sorted({t for k, v in sim.items() if ref in k.split("|") for t, c in v.items() if c < 0})
        if anti:
            parts.append(f"The U-Net's field is anti-correlated with an analytical model's at t = {', '.join(anti)}: a "
                         "sign that the reference has not learnt that noise level.")
    return " ".join(parts)


def _locality_table(m: dict) -> str:
    rows = []
    for name, entry in m["models"].items():
        f = entry.get("fields") or {}
        if "locality" not in f:
            continue
        for t in f["timesteps"]:
            per_pixel = f["locality"][str(t)]
            first = next(iter(per_pixel.values()))
            cos = (f.get("cosine_to_unet") or {}).get(str(t))
            row = [_e(name), str(t), _num(first["r50"], "{:.1f}"), _num(first["r90"], "{:.1f}"),
                   _num(first.get("energy_5x5"), "{:.2f}")]
            rows.append(row + ([_num(cos, "{:.2f}")] if m.get("reference") else []))
    if not rows:
        return ""
    head = ["model", "t", "r50", "r90", "energy in 5x5"] + (["cosine with U-Net"] if m.get("reference") else [])
    return ("<p>Locality of the first field pixel: r50 / r90 are the radii (in pixels) holding 50% / 90% of the "
            "field's energy; 5x5 is the energy fraction inside the 5x5 window around the pixel"
            + ("; the last column is the cosine similarity with the U-Net's field (1 = same shape)" if m.get("reference")
               else "") + ".</p>" + _table(head, rows))


def study_report(metrics: dict, images: dict[str, bytes], grids: dict[str, bytes] | None = None) -> str:
    """The study page. ``metrics`` is the study's metrics.json (with ``command`` and ``versions``);
    ``images`` maps a figure key (see FIGURE_TEXT) to PNG bytes; ``grids`` maps a model to its sample grid."""
    m = metrics
    ds = m["dataset"]
    cfg = m["config"]
    best = m.get("closest_to_unet")
    unet = m.get("reference") is not None
    if not unet:
        lead = ("No U-Net was used (--no-unet), so nothing was compared with it: R² and MSE against the U-Net "
                "were not computed. The samples, fields and memorisation distances below are still valid.")
    elif best:
        lead = (f"{_e(m['headline']['sentence'][0].upper() + m['headline']['sentence'][1:])}, over {cfg['num']} "
                f"samples from the same noise (best mean final R² {best['final_r2']:.3f}, {_e(best['best_mean'])}).")
    else:
        lead = "No analytical model was compared with the U-Net."
    fitted = m["fitted_on"]["num_images"]
    setup = (f"Dataset <b>{_e(ds['name'])}</b>: {ds['num_images']:,} training images of shape "
             f"{'x'.join(map(str, ds['shape']))}"
             + (f" (analytical models fitted on a seeded subset of {fitted:,})" if fitted != ds["num_images"] else "")
             + f"; {cfg['num']} samples per model, {cfg['steps']} {cfg['sampler'].upper()} steps "
             f"(timesteps {', '.join(map(str, m['timesteps']))}), seed {cfg['seed']}, device {_e(m['device'])}; "
             f"total time {m['timings_s'].get('total', float('nan')):.0f} s.")
    explain = ("<p>Final R² compares finished samples with the U-Net's finished samples from the same starting "
               "noise (the paper's table; mean ± standard deviation over samples); single-step R² averages the "
               "per-step comparison in which the U-Net sees the model's own noisy image. " if unet else "<p>") + \
        ("The distance column measures memorisation (0 = a copy of a training image); the last row gives real "
         "held-out images for comparison.</p>")
    parts = [f"<h1>localdiff study: {_e(ds['name'])}</h1>", f"<p class=\"lead\">{lead}</p>", _warnings(m),
             f"<p>{setup}</p>", "<h2>Results</h2>", _results_table(m), explain, _comparisons(m),
             _reference_quality(m)]
    if m.get("r2_note"):
        parts.append(f"<p class=\"note\">{_e(m['r2_note'])}</p>")
    for key in ("r2_per_step", "mse_per_step", "final_r2", "samples"):
        parts.append(_figure(images, key, unet=unet))
    if grids:
        parts.append("<h3>Sample grids</h3><p>One grid per model; the image at the same position in every grid "
                     "starts from the same noise.</p><div class=\"grids\">")
        for name, png in grids.items():
            parts.append(f"<figure><img src=\"{data_uri(png)}\" alt=\"grid {_e(name)}\"><figcaption>{_e(name)}"
                         "</figcaption></figure>")
        parts.append("</div>")
    parts.append(_figure(images, "fields", unet=unet, extra=_e(_field_note(m))))
    parts.append(_locality_table(m))
    skipped = {n: e["fields"]["skipped"] for n, e in m["models"].items()
               if (e.get("fields") or {}).get("skipped")}
    if skipped:
        parts.append("<p class=\"note\">Fields not computed: " + "; ".join(f"{_e(n)}: {_e(r)}" for n, r in
                                                                         skipped.items()) + ".</p>")
    for key in ("nearest_distances", "nearest_pairs", "spectrum"):
        parts.append(_figure(images, key))
    st = m.get("statistics") or {}
    if st:
        parts.append(f"<p>{st.get('components_for_90pct')} of {st.get('dim')} components hold 90% of the variance, "
                     f"{st.get('components_for_99pct')} hold 99%.</p>")
    timing_rows = [[_e(k), _num(v, "{:.1f}")] for k, v in m["timings_s"].items()]
    for name, e in m["models"].items():
        timing_rows.append([_e(name), ", ".join(f"{_e(k)} {v:.1f}" for k, v in e["seconds"].items())])
    versions = m.get("versions") or {}
    parts += [
        "<h2>Run details</h2>",
        "<p>Exact command:</p>", f"<pre>{_e(m.get('command', ''))}</pre>",
        "<p>Versions:</p>", _table(["package", "version"], [[_e(k), _e(v)] for k, v in versions.items()]),
        "<p>Timings (seconds):</p>", _table(["stage", "seconds"], timing_rows),
        "<p>Settings:</p>", f"<pre>{_e(json.dumps(cfg, indent=1))}</pre>",
        "<p>Every number on this page is in <code>metrics.json</code> next to this file, keyed by model, "
        "timestep and comparison mode.</p>",
        "<footer>Generated by localdiff. <span id=\"image-check\">(image check needs JavaScript)</span></footer>",
    ]
    return _page(f"localdiff study: {ds['name']}", parts)


def _page(title: str, parts: list[str]) -> str:
    """The whole document: styles and the image check inline, ``parts`` as the body."""
    body = "\n".join(p for p in parts if p)
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
            "<link rel=\"icon\" href=\"data:,\">\n"
            f"<title>{_e(title)}</title>\n<style>{_CSS}</style>\n"
            f"<script>{_CHECK_SCRIPT}</script>\n</head>\n<body>\n{body}\n</body>\n</html>\n")


def _img(png: bytes, alt: str, caption: str) -> str:
    return f"<figure><img src=\"{data_uri(png)}\" alt=\"{_e(alt)}\"><figcaption>{_e(caption)}</figcaption></figure>"


EXPERIMENT_COLUMNS = (("cos_wiener", "cos(U-Net, Wiener)"), ("cos_blob", "cos(U-Net, blob)"),
                      ("cos_linear_wiener", "cos(linear, Wiener)"), ("r50_unet", "r50 U-Net"),
                      ("r50_wiener", "r50 Wiener"), ("extent_ratio_unet", "extent ratio U-Net"),
                      ("extent_ratio_wiener", "extent ratio Wiener"), ("correlation_ratio_data", "data correlation ratio"))


def experiment_report(record: dict, summary_png: bytes, field_pngs: dict[str, bytes]) -> str:
    """The locality-follows-data page: ``record`` is experiment.json, ``field_pngs`` maps a set to its
    field figure."""
    sets = record["sets"]
    cols = [(k, h) for k, h in EXPERIMENT_COLUMNS if any(k in v["summary"] for v in sets.values())]
    rows = [[_e(name)] + [_num(v["summary"].get(k)) for k, _ in cols]
            + [_e((v.get("verdict") or {}).get("text", "–"))] for name, v in sets.items()]
    per_t = []
    for name, v in sets.items():
        for t, pixels in v["per_timestep"].items():
            for px, rec in pixels.items():
                per_t.append([_e(name), _e(t), _e(px), _num(rec["cos_wiener"]), _num(rec["cos_blob"]),
                              _num(rec["r50_unet"], "{:.2f}"), _num(rec["r50_wiener"], "{:.2f}")])
    cfg = record["config"]
    parts = [
        "<h1>localdiff experiment: does locality follow the data?</h1>",
        "<p class=\"lead\">The same U-Net architecture is trained on datasets whose pixel correlations are "
        "controlled. If the paper is right, the network's sensitivity field follows each dataset's own Wiener "
        "field (the optimal linear denoiser, built from the pixel covariance) rather than a generic local "
        "blob: cos(U-Net, Wiener) above cos(U-Net, blob), and on the anisotropic set a field stretched like "
        "the data.</p>",
        f"<p>U-Net config <b>{_e(cfg['unet_config'])}</b>, {cfg['train_steps']} training steps per set; fields at "
        f"t = {', '.join(map(str, cfg['timesteps']))}, {cfg['draws']} noisy held-out images each.</p>",
        "<h2>Summary (means over timesteps and pixels)</h2>",
        _table(["set"] + [h for _, h in cols] + ["U-Net field closer to (paired over t x pixel, 95% interval)"],
               rows),
        "<p>Cosine: 1 = the same shape. The blob is an isotropic Gaussian centred on the pixel with the same "
        "energy radius r50 as the U-Net's own field. Extent ratio: vertical over horizontal extent of the field "
        "(its own pixel left out); the data correlation ratio comes from neighbouring-pixel correlations.</p>",
        _img(summary_png, "summary", "Cosine similarity of the U-Net's field with its data's Wiener field "
             "and with the matched blob; the trained linear model's agreement with Wiener for reference."),
        "<h2>Per timestep and pixel</h2>",
        _table(["set", "t", "pixel", "cos(U-Net, Wiener)", "cos(U-Net, blob)", "r50 U-Net", "r50 Wiener"], per_t),
        "<h2>Fields</h2>",
    ]
    for name, png in field_pngs.items():
        parts.append(_img(png, f"fields {name}", f"{name}: columns are the data's covariance row of the pixel, "
                          "the Wiener field, the U-Net's field and (if fitted) the trained linear model's field; "
                          "rows are timesteps, little noise at the top, one colour scale per row. Red positive, "
                          "blue negative."))
    parts += ["<h2>Run details</h2>", f"<pre>{_e(record.get('command', ''))}</pre>",
              _table(["package", "version"], [[_e(k), _e(v)] for k, v in (record.get("versions") or {}).items()]),
              "<footer>Generated by localdiff. <span id=\"image-check\">(image check needs JavaScript)</span></footer>"]
    return _page("localdiff experiment: locality-follows-data", parts)


__all__ = ["study_report", "experiment_report", "data_uri", "FIGURE_TEXT"]
