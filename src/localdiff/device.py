"""The compute device, resolved in one place: ``"auto"`` becomes CUDA when available, else the CPU.

Entry points (the CLI commands, :func:`localdiff.study.run_study`) resolve the user's choice once and
pass the resulting ``torch.device`` (or its string) on, so every model of one run agrees on it.
"""

from __future__ import annotations

import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; a CUDA request without a GPU is an error."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but this PyTorch has no usable GPU; use --device cpu")
    return dev


def device_name(device: torch.device) -> str:
    """``cpu`` or the GPU's name (``cuda: NVIDIA H200``), for run records."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


__all__ = ["resolve_device", "device_name"]
