"""``probe()``: what a dataset's second-order statistics imply, before anyone trains a network.

For each dataset and noise level: the covariance spectrum and its top principal components; the exact
Wiener sensitivity field of every pixel summarised as maps (extent, anisotropy, stationarity); the
paper's mask per pixel and the receptive field each level needs, beside the theoretical receptive field
of U-Net configurations; and the held-out denoising MSE of Wiener against the exact optimal denoiser
(and a network, when given) with the memorisation horizon at four training-set sizes. The result
holds every number (:attr:`ProbeResult.record`, written as probe.json) and writes a self-contained page.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..data import ImageDataset, as_dataset, load_dataset
from ..data.raw import SPLIT_RULE, split_indices
from ..denoisers.masked.masks import default_tau
from ..device import resolve_device
from ..distributed import tqdm
from ..errors import ConfigError, DataError
from ..stats import Spectrum, data_spectrum
from . import fields as fieldmod
from . import spectrum as specmod
from .explorer import QUANTISATION
from ..schedules import NoiseLevel
from .levels import noise_levels
from .memorisation import HORIZON_DEFINITION, SIZE_DIVISORS, memorisation
from .receptive import ReceptiveField, receptive_field

FORMAT = "localdiff-probe-v1"
MAPS = ("r90", "r50", "energy_r90", "axis_ratio", "angle_deg", "mask_size", "mask_radius")  # per level, [H, W]
RECEPTIVE_DEFINITION = ("receptive field of a U-Net: the square of input pixels its convolutions and resampling reach "
                        "from one output pixel (size x size, radius = farthest reach to one side), computed from its "
                        "layers; self-attention and GroupNorm statistics, which see the whole image, are listed apart. "
                        "A level 'needs' the mask radius (Chebyshev) of each pixel: covered = fraction of pixels whose "
                        "mask radius is at most the network's radius")


@dataclass
class DatasetProbe:
    """Everything computed for one dataset (arrays on the CPU; maps are [P] per level)."""

    label: str
    data: ImageDataset
    spectrum: Spectrum
    summary: specmod.SpectrumSummary
    components: np.ndarray  # [k, C, H, W]
    levels: list[fieldmod.LevelFields]
    tau: float
    tau_rule: str
    receptive: dict[str, ReceptiveField]
    held_out: dict
    memorisation: dict | None
    errors: dict[str, np.ndarray] = field(default_factory=dict)  # "<size>/<model>": per-image MSE [T, M]
    receptive_notes: dict[str, str] = field(default_factory=dict)  # configs that do not fit the images, and why
    seconds: dict = field(default_factory=dict)

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)

    def mean_image(self) -> np.ndarray:
        return self.spectrum.mean.detach().cpu().numpy().reshape(self.shape)

    def stack(self, name: str) -> np.ndarray:
        """A map (one of ``MAPS``) of every level as [T, H, W] float64."""
        _, h, w = self.shape
        return np.stack([getattr(lf, name).numpy().reshape(h, w) for lf in self.levels])

    def display_fields(self) -> np.ndarray:
        """What the explorer shows: [T, P, P] float32 (row p = position p's field summed over input channels)."""
        return np.stack([lf.display.numpy() for lf in self.levels])

    def position_masks(self) -> np.ndarray:
        return np.stack([lf.masks.numpy() for lf in self.levels])

    def sample_pixels(self) -> list[tuple[int, int]]:
        """The pixels whose fields probe.json holds in full: the centre and two off-centre pixels."""
        _, h, w = self.shape
        return list(dict.fromkeys([(h // 2, w // 2), (h // 4, w // 4), (3 * h // 4, (3 * w) // 4)]))


@dataclass
class ProbeResult:
    """The probe of several datasets: per-dataset results, the noise levels and the probe.json record."""

    levels: list[NoiseLevel]
    datasets: dict[str, DatasetProbe]
    record: dict

    def write(self, out: str | os.PathLike, *, save_fields: bool = False) -> dict[str, Path]:
        """Write probe.json, probe.npz (per dataset: maps [T, H, W], components, eigenvalues, mean image,
        per-image held-out MSE ``<label>/mse/<size>/<model>`` [T, M]; with ``save_fields`` every display field
        [T, P, P]) and probe.html into the existing directory ``out``; returns the paths."""
        from ..fileio import json_default, write_bytes, write_npz
        from .page import probe_page

        out = Path(out)
        arrays: dict[str, np.ndarray] = {"timesteps": np.asarray([lv.t for lv in self.levels], np.int64)}
        for label, d in self.datasets.items():
            for name in MAPS:
                arrays[f"{label}/{name}"] = d.stack(name).astype(np.float32)
            arrays[f"{label}/components"] = d.components
            arrays[f"{label}/eigenvalues"] = d.summary.eigenvalues
            arrays[f"{label}/mean"] = d.mean_image().astype(np.float32)
            for key, err in d.errors.items():
                arrays[f"{label}/mse/{key}"] = err
            if save_fields:
                arrays[f"{label}/fields"] = d.display_fields()
        text = json.dumps(_finite(self.record), separators=(",", ":"), allow_nan=False, default=json_default)
        paths = {"json": write_bytes(out / "probe.json", text.encode()), "npz": write_npz(out / "probe.npz", **arrays)}
        paths["html"] = write_bytes(out / "probe.html", probe_page(self).encode())
        return paths

    def summary_lines(self) -> list[str]:
        """One plain sentence per dataset: how the extent grows with noise, and the memorisation horizon."""
        lines = []
        for label, d in self.record["datasets"].items():
            lv = d["levels"]
            ts = [lv.t for lv in self.levels]
            lo, hi = str(min([t for t in ts if t > 0] or ts)), str(max(ts))  # t = 0 is the identity: no field
            med = lambda t, k: lv[t][k].get("median", float("nan"))  # noqa: E731
            text = (f"{label}: from t = {lo} to t = {hi} the median Wiener field holds 90% of its energy within "
                    f"{med(lo, 'energy_r90'):.1f} px, then {med(hi, 'energy_r90'):.1f} px, and 90% of its absolute "
                    f"mass within {med(lo, 'extent_r90'):.1f}, then {med(hi, 'extent_r90'):.1f} px")
            memo = d.get("memorisation") or {}
            if "horizon_by_size" in memo:
                hs = ", ".join(f"{'t = ' + str(t) if t is not None else 'nowhere'} with {int(s):,}"
                               for s, t in memo["horizon_by_size"].items())
                text += (f"; the memorising (optimal) denoiser beats Wiener on held-out images down to {hs} "
                         "training images")
            lines.append(text)
        return lines


def _finite(obj):
    """``obj`` with every non-finite float replaced by None (JSON has no NaN or infinity)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _number(x, digits: int = 6):
    """A float for JSON: rounded to ``digits`` significant digits, None where not finite."""
    x = float(x)
    return float(f"{x:.{digits}g}") if math.isfinite(x) else None


def _grid(a: np.ndarray, digits: int = 6) -> list:
    """A nested list of :func:`_number` s (NaN and inf become null)."""
    if a.ndim == 0:
        return _number(a, digits)
    return [_grid(x, digits) for x in a]


def default_labels(items: Sequence) -> list[str]:
    """The label of each input of :func:`probe`: a dataset's name, a built-in name as given, a path's last
    part, "array"; repeated labels get "-2", "-3", ..."""
    out, seen = [], {}
    for item in items:
        if isinstance(item, ImageDataset):
            lab = item.name
        elif isinstance(item, (str, os.PathLike)):
            lab = Path(str(item)).name if os.sep in str(item) or Path(str(item)).exists() else str(item)
        else:
            lab = "array"
        seen[lab] = seen.get(lab, 0) + 1
        out.append(lab if seen[lab] == 1 else f"{lab}-{seen[lab]}")
    return out


def _datasets(item, held, *, subset, seed, split, need_held) -> tuple[ImageDataset, ImageDataset | None, dict]:
    """(training set, held-out set, how the held-out set was chosen) for one input of :func:`probe`; a name or
    path's held-out split is read only when ``need_held``."""
    if isinstance(item, (str, os.PathLike)):
        train = load_dataset(item, split="train", subset=subset, seed=seed)
        if held is None:
            if not need_held:
                return train, None, {"split": None, "rule": "not needed (memorise=False)"}
            try:
                held = load_dataset(item, split=split)
            except DataError as exc:
                raise DataError(f"{exc}\n(held-out images for the memorisation stage: choose another held-out split, "
                                "or skip the stage with --no-memorisation / memorise=False)") from exc
            return train, held, {"split": split, "rule": held.meta.get("split_rule", "the source's own split")}
    else:
        if held is None:  # images in memory have no split of their own: hold out every 10th image
            whole = as_dataset(item)  # an array as given: every image (split here)
            n = len(whole)
            tr, te = split_indices(n, "train"), split_indices(n, "test")
            if te.size < 2:
                raise ConfigError(f"{n} images in memory leave fewer than 2 held-out images ({SPLIT_RULE}); pass "
                                  "held_out=..., or memorise=False")
            train = whole.select(tr, note="probe: train part (every 10th image held out)")
            if subset is not None:
                train = train.subset(subset, seed)
            return train, whole.select(te, note="probe: held out"), {
                "split": None, "rule": f"images in memory without a split: {SPLIT_RULE}; the rest is the training set",
                "overlaps_training": False}
        train = as_dataset(item)
        if subset is not None:
            train = train.subset(subset, seed)
    held = as_dataset(held)
    return train, held, {"split": None, "rule": "held-out images given by the caller"}


def probe(*data, labels: Sequence[str] | None = None, timesteps: Sequence[int] | None = None,
          tau: float | None = None, unet_configs: Sequence = ("small", "paper"),
          unets: Mapping[str, str | None] | None = None, allow_foreign_unet: bool = False,
          held_out: Sequence | Mapping | None = None, held_out_num: int = 200, held_out_split: str = "test",
          divisors: Sequence[int] = SIZE_DIVISORS, memorise: bool = True, subset: int | None = None, seed: int = 0,
          components: int = 8, device: str = "auto", cache: bool | str = True, batch_size: int = 100,
          progress: bool = True) -> ProbeResult:
    """Probe one or more datasets (built-in names, paths, arrays ``[N, C, H, W]`` or ImageDatasets).

    ``timesteps``: the noise levels (default: the 10 DDIM timesteps); ``tau``: the mask threshold (default:
    the paper's for the image shape); ``unet_configs``: U-Nets whose receptive field is set beside the
    needs ('small', 'paper', a UNetConfig, a diffusers config or directory); ``unets``: per dataset label a
    trained network directory (None or "shipped": the weights shipped for the set) scored beside Wiener and
    optimal; ``held_out``: held-out images per dataset (sequence aligned with ``data`` or a mapping by
    label; default: the 'test' split, or every 10th image of data held in memory); ``held_out_num``:
    held-out images scored (seeded subset); ``divisors``: training-set sizes N/d; ``memorise=False``
    skips the MSE stage; ``subset``: probe a seeded subset of each training set; ``device``: where the
    statistics, fields and denoisers run ("auto": CUDA when available)."""
    if not data:
        raise ConfigError("probe needs at least one dataset: a built-in name, a path, an array or an ImageDataset")
    if held_out_num < 2:
        raise ConfigError(f"held_out_num must be at least 2 (a paired interval needs two images), got {held_out_num}")
    labels = [str(x) for x in labels] if labels is not None else default_labels(data)
    if len(set(labels)) != len(labels):
        raise ConfigError(f"labels must be distinct, got {labels}")
    if len(labels) != len(data):
        raise ConfigError(f"{len(labels)} labels for {len(data)} datasets")
    if isinstance(held_out, Mapping):
        unknown = sorted(set(held_out) - set(labels))
        if unknown:
            raise ConfigError(f"held_out names {unknown}, which are not among the datasets {labels}")
        helds = [held_out.get(lab) for lab in labels]
    else:
        helds = list(held_out) if held_out is not None else [None] * len(data)
        if len(helds) != len(data):
            raise ConfigError(f"{len(helds)} held-out sets for {len(data)} datasets")
    unets = dict(unets or {})
    unknown = sorted(set(unets) - set(labels))
    if unknown:
        raise ConfigError(f"unets names {unknown}, which are not among the datasets {labels}")
    if tau is not None and not (0 <= float(tau) < 1):
        raise ConfigError(f"tau must be in [0, 1), got {tau}")
    levels = noise_levels(timesteps)
    device = resolve_device(device)  # "auto": CUDA when available; statistics and fields stay float64
    t_start = time.perf_counter()
    results: dict[str, DatasetProbe] = {}
    for label, item, held in tqdm(list(zip(labels, data, helds)), desc="probe", unit="dataset", disable=not progress):
        results[label] = _probe_one(label, item, held, levels, tau=tau, unet_configs=unet_configs,
                                    unet=unets[label] if label in unets else False,
                                    allow_foreign_unet=allow_foreign_unet, held_out_num=held_out_num,
                                    held_out_split=held_out_split, divisors=divisors, memorise=memorise,
                                    subset=subset, seed=seed, components=components, device=device, cache=cache,
                                    batch_size=batch_size, progress=progress)
    record = {
        "format": FORMAT, "levels": [lv.record() for lv in levels],
        "definitions": {**fieldmod.DEFINITIONS, **specmod.DEFINITIONS, "memorisation_horizon": HORIZON_DEFINITION,
                        "explorer_quantisation": QUANTISATION, "receptive_field": RECEPTIVE_DEFINITION,
                        "noise_level": "t: DDPM timestep (docs/DESIGN.md §1); a = sqrt(alpha_bar_t), b2 = 1 - alpha_bar_t, "
                                       "sigma = sqrt(b2) / a, snr = a^2 / b2"},
        "config": {"timesteps": [lv.t for lv in levels], "tau": tau, "unet_configs": [str(c) for c in unet_configs],
                   "held_out_num": held_out_num, "held_out_split": held_out_split, "divisors": list(divisors),
                   "memorise": memorise, "subset": subset, "seed": seed, "components": components, "device": str(device)},
        "datasets": {label: dataset_record(d, levels) for label, d in results.items()},
        "seconds": {"total": time.perf_counter() - t_start, **{label: d.seconds for label, d in results.items()}},
    }
    return ProbeResult(levels, results, record)


def _probe_one(label, item, held, levels, *, tau, unet_configs, unet, allow_foreign_unet, held_out_num,
               held_out_split, divisors, memorise, subset, seed, components, device, cache, batch_size,
               progress) -> DatasetProbe:
    secs: dict[str, float] = {}
    t0 = time.perf_counter()
    train, held_set, held_rule = _datasets(item, held, subset=subset, seed=seed, split=held_out_split,
                                           need_held=memorise)
    secs["load"] = time.perf_counter() - t0
    shape = tuple(train.shape)
    t0 = time.perf_counter()
    spec = data_spectrum(train, device=device, cache=cache, progress=progress).to("cpu")
    secs["statistics"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    tau_value, rule = (float(tau), "given") if tau is not None else default_tau(shape)
    lfs = fieldmod.probe_fields(spec.to(device), shape, levels, tau_value, progress=progress, desc=f"fields {label}")
    secs["fields"] = time.perf_counter() - t0
    rfs, rf_notes = {}, {}
    for cfg in unet_configs:
        name = cfg if isinstance(cfg, str) else type(cfg).__name__
        try:
            rfs[name] = receptive_field(cfg, shape)
        except ConfigError as exc:  # e.g. 'paper' on images whose size its down-sampling cannot halve
            rf_notes[name] = str(exc)
    memo, errors, held_rec = None, {}, {**held_rule}
    if held_set is not None:
        from ..reference import overlapping

        held_rec["dataset"] = held_set.describe()
        held_rec.setdefault("overlaps_training", overlapping(train, held_set))
    if memorise:
        t0 = time.perf_counter()
        n_img = min(held_out_num, len(held_set))
        images = (held_set.subset(n_img, seed=seed) if n_img < len(held_set) else held_set).tensor()
        net = None
        if unet is not False:
            from ..denoisers import make_denoiser
            from ..networks.diffusers_dir import inspect_unet_dir

            path = None if unet in (None, "shipped") else str(unet)
            net = make_denoiser("unet", train, path=path, device=str(device), allow_foreign=allow_foreign_unet)
            if path is not None:
                rfs[f"given: {Path(path).name}"] = receptive_field(inspect_unet_dir(path).config, shape)
        memo, errors = memorisation(train, images, levels, spectrum=spec, divisors=divisors, seed=seed, unet=net,
                            device=str(device), batch_size=batch_size, progress=progress)
        if net is not None:
            memo["unet"]["network"] = net.settings()
        secs["memorisation"] = time.perf_counter() - t0
    return DatasetProbe(label, train, spec, specmod.summarize_spectrum(spec),
                        specmod.principal_components(spec, shape, components), lfs, tau_value, rule, rfs,
                        held_rec, memo, errors, rf_notes, secs)


def dataset_record(d: DatasetProbe, levels: Sequence[NoiseLevel]) -> dict:
    """probe.json's entry for one dataset."""
    per_level = {}
    for lf in d.levels:
        s = fieldmod.level_summary(lf)
        cheb, r90 = lf.mask_radius.numpy(), lf.r90.numpy()
        ok, okr = cheb >= 0, np.isfinite(r90)
        s["receptive_field_covers"] = {
            name: {"mask": float((cheb[ok] <= rf.radius).mean()) if ok.any() else None,
                   "r90": float((np.floor(r90[okr]) <= rf.radius).mean()) if okr.any() else None}
            for name, rf in d.receptive.items()}
        per_level[str(lf.level.t)] = s
    pixels = d.sample_pixels()
    _, h, w = d.shape
    shown = d.display_fields()  # [T, P, P]
    samples = {str(lf.level.t): [_grid(shown[ti, r * w + c].reshape(h, w), 7) for r, c in pixels]
               for ti, lf in enumerate(d.levels)}
    maps = {name: _grid(d.stack(name)) for name in MAPS}
    return {"dataset": d.data.describe(), "shape": list(d.shape), "held_out": d.held_out,
            "tau": {"value": d.tau, "rule": d.tau_rule}, "spectrum": d.summary.record(),
            "receptive_fields": {k: rf.record() for k, rf in d.receptive.items()},
            "receptive_fields_unavailable": d.receptive_notes,
            "levels": per_level, "maps": maps,
            "sample_fields": {"pixels": [list(p) for p in pixels], "what": "display field (sum over input channels), "
                              "[H][W] per pixel, float32 values to 7 digits", "fields": samples},
            "memorisation": d.memorisation if d.memorisation is not None else {"skipped": "memorise=False"},
            "seconds": d.seconds}


__all__ = ["probe", "ProbeResult", "DatasetProbe", "dataset_record", "default_labels", "FORMAT", "MAPS"]
