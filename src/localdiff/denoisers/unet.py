"""A trained U-Net (diffusers ``UNet2DModel``) as a denoiser (DESIGN.md §2.7).

What the network predicts is read from its manifest or scheduler config (diffusers' ``prediction_type``):
``epsilon``: ``x0_hat = (x_t - sqrt(b2) eps_theta) / a``; ``v_prediction``: ``x0_hat = a x_t - sqrt(b2) v_theta``;
``sample``: ``x0_hat = x_theta``. Any diffusers ``UNet2DModel`` directory trained on the same DDPM
schedule loads: the ``--out`` of ``localdiff train-unet``, a ``save_pretrained`` directory, or a
pipeline directory with a ``unet/`` folder (a bare network without either record is taken as
``epsilon``, diffusers' default). Weights are read from safetensors only; pickled ``.bin`` files are refused.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch

from ..schedules import NoiseLevel, Schedule
from ..errors import ConfigError
from ..device import resolve_dtype
from .base import Capabilities, Denoiser, DenoiserConfig

WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
MANIFEST_NAME = "localdiff_unet.json"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")  # diffusers' names
_EXPECTED = ("a diffusers UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors), "
             "such as the --out directory of `localdiff train-unet` or a save_pretrained() directory")


def shipped_weights_dir(dataset_name: str) -> Path:
    """Where weights shipped with localdiff for ``dataset_name`` live: ``localdiff/weights/<name>/``."""
    return Path(__file__).resolve().parent.parent / "weights" / dataset_name


def resolve_unet_path(path: str | None, dataset_name: str) -> Path:
    """``path``, or the shipped weights for ``dataset_name`` when ``path`` is None."""
    if path is not None and str(path).strip():
        return Path(path).expanduser()
    shipped = shipped_weights_dir(dataset_name)
    if (shipped / "config.json").is_file():
        return shipped
    raise ConfigError(
        f"no trained U-Net ships with localdiff for dataset '{dataset_name}'; train one with "
        f"`localdiff train-unet --dataset {dataset_name} --config paper --steps 100000 --out runs/unet-{dataset_name}` "
        f"and pass it as --opt path=runs/unet-{dataset_name} (or make_denoiser('unet', data, path=...))")


@dataclass
class UNetInfo:
    """Where a network came from: its directory, diffusers config, and localdiff manifest (if any)."""

    directory: Path
    subfolder: str | None
    config: dict
    manifest: dict | None
    scheduler: dict | None


def inspect_unet_dir(path: str | Path) -> UNetInfo:
    """Check that ``path`` holds a diffusers ``UNet2DModel`` with safetensors weights; read its metadata."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"U-Net path {path} does not exist; expected {_EXPECTED}")
    if not path.is_dir():
        raise ConfigError(f"U-Net path {path} is a file; expected {_EXPECTED}")
    subfolder, model_dir, scheduler = None, path, None
    if not (path / "config.json").is_file() and (path / "unet" / "config.json").is_file():
        subfolder, model_dir = "unet", path / "unet"  # a diffusers pipeline directory
    if not (model_dir / "config.json").is_file():
        hint = " (training not finished? resume it with `localdiff train-unet --resume`)" \
            if (path / "checkpoints").is_dir() else ""
        raise ConfigError(f"{path} has no config.json{hint}; expected {_EXPECTED}")
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{model_dir / 'config.json'} is not readable JSON ({exc}); expected {_EXPECTED}") from exc
    cls = config.get("_class_name")
    if cls is not None and cls != "UNet2DModel":
        raise ConfigError(f"{model_dir} holds a diffusers {cls}, not a UNet2DModel; expected {_EXPECTED}")
    if not any((model_dir / n).is_file() for n in (WEIGHTS_NAME, WEIGHTS_NAME + ".index.json")):
        if any(model_dir.glob("*.bin")) or any(model_dir.glob("*.pt*")) or any(model_dir.glob("*.ckpt")):
            raise ConfigError(
                f"{model_dir} has only pickle-based weights (.bin/.pt/.ckpt); localdiff never loads pickled files. "
                "Convert them where you trust the source: UNet2DModel.from_pretrained(dir).save_pretrained(dir, "
                "safe_serialization=True)")
        raise ConfigError(f"{model_dir} has no {WEIGHTS_NAME}; expected {_EXPECTED}")
    manifest = None
    if (path / MANIFEST_NAME).is_file():
        try:
            manifest = json.loads((path / MANIFEST_NAME).read_text())
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{path / MANIFEST_NAME} is not readable JSON ({exc})") from exc
    sched_file = path / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        try:
            scheduler = json.loads(sched_file.read_text())
        except (OSError, ValueError):
            scheduler = None
    return UNetInfo(path, subfolder, config, manifest, scheduler)


