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
import time
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch

from .data.shards import total_images
from .denoisers import REGISTRY, Capabilities, available_models, make_denoiser
from .device import resolve_device
from .diffusion import check_grid, grid_for, initial_noise, sample
from .distributed import tqdm
from .errors import ConfigError
from .metrics import nearest_training_distances, own_trajectory_comparison, single_step_comparison
from .samplers import SamplerConfig, make_grid
from .schedules import DEFAULT_SCHEDULE, schedule_named
from .sensitivity import parse_pixels, sensitivity_fields
from .study_results import METRIC_SYMBOLS, METRICS, REFERENCE, ModelRun, StudyResults  # noqa: F401 (public here)

def analytical_models() -> tuple[str, ...]:
    """Every registered model computed in closed form from the data (``not capabilities.trained``), in
    registration order: what ``--models all`` and the GPU preset study."""
    return tuple(name for name, cls in REGISTRY.items() if not cls.capabilities.trained)


ANALYTICAL_MODELS = analytical_models()
# On two CPU cores these fit the 5-minute budget on the full MNIST training set; els, els-boundary and
# pspc take 2-10 minutes each there (docs in commands/study.py), so they are GPU defaults.
CPU_MODELS = ("wiener", "optimal", "nearest", "masked", "ls", "scfdm")


def field_levels(schedule, timesteps) -> list:
    """The levels of the study's fields: the run table's ``timesteps``, or on a continuous schedule its levels at
    the default table's sigmas of those timesteps (the same noise-to-signal ratios)."""
    if getattr(schedule, "discrete", False):
        return [schedule.at(t) for t in timesteps]
    return [schedule.level(float(DEFAULT_SCHEDULE.sigmas[DEFAULT_SCHEDULE.check_t(t)])) for t in timesteps]


EXPLORER_MAX_PIXELS = 1024  # positions (H x W) up to which the page embeds every pixel's field (n^2 values per level)


def exact_fields(spectrum, shape, levels, tau=None) -> dict | None:
    """Every pixel's exact Wiener field (input-independent: row i of J_t) and the paper's mask at ``levels``,
    for the page's field explorer: ``{"labels", "fields": {"wiener": [T, P, P]}, "masks": {...}, "mean"}``;
    None above :data:`EXPLORER_MAX_PIXELS` positions."""
    from .denoisers.masked.masks import default_tau
    from .probing.fields import level_fields
    from .schedules import level_key

    c, h, w = shape
    if h * w > EXPLORER_MAX_PIXELS:
        return None
    tau = float(tau) if tau is not None else default_tau(tuple(shape))[0]
    per = [level_fields(spectrum, tuple(shape), lv, tau) for lv in levels]
    labels = [("t = " + k) if k.isdigit() else ("σ = " + k[2:]) for k in (level_key(lv) for lv in levels)]
    return {"labels": labels, "tau": tau,
            "fields": {"wiener": np.stack([f.display.numpy() for f in per])},
            "masks": {"wiener": np.stack([f.masks.numpy() for f in per])},
            "mean": spectrum.mean.reshape(shape).cpu().numpy()}


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
    steps: int = 10  # sampling steps (10 DDIM steps: timesteps 900, 800, ..., 0)
    seed: int = 0  # seed of the initial noise, the field draws and the held-out subset
    sampler: Literal["ddim", "ddpm", "euler", "heun"] = "ddim"
    schedule: str | None = None  # the levels' family (None: the U-Net's own, else ddpm-linear)
    sigma_min: float | None = None  # euler/heun grid (None: EDM's 0.002 / 80, clipped to the network's range)
    sigma_max: float | None = None
    s_churn: float = 0.0
    batch_size: int | None = None  # denoise this many samples at a time (None: all)
    subset: int | None = None  # fit the analytical models on a seeded subset of this many training images
    data_seed: int = 0  # seed of that subset
    field_models: tuple[str, ...] | None = None  # None: every model but those fields_skip_reason leaves out
    field_timesteps: tuple[int, ...] = (100, 500, 900)  # of the run's table; on a continuous schedule the
    # fields are taken at the default table's sigmas of these timesteps
    field_draws: int = 8  # noisy held-out images per field timestep
    field_pixels: str = "center"  # output pixels of the fields ("center", "all" or "r,c;r,c")
    held_out: int = 64  # held-out images whose nearest-training distances are the yardstick
    reference_check: int = 64  # held-out images on which the U-Net's denoising MSE is set beside wiener/optimal's
    device: str = "auto"
    smoke: bool = False  # a smoke run (--quick): it checks that everything runs and gives no verdict

    def sampler_config(self) -> SamplerConfig:
        return SamplerConfig(name=self.sampler, steps=self.steps, sigma_min=self.sigma_min, sigma_max=self.sigma_max,
                             s_churn=self.s_churn)

    def validate(self) -> None:
        self.sampler_config()
        if self.schedule is not None:
            schedule_named(self.schedule)
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
QUICK = StudyConfig(num=4, subset=5000, field_draws=2, held_out=16, reference_check=16, smoke=True)
GPU = StudyConfig(models=ANALYTICAL_MODELS, num=64, field_timesteps=(100, 300, 500, 700, 900), field_draws=32,
                  held_out=256, reference_check=256)


def default_config(device: str | torch.device, quick: bool = False) -> StudyConfig:
    """The preset for a device: QUICK when asked, GPU on CUDA, else the CPU defaults."""
    if quick:
        return QUICK
    return GPU if torch.device(device).type == "cuda" else StudyConfig()


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
    schedule = schedule_named(config.schedule) if config.schedule else None
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
        opts = {"device": device, **options.get(name, {})}
        if name != REFERENCE:  # the statistics computed once below, not re-read from the cache by each model
            return make_denoiser(name, fit_data, spectrum=spectrum, schedule=grid.schedule, **opts)
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
    # one grid for every model: the U-Net's levels (rounded to its trained ones), else the schedule's
    grid = grid_for(unet, config.sampler_config(), schedule=schedule) if unet is not None else \
        make_grid(config.sampler_config(), schedule or DEFAULT_SCHEDULE)
    if unet is not None:
        check_grid(unet, grid)
    field_ts = field_levels(grid.schedule, config.field_timesteps)

    # statistics: mean, covariance and its spectrum (cached on disk), handed to the models that read them
    stage("statistics")
    t0 = time.perf_counter()
    spectrum = data_spectrum(fit_data, progress=progress)
    statistics = describe_spectrum(spectrum)
    eigvals = spectrum.eigvals.cpu().numpy().copy()
    explorer = exact_fields(spectrum, fit_data.shape, field_ts, options.get("masked", {}).get("tau"))
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
            reference_quality = check_reference(unet, fit_data, spectrum, held_out, grid, config, device,
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
            traj = sample(den, num=config.num, seed=config.seed, init_noise=noise, grid=grid,
                          batch_size=config.batch_size, return_trajectory=True, progress=progress)
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
        held_out=held_out.describe(), yardstick=ref_set.describe(), statistics=statistics, eigvals=eigvals, grid=grid,
        init_noise=noise, runs=runs, held_out_nearest=held_out_nearest, field_skipped=field_skipped,
        seconds=seconds, reference_quality=reference_quality, warnings=warnings, explorer=explorer)


__all__ = ["ReferenceUnavailable", "StudyConfig", "StudyResults", "ModelRun", "QUICK", "GPU", "CPU_MODELS",
           "ANALYTICAL_MODELS", "METRICS", "analytical_models", "default_config",
           "fields_skip_reason", "run_study"]
