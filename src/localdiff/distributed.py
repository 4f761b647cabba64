"""More than one process: torch.distributed under ``torchrun`` (docs/DESIGN.md §9).

A job started by ``torchrun`` (``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK`` in the environment) joins its
process group here, once (:func:`init_from_env`): gloo for CPU tensors and, where there is a GPU, NCCL
for CUDA tensors with one GPU per local rank. Everything else asks :func:`world`. A plain run is a world
of one process and never touches torch.distributed.

The ranks exchange the mergeable states of docs/DESIGN.md §8. :func:`gather` collects one state per rank
(any nesting of dataclasses, dicts, lists, tuples, tensors and numbers; one collective per dtype, after a check
that every rank sends the same shapes), and :func:`merge_ranks` folds them in rank order with the
state's own ``merge``, the merge used between blocks and worker threads inside a process, so every
rank ends with the same state and the result differs from one process's only by float round-off.
Under autograd the exchange is differentiable: :func:`rank_input` marks the input of a rank's share of
the computation (its gradient is summed over the ranks in the backward pass) and a gathered state
passes to each rank the gradient of its own slot.

Failures: each collective waits at most the process group's timeout (``LOCALDIFF_DIST_TIMEOUT``
seconds, default 1800) and one that fails (a rank stopped, the timeout passed, the ranks disagree on
what they exchange) raises :class:`~localdiff.errors.DistributedError` naming the operation and the
cause; the CLI prints it with this rank's number and exits non-zero, and torchrun then stops the other
processes.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import time
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable

import numpy as np
import torch

from .errors import ConfigError, DataError, DistributedError, LocaldiffError

TIMEOUT_ENV = "LOCALDIFF_DIST_TIMEOUT"
DEFAULT_TIMEOUT_S = 1800.0  # rank 0 may eigendecompose a 12,288-pixel covariance while the others wait


@dataclass(frozen=True)
class World:
    """The processes of this job: ``size`` ranks, this one ``rank`` (``local_rank`` on its machine)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None  # None: torch.distributed is not in use (a plain run)
    timeout_s: float | None = None

    @property
    def active(self) -> bool:
        """More than one process: states are exchanged between the ranks."""
        return self.size > 1 and self.backend is not None

    @property
    def main(self) -> bool:
        """Rank 0, the one that writes outputs and draws progress bars."""
        return self.rank == 0

    def where(self) -> str:
        """``rank 1 of 4 (host)`` for messages; empty for a plain run."""
        return f"rank {self.rank} of {self.size} ({socket.gethostname()})" if self.backend is not None else ""

    def record(self) -> dict:
        """What run records say about the processes."""
        return {"world_size": self.size, "backend": self.backend, "launcher": "torchrun" if self.backend else None}


_WORLD = World()
_OWNED = False  # this module created the process group (and so destroys it)


def world() -> World:
    return _WORLD


def is_main() -> bool:
    """True on rank 0 and in a plain run."""
    return _WORLD.rank == 0


def launched_by_torchrun(environ=None) -> bool:
    env = os.environ if environ is None else environ
    return "WORLD_SIZE" in env and "RANK" in env


def timeout_s() -> float:
    """The collectives' timeout in seconds: ``$LOCALDIFF_DIST_TIMEOUT`` or 1800."""
    text = os.environ.get(TIMEOUT_ENV, "").strip()
    if not text:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(f"${TIMEOUT_ENV} must be a positive number of seconds, got {text!r}")
    return value


def init_from_env() -> World:
    """Join the torchrun job this process belongs to (no-op in a plain run, or when already joined)."""
    global _WORLD, _OWNED
    if _WORLD.backend is not None or not launched_by_torchrun():
        return _WORLD
    import torch.distributed as dist

    try:
        size, rank = int(os.environ["WORLD_SIZE"]), int(os.environ["RANK"])
        local = int(os.environ.get("LOCAL_RANK", "0"))
    except ValueError as exc:
        raise ConfigError(f"WORLD_SIZE, RANK and LOCAL_RANK must be integers (set by torchrun): {exc}") from None
    if not dist.is_available():
        raise ConfigError("this PyTorch has no torch.distributed; run without torchrun")
    timeout = timeout_s()
    if dist.is_initialized():  # a script that joined its group itself
        backend, size, rank = str(dist.get_backend()), dist.get_world_size(), dist.get_rank()
    else:
        cuda = torch.cuda.is_available()
        if cuda:  # one GPU per process on its machine: "cuda" means this one from here on
            torch.cuda.set_device(local % torch.cuda.device_count())
        backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
        try:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout))
        except (RuntimeError, ValueError) as exc:
            raise DistributedError(f"rank {rank} of {size}: could not join the torchrun job ({_first_line(exc)})") \
                from exc
        _OWNED = True
    _WORLD = World(rank, size, local, backend, timeout)
    return _WORLD


