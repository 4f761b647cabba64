"""The compute device and the arithmetic types, resolved in one place: ``"auto"`` becomes CUDA when
available, else the CPU; dtype names (``"float32"``, ...) become ``torch.dtype`` through one table.

Entry points (the CLI commands, :func:`localdiff.study.run_study`) resolve the user's choice once and
pass the ``torch.device`` on; a model given a ``torch.device`` keeps it as it is.
"""

from __future__ import annotations

import torch

from .errors import ConfigError

DTYPES = {"float32": torch.float32, "float64": torch.float64, "float16": torch.float16, "bfloat16": torch.bfloat16}


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None``/"auto" -> CUDA when available, else CPU; a CUDA request without a GPU is an error."""
    if isinstance(device, torch.device):
        dev = device
    elif device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as exc:
            raise ConfigError(f"unknown device '{device}': use cpu, cuda, cuda:N or auto") from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device 'cuda' was requested but this PyTorch has no usable GPU; use --device cpu")
    return dev


def resolve_dtype(name: str | torch.dtype) -> torch.dtype:
    """A dtype name of :data:`DTYPES` (or a ``torch.dtype``) as a ``torch.dtype``."""
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


def device_name(device: torch.device) -> str:
    """``cpu`` or the GPU's name (``cuda: NVIDIA H200``), for run records."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return device.type


__all__ = ["DTYPES", "resolve_device", "resolve_dtype", "device_name"]
