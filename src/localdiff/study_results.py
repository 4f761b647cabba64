"""What a study found (:class:`StudyResults`): every model's run, its comparisons with the U-Net, fields
and memorisation, the headline rule, and :meth:`StudyResults.metrics`, the JSON of metrics.json."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
import torch

from .diffusion import Trajectory
from .errors import ConfigError
from .metrics import MODES, NearestImages, StepComparison
from .samplers import Grid
from .sensitivity import Fields, field_similarity, locality_measures

if TYPE_CHECKING:  # localdiff.study imports this module
    from .study import StudyConfig

REFERENCE = "unet"  # the trained network every analytical model is compared with
# The compared metrics, and whether lower is better; the headline uses the first.
METRICS = {"final_r2": False, "single_step_r2": False, "final_mse": True}
METRIC_SYMBOLS = {"final_r2": "ΔR²", "single_step_r2": "Δ single-step R²", "final_mse": "ΔMSE"}


@dataclass
class ModelRun:
    """One model in a study: its trajectory, comparisons with the U-Net, fields and memorisation."""

    name: str
    settings: dict
    trajectory: Trajectory
    seconds: dict[str, float]
    own: StepComparison | None = None  # x0_hat vs the U-Net's along each one's own trajectory
    single: StepComparison | None = None  # x0_hat vs the U-Net applied to this model's x_t
    single_ref: torch.Tensor | None = None  # [S, N, C, H, W] the U-Net's x0_hat on this model's x_t
    nearest: NearestImages | None = None
    fields: Fields | None = None
    fields_note: str | None = None  # why there are no fields

    @property
    def samples(self) -> torch.Tensor:
        return self.trajectory.samples

    def final(self) -> dict | None:
        """R² and MSE of the final samples against the U-Net's (the last step of the own-trajectory mode)."""
        if self.own is None:
            return None
        r2, err = self.own.r2[-1], self.own.mse[-1]
        return {"r2": float(r2.mean()), "r2_sd": float(r2.std(unbiased=False)), "mse": float(err.mean()),
                "r2_per_sample": r2.tolist(), "mse_per_sample": err.tolist()}

    def per_sample(self, metric: str) -> np.ndarray | None:
        """Per-sample values [N] of a compared metric (None without a U-Net): ``final_r2`` and ``final_mse``
        of the final samples, ``single_step_r2`` the single-step R² averaged over the steps."""
        if self.own is None:
            return None
        if metric == "final_r2":
            return self.own.r2[-1].numpy()
        if metric == "final_mse":
            return self.own.mse[-1].numpy()
        if metric == "single_step_r2":
            return self.single.r2.mean(dim=0).numpy()
        raise ConfigError(f"unknown study metric '{metric}'; one of {', '.join(METRICS)}")


