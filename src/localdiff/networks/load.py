"""Any supported network file or directory as a :class:`~.reference.ReferenceNetwork`, and its conversion to
safetensors + JSON (``localdiff convert-network``).

Accepted (detected from the path and the file's first bytes, never by running anything in it):

* a directory: a diffusers ``UNet2DModel`` (:mod:`.diffusers_dir`);
* ``NAME.safetensors`` (or ``NAME.json``) written by ``convert-network``: its JSON names the architecture;
* a ``torch.save`` file, read with ``torch.load(weights_only=True)``: the paper's checkpoints
  (``ckpt_epoch_200.pt``: a raw state_dict, or one under ``model_state_dict``/``ema``/``net_model``, a
  ``module.`` prefix stripped; :mod:`.paper_unet`) or an EDM ``{init_kwargs, state_dict, meta}`` file
  (analytic-diffusion-studio's converter; :mod:`.edm`);
* EDM's pickled snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``), read by a restricted unpickler
  that keeps their embedded source as text (:mod:`.edm.snapshot`).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import torch

from ..errors import ConfigError
from ..schedules import Schedule
from .diffusers_dir import UNetInfo, load_diffusers_network
from .reference import ReferenceNetwork, SigmaNetwork, TimestepNetwork, edm_schedule

PAPER_FORMAT, PAPER_VERSION = "localdiff-paper-unet", 1
_ZIP = b"PK\x03\x04"
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"


def _paper_network(model, config, info: dict, dtype: torch.dtype, device) -> TimestepNetwork:
    """The paper's U-Net: epsilon on the DDPM linear table of its T timesteps (betas 1e-4 .. 0.02)."""
    schedule = Schedule(num_train_timesteps=config.num_timesteps)
    return TimestepNetwork(module=model.to(device=device, dtype=dtype), in_channels=config.in_channels,
                           resolution=config.resolution, schedule=schedule, info=info, prediction_type="epsilon",
                           forward=lambda m, x, t, labels: m(x, t), dtype=dtype, min_multiple=config.size_multiple)


def _edm_network(net, info: dict, dtype: torch.dtype, device) -> SigmaNetwork:
    if dtype != torch.float32:
        raise ConfigError("an EDM network runs as EDM runs it: float32 (float16 on CUDA where its snapshot says "
                          "use_fp16); drop the dtype option")
    return SigmaNetwork(module=net.to(device), in_channels=net.img_channels, resolution=net.img_resolution,
                        schedule=edm_schedule(net), info=info, label_dim=net.label_dim)


def load_network(path: str | Path, *, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
                 class_label: int | None = None, key: str = "ema") -> tuple[ReferenceNetwork, UNetInfo | None]:
    """The network at ``path`` (module docstring) on ``device``, in eval mode with its weights frozen, and
    the diffusers records (None for a file). ``class_label`` selects the class of a class-conditional
    network; ``key`` the network of an EDM snapshot (``ema``)."""
    from .edm import load_edm_network
    from .paper_unet import paper_checkpoint_from_object
    from .paper_unet_files import load_checkpoint_safely

    p = Path(path).expanduser()
    if p.is_dir():
        net, info = load_diffusers_network(p, dtype=dtype, device=device)
        net.class_label = class_label
        return net, info
    if not p.exists():
        raise ConfigError(f"network {p} does not exist; give a diffusers UNet2DModel directory, the paper's .pt "
                          "checkpoint, an EDM .pkl snapshot or a file written by `localdiff convert-network`")
    if not p.is_file():
        raise ConfigError(f"network {p} is not a regular file")
    if p.suffix in (".safetensors", ".json"):
        net = read_converted(p, dtype=dtype, device=device)
    else:
        with open(p, "rb") as f:
            head = f.read(len(_TORCH_LEGACY))
        if head.startswith(_ZIP) or head == _TORCH_LEGACY:
            obj = load_checkpoint_safely(p)
            if isinstance(obj, Mapping) and "init_kwargs" in obj and "state_dict" in obj:
                edm, info = load_edm_network(p, key=key)
                net = _edm_network(edm, info, dtype, device)
            else:
                model, config, info = paper_checkpoint_from_object(obj, p)
                net = _paper_network(model, config, {"format": "paper-checkpoint", "architecture": "paper-unet",
                                                     **info, "config": config.to_dict()}, dtype, device)
        elif head[:1] == b"\x80":
            edm, info = load_edm_network(p, key=key)
            net = _edm_network(edm, info, dtype, device)
        else:
            raise ConfigError(f"{p} is neither a torch.save file, an EDM pickle nor a converted .safetensors network "
                              f"(it starts with {head[:8]!r})")
    net.class_label = class_label
    return net, None


