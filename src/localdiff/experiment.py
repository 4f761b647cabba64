"""Does locality follow the data? Train a U-Net on sets with controlled statistics and compare its
sensitivity fields with the data's Wiener fields and with a generic isotropic local field.

The paper's causal claim: a deep denoiser's locality comes from the pixel correlations of its training
data, not from its convolutional architecture. Each set changes the correlations while keeping the
architecture: stationary isotropic (``grf``), stationary anisotropic (``grf-aniso``), non-stationary
(``grf-varying``) and MNIST under a fixed pixel permutation (``mnist-permuted``), whose Wiener fields are
no longer local in image space. For every set, timestep and output pixel we record

- ``cos_wiener``: cosine similarity of the U-Net's mean field with the Wiener field of the same data;
- ``cos_blob``: the same with a generic isotropic Gaussian field centred on the pixel whose energy radius
  r50 equals the U-Net field's own (the "it is just a local conv-net" hypothesis, given its best size);
- r50 / r90 of both fields; and the ratio of vertical to horizontal extent of the U-Net field, the
  Wiener field and the data's covariance row (for the anisotropic set: does the field stretch with the
  data?). Extents are energy-weighted RMS displacements with the output pixel itself left out, because
  the self-term ``d x0_i / d x_t[i]`` carries no direction.

If locality follows the data, ``cos_wiener`` beats ``cos_blob`` everywhere and most of all on the
permuted set, where a local blob must fail.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from .schedules import DEFAULT_SCHEDULE
from .errors import ConfigError
from .sensitivity import Fields, cosine, energy_radius, parse_pixels, sensitivity_fields

DEFAULT_SETS = ("grf", "grf-aniso", "grf-varying", "mnist-permuted")


@dataclass
class ExperimentConfig:
    """Settings of ``locality-follows-data``; defaults are the CPU-sized run."""

    sets: tuple[str, ...] = DEFAULT_SETS
    unet_config: str = "small"  # U-Net architecture and recipe: small (CPU) or paper (GPU)
    train_steps: int = 1500  # optimisation steps per set
    subset: int | None = None  # training images per set (None: the whole training split)
    timesteps: tuple[int, ...] = (100, 300, 500)
    pixels: str = "center"  # output pixels whose fields are compared (see sensitivity.parse_pixels)
    draws: int = 8  # noisy held-out images per timestep for the U-Net's mean field
    linear: bool = True  # also fit the trained linear denoiser and compare its fields
    linear_steps: int | None = None  # its optimisation steps per timestep (None: its own default)
    seed: int = 0
    device: str = "auto"
    allow_foreign_unet: bool = False  # accept a --unet SET=DIR whose manifest names other data
    smoke: bool = False  # a smoke run (--quick): it checks that everything runs and gives no verdict

    def validate(self) -> None:
        if not self.sets:
            raise ConfigError("no datasets given; name at least one (e.g. grf,grf-aniso,mnist-permuted)")
        if self.train_steps < 0:
            raise ConfigError(f"train_steps must be >= 0, got {self.train_steps}")
        if self.draws < 1:
            raise ConfigError(f"draws must be positive, got {self.draws}")
        if not self.timesteps:
            raise ConfigError("no timesteps given")
        for t in self.timesteps:
            DEFAULT_SCHEDULE.check_t(t)


def axis_extent(fld: np.ndarray, pixel: tuple[int, int]) -> tuple[float, float]:
    """Energy-weighted RMS displacement (vertical, horizontal) of a field [C, H, W] around ``pixel``,
    leaving the pixel itself out."""
    energy = (np.asarray(fld, dtype=np.float64) ** 2).sum(axis=0)  # [H, W]
    energy[pixel[0], pixel[1]] = 0.0
    total = energy.sum()
    if not total > 0:
        return float("nan"), float("nan")
    rr, cc = np.mgrid[0:energy.shape[0], 0:energy.shape[1]]
    dv = float(np.sqrt((energy * (rr - pixel[0]) ** 2).sum() / total))
    dh = float(np.sqrt((energy * (cc - pixel[1]) ** 2).sum() / total))
    return dv, dh


def _ratio(ext: tuple[float, float]) -> float:
    return ext[0] / ext[1] if ext[1] > 0 else float("nan")


def gaussian_blob_fields(reference: Fields) -> Fields:
    """For each (timestep, pixel) of ``reference``, an isotropic Gaussian field with the same r50."""
    from .theory import gaussian_blob

    mean = torch.zeros_like(reference.mean)
    shape = tuple(reference.mean.shape[2:])
    for ti in range(len(reference.timesteps)):
        for pi, p in enumerate(reference.pixels):
            r50 = energy_radius(reference.mean[ti, pi].numpy(), p, 0.5)
            blob = gaussian_blob(shape, p, r50 if np.isfinite(r50) else 0.5)
            mean[ti, pi] = torch.from_numpy(blob).to(mean.dtype)
    return Fields(mean, mean.abs(), list(reference.timesteps), list(reference.pixels), 1, "gaussian blob")


def covariance_fields(spec, reference: Fields) -> Fields:
    """The data's covariance row of each output pixel (time-independent), laid out like ``reference``."""
    shape = tuple(reference.mean.shape[2:])
    c, h, w = shape
    cov_rows = []
    for p in reference.pixels:
        i = p[0] * w + p[1]  # channel 0 of a colour pixel
        row = spec.eigvecs @ (spec.eigvals * spec.eigvecs[i])  # Sigma[i, :] [n]
        cov_rows.append(row.reshape(shape).float())
    mean = torch.stack(cov_rows)[None].repeat(len(reference.timesteps), 1, 1, 1, 1)
    return Fields(mean, mean.abs(), list(reference.timesteps), list(reference.pixels), 0, "covariance row")