def check_unet_compatible(info: UNetInfo, shape: tuple[int, int, int], schedule: Schedule) -> None:
    """ConfigError unless the network takes and returns images of ``shape`` and was trained on ``schedule``."""
    cfg, where = info.config, info.directory
    c, h, w = shape
    if cfg.get("in_channels", 3) != c or cfg.get("out_channels", 3) != c:
        raise ConfigError(
            f"the U-Net in {where} maps {cfg.get('in_channels', 3)} to {cfg.get('out_channels', 3)} channels, but the "
            f"data have {c}; use data with {cfg.get('in_channels', 3)} channels (--channels) or another network")
    size = cfg.get("sample_size")
    if size is not None:
        hw = (size, size) if isinstance(size, int) else tuple(size)
        if tuple(hw) != (h, w):
            raise ConfigError(f"the U-Net in {where} was built for {hw[0]}x{hw[1]} images, but the data are {h}x{w}; "
                              f"resize the data (--resolution {hw[0]}) or use another network")
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ConfigError(f"the U-Net in {where} uses {cfg['time_embedding_type']} time embeddings (a score-SDE "
                          "model); only DDPM epsilon-prediction networks conditioned on the timestep are supported")
    if cfg.get("class_embed_type") is not None or cfg.get("num_class_embeds") is not None:
        raise ConfigError(f"the U-Net in {where} is class-conditional; only unconditional networks are supported")
    want = {"num_train_timesteps": schedule.num_train_timesteps, "beta_start": schedule.beta_start,
            "beta_end": schedule.beta_end, "beta_schedule": "linear"}
    for source, record in (("manifest", (info.manifest or {}).get("schedule")), ("scheduler config", info.scheduler)):
        if not record:
            continue
        diff = {k: (record.get(k), v) for k, v in want.items() if k in record and _differs(record.get(k), v)}
        if diff:
            raise ConfigError(f"the U-Net in {where} was trained with a different noise schedule (its {source}: "
                              + ", ".join(f"{k}={a!r}, expected {b!r}" for k, (a, b) in diff.items()) + ")")
    prediction_type(info)  # known, and the same in the manifest and the scheduler config


def prediction_type(info: UNetInfo) -> str:
    """What the network predicts (``epsilon``, ``v_prediction`` or ``sample``), from its manifest and its
    scheduler config; ``epsilon`` (diffusers' default) when neither says. They must agree when both do."""
    found = {}
    for source, record in (("manifest", (info.manifest or {}).get("schedule")), ("scheduler config", info.scheduler)):
        if record and "prediction_type" in record:
            found[source] = record["prediction_type"]
    for source, value in found.items():
        if value not in PREDICTION_TYPES:
            raise ConfigError(f"the U-Net in {info.directory} predicts {value!r} (its {source}); supported: "
                              + ", ".join(PREDICTION_TYPES))
    if len(set(found.values())) > 1:
        raise ConfigError(f"the U-Net in {info.directory} has contradictory records of what it predicts: "
                          + ", ".join(f"{k} says {v!r}" for k, v in found.items()))
    return next(iter(found.values()), "epsilon")