@dataclass
class StudyResults:
    config: StudyConfig
    device: str
    dataset: dict  # the training set (nearest-image distances are measured against it)
    fitted_on: dict  # what the analytical models were fitted on (the training set or its subset)
    held_out: dict  # the held-out split (field draws come from it)
    yardstick: dict  # the held-out images whose nearest-training distances are the yardstick
    statistics: dict  # summary of the training set's spectrum
    eigvals: np.ndarray  # [n] covariance eigenvalues, descending
    grid: Grid  # the levels every model stepped on (sampler, schedule, rounding)
    init_noise: torch.Tensor  # [N, C, H, W]
    runs: dict[str, ModelRun]  # the U-Net first when present
    held_out_nearest: NearestImages
    field_skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    reference_quality: dict | None = None  # the U-Net's held-out denoising MSE beside wiener's and optimal's
    explorer: dict | None = None  # every pixel's exact Wiener field and mask at the field levels, for the page
    warnings: list[str] = field(default_factory=list)  # what the reader must know before trusting the numbers

    @property
    def reference(self) -> str | None:
        return REFERENCE if REFERENCE in self.runs else None

    @property
    def timesteps(self) -> list:
        """Each step's timestep (None for a continuous level)."""
        return self.grid.timesteps

    @property
    def keys(self) -> list[str]:
        """Each step's key in metrics.json: ``"900"``, or ``"s=1.234"`` for a continuous level."""
        return self.grid.keys()

    @property
    def compared(self) -> list[str]:
        """The analytical models, in the order they were run."""
        return [m for m in self.runs if m != REFERENCE]

    def closest(self) -> tuple[str, float] | None:
        """The model whose final samples have the highest mean R² against the U-Net's, and that R²
        (the best mean: whether it is separable from the others is :meth:`comparisons`' headline)."""
        scores = [(m, self.runs[m].final()["r2"]) for m in self.compared if self.runs[m].own is not None]
        scores = [(m, r) for m, r in scores if not math.isnan(r)]
        return max(scores, key=lambda mr: mr[1]) if scores else None

    def comparisons(self) -> dict[str, tuple[list, dict]]:
        """Per metric, the best model against every other on the same noise (:mod:`localdiff.paired`):
        ``{metric: (comparisons, headline)}``. Samples where a metric is undefined for any model (R² of a
        constant U-Net image) are left out of that metric for every model, so the pairs stay paired."""
        from .paired import best_against_rest

        compared = [m for m in self.compared if self.runs[m].own is not None]
        out = {}
        for metric, lower in METRICS.items():
            values = {m: self.runs[m].per_sample(metric) for m in compared}
            if not values:
                out[metric] = best_against_rest({}, metric, lower_is_better=lower)
                continue
            ok = np.logical_and.reduce([np.isfinite(v) for v in values.values()])
            out[metric] = best_against_rest({m: v[ok] for m, v in values.items()}, metric, lower_is_better=lower)
        return out

    @property
    def reference_too_weak(self) -> bool:
        """The reference denoises held-out images worse than Wiener at most of the studied steps."""
        return bool((self.reference_quality or {}).get("too_weak"))

    def metrics_headline(self, comparisons: dict | None = None) -> dict:
        """The final-R² verdict as metrics.json records it: ``{"metric", "closest", "tied", "withheld"}``."""
        if comparisons is None:
            comparisons = self.comparisons() if self.reference else {}
        head = comparisons["final_r2"][1] if comparisons else {"metric": "final_r2", "closest": None, "tied": []}
        if self.config.smoke:  # a smoke run gives no verdict
            head = {**head, "closest": None, "tied": [], "withheld": "smoke run"}
        elif self.reference_too_weak:  # no verdict against a reference worse than Wiener
            head = {**head, "closest": None, "tied": [], "withheld": "reference too weak"}
        return head

    def headline(self) -> str:
        """The one true sentence about closeness to the U-Net (final R², paired intervals); none when the
        reference is too weak to judge."""
        from .paired import headline_sentence

        if self.reference is None:
            return "no U-Net (--no-unet), so nothing was compared with it"
        if self.config.smoke:
            return (f"a smoke run (--quick: {self.config.num} samples, analytical models on "
                    f"{self.fitted_on['num_images']:,} training images) checks that everything runs and names no "
                    "model closest to the U-Net; run without --quick for a verdict")
        if self.reference_too_weak:
            q = self.reference_quality
            return (f"the reference U-Net is too weak to judge the analytical models: it is worse than Wiener at "
                    f"{len(q['worse_than_wiener'])} of {len(q['judged_steps'])} steps on held-out images, so no model "
                    "is named closest to it; compare with a better-trained network (--unet)")
        comps, head = self.comparisons()["final_r2"]
        return headline_sentence(comps, head, symbol=METRIC_SYMBOLS["final_r2"], against="the U-Net")

    def table(self) -> list[dict]:
        """The results table: one row per model (the U-Net first)."""
        rows = []
        for name, run in self.runs.items():
            final = run.final()
            single = run.single.mean_r2() if run.single is not None else None
            rows.append({
                "model": name,
                "final_r2": final["r2"] if final else None,
                "final_r2_sd": final["r2_sd"] if final else None,
                "final_mse": final["mse"] if final else None,
                "single_step_r2_mean": float(np.mean(single)) if single else None,
                "nearest_train_median": run.nearest.summary()["median"] if run.nearest is not None else None,
                "seconds": run.seconds.get("build", 0.0) + run.seconds.get("sample", 0.0),
            })
        return rows

    def field_similarity(self) -> dict:
        with_fields = {m: r.fields for m, r in self.runs.items() if r.fields is not None}
        return field_similarity(with_fields) if len(with_fields) > 1 else {}

    def metrics(self) -> dict:
        """Every number of the study, JSON-ready: keyed by model, then timestep, then mode."""
        models = {}
        sim = self.field_similarity()
        for name, run in self.runs.items():
            entry: dict = {"settings": run.settings, "seconds": run.seconds,
                           "step_seconds": run.trajectory.step_seconds}
            if run.own is not None:
                own, single = run.own.by_step(), run.single.by_step()
                entry["steps"] = {k: {"own_trajectory": own[k], "single_step": single[k]} for k in self.keys}
                entry["final"] = run.final()
            if run.nearest is not None:
                entry["nearest_train"] = _nearest_json(run.nearest)
            if run.fields is not None:
                key = f"{REFERENCE}|{name}"
                entry["fields"] = {"method": run.fields.method, "timesteps": run.fields.timesteps,
                                   "pixels": run.fields.pixels, "draws": run.fields.draws,
                                   "locality": locality_measures(run.fields),
                                   "cosine_to_unet": sim.get(key) if name != REFERENCE else None}
            else:
                entry["fields"] = {"skipped": run.fields_note}
            models[name] = entry
        best = self.closest()
        comparisons = self.comparisons() if self.reference else {}
        head = self.metrics_headline(comparisons)
        return {
            "format": "localdiff.study/1",
            "config": self.config.to_dict(),
            "device": self.device,
            "dataset": self.dataset, "fitted_on": self.fitted_on, "held_out": self.held_out,
            "yardstick": self.yardstick,
            "statistics": self.statistics,
            "timesteps": self.timesteps,
            "steps": self.keys,
            "sampler": self.grid.record(),
            "reference": self.reference,
            "modes": list(MODES) if self.reference else [],
            "r2_note": None if self.reference else "no U-Net (--no-unet): R² and MSE against the U-Net were not computed",
            "models": models,
            "held_out_nearest_train": _nearest_json(self.held_out_nearest),
            "field_similarity": sim,
            "table": self.table(),
            "closest_to_unet": ({"model": head["closest"], "best_mean": best[0], "final_r2": best[1]}
                                if best else None),
            "comparisons": {metric: [c.to_dict() for c in comps] for metric, (comps, _) in comparisons.items()},
            "comparison_method": "paired over samples (same initial noise): mean of per-sample differences a - b, "
                                 "95% Student-t interval, wins of a (higher R², lower MSE)",
            "headline": {"metric": head["metric"], "closest": head["closest"], "tied": head["tied"],
                         "withheld": head.get("withheld"), "sentence": self.headline()},
            "reference_quality": self.reference_quality,
            "warnings": self.warnings,
            "timings_s": self.seconds,
        }


def _nearest_json(n: NearestImages) -> dict:
    return {"summary": n.summary(), "distance": n.distance.tolist(), "second": n.second.tolist(),
            "index": n.index.tolist()}


__all__ = ["ModelRun", "StudyResults", "REFERENCE", "METRICS", "METRIC_SYMBOLS"]
