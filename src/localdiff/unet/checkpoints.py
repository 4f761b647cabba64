"""Checkpoint files of the U-Net trainer: atomic directories of safetensors and JSON, checksummed.

Layout (no pickle anywhere; tensors in safetensors, everything else in JSON)::

    <root>/step-0001000/
        model.safetensors       network weights (float32)
        ema.safetensors         EMA of the weights (float32)
        optimizer.safetensors   AdamW tensors, keys "state.<param index>.<name>"
        rng.safetensors         generator states: "device" (timesteps, noise, flips), "cpu" (dropout seeds)
        state.json              step, data order, loss statistics, configs, optimizer scalars, history
        checksums.json          sha256 of every byte of the five files above

A checkpoint directory is written as ``.step-XXXXXXX.pid<PID>.<random>.partial`` and renamed when
complete; older ones are removed only afterwards. Loading verifies every checksum first: a corrupt or
truncated checkpoint is an error that names the file and the newest checkpoint that still verifies.
Partial directories of processes that no longer run (a kill during a write) are removed by the next
checkpoint written to the same folder.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch

from ..errors import ConfigError

CHECKPOINT_FORMAT = "localdiff-unet-checkpoint/1"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


# -- optimizer state without pickle ---------------------------------------------------------------

def _encode_json(v):
    if isinstance(v, tuple):
        return {"__tuple__": [_encode_json(x) for x in v]}
    if isinstance(v, list):
        return [_encode_json(x) for x in v]
    if isinstance(v, dict):
        return {str(k): _encode_json(x) for k, x in v.items()}
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    raise ConfigError(f"optimizer state holds a value of type {type(v).__name__} that cannot be stored as JSON")


def _decode_json(v):
    if isinstance(v, dict):
        if set(v) == {"__tuple__"}:
            return tuple(_decode_json(x) for x in v["__tuple__"])
        return {k: _decode_json(x) for k, x in v.items()}
    if isinstance(v, list):
        return [_decode_json(x) for x in v]
    return v


def split_optimizer_state(sd: dict) -> tuple[dict[str, torch.Tensor], dict]:
    """``optimizer.state_dict()`` -> (tensors for safetensors, JSON-able rest); see :func:`join_optimizer_state`."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if isinstance(v, torch.Tensor):
                tensors[f"state.{idx}.{name}"] = v.detach().cpu().contiguous()
            else:
                scalars.setdefault(str(idx), {})[name] = _encode_json(v)
    return tensors, {"param_groups": _encode_json(sd["param_groups"]), "state_scalars": scalars}


def join_optimizer_state(tensors: dict[str, torch.Tensor], rest: dict) -> dict:
    state: dict[int, dict] = {}
    for key, v in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = v
    for idx, st in rest.get("state_scalars", {}).items():
        state.setdefault(int(idx), {}).update(_decode_json(st))
    return {"state": state, "param_groups": _decode_json(rest["param_groups"])}


# -- files -----------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def make_readable(path: Path, mode: int = 0o666) -> None:
    """Give ``path`` the permissions of a normally created file (safetensors and mkdtemp use 0600/0700)."""
    os.chmod(path, mode & ~_umask())


def fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every platform can open directories
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(path))
    make_readable(path)
    fsync_file(path)


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing: an incomplete or foreign checkpoint")
    try:
        return load_file(str(path), device="cpu")
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError on damaged files
        raise CheckpointError(f"checkpoint file {path} cannot be read ({exc}); it is truncated or corrupt") from exc


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
    fsync_file(path)


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


CHECKSUMS_NAME = "checksums.json"
CHECKPOINT_FILES = ("model.safetensors", "ema.safetensors", "optimizer.safetensors", "rng.safetensors", "state.json")


class CheckpointError(ConfigError):
    """A checkpoint that is truncated, modified or unreadable."""


def _write_checksums(ckpt: Path) -> None:
    """Record the sha256 of every checkpoint file (written last: the checkpoint is whole once it exists)."""
    write_json(ckpt / CHECKSUMS_NAME, {"format": "sha256/1",
                                        "files": {n: sha256_file(ckpt / n) for n in CHECKPOINT_FILES}})


def verify_checkpoint(ckpt: str | os.PathLike) -> None:
    """:class:`CheckpointError` unless every file of ``ckpt`` matches its recorded sha256, naming the first
    bad file and the newest other checkpoint beside it that verifies. Checkpoints from before checksums
    were written are accepted with a warning."""
    ckpt = Path(ckpt)
    problem = _checksum_problem(ckpt)
    if problem is None:
        return
    if problem == "unverified":
        warnings.warn(f"checkpoint {ckpt} predates checksums ({CHECKSUMS_NAME}); it is loaded unverified",
                      RuntimeWarning)
        return
    good = next((c for c in reversed(list_checkpoints(ckpt.parent)) if c != ckpt and _checksum_problem(c) is None),
                None)
    hint = (f"the last good checkpoint is {good}: resume from it with --resume {good}" if good is not None else
            "no other checkpoint beside it verifies; start the run again")
    raise CheckpointError(f"checkpoint {ckpt} is corrupt: {problem}; {hint}")