def compare(fields: dict[str, Fields], cov: Fields) -> dict:
    """Per timestep and pixel: cosines, radii and extent ratios of every model against the U-Net."""
    unet = fields["unet"]
    blob = gaussian_blob_fields(unet)
    out: dict = {}
    for ti, t in enumerate(unet.timesteps):
        per_t = {}
        for pi, p in enumerate(unet.pixels):
            fu = unet.mean[ti, pi].numpy()
            rec = {"cos_wiener": cosine(fu, fields["wiener"].mean[ti, pi]),
                   "cos_blob": cosine(fu, blob.mean[ti, pi]),
                   "cos_wiener_blob": cosine(fields["wiener"].mean[ti, pi], blob.mean[ti, pi]),
                   "extent_ratio_data": _ratio(axis_extent(cov.mean[ti, pi].numpy(), p))}
            for name, f in fields.items():
                fm = f.mean[ti, pi].numpy()
                rec[f"r50_{name}"] = energy_radius(fm, p, 0.5)
                rec[f"r90_{name}"] = energy_radius(fm, p, 0.9)
                rec[f"extent_ratio_{name}"] = _ratio(axis_extent(fm, p))
            if "linear" in fields:
                fl = fields["linear"].mean[ti, pi]
                rec["cos_linear_wiener"] = cosine(fl, fields["wiener"].mean[ti, pi])
                rec["cos_linear_unet"] = cosine(fl, fu)
            per_t[f"{p[0]},{p[1]}"] = rec
        out[str(t)] = per_t
    return out


def verdict(comparison: dict) -> dict:
    """Is the U-Net's field closer to the Wiener field or to the blob? A paired comparison over the
    (timestep, pixel) units of ``comparison`` (:func:`localdiff.paired.compare`): "Wiener" or "blob" only
    when the 95% interval of cos(U-Net, Wiener) - cos(U-Net, blob) excludes 0, else "tied"."""
    from .paired import compare

    recs = [rec for per_t in comparison.values() for rec in per_t.values()]
    c = compare([r["cos_wiener"] for r in recs], [r["cos_blob"] for r in recs], a="Wiener", b="blob",
                metric="cosine with the U-Net's field")
    closer = "Wiener" if c.a_better else "blob" if c.b_better else "tied"
    return {"closer_to": closer, "comparison": c.to_dict(), "units": "timestep x pixel",
            "text": f"{closer} ({c.interval_text('Δcos')} over {c.n} timestep-pixel pairs)"}


def summarise(comparison: dict) -> dict:
    """Means over timesteps and pixels of every number in :func:`compare`'s output."""
    keys = {k for per_t in comparison.values() for rec in per_t.values() for k in rec}
    out = {}
    for k in sorted(keys):
        vals = [rec[k] for per_t in comparison.values() for rec in per_t.values() if k in rec]
        vals = [v for v in vals if v is not None and np.isfinite(v)]
        out[k] = float(np.mean(vals)) if vals else float("nan")
    return out


@dataclass
class SetResult:
    name: str
    comparison: dict
    summary: dict
    fields: dict[str, Fields]
    covariance: Fields
    unet_dir: Path
    unet_info: dict = field(default_factory=dict)
    linear_history: dict | None = None


def _train_unet(train, cfg: ExperimentConfig, out_dir: Path, label: str, progress: bool) -> dict:
    from .unet.configs import TRAIN_RECIPES, unet_config
    from .unet.training import UNetTrainer

    recipe = dataclasses.replace(TRAIN_RECIPES[cfg.unet_config], seed=cfg.seed, device=cfg.device)
    trainer = UNetTrainer(train, unet_config(cfg.unet_config, train.shape), recipe)
    trainer.fit(cfg.train_steps, progress=progress, handle_signals=False, label=label)
    trainer.export(out_dir, dtype="fp32", extra={"command": label, "experiment": "locality-follows-data"})
    return {"steps": trainer.step, "epochs": trainer.order.epochs, "final_loss": trainer.loss_ema,
            "wall_s": trainer.total_wall_s}


