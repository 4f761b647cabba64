"""EDM networks from files: EDM's pickles, the {init_kwargs, state_dict, meta} torch file, localdiff's record.

Formats (detected from the file's first bytes, not its name):

``edm-pickle``
    EDM's ``network-snapshot-*.pkl`` / ``edm-*.pkl`` (a dict with ``ema``, ``loss_fn``, ``augment_pipe``,
    ``dataset_kwargs``), read by :mod:`.snapshot` without executing the code it embeds.
``torch-kwargs``
    A ``torch.save`` file (zip, or the legacy format) holding ``{"init_kwargs", "state_dict", "meta"}``, as
    analytic-diffusion-studio's ``convert_edm_checkpoint.py`` writes it (``meta``: img_resolution,
    img_channels, label_dim, sigma_min, sigma_max, sigma_data), read with ``torch.load(weights_only=True)``.
    That converter records no class name (its loader always builds ``EDMPrecond``): the preconditioning is
    taken from ``meta["class_name"]`` where present (localdiff's addition), else from the buffers and
    keyword arguments only one preconditioning has (``u``; beta_d/beta_min/epsilon_t; C_1/C_2; sigma_data),
    else from the noise range in ``meta``, else ``EDMPrecond`` as the converter's loader assumes.
``localdiff-safetensors``
    ``NAME.safetensors`` beside ``NAME.json`` (:func:`network_record`'s config).

Every state_dict is loaded strictly: missing or unexpected keys and shape mismatches are a ConfigError
that names them.
"""

from __future__ import annotations

import hashlib
import json
import math
import pickle
from collections.abc import Mapping
from pathlib import Path

import torch

from ...errors import ConfigError
from .precond import CLASS_NAMES, DEFAULTS, EDMNetwork, precond_name, vp_sigma
from .snapshot import read_edm_snapshot

RECORD_FORMAT, RECORD_VERSION = "localdiff-edm-network", 1
_ZIP = b"PK\x03\x04"
_TORCH_LEGACY = b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19"  # pickled magic number of torch.save's old format
_ONLY_ONE = {"vp": ("beta_d", "beta_min", "epsilon_t"), "iddpm": ("C_1", "C_2"), "edm": ("sigma_data",)}


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def load_state_strict(net: torch.nn.Module, state_dict: Mapping, where: str) -> None:
    """``net.load_state_dict(state_dict, strict=True)`` with a ConfigError naming every key that is
    missing, unexpected, not a floating-point tensor, or of the wrong shape."""
    own = net.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    bad = [f"{k} {tuple(v.shape)} (expected {tuple(own[k].shape)})" for k, v in state_dict.items()
           if k in own and (not isinstance(v, torch.Tensor) or tuple(v.shape) != tuple(own[k].shape))]
    bad += [f"{k} of dtype {v.dtype}" for k, v in state_dict.items()
            if k in own and isinstance(v, torch.Tensor) and not v.is_floating_point()]
    problems = []
    for label, keys in (("missing", missing), ("unexpected", unexpected), ("mismatched", bad)):
        if keys:
            problems.append(f"{len(keys)} {label}: {', '.join(keys[:8])}{' ...' if len(keys) > 8 else ''}")
    if problems:
        raise ConfigError(f"the weights of {where} do not fit {net.class_name}({net.architecture}) built from its "
                          f"keyword arguments: {'; '.join(problems)}. Are the weights and the keyword arguments "
                          f"from the same network?")
    with torch.no_grad():
        net.load_state_dict({k: v.to(own[k].dtype) for k, v in state_dict.items()}, strict=True)


def edm_network_from_parts(init_kwargs: Mapping, state_dict: Mapping, class_name: str) -> EDMNetwork:
    """An :class:`EDMNetwork` of preconditioning ``class_name`` (``"VPPrecond"``, ``"vp"`` ...) built from
    ``init_kwargs`` with ``state_dict`` loaded strictly; in eval mode, without gradients, on the CPU."""
    if not isinstance(init_kwargs, Mapping):
        raise ConfigError(f"init_kwargs must be a dict, not {type(init_kwargs).__name__}")
    if not isinstance(state_dict, Mapping):
        raise ConfigError(f"state_dict must be a dict of tensors, not {type(state_dict).__name__}")
    net = EDMNetwork(class_name, init_kwargs)
    load_state_strict(net, state_dict, f"a {net.class_name} network")
    return net.eval().requires_grad_(False)


def _json_safe(value):
    if isinstance(value, Mapping):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, (bool, int, str)) or value is None:
        return value
    if isinstance(value, float):
        return value  # inf (EDMPrecond's sigma_max) is written as JSON's Infinity, which json.loads reads back
    if hasattr(value, "item"):
        return value.item()
    raise ConfigError(f"keyword argument value {value!r:.60} of type {type(value).__name__} is not JSON-able")


