"""The paper's comparison on one dataset, end to end (the work behind ``localdiff study``).

Every analytical denoiser and the trained U-Net are sampled with DDIM from the same initial noise;
each model's x0_hat is compared with the U-Net's at every step, along its own trajectory and as a
single step (the U-Net applied to that model's x_t), with the official R² and MSE
(:mod:`localdiff.metrics`); the final R² table is the last step of the first mode. Sensitivity
fields and locality measures, and every sample's distance to its nearest training image (with
held-out test images as the yardstick), complete the picture. Nothing here prints or writes files:
:func:`run_study` returns a :class:`StudyResults`, whose :meth:`~StudyResults.metrics` is JSON-ready.
"""

from __future__ import annotations

import dataclasses
import gc
import math
import time
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch

from .data.shards import total_images
from .denoisers import REGISTRY, Capabilities, available_models, make_denoiser
from .device import resolve_device
from .diffusion import Trajectory, initial_noise, sample, timesteps_for
from .schedules import DEFAULT_SCHEDULE
from .distributed import tqdm
from .errors import ConfigError
from .metrics import (
    MODES,
    NearestImages,
    StepComparison,
    nearest_training_distances,
    own_trajectory_comparison,
    single_step_comparison,
)
from .sensitivity import (
    Fields,
    field_similarity,
    locality_measures,
    parse_pixels,
    sensitivity_fields,
)

REFERENCE = "unet"  # the trained network every analytical model is compared with
# The compared metrics, and whether lower is better; the headline uses the first.
METRICS = {"final_r2": False, "single_step_r2": False, "final_mse": True}
METRIC_SYMBOLS = {"final_r2": "ΔR²", "single_step_r2": "Δ single-step R²", "final_mse": "ΔMSE"}


def analytical_models() -> tuple[str, ...]:
    """Every registered model computed in closed form from the data (``not capabilities.trained``), in
    registration order: what ``--models all`` and the GPU preset study."""
    return tuple(name for name, cls in REGISTRY.items() if not cls.capabilities.trained)


ANALYTICAL_MODELS = analytical_models()
# On two CPU cores these fit the 5-minute budget on the full MNIST training set; els, els-boundary and
# pspc take 2-10 minutes each there (docs in commands/study.py), so they are GPU defaults.
CPU_MODELS = ("wiener", "optimal", "nearest", "masked", "ls", "scfdm")


def fields_skip_reason(caps: Capabilities, device: torch.device) -> str | None:
    """Why a model's sensitivity fields are not computed by default (None: they are), from what it declares."""
    if caps.piecewise_constant:
        return "piecewise constant in x_t, so its Jacobian is zero almost everywhere"
    if caps.slow_autograd and not caps.closed_form_jacobian and device.type != "cuda":
        return ("autograd through it over the whole training set takes minutes per timestep on the CPU; "
                "ask for it with --field-models")
    return None


class ReferenceUnavailable(ConfigError):
    """The U-Net could not be built (no shipped weights, a wrong directory, ...)."""


