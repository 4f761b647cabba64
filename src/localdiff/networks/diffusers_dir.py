"""diffusers ``UNet2DModel`` directories (docs/DESIGN.md §2.7): the ``--out`` of ``localdiff train-unet``, a
``save_pretrained`` directory, or a pipeline directory with a ``unet/`` folder. Weights are read from
safetensors only (pickled ``.bin`` files are refused); what the network predicts and the DDPM table it
was trained on are read from its manifest (``localdiff_unet.json``) or its ``scheduler/scheduler_config.json``
(diffusers' defaults, epsilon on the linear table, when neither says)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import ConfigError
from ..schedules import DEFAULT_SCHEDULE, Schedule
from ..unet.files import MANIFEST_NAME, WEIGHTS_NAME
from .reference import PREDICTION_TYPES, TimestepNetwork

BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")
_EXPECTED = ("a diffusers UNet2DModel directory (config.json + diffusion_pytorch_model.safetensors), "
             "such as the --out directory of `localdiff train-unet` or a save_pretrained() directory")


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
        raise ConfigError(f"U-Net path {path} does not exist; expected {_EXPECTED}, or a network file "
                          "(the paper's .pt checkpoint, an EDM .pkl snapshot, a converted .safetensors)")
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


def _records(info: UNetInfo):
    return (("manifest", (info.manifest or {}).get("schedule")), ("scheduler config", info.scheduler))


def prediction_type(info: UNetInfo) -> str:
    """What the network predicts (``epsilon``, ``v_prediction`` or ``sample``), from its manifest and its
    scheduler config; ``epsilon`` (diffusers' default) when neither says. They must agree when both do."""
    found = {}
    for source, record in _records(info):
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


def network_schedule(info: UNetInfo) -> Schedule:
    """The DDPM table the network was trained on, from its records (the default linear table when they are
    silent); contradictory records or a table localdiff does not compute are errors."""
    found: dict[str, Schedule] = {}
    for source, record in _records(info):
        if not record or not any(k in record for k in ("beta_schedule", "beta_start", "beta_end",
                                                       "num_train_timesteps")):
            continue
        kind = record.get("beta_schedule", "linear")
        if kind not in BETA_SCHEDULES:
            raise ConfigError(f"the U-Net in {info.directory} was trained on a '{kind}' beta schedule (its {source}); "
                              f"localdiff computes {', '.join(BETA_SCHEDULES)}")
        found[source] = Schedule(num_train_timesteps=int(record.get("num_train_timesteps", 1000)),
                                 beta_start=float(record.get("beta_start", 1e-4)),
                                 beta_end=float(record.get("beta_end", 0.02)), beta_schedule=kind)
    tables = {(s.beta_schedule, s.num_train_timesteps) + ((s.beta_start, s.beta_end) if s.beta_schedule !=
              "squaredcos_cap_v2" else ()) for s in found.values()}
    if len(tables) > 1:
        raise ConfigError(f"the U-Net in {info.directory} has contradictory noise schedules: "
                          + "; ".join(f"its {k} says {v.record()}" for k, v in found.items()))
    schedule = next(iter(found.values()), DEFAULT_SCHEDULE)
    return DEFAULT_SCHEDULE if schedule == DEFAULT_SCHEDULE else schedule


def load_diffusers_network(path: str | Path | UNetInfo, *, dtype: torch.dtype = torch.float32,
                           device: str | torch.device = "cpu") -> tuple[TimestepNetwork, UNetInfo]:
    """A diffusers ``UNet2DModel`` directory as a :class:`TimestepNetwork` (eval mode, weights frozen), and its
    records. Reads safetensors only and never touches the network (``local_files_only``)."""
    from diffusers import UNet2DModel

    info = path if isinstance(path, UNetInfo) else inspect_unet_dir(path)
    cfg = info.config
    if cfg.get("time_embedding_type", "positional") != "positional":
        raise ConfigError(f"the U-Net in {info.directory} uses {cfg['time_embedding_type']} time embeddings (a "
                          "score-SDE model); only networks conditioned on the integer DDPM timestep are supported here")
    if cfg.get("class_embed_type") not in (None,) and cfg.get("num_class_embeds") is None:
        raise ConfigError(f"the U-Net in {info.directory} has a '{cfg['class_embed_type']}' class embedding; only "
                          "unconditional networks and class-index embeddings (num_class_embeds) are supported")
    schedule = network_schedule(info)
    pred = prediction_type(info)
    try:
        model = UNet2DModel.from_pretrained(str(info.directory), subfolder=info.subfolder, use_safetensors=True,
                                            local_files_only=True, torch_dtype=dtype, low_cpu_mem_usage=False)
    except (OSError, ValueError, RuntimeError, KeyError) as exc:
        raise ConfigError(f"could not load the U-Net in {info.directory}: {exc}") from exc
    model = model.to(device=device).eval()
    model.requires_grad_(False)
    size = cfg.get("sample_size")
    if isinstance(size, (list, tuple)):
        size = size[0] if len(set(size)) == 1 else None
    m = info.manifest or {}
    record = {"format": "diffusers", "path": str(info.directory), "architecture": "diffusers.UNet2DModel",
              "sha256": (m.get("weights") or {}).get("sha256"), "trained_on": (m.get("data") or {}).get("name"),
              "train_steps": m.get("steps")}
    net = TimestepNetwork(module=model, in_channels=int(cfg.get("in_channels", 3)), resolution=size,
                          schedule=schedule, info=record, label_dim=int(cfg.get("num_class_embeds") or 0),
                          prediction_type=pred, forward=_forward, dtype=dtype)
    if int(cfg.get("out_channels", net.in_channels)) != net.in_channels:
        raise ConfigError(f"the U-Net in {info.directory} maps {net.in_channels} to {cfg.get('out_channels')} channels; "
                          "only networks whose output has the image's channels are supported")
    return net, info


def _forward(module, x, t, labels):
    class_labels = None if labels is None else labels.argmax(dim=1)
    return module(x, t, class_labels=class_labels, return_dict=False)[0]


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


__all__ = ["UNetInfo", "inspect_unet_dir", "prediction_type", "network_schedule", "load_diffusers_network",
           "data_match", "foreign_message", "WEIGHTS_NAME", "MANIFEST_NAME"]