def network_record(net: EDMNetwork) -> tuple[dict, dict[str, torch.Tensor]]:
    """(JSON config, state_dict) that :func:`edm_network_from_parts` (or :func:`load_edm_network` on
    ``NAME.safetensors`` + ``NAME.json``) turns back into the same network. Tensors are contiguous CPU copies."""
    config = {
        "format": RECORD_FORMAT, "version": RECORD_VERSION,
        "class_name": net.class_name, "precond": net.precond, "architecture": net.architecture,
        "init_kwargs": _json_safe(net.init_kwargs),
        "img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": net.label_dim,
        "sigma_min": net.sigma_min, "sigma_max": net.sigma_max, "sigma_data": net.sigma_data,
        "num_params": sum(p.numel() for p in net.parameters()),
    }
    state = {k: v.detach().to("cpu").contiguous().clone() for k, v in net.state_dict().items()}
    return config, state


def _sigma_range(precond: str, kw: Mapping) -> tuple[float, float] | None:
    """(sigma_min, sigma_max) a preconditioning would report for keyword arguments ``kw`` (None: needs its table)."""
    d = {**DEFAULTS[precond], **kw}
    if precond == "vp":
        return float(vp_sigma(d["epsilon_t"], d["beta_d"], d["beta_min"])), float(vp_sigma(1, d["beta_d"], d["beta_min"]))
    if precond == "iddpm":
        return None
    return float(d["sigma_min"]), float(d["sigma_max"])


def _close(a: float, b: float) -> bool:
    return (math.isinf(a) and a == b) or (math.isfinite(a) and math.isfinite(b) and abs(a - b) <= 1e-6 * max(1, abs(b)))


def infer_precond(init_kwargs: Mapping, state_dict: Mapping, meta: Mapping | None) -> tuple[str, str]:
    """(preconditioning, how it was decided) for a {init_kwargs, state_dict, meta} file."""
    meta = meta or {}
    if meta.get("class_name"):
        return precond_name(meta["class_name"]), "meta class_name"
    if "u" in state_dict:
        return "iddpm", "its state_dict holds the iDDPM table u"
    found = [p for p, keys in _ONLY_ONE.items() if any(k in init_kwargs for k in keys)]
    if len(found) == 1:
        return found[0], f"its keyword arguments include {[k for k in _ONLY_ONE[found[0]] if k in init_kwargs]}"
    if len(found) > 1:
        raise ConfigError(f"keyword arguments {sorted(init_kwargs)} mix those of {[CLASS_NAMES[p] for p in found]}; "
                          f"pass the preconditioning explicitly (precond=...)")
    if "sigma_min" in meta and "sigma_max" in meta:
        lo, hi = float(meta["sigma_min"]), float(meta["sigma_max"])
        ranges = {p: _sigma_range(p, init_kwargs) for p in ("vp", "ve", "edm")}
        match = [p for p, r in ranges.items() if _close(r[0], lo) and _close(r[1], hi)]
        if len(match) == 1:
            return match[0], f"meta's noise range [{lo:g}, {hi:g}]"
        if len(match) > 1:
            raise ConfigError(f"meta's noise range [{lo:g}, {hi:g}] fits {[CLASS_NAMES[p] for p in match]}; "
                              f"pass the preconditioning explicitly (precond=...)")
        raise ConfigError(f"meta's noise range [{lo:g}, {hi:g}] fits none of VPPrecond, VEPrecond, EDMPrecond with "
                          f"these keyword arguments; pass the preconditioning explicitly (precond=...)")
    return "edm", "default: the converter's loader builds EDMPrecond"


def _check_meta(net: EDMNetwork, meta: Mapping, where: str) -> None:
    for key in ("img_resolution", "img_channels", "label_dim", "sigma_min", "sigma_max", "sigma_data"):
        if key in meta and meta[key] is not None:
            have = getattr(net, key)
            if have is None:  # sigma_data of a preconditioning without one: nothing to compare
                continue
            if not _close(float(have), float(meta[key])):
                raise ConfigError(f"{where}: meta says {key}={meta[key]} but the network built from its keyword "
                                  f"arguments has {have}; the file is inconsistent (or the preconditioning is not "
                                  f"{net.class_name}: pass precond=...)")


