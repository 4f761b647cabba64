"""Reading a PyTorch checkpoint file safely, and finding the state_dict inside it.

``torch.load(path, map_location="cpu", weights_only=True)`` is the only reader: it rebuilds tensors and
plain containers and refuses every other global before calling it, so a file that pickles a whole
``nn.Module`` or a code-running payload is refused with nothing of it executed. Its refusals and other
failures become ConfigErrors that say what the file holds and how to convert it on a trusted machine.
"""

from __future__ import annotations

import pickle
import re
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from ..errors import ConfigError


def name_list(keys: list[str], limit: int = 5) -> str:
    """``"12: a, b, c, d, e, ... 7 more"``: a count and the first few names, for error messages."""
    shown = ", ".join(keys[:limit])
    return f"{len(keys)}: {shown}" + (f", ... {len(keys) - limit} more" if len(keys) > limit else "")


# -- finding the state_dict inside a checkpoint -------------------------------------------------------------

# Entries that hold a network's weights in common checkpoint layouts, in the order they are preferred: the
# paper's own loader reads "model_state_dict"; EMA weights come before raw training weights.
STATE_ENTRIES = ("model_state_dict", "ema", "ema_model", "net_model", "model", "state_dict", "net")
_PREFIXES = ("module.", "_orig_mod.")  # DataParallel/DistributedDataParallel, torch.compile


def extract_state_dict(obj, *, entry: str | None = None) -> dict[str, torch.Tensor]:
    """The ``{name: tensor}`` state_dict inside a loaded checkpoint: ``obj`` itself if it is one, else the
    first of ``STATE_ENTRIES`` that holds one (searched recursively, e.g. ``{'state_dict': {'ema': ...}}``),
    or the dotted ``entry`` given. A ``module.`` (or ``_orig_mod.``) prefix on every key is removed."""
    return locate_state_dict(obj, entry)[0]


def locate_state_dict(obj, entry: str | None) -> tuple[dict[str, torch.Tensor], str | None]:
    """(state_dict with prefixes stripped, dotted path of the entry used; None for the top level)."""
    if entry is not None:
        node = obj
        for part in entry.split("."):
            if not isinstance(node, Mapping) or part not in node:
                raise ConfigError(f"the checkpoint has no entry '{entry}' (at '{part}'; keys there: "
                                  f"{_key_list(node)})")
            node = node[part]
        if not _is_tensor_dict(node):
            raise ConfigError(f"the checkpoint's entry '{entry}' is not a {{name: tensor}} state_dict")
        return strip_prefixes(dict(node)), entry
    found = _search(obj, (), depth=0)
    if found is None:
        raise ConfigError(f"no state_dict found in the checkpoint (a {type(obj).__name__} with keys "
                          f"{_key_list(obj)}); expected a {{name: tensor}} dict, or one under any of "
                          f"{list(STATE_ENTRIES)}; name another entry explicitly (entry='...')")
    state, path = found
    return strip_prefixes(dict(state)), ".".join(path) or None


def _search(node, path: tuple[str, ...], depth: int):
    if isinstance(node, nn.Module):
        node = node.state_dict()
    if _is_tensor_dict(node):
        return node, path
    if not isinstance(node, Mapping) or depth >= 4:
        return None
    for name in STATE_ENTRIES:
        if name in node:
            found = _search(node[name], (*path, name), depth + 1)
            if found is not None:
                return found
    return None


def _is_tensor_dict(node) -> bool:
    return (isinstance(node, Mapping) and len(node) > 0
            and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in node.items()))


def _key_list(node) -> list:
    if not isinstance(node, Mapping):
        return []
    keys = [str(k) for k in node]
    return keys[:8] + ([f"... {len(keys) - 8} more"] if len(keys) > 8 else [])


def strip_prefixes(state: dict) -> dict:
    """``state`` without a prefix that every key carries (``module.``, ``_orig_mod.``; repeatedly)."""
    while state:
        prefix = next((p for p in _PREFIXES if all(k.startswith(p) for k in state)), None)
        if prefix is None:
            break
        state = {k[len(prefix):]: v for k, v in state.items()}
    return state


# -- reading a checkpoint file -------------------------------------------------------------------------------

_CONVERT = ("convert it on a machine where you trust the file and have the code that wrote it, keeping only "
            "the tensors: python -c \"import torch; m = torch.load('IN.pt', weights_only=False); "
            "torch.save(m.state_dict(), 'OUT.pt')\" (for a dict checkpoint: torch.save(ckpt['model_state_dict'], "
            "'OUT.pt')), then pass OUT.pt")


def load_checkpoint_safely(path: str | Path):
    """``torch.load(path, map_location="cpu", weights_only=True)``, its failures as ConfigErrors that say
    what the file holds; a path that is not a regular file is refused before reading."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"checkpoint {path} does not exist")
    if path.is_dir():
        raise ConfigError(f"checkpoint {path} is a directory; expected a .pt file written by torch.save "
                          "(a diffusers UNet2DModel directory is read by the `unet` model's diffusers path)")
    if not path.is_file():
        raise ConfigError(f"checkpoint {path} is not a regular file (a device, pipe or socket); pass a .pt file")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        if "weights only load failed" not in text.lower():
            raise ConfigError(f"{path} is not a readable PyTorch checkpoint ({text.splitlines()[0][:200]}); "
                              "expected a file written by torch.save") from None
        found = _unsafe_globals(path, text)
        if not found:  # not a pickle of objects at all: garbage, or an unpickler opcode torch does not take
            reason = " ".join(text.split("WeightsUnpickler error:")[-1].split("Check the documentation")[0].split())
            raise ConfigError(f"{path} is not a readable PyTorch checkpoint (the weights-only unpickler stopped: "
                              f"{reason[:200]}); expected a file written by torch.save") from None
        raise ConfigError(f"{path} pickles Python objects, not only tensors ({', '.join(found)}); "
                          "localdiff loads checkpoints with torch.load(weights_only=True) only and ran none of it. "
                          f"If it is a network or checkpoint you trust, {_CONVERT}") from None
    except Exception as exc:  # corrupt zip, truncated file, foreign format: nothing of it was executed
        first = str(exc).splitlines()[0][:200] if str(exc) else ""
        raise ConfigError(f"{path} is not a readable PyTorch checkpoint ({type(exc).__name__}: {first}); "
                          "expected a file written by torch.save") from None


def _unsafe_globals(path: Path, message: str) -> list[str]:
    """The globals ``weights_only`` refuses in ``path``, read from the pickle without running it."""
    try:
        found = list(torch.serialization.get_unsafe_globals_in_checkpoint(path))
    except Exception:  # legacy (non-zip) format: fall back to the one named in the error
        found = []
    if not found:
        found = re.findall(r"GLOBAL ([\w.]+)", message)
    # The file's own classes first, then torch's.
    found = sorted(set(found), key=lambda name: (name.startswith(("torch.", "collections.")), name))
    return found[:6] + ([f"... {len(found) - 6} more"] if len(found) > 6 else [])