# What identifies the training data of a network, beyond a subset or split of it: the manifest's
# "dataset" record (meta of the data it was trained on) against the data's own meta.
_SOURCE_KEYS = ("source", "resolution", "channels", "channel_conversion", "resize")


def data_match(info: UNetInfo, data) -> str:
    """How the data a network was trained on (its manifest) relate to ``data``: "same" (same fingerprint),
    "same-source" (another subset or split of the same source, preprocessed alike), "unknown" (no
    manifest record: a plain diffusers directory) or "foreign" (other data, or another shape)."""
    m = info.manifest or {}
    rec, full = m.get("data") or {}, m.get("dataset") or {}
    if not rec and not full:
        return "unknown"
    if rec.get("fingerprint") and rec["fingerprint"] == getattr(data, "fingerprint", None):
        return "same"
    shape = rec.get("shape") or full.get("shape")
    name = rec.get("name") or full.get("name")
    if (shape is not None and list(shape) != list(data.shape)) or (name is not None and name != data.name):
        return "foreign"
    meta = getattr(data, "meta", {}) or {}
    if full and all(full.get(k) == meta.get(k) for k in _SOURCE_KEYS if k in full or k in meta):
        return "same-source"
    return "foreign"


def foreign_message(info: UNetInfo, data) -> str:
    m = info.manifest or {}
    rec = {**(m.get("dataset") or {}), **(m.get("data") or {})}
    fp = str(rec.get("fingerprint") or "?")[:12]
    return (f"the U-Net in {info.directory} was trained on other data: {rec.get('name')} "
            f"({rec.get('num', rec.get('num_images', '?'))} images of shape {rec.get('shape')}, source "
            f"{rec.get('source', '?')}, fingerprint {fp}), not on {data.name} ({len(data)} images of shape "
            f"{list(data.shape)}, source {(getattr(data, 'meta', {}) or {}).get('source', '?')}, fingerprint "
            f"{data.fingerprint[:12]})")


def _differs(a, b) -> bool:
    if isinstance(b, float) and isinstance(a, (int, float)):
        return abs(a - b) > 1e-12
    return a != b


def load_unet(path: str | Path | UNetInfo, *, dtype: torch.dtype = torch.float32,
              device: str | torch.device = "cpu"):
    """``(model, info)``: a diffusers ``UNet2DModel`` from a local directory, in eval mode, weights frozen.

    Reads safetensors only and never touches the network (``local_files_only``).
    """
    from diffusers import UNet2DModel

    info = path if isinstance(path, UNetInfo) else inspect_unet_dir(path)
    try:
        model = UNet2DModel.from_pretrained(str(info.directory), subfolder=info.subfolder, use_safetensors=True,
                                            local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"could not load the U-Net in {info.directory}: {exc}") from exc
    model = model.to(device=device).eval()
    model.requires_grad_(False)
    return model, info


@dataclass
class UNetDenoiserConfig(DenoiserConfig):
    path: str | None = None  # a diffusers UNet2DModel directory (default: the weights shipped for the dataset)
    dtype: Literal["float32", "float64", "float16", "bfloat16"] = "float32"  # network arithmetic
    allow_foreign: bool = False  # use a network whose manifest names other training data (refused otherwise)