def _read_torch_kwargs(path: Path, precond: str | None) -> tuple[EDMNetwork, dict]:
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise ConfigError(f"{path} holds objects other than tensors and plain data, which torch's weights-only "
                          f"reader refuses ({str(exc).splitlines()[0][:200]}); localdiff does not unpickle them") from exc
    except Exception as exc:  # a truncated zip, a bad record ...
        raise ConfigError(f"{path} is not a readable torch file: {type(exc).__name__}: {exc!s:.200}") from exc
    if not isinstance(blob, Mapping) or "init_kwargs" not in blob or "state_dict" not in blob:
        keys = sorted(map(str, blob)) if isinstance(blob, Mapping) else type(blob).__name__
        raise ConfigError(f"{path} is a torch file but not an EDM network record: it holds {keys}; expected a dict "
                          f"with 'init_kwargs' and 'state_dict' (and 'meta'), as convert_edm_checkpoint.py writes")
    init_kwargs, state_dict, meta = blob["init_kwargs"], blob["state_dict"], blob.get("meta") or {}
    if not isinstance(init_kwargs, Mapping) or not isinstance(state_dict, Mapping) or not isinstance(meta, Mapping):
        raise ConfigError(f"{path}: init_kwargs, state_dict and meta must be dicts")
    how = "given"
    if precond is None:
        precond, how = infer_precond(init_kwargs, state_dict, meta)
    net = edm_network_from_parts(init_kwargs, state_dict, precond)
    _check_meta(net, meta, str(path))
    return net, {"format": "torch-kwargs", "precond_from": how, "meta": dict(meta)}


def _read_record(path: Path, precond: str | None) -> tuple[EDMNetwork, dict]:
    from safetensors.torch import load_file

    cfg_path = path.with_suffix(".json")
    try:
        config = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path} needs its config {cfg_path} (written beside it); {exc}") from exc
    if not isinstance(config, dict) or config.get("format") != RECORD_FORMAT or "init_kwargs" not in config:
        raise ConfigError(f"{cfg_path} is not a {RECORD_FORMAT} config")
    if config.get("version") != RECORD_VERSION:
        raise ConfigError(f"{cfg_path} is version {config.get('version')}; this localdiff reads version {RECORD_VERSION}")
    try:
        state_dict = load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - safetensors raises its own SafetensorError and OSError on damaged files
        raise ConfigError(f"{path} is not a readable safetensors file: {exc}") from exc
    net = edm_network_from_parts(config["init_kwargs"], state_dict, precond or config["class_name"])
    how = "given" if precond else "config"
    return net, {"format": "localdiff-safetensors", "precond_from": how, "config": str(cfg_path)}


def _read_pickle(path: Path, key: str, precond: str | None) -> tuple[EDMNetwork, dict]:
    snap = read_edm_snapshot(path)
    if key not in snap.networks:
        raise ConfigError(f"{path} has no network {key!r}; it has {sorted(snap.networks)} (choose one with key=...)")
    parts = snap.networks[key]
    if precond is not None and precond_name(precond) != precond_name(parts.class_name):
        raise ConfigError(f"{path}[{key!r}] is a {parts.class_name}, not a {CLASS_NAMES[precond_name(precond)]}")
    net = edm_network_from_parts(parts.init_kwargs, parts.state_dict, parts.class_name)
    unknown = [h for h, known in parts.module_sources.items() if known is None]
    return net, {"format": "edm-pickle", "key": key, "precond_from": "pickle", "classes": list(parts.classes),
                 "module_sources": parts.module_sources, "source_known": not unknown,
                 "snapshot": {"networks": sorted(snap.networks), **snap.other}}


def load_edm_network(path: str | Path, *, key: str = "ema", precond: str | None = None) -> tuple[EDMNetwork, dict]:
    """An EDM network from ``path`` (any format of this module's docstring) and an info dict: path, sha256,
    format, class_name, precond, architecture, init_kwargs, num_params, sigma range, and how the
    preconditioning was decided (plus, for a pickle, what else the snapshot holds and whether its
    embedded network source is a released NVlabs/edm one: ``source_known``).

    ``key``: which network of a snapshot (``ema``). ``precond``: force the preconditioning ("vp", "ve",
    "iddpm", "edm" or a class name) where a file does not record it."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise ConfigError(f"EDM network file {path} does not exist (or is not a file)")
    with open(path, "rb") as f:
        head = f.read(len(_TORCH_LEGACY))
    if path.suffix == ".safetensors":
        net, info = _read_record(path, precond)
    elif head.startswith(_ZIP) or head == _TORCH_LEGACY:
        net, info = _read_torch_kwargs(path, precond)
    elif head[:1] == b"\x80" or head[:1] in (b"(", b"}", b"c"):
        net, info = _read_pickle(path, key, precond)
    else:
        raise ConfigError(f"{path} is neither a pickle (EDM's .pkl), a torch file nor a .safetensors record "
                          f"(it starts with {head[:8]!r})")
    info = {"path": str(path), "sha256": file_sha256(path), **info, "class_name": net.class_name,
            "precond": net.precond, "architecture": net.architecture, "init_kwargs": _json_safe(net.init_kwargs),
            "img_resolution": net.img_resolution, "img_channels": net.img_channels, "label_dim": net.label_dim,
            "sigma_min": net.sigma_min, "sigma_max": net.sigma_max,
            "num_params": sum(p.numel() for p in net.parameters())}
    return net, info