def _checksum_problem(ckpt: Path) -> str | None:
    """None when ``ckpt`` verifies, "unverified" without a checksum file, else what is wrong."""
    sums = ckpt / CHECKSUMS_NAME
    if not sums.is_file():
        return "unverified"
    try:
        record = json.loads(sums.read_text())
        files = record["files"]
        assert record["format"] == "sha256/1" and set(files) == set(CHECKPOINT_FILES)
    except (OSError, ValueError, KeyError, TypeError, AssertionError):
        return f"{sums} is damaged"
    for name in CHECKPOINT_FILES:
        if not (ckpt / name).is_file():
            return f"{ckpt / name} is missing"
        if sha256_file(ckpt / name) != files[name]:
            return f"{ckpt / name} does not match its sha256 (truncated or modified)"
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def remove_stale_partials(root: str | os.PathLike) -> list[Path]:
    """Remove ``.step-*.partial`` / ``.export.*.partial`` / ``.step-*.stale`` directories in ``root`` left by
    processes that no longer run (their PID is in the name; names without one are from before PIDs were
    recorded, and are removed too). Returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    for p in root.iterdir():
        if not (p.name.startswith(".") and p.name.endswith((".partial", ".stale")) and p.is_dir()):
            continue
        m = re.search(r"\.pid(\d+)\.", p.name)
        if m and int(m.group(1)) != os.getpid() and _pid_alive(int(m.group(1))):
            continue
        if m and int(m.group(1)) == os.getpid():
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under ``root`` (``step-N`` directories holding state.json), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for p in root.iterdir():
        m = _STEP_DIR.match(p.name)
        if m and p.is_dir() and (p / "state.json").is_file():
            found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def find_checkpoint(path: str | os.PathLike) -> Path:
    """Resolve ``path`` to one checkpoint: a checkpoint itself, a directory of them (newest), or a run
    directory with a ``checkpoints/`` folder (newest)."""
    p = Path(path)
    if (p / "state.json").is_file():
        return p
    for root in (p / "checkpoints", p):
        ckpts = list_checkpoints(root)
        if ckpts:
            return ckpts[-1]
    if not p.exists():
        raise ConfigError(f"--resume: {p} does not exist")
    raise ConfigError(f"--resume: no complete checkpoint in {p}; expected a train-unet run directory (with "
                      "checkpoints/step-N/), a checkpoints folder, or one step-N checkpoint directory. A run killed "
                      "before its first checkpoint has nothing to resume: run the same command without --resume")


def write_checkpoint(root: str | os.PathLike, step: int, tensors: dict[str, dict[str, torch.Tensor]], state: dict,
                     *, keep: int = 1) -> Path:
    """Write ``root/step-N`` atomically: one safetensors file per entry of ``tensors`` (``model``, ``ema``,
    ``optimizer``, ``rng``), ``state.json`` and the checksums; keep the newest ``keep`` checkpoints (0: all)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / step_name(step)
    remove_stale_partials(root)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.pid{os.getpid()}.", suffix=".partial", dir=root))
    try:
        for name, group in tensors.items():
            save_tensors(group, tmp / f"{name}.safetensors")
        write_json(tmp / "state.json", {"format": CHECKPOINT_FORMAT, "step": step, **state})
        _write_checksums(tmp)
        fsync_dir(tmp)
        make_readable(tmp, 0o777)
        stale = None
        if final.exists():  # a checkpoint of this very step: move it aside, remove it once replaced
            stale = root / f".{final.name}.pid{os.getpid()}.stale"
            shutil.rmtree(stale, ignore_errors=True)
            os.replace(final, stale)
        os.replace(tmp, final)
        fsync_dir(root)
        if stale is not None:
            shutil.rmtree(stale, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for old in list_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def read_checkpoint(path: str | os.PathLike) -> tuple[Path, dict]:
    """``(checkpoint directory, state)`` of the checkpoint ``path`` resolves to (:func:`find_checkpoint`),
    after verifying its checksums."""
    ckpt = find_checkpoint(path)
    verify_checkpoint(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'state.json'} is not readable JSON ({exc}); the checkpoint is corrupt") from exc
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ConfigError(f"{ckpt} is not a {CHECKPOINT_FORMAT} checkpoint")
    return ckpt, state