@dataclass(frozen=True)
class StudyConfig:
    """Settings of one study; the defaults are the CPU run (see :data:`QUICK` and :data:`GPU`)."""

    models: tuple[str, ...] = CPU_MODELS  # analytical models, sampled in this order
    unet: bool = True  # sample the U-Net and compare every model with it (R² needs it)
    num: int = 8  # samples per model, all from the same initial noise
    steps: int = 10  # DDIM steps (10: timesteps 900, 800, ..., 0)
    seed: int = 0  # seed of the initial noise, the field draws and the held-out subset
    sampler: Literal["ddim", "ddpm"] = "ddim"
    batch_size: int | None = None  # denoise this many samples at a time (None: all)
    subset: int | None = None  # fit the analytical models on a seeded subset of this many training images
    data_seed: int = 0  # seed of that subset
    field_models: tuple[str, ...] | None = None  # None: every model but those fields_skip_reason leaves out
    field_timesteps: tuple[int, ...] = (100, 500, 900)
    field_draws: int = 8  # noisy held-out images per field timestep
    field_pixels: str = "center"  # output pixels of the fields ("center", "all" or "r,c;r,c")
    held_out: int = 64  # held-out images whose nearest-training distances are the yardstick
    reference_check: int = 64  # held-out images on which the U-Net's denoising MSE is set beside wiener/optimal's
    device: str = "auto"

    def validate(self) -> None:
        known = set(available_models())
        if not self.models and not self.unet:
            raise ConfigError("nothing to study: no models and no U-Net")
        for m in self.models:
            if m == REFERENCE:
                raise ConfigError("'unet' is the reference, not one of the compared models; it is included unless "
                                  "--no-unet is given")
            if m not in known:
                raise ConfigError(f"unknown model '{m}'; available models: {', '.join(sorted(known - {REFERENCE}))}")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"a model is listed twice in {', '.join(self.models)}")
        for name, v in (("num", self.num), ("steps", self.steps), ("field_draws", self.field_draws),
                        ("held_out", self.held_out)):
            if not isinstance(v, int) or v < 1:
                raise ConfigError(f"{name} must be a positive integer, got {v}")
        if not isinstance(self.reference_check, int) or self.reference_check < 0:
            raise ConfigError(f"reference_check must be a non-negative integer, got {self.reference_check}")
        if self.subset is not None and self.subset < 1:
            raise ConfigError(f"subset must be a positive number of images, got {self.subset}")
        if self.batch_size is not None and self.batch_size < 1:
            raise ConfigError(f"batch_size must be positive, got {self.batch_size}")
        if self.field_models is not None:
            studied = set(self.models) | ({REFERENCE} if self.unet else set())
            extra = [m for m in self.field_models if m not in studied]
            if extra:
                raise ConfigError(f"field models {', '.join(extra)} are not among the studied models "
                                  f"({', '.join(sorted(studied))})")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


# Presets: --quick (a data subset and few samples: about a minute on two CPU cores) and the GPU run.
QUICK = StudyConfig(num=4, subset=5000, field_draws=2, held_out=16, reference_check=16)
GPU = StudyConfig(models=ANALYTICAL_MODELS, num=64, field_timesteps=(100, 300, 500, 700, 900), field_draws=32,
                  held_out=256, reference_check=256)


def default_config(device: str | torch.device, quick: bool = False) -> StudyConfig:
    """The preset for a device: QUICK when asked, GPU on CUDA, else the CPU defaults."""
    if quick:
        return QUICK
    return GPU if torch.device(device).type == "cuda" else StudyConfig()


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
    timesteps: list[int]
    init_noise: torch.Tensor  # [N, C, H, W]
    runs: dict[str, ModelRun]  # the U-Net first when present
    held_out_nearest: NearestImages
    field_skipped: dict[str, str] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    reference_quality: dict | None = None  # the U-Net's held-out denoising MSE beside wiener's and optimal's
    warnings: list[str] = field(default_factory=list)  # what the reader must know before trusting the numbers

    @property
    def reference(self) -> str | None:
        return REFERENCE if REFERENCE in self.runs else None

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

    def headline(self) -> str:
        """The one true sentence about closeness to the U-Net (final R², paired intervals)."""
        from .paired import headline_sentence

        if self.reference is None:
            return "no U-Net (--no-unet), so nothing was compared with it"
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
                entry["steps"] = {str(t): {"own_trajectory": own[str(t)], "single_step": single[str(t)]}
                                  for t in self.timesteps}
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
        head = comparisons["final_r2"][1] if comparisons else {"metric": "final_r2", "closest": None, "tied": []}
        return {
            "format": "localdiff.study/1",
            "config": self.config.to_dict(),
            "device": self.device,
            "dataset": self.dataset, "fitted_on": self.fitted_on, "held_out": self.held_out,
            "yardstick": self.yardstick,
            "statistics": self.statistics,
            "timesteps": self.timesteps,
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
                         "sentence": self.headline()},
            "reference_quality": self.reference_quality,
            "warnings": self.warnings,
            "timings_s": self.seconds,
        }


