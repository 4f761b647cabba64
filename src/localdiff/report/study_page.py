"""The study's page (``report.html``): what it shows, with a plain-language caption on every figure."""

from __future__ import annotations

import json

from .page import data_uri, esc, num, page, table

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
        "negative. Rows are noise levels (little noise at the top), columns are models; every panel has its own "
        "symmetric colour scale, its largest |value| printed in its corner, so every field is readable (the "
        "optimal denoiser's are tiny where it has settled on one training image). The paper's claim: the "
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

# Without a U-Net the captions drop what refers to it.
NO_UNET_TEXT = {
    "samples": "Every row is one model; every column starts from the same random noise, so images in one column "
               "can be compared directly.",
    "fields": "For one output pixel (marked +), how much its denoised value changes when each input pixel of the "
              "noisy image changes (the average Jacobian row over noisy held-out images). Red: positive influence, "
              "blue: negative. Rows are noise levels (little noise at the top), columns are models; every panel has "
              "its own symmetric colour scale, whose largest |value| is printed in its corner, so every field is "
              "readable: compare shapes along a row, magnitudes by the printed scales.",
}


def _figure(images: dict, key: str, *, title: bool = True, unet: bool = True, extra: str = "") -> str:
    if key not in images:
        return ""
    head, text = FIGURE_TEXT.get(key, (key, ""))
    if not unet:
        text = NO_UNET_TEXT.get(key, text)
    return (f"{'<h2>' + esc(head) + '</h2>' if title else ''}<figure><img src=\"{data_uri(images[key])}\" "
            f"alt=\"{esc(key)}\"><figcaption>{esc(text)}{' ' + extra if extra else ''}</figcaption></figure>")