def shutdown(failed: bool = False) -> None:
    """Leave the process group this module joined. After a failure the group is left to the process's
    exit, which closes its connections (a peer waiting in a collective then fails at once)."""
    global _WORLD, _OWNED
    if _OWNED and not failed:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
    _OWNED = False
    _WORLD = World()


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__


@contextmanager
def collective(what: str):
    """Turn a failed collective into a DistributedError naming this rank, the operation and the cause."""
    try:
        yield
    except LocaldiffError:
        raise
    except RuntimeError as exc:  # torch.distributed's DistBackendError, DistNetworkError, gloo/NCCL errors
        raise DistributedError(
            f"'{what}' with the other processes failed: another rank stopped (see its message) or did not arrive "
            f"within {world().timeout_s:g} s (${TIMEOUT_ENV}); cause: {_first_line(exc)}") from exc


# -- gathering states ---------------------------------------------------------------------------------

def _map(obj: Any, fn: Callable[[torch.Tensor], torch.Tensor], device) -> Any:
    """``obj`` with every tensor ``v`` replaced by ``fn(v)``; numbers travel as 0-d tensors on ``device``."""
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    if obj is None or isinstance(obj, str):
        return obj
    if isinstance(obj, (bool, int, float)):
        dtype = torch.float64 if isinstance(obj, float) else torch.int64
        return type(obj)(fn(torch.tensor(obj, dtype=dtype, device=device)).item())
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map(v, fn, device) for v in obj)
    if isinstance(obj, dict):
        return {k: _map(v, fn, device) for k, v in obj.items()}
    if dataclasses.is_dataclass(obj):
        return dataclasses.replace(obj, **{f.name: _map(getattr(obj, f.name), fn, device)
                                           for f in dataclasses.fields(obj) if f.init})
    raise TypeError(f"cannot exchange a {type(obj).__name__} between ranks")


class _Gather(torch.autograd.Function):
    """All-gather ``flat`` [L] -> [P, L]. Backward: this rank's slot (every rank computes the same
    function of the gathered values, so each one passes the gradient of its own part back)."""

    @staticmethod
    def forward(ctx, flat):
        return _all_gather(flat, "all_gather")

    @staticmethod
    def backward(ctx, grad):
        return grad[world().rank]


class _SumGrad(torch.autograd.Function):
    """Identity whose backward sums the gradient over the ranks (each rank differentiates its share)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        import torch.distributed as dist

        grad = grad.contiguous().clone()
        with collective("all_reduce of a gradient"):
            dist.all_reduce(grad)
        return grad


def _all_gather(flat: torch.Tensor, what: str) -> torch.Tensor:
    import torch.distributed as dist

    out = [torch.empty_like(flat) for _ in range(world().size)]
    with collective(what):
        dist.all_gather(out, flat.contiguous())
    return torch.stack(out)


def _signature(leaves: list[torch.Tensor]) -> int:
    text = json.dumps([[str(v.dtype), list(v.shape)] for v in leaves])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:7], "little")


def gather(obj: Any) -> list:
    """``obj`` of every rank, in rank order (one object per rank; ``[obj]`` in a plain run).

    Every rank must call it at the same point with an object of the same structure and shapes (checked
    first, so a mismatch is an error on every rank instead of a hang). Differentiable.
    """
    w = world()
    if not w.active:
        return [obj]
    leaves: list[torch.Tensor] = []
    device = _first_device(obj)
    _map(obj, lambda v: leaves.append(v) or v, device)
    sig = torch.tensor([_signature(leaves), sum(v.numel() for v in leaves)], dtype=torch.int64, device=device)
    sigs = _all_gather(sig, "all_gather of the state's shapes").cpu()
    if not bool((sigs == sigs[0]).all()):
        raise DistributedError(f"the ranks hold states of different shapes (signatures "
                               f"{sigs[:, 0].tolist()}, sizes {sigs[:, 1].tolist()}); every rank must run the same "
                               "calls with the same options")
    per_rank: list[list[torch.Tensor | None]] = [[None] * len(leaves) for _ in range(w.size)]
    groups: dict[tuple, list[int]] = {}
    for i, v in enumerate(leaves):
        groups.setdefault((v.dtype, v.device), []).append(i)
    for idx in groups.values():
        flat = torch.cat([leaves[i].reshape(-1) for i in idx])
        grad = torch.is_grad_enabled() and flat.requires_grad
        stacked = _Gather.apply(flat) if grad else _all_gather(flat.detach(), "all_gather of the states")
        for r in range(w.size):
            parts = stacked[r].split([leaves[i].numel() for i in idx])
            for i, p in zip(idx, parts):
                per_rank[r][i] = p.view(leaves[i].shape)
    out = []
    for r in range(w.size):
        it = iter(per_rank[r])
        out.append(_map(obj, lambda v: next(it), device))
    return out


def _first_device(obj) -> torch.device:
    found: list[torch.device] = []

    def visit(v):
        found.append(v.device)
        return v

    try:
        _map(obj, visit, "cpu")
    except TypeError:
        pass
    return found[0] if found else torch.device("cpu")


def merge_ranks(state, shard):
    """The state of the whole training set from each rank's state of its ``shard``: gathered, then folded
    in rank order with ``state.merge``. ``shard`` None (or of one process): ``state`` itself."""
    if shard is None or shard.size == 1:
        return state
    _require(shard)
    parts = gather(state)
    merged = parts[0]
    for part in parts[1:]:
        merged = merged.merge(part)
    return merged


def rank_input(x: torch.Tensor, shard) -> torch.Tensor:
    """``x`` as the input of this rank's share (identity); under autograd its gradient is summed over the
    ranks, so ``d(merged)/dx`` holds every shard's term. Apply it once, to what enters the streamed part."""
    if shard is None or shard.size == 1 or not (torch.is_grad_enabled() and x.requires_grad):
        return x
    _require(shard)
    return _SumGrad.apply(x)