def _nearest_json(n: NearestImages) -> dict:
    return {"summary": n.summary(), "distance": n.distance.tolist(), "second": n.second.tolist(),
            "index": n.index.tolist()}


def _release(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_study(data, held_out, config: StudyConfig = StudyConfig(), *, options: dict[str, dict] | None = None,
              progress: bool = True) -> StudyResults:
    """Run the comparison on ``data`` (training set) with ``held_out`` images (fields, yardstick).

    ``options`` maps a model name to its options (``make_denoiser`` keywords, strings allowed), e.g.
    ``{"unet": {"path": "runs/unet"}, "masked": {"tau": "0.005"}}``. The U-Net is built first, so a
    missing network fails before any long computation. Models are built, sampled, analysed and
    released one at a time, so memory holds one analytical model (and the U-Net) at once.
    """
    from .denoisers.unet import shipped_weights_dir
    from .reference import check_reference, overlapping
    from .stats import data_spectrum, describe_spectrum

    config.validate()
    options = {m: dict(v) for m, v in (options or {}).items()}
    studied = ([REFERENCE] if config.unet else []) + list(config.models)
    unknown = sorted(set(options) - set(studied))
    if unknown:
        raise ConfigError(f"options given for {', '.join(unknown)}, which is not studied ({', '.join(studied)})")
    device = resolve_device(config.device)  # once: every model gets the resolved device
    timesteps = timesteps_for(config.steps, config.sampler)
    field_ts = tuple(DEFAULT_SCHEDULE.check_t(t) for t in config.field_timesteps)
    pixels = parse_pixels(config.field_pixels, data.shape)
    if tuple(held_out.shape) != tuple(data.shape):
        raise ConfigError(f"held-out images have shape {held_out.shape}, the training set {data.shape}")
    fit_data = data
    if config.subset is not None and config.subset < total_images(data):  # data may be a rank's shard
        fit_data = data.subset(config.subset, seed=config.data_seed)
    field_skipped: dict[str, str] = {}
    spectrum = None  # the training set's statistics, computed after the U-Net is built (below)
    start_all = time.perf_counter()
    seconds: dict[str, float] = {}

    stages = ["statistics", *(["reference check"] if config.unet and config.reference_check else []), *studied,
              "held-out distances"]
    bar = tqdm(total=len(stages), desc="study", unit="stage", disable=not progress)

    def stage(name: str) -> None:
        bar.set_postfix_str(name)
        bar.refresh()

    def build(name: str):
        opts = {"device": str(device), **options.get(name, {})}
        if name != REFERENCE:  # the statistics computed once below, not re-read from the cache by each model
            return make_denoiser(name, fit_data, spectrum=spectrum, **opts)
        if not opts.get("path") and not (shipped_weights_dir(data.name) / "config.json").is_file():
            raise ReferenceUnavailable(f"no trained U-Net ships with localdiff for dataset '{data.name}', "
                                       "and no network directory was given")
        try:
            return make_denoiser(name, data, **opts)
        except ConfigError as exc:
            raise ReferenceUnavailable(f"the U-Net reference could not be loaded: {exc}") from exc

    # the U-Net first: a missing or incompatible network fails before any long computation
    t0 = time.perf_counter()
    unet = build(REFERENCE) if config.unet else None
    unet_build = time.perf_counter() - t0

    # statistics: mean, covariance and its spectrum (cached on disk), handed to the models that read them
    stage("statistics")
    t0 = time.perf_counter()
    spectrum = data_spectrum(fit_data, progress=progress)
    statistics = describe_spectrum(spectrum)
    eigvals = spectrum.eigvals.cpu().numpy().copy()
    seconds["statistics"] = time.perf_counter() - t0
    bar.update()

    warnings: list[str] = []
    if overlapping(data, held_out):
        warnings.append("the held-out images come from the training split (--held-out-split equals --split): the "
                        "memorisation yardstick and the field inputs are training images, so a model that copies "
                        "the training set looks like it generalises; use a held-out split")
    reference_quality = None
    if unet is not None:
        if getattr(unet, "data_match", None) == "foreign":
            warnings.append("the U-Net was trained on other data than these (allowed by --allow-foreign-unet): every "
                            "comparison with it is a comparison with a network of another dataset")
        if config.reference_check:
            stage("reference check")
            t0 = time.perf_counter()
            reference_quality = check_reference(unet, fit_data, spectrum, held_out, timesteps, config, device,
                                                progress=progress)
            warnings += reference_quality["warnings"]
            seconds["reference_check"] = time.perf_counter() - t0
            bar.update()

    noise = initial_noise(config.num, fit_data.shape, seed=config.seed)  # the same noise for every model
    runs: dict[str, ModelRun] = {}
    for name in studied:
        stage(name)
        t0 = time.perf_counter()
        den = unet if name == REFERENCE else build(name)
        sec = {"build": unet_build if name == REFERENCE else time.perf_counter() - t0}
        t0 = time.perf_counter()
        with torch.no_grad():
            traj = sample(den, num=config.num, steps=config.steps, seed=config.seed, init_noise=noise,
                          sampler=config.sampler, batch_size=config.batch_size, return_trajectory=True,
                          progress=progress)
        sec["sample"] = time.perf_counter() - t0
        run = ModelRun(name, den.settings(), traj, sec)
        if name != REFERENCE and unet is not None:
            t0 = time.perf_counter()
            run.own = own_trajectory_comparison(traj, runs[REFERENCE].trajectory)
            run.single, run.single_ref = single_step_comparison(traj, unet, batch_size=config.batch_size,
                                                                progress=progress)
            sec["compare"] = time.perf_counter() - t0
        if config.field_models is not None:
            skip = None if name in config.field_models else "not in --field-models"
        else:
            skip = fields_skip_reason(den.capabilities, device)
        if skip is None:
            t0 = time.perf_counter()
            run.fields = sensitivity_fields(den, held_out, pixels, field_ts, config.field_draws, config.seed,
                                            progress=progress)
            sec["fields"] = time.perf_counter() - t0
        else:
            run.fields_note = field_skipped[name] = skip
        t0 = time.perf_counter()
        run.nearest = nearest_training_distances(traj.samples, data, device=device, progress=progress)
        sec["nearest"] = time.perf_counter() - t0
        runs[name] = run
        if name != REFERENCE:
            del den
            _release(device)
        bar.update()

    stage("held-out distances")
    t0 = time.perf_counter()
    n_ref = min(config.held_out, len(held_out))
    ref_set = held_out.subset(n_ref, seed=config.seed) if n_ref < len(held_out) else held_out
    held_out_nearest = nearest_training_distances(ref_set.tensor(), data, device=device, progress=progress)
    seconds["held_out_distances"] = time.perf_counter() - t0
    bar.update()
    bar.close()
    del unet
    spectrum = None
    _release(device)
    seconds["total"] = time.perf_counter() - start_all
    return StudyResults(
        config=config, device=str(device), dataset=data.describe(), fitted_on=fit_data.describe(),
        held_out=held_out.describe(), yardstick=ref_set.describe(), statistics=statistics, eigvals=eigvals, timesteps=timesteps,
        init_noise=noise, runs=runs, held_out_nearest=held_out_nearest, field_skipped=field_skipped,
        seconds=seconds, reference_quality=reference_quality, warnings=warnings)


__all__ = ["ReferenceUnavailable", "StudyConfig", "StudyResults", "ModelRun", "QUICK", "GPU", "CPU_MODELS",
           "ANALYTICAL_MODELS", "METRICS", "analytical_models", "default_config",
           "fields_skip_reason", "run_study"]