def run_set(name: str, cfg: ExperimentConfig, unet_root: Path, *, unet_dir: str | None = None,
            label: str = "", progress: bool = True) -> SetResult:
    """Train (or load, with ``unet_dir``) a U-Net on ``name`` and compare its fields with the data's."""
    from . import make_denoiser
    from .data import load_dataset
    from .stats import data_spectrum

    train = load_dataset(name, split="train", subset=cfg.subset, seed=cfg.seed)
    test = load_dataset(name, split="test")
    info: dict = {}
    if unet_dir is None:
        target = unet_root / name
        info = _train_unet(train, cfg, target, label, progress)
        unet_dir = str(target)
    unet = make_denoiser("unet", train, path=unet_dir, device=cfg.device, allow_foreign=cfg.allow_foreign_unet)
    info.update(unet.settings())
    wiener = make_denoiser("wiener", train, device=cfg.device)
    pixels = parse_pixels(cfg.pixels, train.shape)
    kw = dict(pixels=pixels, timesteps=cfg.timesteps, draws=cfg.draws, seed=cfg.seed, progress=progress)
    fields = {"wiener": sensitivity_fields(wiener, test, **kw), "unet": sensitivity_fields(unet, test, **kw)}
    history = None
    if cfg.linear:
        opts = {"timesteps": tuple(cfg.timesteps), "seed": cfg.seed, "device": cfg.device}
        if cfg.linear_steps is not None:
            opts["steps"] = cfg.linear_steps
        lin = make_denoiser("linear", train, **opts)
        fields["linear"] = sensitivity_fields(lin, test, **kw)
        history = lin.history
    spec = data_spectrum(train, progress=False)
    cov = covariance_fields(spec, fields["unet"])
    comparison = compare(fields, cov)
    summary = summarise(comparison)
    summary["correlation_ratio_data"] = _correlation_ratio(spec, train.shape)
    return SetResult(name, comparison, summary, fields, cov, Path(unet_dir), info, history)


def _correlation_ratio(spec, shape) -> float:
    """The data's vertical/horizontal correlation-length ratio from neighbouring pixels (nan where a
    pixel never varies, as on MNIST's border)."""
    from .data.synthetic import correlation_length_ratio
    from .errors import DataError

    cov = (spec.eigvecs * spec.eigvals) @ spec.eigvecs.T
    try:
        return float(correlation_length_ratio(cov.cpu().numpy(), shape))
    except DataError:
        return float("nan")


def run_experiment(cfg: ExperimentConfig, unet_root: Path, *, unet_dirs: dict[str, str] | None = None,
                   label: str = "", progress: bool = True) -> list[SetResult]:
    """:func:`run_set` for every set of ``cfg``, in order."""
    from .device import resolve_device

    cfg.validate()
    cfg = dataclasses.replace(cfg, device=str(resolve_device(cfg.device)))  # once, for every set and model
    unet_dirs = unet_dirs or {}
    unknown = sorted(set(unet_dirs) - set(cfg.sets))
    if unknown:
        raise ConfigError(f"--unet names sets {unknown} that are not in --sets ({', '.join(cfg.sets)})")
    results = []
    for name in tqdm(cfg.sets, desc="locality-follows-data", unit="set", disable=not progress):
        results.append(run_set(name, cfg, unet_root, unet_dir=unet_dirs.get(name), label=label, progress=progress))
    return results


SUMMARY_COLUMNS = ("cos_wiener", "cos_blob", "cos_linear_wiener", "cos_linear_unet", "r50_unet", "r50_wiener",
                   "extent_ratio_unet", "extent_ratio_wiener", "extent_ratio_data", "correlation_ratio_data")


def summary_table(results: list[SetResult]) -> str:
    """Markdown: one row per set, the means over timesteps and pixels."""
    cols = [c for c in SUMMARY_COLUMNS if any(c in r.summary for r in results)]
    lines = ["| set | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    for r in results:
        lines.append(f"| {r.name} | " + " | ".join(f"{r.summary.get(c, float('nan')):.3f}" for c in cols) + " |")
    return "\n".join(lines)


def per_timestep_table(results: list[SetResult]) -> str:
    """Markdown: cosine with Wiener vs with the matched blob, per set and timestep (mean over pixels)."""
    lines = ["| set | t | cos(U-Net, Wiener) | cos(U-Net, blob) | r50 U-Net | r50 Wiener |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for t, per_t in r.comparison.items():
            m = summarise({t: per_t})
            lines.append(f"| {r.name} | {t} | {m['cos_wiener']:.3f} | {m['cos_blob']:.3f} | "
                         f"{m['r50_unet']:.2f} | {m['r50_wiener']:.2f} |")
    return "\n".join(lines)