def _results_table(m: dict) -> str:
    best = (m.get("closest_to_unet") or {}).get("model")
    rows, classes = [], []
    if m.get("reference") is None:  # no U-Net: no comparison columns
        for r in m["table"]:
            rows.append([esc(r["model"]), num(r["nearest_train_median"], "{:.2f}"), num(r["seconds"], "{:.1f}")])
        ho = m["held_out_nearest_train"]["summary"]["median"]
        rows.append(["<i>held-out test images</i>", num(ho, "{:.2f}"), ""])
        return table(["model", "median distance to nearest training image", "build + sampling time (s)"], rows)
    for r in m["table"]:
        ref = r["model"] == m.get("reference")
        rows.append([
            esc(r["model"]) + (" (reference)" if ref else ""),
            "1 (itself)" if ref else (f"{num(r['final_r2'])} ± {num(r['final_r2_sd'], '{:.2f}')}"
                                      if r["final_r2"] is not None else "–"),
            "0" if ref else num(r["final_mse"], "{:.4f}"),
            "1 (itself)" if ref else num(r["single_step_r2_mean"]),
            num(r["nearest_train_median"], "{:.2f}"),
            num(r["seconds"], "{:.1f}"),
        ])
        classes.append("best" if r["model"] == best else "")
    ho = m["held_out_nearest_train"]["summary"]["median"]
    rows.append(["<i>held-out test images</i>", "", "", "", num(ho, "{:.2f}"), ""])
    classes.append("")
    return table(["model", "final R² vs U-Net (mean ± sd)", "final MSE", "single-step R² (mean over steps)",
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
            verdict = f"{esc(c['a'])} closer" if a_better else "tied (interval includes 0)"
            rows.append([esc(METRIC_NAMES.get(metric, metric)), f"{esc(c['a'])} − {esc(c['b'])}",
                         f"{c['mean_diff']:+.3f}",
                         f"[{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci is not None else "–",
                         f"{c['wins_a']}/{c['n']}", verdict])
    if not rows:
        return ""
    return ("<h2>Paired comparisons</h2><p>Each model is compared with the best model of each metric on the same "
            "initial noise, sample by sample: the mean of the per-sample differences, its 95% interval (Student "
            "t over samples) and how often the best model is closer to the U-Net. A model is named closest only "
            "when every interval against it lies on one side of zero; otherwise the models are tied.</p>"
            + table(["metric", "difference", "mean", "95% interval", "wins", "verdict"], rows))


def _vs(c: dict, other: str) -> tuple[str, str]:
    """(difference with its interval, verdict) of one paired U-Net-minus-``other`` comparison."""
    ci = c["ci95"]
    if ci is None:
        return "–", "–"
    verdict = (f"<b>worse than {other}</b>" if ci[0] > 0 else f"better than {other}" if ci[1] < 0
               else f"tied with {other}")
    return f"{c['mean_diff']:+.4f} [{ci[0]:+.4f}, {ci[1]:+.4f}]", verdict


def _reference_quality(m: dict) -> str:
    """The U-Net's own held-out denoising error beside Wiener's and optimal's, paired, and what it was trained on."""
    q = m.get("reference_quality")
    if not q:
        return ""
    keys = q.get("steps") or [str(t) for t in q["timesteps"]]
    judged = set(q.get("judged_steps", keys))
    rows = []
    for k in keys:
        mse = {name: q["mse"][name][k] for name in q["mse"]}
        w_diff, w_verdict = _vs(q["unet_minus"]["wiener"][k], "Wiener")
        o_diff, o_verdict = _vs(q["unet_minus"]["optimal"][k], "optimal")
        if k not in judged:
            w_verdict = o_verdict = "trivial (not counted)"
        rows.append([esc(k if not k.startswith("s=") else "σ " + k[2:])]
                    + [f"{mse[n]['mse']:.4f} ± {mse[n]['se']:.4f}" for n in ("unet", "wiener", "optimal")]
                    + [w_diff, w_verdict, o_diff, o_verdict])
    net = q["network"]
    cfg = net.get("model_config") or {}
    pred = {"epsilon": "noise (ε)", "v_prediction": "velocity (v)", "sample": "clean image (x0)",
            "edm": "EDM's preconditioned D(x; σ)"}.get(net.get("prediction_type"), net.get("prediction_type"))
    about = (f"Network: {esc(net['path'])}; {net['num_parameters'] / 1e6:.2f} M parameters"
             + (f", {cfg.get('base_channels')} base channels x {cfg.get('channel_mult')}" if cfg else "")
             + f"; it predicts the {esc(pred)}"
             + (f"; {net['steps']:,} steps ({net['epochs']:.1f} epochs)" if net.get("steps") else "")
             + (f" on {esc(net['device'])}" if net.get("device") else "")
             + (f"; trained on {esc(net['trained_on'])} (data fingerprint {esc(str(net['data_fingerprint'])[:12])}, "
                f"{esc(net['data_match'])} as these data)" if net.get("trained_on") else "; no localdiff manifest")
             + (" <b>(an interim network)</b>" if net.get("interim") else "") + ".")
    weak = ("<p class=\"warn\">This network is worse than Wiener at most of the studied steps: too weak to judge the "
            "analytical models, so the study names no model closest to it.</p>") if q.get("too_weak") else ""
    return ("<h2>How good is the reference?</h2><p>Every comparison above is with this U-Net, so it is only as "
            f"meaningful as the network is good. Its denoising error on {q['num_images']} held-out images at the "
            "study's steps, beside the best linear denoiser (Wiener) and the exact optimum on the training set "
            "(optimal), on the same noisy images (per-pixel MSE ± standard error); the differences are paired "
            "(95% Student-t intervals). At high noise every good denoiser returns nearly the data mean, so ties "
            "there are expected; at the lowest level (σ ≤ 0.0101, DDPM's t = 0) every denoiser returns about x_t, "
            "so that row is not counted.</p>"
            + table(["step", "U-Net MSE", "Wiener MSE", "optimal MSE", "U-Net − Wiener [95% interval]",
                     "against Wiener", "U-Net − optimal [95% interval]", "against optimal"], rows)
            + weak + f"<p>{about}</p>")


def _warnings(m: dict) -> str:
    ws = m.get("warnings") or []
    return "".join(f"<p class=\"warn\">Warning: {esc(w)}.</p>" for w in ws)


def _field_note(m: dict) -> str:
    """Panel scales of the field figure, and a line where every analytical model's field coincides."""
    scales = m.get("field_scales") or {}
    parts = []
    if scales:
        parts.append("Panel scales (largest |field|): " + "; ".join(
            f"{t}: " + ", ".join(f"{n} {v:.3g}" for n, v in per.items()) for t, per in scales.items()) + ".")
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
            row = [esc(name), str(t), num(first["r50"], "{:.1f}"), num(first["r90"], "{:.1f}"),
                   num(first.get("energy_5x5"), "{:.2f}")]
            rows.append(row + ([num(cos, "{:.2f}")] if m.get("reference") else []))
    if not rows:
        return ""
    head = ["model", "t", "r50", "r90", "energy in 5x5"] + (["cosine with U-Net"] if m.get("reference") else [])
    return ("<p>Locality of the first field pixel: r50 / r90 are the radii (in pixels) holding 50% / 90% of the "
            "field's energy; 5x5 is the energy fraction inside the 5x5 window around the pixel"
            + ("; the last column is the cosine similarity with the U-Net's field (1 = same shape)" if m.get("reference")
               else "") + ".</p>" + table(head, rows))


def _grid_text(s: dict) -> str:
    """How the models were sampled, for the page: sampler, schedule, the levels visited."""
    steps = s["timesteps"] if all(t is not None for t in s["timesteps"]) else None
    where = (f"timesteps {', '.join(map(str, steps))}" if steps is not None
             else f"sigma {', '.join(f'{v:.3g}' for v in s['sigmas'])}")
    rounded = ", rounded to the network's trained levels" if s.get("snapped") else ""
    return (f"{s['name'].upper()} with {s['steps_taken']} steps on the {esc(s['schedule']['family'])} schedule "
            f"({where}{rounded})")


def study_report(metrics: dict, images: dict[str, bytes], explorer: str | None = None) -> str:
    """The study page. ``metrics`` is the study's metrics.json (with ``command`` and ``versions``);
    ``images`` maps a figure key (see FIGURE_TEXT) to PNG bytes; ``explorer`` the field explorer's fragment
    (:func:`localdiff.probing.field_explorer`) of the exact fields, if any."""
    m = metrics
    ds = m["dataset"]
    cfg = m["config"]
    best = m.get("closest_to_unet")
    unet = m.get("reference") is not None
    if not unet:
        lead = ("No U-Net was used (--no-unet), so nothing was compared with it: R² and MSE against the U-Net "
                "were not computed. The samples, fields and memorisation distances below are still valid.")
    elif m["headline"].get("withheld"):
        lead = f"{esc(m['headline']['sentence'][0].upper() + m['headline']['sentence'][1:])}."
    elif best:
        lead = (f"{esc(m['headline']['sentence'][0].upper() + m['headline']['sentence'][1:])}, over {cfg['num']} "
                f"samples from the same noise (best mean final R² {best['final_r2']:.3f}, {esc(best['best_mean'])}).")
    else:
        lead = "No analytical model was compared with the U-Net."
    fitted = m["fitted_on"]["num_images"]
    setup = (f"Dataset <b>{esc(ds['name'])}</b>: {ds['num_images']:,} training images of shape "
             f"{'x'.join(map(str, ds['shape']))}"
             + (f" (analytical models fitted on a seeded subset of {fitted:,})" if fitted != ds["num_images"] else "")
             + f"; {cfg['num']} samples per model, {_grid_text(m['sampler'])}, seed {cfg['seed']}, "
             f"device {esc(m['device'])}; total time {m['timings_s'].get('total', float('nan')):.0f} s.")
    explain = ("<p>Final R² compares finished samples with the U-Net's finished samples from the same starting "
               "noise (the paper's table; mean ± standard deviation over samples); single-step R² averages the "
               "per-step comparison in which the U-Net sees the model's own noisy image. " if unet else "<p>") + \
        ("The distance column measures memorisation (0 = a copy of a training image); the last row gives real "
         "held-out images for comparison.</p>")
    parts = [f"<h1>localdiff study: {esc(ds['name'])}</h1>", f"<p class=\"lead\">{lead}</p>", _warnings(m),
             f"<p>{setup}</p>", "<h2>Results</h2>", _results_table(m), explain, _comparisons(m),
             _reference_quality(m)]
    if m.get("r2_note"):
        parts.append(f"<p class=\"note\">{esc(m['r2_note'])}</p>")
    for key in ("r2_per_step", "mse_per_step", "final_r2", "samples"):
        parts.append(_figure(images, key, unet=unet))
    parts.append(_figure(images, "fields", unet=unet, extra=esc(_field_note(m))))
    if explorer:
        parts += ["<h3>Every pixel's exact Wiener field</h3><p>The Wiener filter's Jacobian does not depend on the "
                  "input, so its field is exact for every pixel. Hover over or click a pixel of the mean image "
                  "(the arrow keys move it) to see its field at each noise level of the study and the paper's mask "
                  "of that pixel; the masked model compares only the pixels in that mask.</p>", explorer]
    parts.append(_locality_table(m))
    skipped = {n: e["fields"]["skipped"] for n, e in m["models"].items()
               if (e.get("fields") or {}).get("skipped")}
    if skipped:
        parts.append("<p class=\"note\">Fields not computed: " + "; ".join(f"{esc(n)}: {esc(r)}" for n, r in
                                                                         skipped.items()) + ".</p>")
    for key in ("nearest_distances", "nearest_pairs", "spectrum"):
        parts.append(_figure(images, key))
    st = m.get("statistics") or {}
    if st:
        parts.append(f"<p>{st.get('components_for_90pct')} of {st.get('dim')} components hold 90% of the variance, "
                     f"{st.get('components_for_99pct')} hold 99%.</p>")
    timing_rows = [[esc(k), num(v, "{:.1f}")] for k, v in m["timings_s"].items()]
    for name, e in m["models"].items():
        timing_rows.append([esc(name), ", ".join(f"{esc(k)} {v:.1f}" for k, v in e["seconds"].items())])
    versions = m.get("versions") or {}
    parts += [
        "<h2>Run details</h2>",
        "<p>Exact command:</p>", f"<pre>{esc(m.get('command', ''))}</pre>",
        "<p>Versions:</p>", table(["package", "version"], [[esc(k), esc(v)] for k, v in versions.items()]),
        "<p>Timings (seconds):</p>", table(["stage", "seconds"], timing_rows),
        "<p>Settings:</p>", f"<pre>{esc(json.dumps(cfg, indent=1))}</pre>",
        "<p>Every number on this page is in <code>metrics.json</code> next to this file, keyed by model, "
        "timestep and comparison mode.</p>",
        "<footer>Generated by localdiff. <span id=\"image-check\">(image check needs JavaScript)</span></footer>",
    ]
    return page(f"localdiff study: {ds['name']}", parts)



__all__ = ["study_report", "FIGURE_TEXT"]
