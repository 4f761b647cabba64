"""Everything a study writes into its run directory: metrics.json, samples.npz, fields.npz, the figures (each
rendered once, in memory, then written and embedded) and the self-contained report.html."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ..fileio import write_bytes, write_json, write_npz
from .figures import (field_scales, figure_png, plot_fields, plot_final_r2, plot_nearest_distances, plot_nearest_pairs,
                      plot_per_step, plot_sample_rows, plot_spectrum)
from .grid import grid_png
from .study_page import study_report


def step_axis(results) -> list:
    """The x values of per-step plots: the timesteps, or the sigmas where a level has no timestep."""
    ts = results.timesteps
    return list(ts) if all(t is not None for t in ts) else [float(s) for s in results.grid.sigmas]


def write_study(results, data, out: Path, *, command: str, versions: dict) -> dict:
    """Write a :class:`~localdiff.study.StudyResults` into the directory ``out``; returns the metrics."""
    metrics = {"command": command, "versions": versions, **results.metrics()}
    runs = results.runs
    arrays = {"timesteps": np.asarray([-1 if t is None else t for t in results.timesteps], np.int64),
              "sigmas": np.asarray(results.grid.sigmas, np.float64), "init_noise": results.init_noise.numpy()}
    for name, run in runs.items():
        arrays[f"{name}/samples"] = run.samples.numpy()
        arrays[f"{name}/x0_hat"] = run.trajectory.x0_hat.numpy()
        arrays[f"{name}/xt"] = run.trajectory.xt.numpy()
        if run.single_ref is not None:  # the U-Net on this model's x_t: single-step values are recomputable
            arrays[f"{name}/unet_single_step"] = run.single_ref.numpy()
    write_npz(out / "samples.npz", **arrays)
    with_fields = {n: r.fields for n, r in runs.items() if r.fields is not None}
    first = next(iter(with_fields.values())) if with_fields else None
    if first is not None:
        f_arrays = {"timesteps": np.asarray([t if isinstance(t, int) else -1 for t in first.timesteps], np.int64),
                    "sigmas": np.asarray(first.sigmas, np.float64), "pixels": np.asarray(first.pixels, np.int64)}
        for name, fl in with_fields.items():
            f_arrays[name] = fl.mean.numpy().astype(np.float32)
            f_arrays[f"{name}_abs"] = fl.abs_mean.numpy().astype(np.float32)
        write_npz(out / "fields.npz", **f_arrays)

    figures: dict = {}
    compared = [n for n in results.compared if runs[n].own is not None]
    if compared:
        x = step_axis(results)
        r2 = {n: {"own_trajectory": runs[n].own.mean_r2(), "single_step": runs[n].single.mean_r2()} for n in compared}
        err = {n: {"own_trajectory": runs[n].own.mean_mse(), "single_step": runs[n].single.mean_mse()}
               for n in compared}
        figures["r2_per_step"] = plot_per_step(r2, x, ylabel="R² vs U-Net")
        figures["mse_per_step"] = plot_per_step(err, x, ylabel="MSE vs U-Net", floor=None, log=True)
        figures["final_r2"] = plot_final_r2({n: runs[n].final()["r2_per_sample"] for n in compared})
    figures["samples"] = plot_sample_rows({n: r.samples for n, r in runs.items()})
    extra = {}
    if first is not None:
        figures["fields"] = plot_fields(with_fields, 0)
        metrics["field_scales"] = field_scales(with_fields, 0)
        for pi in range(1, min(len(first.pixels), 8)):
            extra[f"fields_pixel{pi}"] = plot_fields(with_fields, pi)
    figures["nearest_distances"] = plot_nearest_distances(
        {n: r.nearest.distance.numpy() for n, r in runs.items()},
        reference=("held-out test images", results.held_out_nearest.distance.numpy()))
    pairs = {}
    for n, r in runs.items():
        idx = r.nearest.index[:8].tolist()
        near = r.nearest.image  # the images themselves: in a torchrun job another rank may hold them
        pairs[n] = (r.samples[:8], near[:8] if near is not None else torch.stack([data[i] for i in idx]))
    figures["nearest_pairs"] = plot_nearest_pairs(pairs)
    figures["spectrum"] = plot_spectrum(results.eigvals)
    images = {key: figure_png(fig) for key, fig in figures.items()}  # rendered once, written and embedded
    for key, png in [*images.items(), *((k, figure_png(f)) for k, f in extra.items())]:
        write_bytes(out / f"{key}.png", png)
    for n, r in runs.items():
        write_bytes(out / f"grid_{n}.png", grid_png(r.samples, nrow=min(8, r.samples.shape[0])))

    explorer = None
    if results.explorer is not None:
        from ..probing.explorer import field_explorer

        ex = results.explorer
        explorer = field_explorer(ex["fields"], tuple(ex["mean"].shape), ex["labels"], masks=ex["masks"],
                                  backgrounds={k: ex["mean"] for k in ex["fields"]}, element_id="study-explorer",
                                  title="Wiener field explorer", mask_label=f"the masked model's mask (tau {ex['tau']:g})")
    metrics["files"] = sorted(p.name for p in out.iterdir() if not p.name.startswith(".")) + \
        ["metrics.json", "report.html"]
    write_json(out / "metrics.json", metrics)
    write_bytes(out / "report.html", study_report(metrics, images, explorer=explorer).encode("utf-8"))
    return metrics


__all__ = ["write_study", "step_axis"]