def _require(shard) -> None:
    w = world()
    if not w.active or w.size != shard.size or w.rank != shard.rank:
        raise DistributedError(f"a shard of rank {shard.rank} of {shard.size} is used in a world of {w.size} "
                               "process(es): shards are exchanged only inside the torchrun job that made them")


def gather_rows(rows: np.ndarray) -> np.ndarray:
    """Every rank's ``rows`` [k_r, ...] (same dtype and trailing shape everywhere), concatenated in rank order."""
    w = world()
    if not w.active:
        return rows
    counts = gather(int(rows.shape[0]))
    width = max(counts)
    padded = np.zeros((width, *rows.shape[1:]), dtype=rows.dtype)
    padded[:rows.shape[0]] = rows
    stacked = _all_gather(torch.from_numpy(padded).reshape(-1), "all_gather of images").numpy()
    stacked = stacked.reshape(w.size, width, *rows.shape[1:])
    return np.concatenate([stacked[r, :k] for r, k in enumerate(counts)])


# -- rank 0 decides ----------------------------------------------------------------------------------

def broadcast_tensors(tensors: list[torch.Tensor], what: str = "broadcast") -> None:
    """Overwrite ``tensors`` on every rank with rank 0's (same shapes and dtypes everywhere)."""
    if not world().active:
        return
    import torch.distributed as dist

    with collective(what):
        for t in tensors:
            dist.broadcast(t, src=0)


def broadcast_json(obj: Any, what: str = "broadcast") -> Any:
    """Rank 0's JSON-able ``obj`` on every rank (the others' ``obj`` is ignored)."""
    if not world().active:
        return obj
    data = json.dumps(obj).encode() if is_main() else b""
    size = torch.tensor([len(data)], dtype=torch.int64)
    broadcast_tensors([size], what)
    buf = torch.zeros(int(size), dtype=torch.uint8)
    if is_main():
        buf[:] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    broadcast_tensors([buf], what)
    return json.loads(bytes(buf.numpy()).decode())


_ERRORS = {"ConfigError": ConfigError, "DataError": DataError}


def main_decides(fn: Callable[[], Any], what: str = "a check on rank 0") -> Any:
    """``fn()`` run on rank 0 only, its JSON-able result given to every rank. A LocaldiffError it raises is
    raised on every rank (same message), so all processes stop together with rank 0's reason."""
    if not world().active:
        return fn()
    payload = None
    if is_main():
        try:
            payload = {"ok": fn()}
        except LocaldiffError as exc:
            broadcast_json({"error": str(exc), "type": type(exc).__name__}, what)
            raise
    payload = broadcast_json(payload, what)
    if "error" in payload:
        raise _ERRORS.get(payload["type"], ConfigError)(payload["error"])
    return payload["ok"]


def main_clock() -> float:
    """Rank 0's ``time.perf_counter()`` on every rank, so that decisions taken from the clock (a time
    budget, a deadline) are the same everywhere."""
    if not world().active:
        return time.perf_counter()
    now = torch.tensor([time.perf_counter()], dtype=torch.float64)
    broadcast_tensors([now], "broadcast of rank 0's clock")
    return float(now)


def barrier(what: str = "barrier") -> None:
    if world().active:
        import torch.distributed as dist

        with collective(what):
            dist.barrier()


def tqdm(*args, **kwargs):
    """``tqdm.auto.tqdm``, drawn by rank 0 only (the other ranks run the same loops silently)."""
    from tqdm.auto import tqdm as bar

    if not is_main():
        kwargs["disable"] = True
    return bar(*args, **kwargs)


__all__ = ["World", "world", "is_main", "launched_by_torchrun", "init_from_env", "shutdown", "collective", "gather",
           "merge_ranks", "rank_input", "gather_rows", "broadcast_tensors", "broadcast_json", "main_decides",
           "main_clock", "barrier", "tqdm", "timeout_s", "TIMEOUT_ENV"]