class UNetDenoiser(Denoiser):
    """A trained network; ``x0_hat`` from its output by its ``prediction_type`` (module docstring).

    Differentiable in ``x_t`` (weights frozen, eval mode), so sensitivity fields come from autograd.
    """

    name = "unet"
    Config = UNetDenoiserConfig
    capabilities = Capabilities(trained=True)
    merges_shards = True  # it reads no training images (only their shape and the dataset's name)

    def __init__(self, data, config: UNetDenoiserConfig, schedule=None):
        super().__init__(data.shape, config, schedule)
        self.dtype = resolve_dtype(config.dtype)
        self.path = resolve_unet_path(config.path, data.name)
        info = inspect_unet_dir(self.path)
        check_unet_compatible(info, self.shape, self.schedule)
        self.data_match = data_match(info, data)
        if self.data_match == "foreign" and not config.allow_foreign:
            raise ConfigError(f"{foreign_message(info, data)}; use a network trained on these data, or pass "
                              "--allow-foreign-unet (model option allow_foreign=true) to compare with it anyway")
        self.model, self.info = load_unet(info, dtype=self.dtype, device=self.device)
        self.prediction_type = prediction_type(info)

    discrete_levels = True

    def snap_sigma(self, sigma: float) -> float:
        """The sigma of the network's trained timestep nearest to ``sigma`` in log sigma."""
        return float(self.schedule.sigmas[self.schedule.nearest_timestep(sigma)])

    def sigma_range(self) -> tuple[float, float]:
        return self.schedule.sigma_min, self.schedule.sigma_max

    def timestep(self, t) -> tuple[int, float]:
        """The network's timestep at the level ``t`` (a timestep of its schedule, or a NoiseLevel of any family
        at the sigma of one of its trained levels) and the scale ``a_t / a`` that brings ``x_t`` to it."""
        level = self.schedule.at(t)
        ts = self.schedule.timestep_of(level)
        if ts is None:
            near = self.schedule.nearest_timestep(level.sigma)
            raise ConfigError(f"unet: the network was trained at the {self.schedule.num_train_timesteps} discrete levels "
                              f"of its {self.schedule.name} schedule; {level.label} is none of them (nearest: t={near}, "
                              f"sigma={float(self.schedule.sigmas[near]):.6g}); sample with --sampler euler or heun, "
                              "whose grid is snapped to the network's levels")
        return ts, self.schedule.at(ts).a / level.a

    def output(self, x_t: torch.Tensor, t: int) -> torch.Tensor:
        """The network's raw output (eps, v or x0 by ``prediction_type``) [B, C, H, W], in its dtype, at its
        integer timestep ``t``."""
        ts = torch.full((x_t.shape[0],), int(t), dtype=torch.long, device=x_t.device)
        return self.model(x_t.to(self.dtype), ts, return_dict=False)[0]

    def eps(self, x_t: torch.Tensor, t) -> torch.Tensor:
        """The network's noise prediction ``eps_hat`` [B, C, H, W] at the level ``t`` (``eps = a v + sqrt(b2) x_t``
        for a v-net)."""
        level = self.schedule.at(t)
        ts, scale = self.timestep(level)
        if self.prediction_type == "epsilon" and scale == 1.0:
            return self.output(x_t, ts)
        out = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        return self.schedule.eps_from_x0(x_t.to(out), self.denoise(x_t, level), level)

    def denoise(self, x_t: torch.Tensor, level: NoiseLevel) -> torch.Tensor:
        t, scale = self.timestep(level)
        out = torch.float64 if x_t.dtype == torch.float64 else torch.float32
        x = x_t.to(out) if scale == 1.0 else x_t.to(out) * scale  # the network's own scaling of x_t
        y = self.output(x, t).to(out)
        if self.prediction_type == "v_prediction":
            return self.schedule.x0_from_v(x, y, t)
        if self.prediction_type == "sample":
            return y
        return self.schedule.x0_from_eps(x, y, t)

    def settings(self) -> dict:
        out = super().settings()
        out["path"] = str(self.path)
        m = self.info.manifest or {}
        out["weights_sha256"] = (m.get("weights") or {}).get("sha256")
        out["trained_on"] = (m.get("data") or {}).get("name")
        out["train_steps"] = m.get("steps")
        out["prediction_type"] = self.prediction_type
        out["data_match"] = self.data_match
        out["num_parameters"] = sum(p.numel() for p in self.model.parameters())
        return out
