"""Helpers shared by the benchmark scripts (run as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import json
import resource

import torch


def sync(device) -> None:
    """Wait for queued GPU work so wall-clock timings are honest (no-op on the CPU)."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_mib(device) -> float:
    """Peak allocated GPU memory on CUDA, peak resident set size of this process on the CPU."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def write_json(path: str | None, results: dict) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def print_and_write_json(path: str | None, results: dict) -> None:
    """The results as indented JSON on stdout, and in ``path`` when given."""
    print(json.dumps(results, indent=2))
    write_json(path, results)