def read_converted(path: Path, *, dtype: torch.dtype = torch.float32, device="cpu") -> ReferenceNetwork:
    """A network written by :func:`convert_network` (``NAME.safetensors`` beside ``NAME.json``)."""
    from safetensors.torch import load_file

    from .edm import edm_network_from_parts
    from .edm.load import RECORD_FORMAT as EDM_FORMAT
    from .paper_unet import PaperUNet, PaperUNetConfig, load_state_strict

    weights, record = path.with_suffix(".safetensors"), path.with_suffix(".json")
    try:
        doc = json.loads(record.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} needs its record {record} (written beside it by convert-network): {exc}") from exc
    try:
        state = load_file(str(weights))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own errors on damaged files
        raise ConfigError(f"{weights} is not a readable safetensors file: {exc}") from exc
    fmt = doc.get("format") if isinstance(doc, dict) else None
    info = {"format": "converted", "path": str(weights), "record": str(record), "source": doc.get("source")
            if isinstance(doc, dict) else None}
    if fmt == EDM_FORMAT:
        net = edm_network_from_parts(doc["init_kwargs"], state, doc["class_name"])
        return _edm_network(net, {**info, "architecture": f"edm.{doc['class_name']}", "init_kwargs": doc["init_kwargs"]},
                            dtype, device)
    if fmt == PAPER_FORMAT:
        if doc.get("version") != PAPER_VERSION:
            raise ConfigError(f"{record} is version {doc.get('version')}; this localdiff reads version {PAPER_VERSION}")
        config = PaperUNetConfig.from_dict(doc["config"])
        model = PaperUNet(config)
        load_state_strict(model, state)
        model.eval().requires_grad_(False)
        return _paper_network(model, config, {**info, "architecture": "paper-unet", "config": doc["config"]},
                              dtype, device)
    raise ConfigError(f"{record} is not a network record of convert-network (format {fmt!r}; expected "
                      f"{EDM_FORMAT!r} or {PAPER_FORMAT!r})")


def convert_network(src: str | Path, out: str | Path, *, key: str = "ema") -> tuple[Path, Path]:
    """Write the network at ``src`` (any accepted file) as ``OUT.safetensors`` + ``OUT.json``, which every
    localdiff command reads back with no pickle involved. Existing files are never overwritten."""
    from safetensors.torch import save

    from ..fileio import write_bytes, write_json
    from .edm import network_record

    out = Path(out)
    stem = out.with_suffix("") if out.suffix in (".safetensors", ".json") else out
    weights, record = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
    for f in (weights, record):
        if f.exists():
            raise ConfigError(f"{f} already exists; choose a new output name (files are never overwritten)")
    if Path(src).is_dir():
        raise ConfigError(f"{src} is a diffusers directory: its weights are already safetensors, nothing to convert")
    net, _ = load_network(src, key=key)
    source = {k: net.info.get(k) for k in ("path", "sha256", "format", "entry", "key", "class_name", "architecture")
              if net.info.get(k) is not None}
    if isinstance(net, SigmaNetwork):
        doc, state = network_record(net.module)
    else:
        state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.module.state_dict().items()}
        doc = {"format": PAPER_FORMAT, "version": PAPER_VERSION, "config": net.info["config"],
               "prediction_type": "epsilon", "schedule": net.schedule.record(),
               "num_params": net.num_parameters}
    doc["source"] = source
    stem.parent.mkdir(parents=True, exist_ok=True)
    write_bytes(weights, save(state, metadata={"format": doc["format"]}))
    write_json(record, doc)
    return weights, record


__all__ = ["load_network", "read_converted", "convert_network", "PAPER_FORMAT"]
