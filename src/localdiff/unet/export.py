"""Export of a trained U-Net: the EMA weights in diffusers ``save_pretrained`` format plus the manifest
``localdiff_unet.json`` (command, data fingerprint, steps, epochs, loss, throughput, plan, sha256)."""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

import torch

from ..device import device_name
from ..errors import ConfigError, LocaldiffError
from .checkpoints import fsync_dir, fsync_file, make_readable, remove_stale_partials, sha256_file, write_json
from .configs import build_unet, schedule_record
from .files import LOSS_EMA_DECAY, MANIFEST_FORMAT, MANIFEST_NAME, WEIGHTS_NAME

EXPORT_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def ema_model(trainer, dtype: torch.dtype = torch.float32):
    """A fresh ``UNet2DModel`` (CPU, eval mode) holding the trainer's EMA weights."""
    model = build_unet(trainer.model_config, trainer.data.shape)
    names = [n for n, p in trainer.model.named_parameters() if p.requires_grad]
    sd = {k: v.detach().cpu() for k, v in trainer.model.state_dict().items()}
    sd.update({n: e.detach().cpu() for n, e in zip(names, trainer.ema)})
    model.load_state_dict({k: v.contiguous() for k, v in sd.items()})
    if dtype != torch.float32:
        # diffusers warns about casting with .to(); every module of a UNet2DModel is safe in half precision
        log = logging.getLogger("diffusers.models.modeling_utils")
        level = log.level
        log.setLevel(logging.ERROR)
        try:
            model = model.to(dtype)
        finally:
            log.setLevel(level)
    return model.eval()


def export(trainer, out: str | os.PathLike, *, dtype: str = "fp32", extra: dict | None = None) -> Path:
    """Write the EMA network (config.json + diffusion_pytorch_model.safetensors) and the manifest into
    ``out``; each file is replaced atomically, the manifest last."""
    if dtype not in EXPORT_DTYPES:
        raise ConfigError(f"export dtype must be one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_partials(out)
    tmp = Path(tempfile.mkdtemp(prefix=f".export.pid{os.getpid()}.", suffix=".partial", dir=out))
    try:
        ema_model(trainer, EXPORT_DTYPES[dtype]).save_pretrained(tmp, safe_serialization=True)
        weights = tmp / WEIGHTS_NAME
        if not weights.is_file():
            raise LocaldiffError(f"diffusers did not write {WEIGHTS_NAME} in {tmp}")
        make_readable(weights)
        fsync_file(weights)
        cfg = trainer.config
        manifest = {
            "format": MANIFEST_FORMAT,
            **(extra or {}),
            "data": {"name": trainer.data.name, "fingerprint": trainer.data.fingerprint, "num": len(trainer.data),
                     "shape": list(trainer.data.shape)},
            "steps": trainer.step,
            "epochs": trainer.order.epochs,
            "final_loss": trainer.loss_ema,
            "loss_ema_decay": LOSS_EMA_DECAY,
            "loss_log": trainer.loss_log,
            "wall_time_s": trainer.total_wall_s,
            "images_per_s": trainer.images_per_s,
            "device": device_name(trainer.device),
            "prediction": cfg.prediction,
            "lr_schedule": {"decay": cfg.lr_decay, "total_steps": trainer.total_steps,
                            "warmup_steps": trainer.warmup_steps},
            "plan": trainer.plan,
            "stopped_early": any(h.get("stopped_early") for h in trainer.history),
            "history": trainer.history,
            "weights": {"file": WEIGHTS_NAME, "sha256": sha256_file(weights), "dtype": dtype, "source": "ema"},
            "model_config": trainer.model_config.to_dict(),
            "train_config": cfg.to_dict(),
            "schedule": schedule_record(trainer.schedule, cfg.prediction),
            "num_parameters": sum(p.numel() for p in trainer.params),
        }
        for name in (WEIGHTS_NAME, "config.json"):
            os.replace(tmp / name, out / name)
        write_json(tmp / MANIFEST_NAME, manifest)
        os.replace(tmp / MANIFEST_NAME, out / MANIFEST_NAME)
        fsync_dir(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out
