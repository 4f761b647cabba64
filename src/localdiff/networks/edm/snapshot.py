"""EDM's pickled snapshots (``network-snapshot-*.pkl``, ``edm-*.pkl``) read without running anything in them.

EDM pickles its networks with ``torch_utils.persistence``: every network object is written as a call of
``torch_utils.persistence._reconstruct_persistent_obj(meta)``, where ``meta`` holds the object's state
(its ``__dict__``: parameters, buffers, sub-modules, ``_init_kwargs``) *and the source code of the Python
module that defined its class*, which a plain ``pickle.load`` executes. :class:`SnapshotUnpickler`
resolves only the names on an allow-list, and each to a stand-in of its own:

* ``_reconstruct_persistent_obj`` -> :class:`PersistentRecord`, which keeps the class name, the state and
  the module source *as text* (hashed, never compiled or executed);
* ``torch.storage._load_from_bytes`` -> ``torch.load(..., weights_only=True)`` of the storage bytes
  (the legacy serialisation torch writes inside pickles, old and new versions alike);
* torch's tensor and parameter rebuild functions -> checked calls (integer geometry, bounds checked);
  storages and tensors are handed around as :class:`TensorRef`, so no opcode reaches a method of torch's;
* ``torch.nn`` containers (``ModuleDict`` ...) -> :class:`ContainerRecord` holding their state;
* ``collections.OrderedDict``, ``dnnlib.util.EasyDict`` (-> dict), ``builtins.set`` / ``frozenset``,
  numpy's ``dtype`` and ``scalar`` (plain numeric types only, -> Python numbers).

Any other global (``os.system``, ``builtins.exec``, ``subprocess.Popen``, a class of the file's own ...)
is refused with a :class:`~localdiff.errors.ConfigError` naming it; so is a persistent id, a truncated
or corrupted file, and a tree that is not an EDM network. Nothing from the file is imported, called or
executed: the stand-ins are the only callables a pickle opcode can reach.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import re
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...errors import ConfigError

_PLAIN_DTYPE = re.compile(r"[<>|=]?(b1|[iu][1248]|f[248])")
MAX_DEPTH = 64  # nesting of modules in a network (EDM's have 4)
KNOWN_SOURCES = {  # sha256 of NVlabs/edm training/networks.py as released (the module source EDM pickles)
    "2294828d5f59f5fd008f7141e6b8af2095918f2ce019f280a933e4779b5c3cef":
        "NVlabs/edm training/networks.py @0a2ff34 (2022-10-31)",
    "5db27dcd96674b95c72d5e6491b879cdc35e24039ada3411b4b46a28ed1fe284":
        "NVlabs/edm training/networks.py @b2a26c9 (2022-11-21 .. 2024)",
}
_FIX = ("Is it a network-snapshot-*.pkl / edm-*.pkl written by NVlabs/edm? A file from elsewhere can be converted "
        "with EDM's own code, on a machine and in an environment you trust, to the {init_kwargs, state_dict, meta} "
        "torch file that localdiff also reads")


class PersistentRecord:
    """An object EDM pickled through ``torch_utils.persistence``: its class name, its state (the
    object's ``__dict__``) and its module's source, kept as inert text."""

    def __init__(self, class_name: str, module_src: str, state: dict, version: Any):
        self.class_name, self.module_src, self.state, self.version = class_name, module_src, state, version

    def __setstate__(self, state) -> None:
        raise ConfigError(f"a state change (BUILD) of the persistent object {self.class_name}; EDM never writes one")

    @property
    def source_sha256(self) -> str:
        return hashlib.sha256(self.module_src.encode("utf-8", "surrogatepass")).hexdigest()

    def __repr__(self) -> str:
        return f"PersistentRecord({self.class_name}, source {len(self.module_src)} chars)"


class ContainerRecord:
    """A ``torch.nn`` container (``ModuleDict``, ``ModuleList``, ``Sequential``) rebuilt as its state only."""

    class_name = "Module"

    def __new__(cls, *args):
        if args:
            raise ConfigError(f"torch.nn.{cls.class_name} created with arguments {args!r:.80}; EDM never writes that")
        self = super().__new__(cls)
        self.state = {}
        return self

    def __setstate__(self, state) -> None:
        if not isinstance(state, dict) or self.state:
            raise ConfigError(f"torch.nn.{self.class_name} given a state of {type(state).__name__}, or given it twice")
        self.state = state


def _container(name: str) -> type:
    return type(f"{name}Record", (ContainerRecord,), {"class_name": name})


class _DType:
    """numpy.dtype as pickled: a plain numeric code, its byte order set by BUILD."""

    def __init__(self, code: str):
        self.dtype, self.built = np.dtype(code), False

    def __setstate__(self, state) -> None:
        if self.built or type(state) is not tuple or len(state) < 2 or state[1] not in ("<", ">", "|", "="):
            raise ConfigError("a numpy dtype state that is not a plain numeric type")
        if state[1] in "<>":
            self.dtype = self.dtype.newbyteorder(state[1])
        self.built = True


def _numpy_dtype(code, align=False, copy=False) -> _DType:
    if not isinstance(code, str) or not _PLAIN_DTYPE.fullmatch(code):
        raise ConfigError(f"numpy.dtype({code!r:.40}) is not a plain numeric type")
    return _DType(code)


def _numpy_scalar(dtype, raw=None):
    if not isinstance(dtype, _DType) or not isinstance(raw, bytes) or len(raw) != dtype.dtype.itemsize:
        raise ConfigError("a numpy scalar without a plain numeric dtype and its raw bytes")
    return np.frombuffer(raw, dtype.dtype)[0].item()


def _persistent(meta) -> PersistentRecord:
    """The stand-in of ``torch_utils.persistence._reconstruct_persistent_obj``: records, never executes."""
    if not isinstance(meta, dict):
        raise ConfigError(f"a persistent object whose meta is {type(meta).__name__}, not a dict")
    kind, name, src, state = meta.get("type"), meta.get("class_name"), meta.get("module_src"), meta.get("state")
    if kind != "class" or not isinstance(name, str) or not isinstance(src, str) or not isinstance(state, dict):
        raise ConfigError("a persistent object without type 'class', a class name, its module source and its state")
    return PersistentRecord(name, src, state, meta.get("version"))


class TensorRef:
    """A storage or tensor the pickle rebuilt, held so that no pickle opcode reaches torch's own methods
    (a BUILD on it is refused instead of calling ``Tensor.__setstate__``)."""

    def __init__(self, value: torch.Tensor | torch.TypedStorage | torch.UntypedStorage):
        self.value = value

    def __setstate__(self, state) -> None:
        raise ConfigError("a state change (BUILD) of a tensor or storage; EDM never writes one")


def _storage_from_bytes(data) -> TensorRef:
    """``torch.storage._load_from_bytes``, with torch's weights-only reader (no code can run)."""
    if not isinstance(data, (bytes, bytearray)):
        raise ConfigError(f"tensor storage given as {type(data).__name__}, not bytes")
    try:
        storage = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a bad blob
        raise ConfigError(f"a tensor storage in the pickle is not readable by torch's weights-only loader "
                          f"({exc!s:.200})") from exc
    if not isinstance(storage, (torch.TypedStorage, torch.UntypedStorage)):
        raise ConfigError(f"a tensor storage blob holds {type(storage).__name__}, not a storage")
    return TensorRef(storage)


def _is_ints(v) -> bool:
    return isinstance(v, (tuple, list)) and all(type(i) is int for i in v)


def _rebuild_tensor(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None) -> TensorRef:
    """``torch._utils._rebuild_tensor_v2`` restricted to a storage and integer geometry (bounds checked)."""
    if not isinstance(storage, TensorRef) or not isinstance(storage.value, (torch.TypedStorage, torch.UntypedStorage)):
        raise ConfigError(f"a tensor rebuilt from {type(storage).__name__}, not a storage")
    if type(offset) is not int or not _is_ints(size) or not _is_ints(stride) or len(size) != len(stride):
        raise ConfigError("a tensor with a non-integer offset, size or stride")
    if hooks or metadata:
        raise ConfigError("a tensor with backward hooks or metadata; EDM's tensors have none")
    try:
        return TensorRef(torch._utils._rebuild_tensor_v2(storage.value, offset, tuple(size), tuple(stride), False,
                                                         OrderedDict()))
    except RuntimeError as exc:
        raise ConfigError(f"a tensor whose size does not fit its storage ({exc!s:.200})") from exc


def _rebuild_parameter(data, requires_grad=False, hooks=None, state=None) -> TensorRef:
    if not isinstance(data, TensorRef) or not isinstance(data.value, torch.Tensor) or hooks or state:
        raise ConfigError("a parameter that is not a plain tensor (or with hooks or state)")
    return data


ALLOWED = {  # (module, name) as written in the pickle -> the stand-in the unpickler returns
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("collections", "OrderedDict"): OrderedDict,
    ("dnnlib.util", "EasyDict"): dict,
    ("dnnlib", "EasyDict"): dict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): _numpy_dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    **{("torch.nn.modules.container", n): _container(n) for n in ("ModuleDict", "ModuleList", "Sequential")},
}


class SnapshotUnpickler(pickle.Unpickler):
    """``pickle.Unpickler`` whose globals are the stand-ins of :data:`ALLOWED`, and nothing else."""

    def find_class(self, module: str, name: str):
        target = ALLOWED.get((module, name))
        if target is None:
            raise ConfigError(
                f"the pickle asks for {module}.{name}, which is not on localdiff's allow-list for EDM snapshots "
                f"(persistence records, tensors, storages, torch containers, plain dicts and numbers); refusing "
                f"to load it: a pickle can run any code it names when loaded. {_FIX}")
        return target

    def persistent_load(self, pid):
        raise ConfigError(f"the pickle uses a persistent id ({type(pid).__name__}); EDM snapshots do not")


def unpickle_snapshot(stream) -> Any:
    """The object tree of an EDM pickle, through :class:`SnapshotUnpickler` (a ConfigError on anything else)."""
    try:
        return SnapshotUnpickler(stream).load()
    except ConfigError:
        raise
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError, KeyError, IndexError, AttributeError,
            MemoryError, OverflowError, RecursionError, RuntimeError, UnicodeDecodeError) as exc:
        raise ConfigError(f"not a readable EDM pickle: {type(exc).__name__}: {exc!s:.300}. The file is truncated "
                          f"or corrupt, or not a pickle. {_FIX}") from exc


# -- from the inert tree to (class name, init_kwargs, state_dict) ------------------------------------------


@dataclass(frozen=True)
class NetworkParts:
    """A network found in a snapshot: the class name of its preconditioning (``VPPrecond`` ...), the keyword
    arguments it was built with, its state_dict (EDM's keys), every persistent class inside it and the
    sha256 of each distinct module source embedded (with the EDM release it matches, or None)."""

    class_name: str
    init_kwargs: dict
    state_dict: dict[str, torch.Tensor]
    classes: tuple[str, ...]
    module_sources: dict[str, str | None] = field(default_factory=dict)


def _module_state(node, where: str) -> dict:
    state = node.state
    for key in ("_parameters", "_buffers", "_modules"):
        if not isinstance(state.get(key), dict):
            raise ConfigError(f"{where} ({type(node).__name__} {node.class_name}) is not a torch module: "
                              f"its state has no {key} dict")
    return state


def _collect(node, prefix: str, out: dict, classes: list, sources: dict, depth: int = 0) -> None:
    """Flatten a module tree into ``out`` as ``nn.Module.state_dict`` would (parameters, persistent buffers)."""
    where = prefix.rstrip(".") or "the network"
    if depth > MAX_DEPTH:
        raise ConfigError(f"modules nested more than {MAX_DEPTH} deep at {where}")
    if isinstance(node, PersistentRecord):
        classes.append(node.class_name)
        sources.setdefault(node.source_sha256, KNOWN_SOURCES.get(node.source_sha256))
    elif not isinstance(node, ContainerRecord):
        raise ConfigError(f"{where} is a {type(node).__name__}, not a module")
    state = _module_state(node, where)
    skip = state.get("_non_persistent_buffers_set") or set()
    for kind in ("_parameters", "_buffers"):
        for name, value in state[kind].items():
            if value is None or (kind == "_buffers" and name in skip):
                continue
            if not isinstance(value, TensorRef) or not isinstance(value.value, torch.Tensor):
                raise ConfigError(f"{prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + str(name)] = value.value
    for name, child in state["_modules"].items():
        if child is not None:
            _collect(child, f"{prefix}{name}.", out, classes, sources, depth + 1)


def network_parts(record: PersistentRecord, where: str = "the network") -> NetworkParts:
    """(class name, init_kwargs, state_dict, ...) of a persistent network record."""
    from .precond import DEFAULTS, precond_name

    if not isinstance(record, PersistentRecord):
        raise ConfigError(f"{where} is a {type(record).__name__}, not an EDM network")
    precond = precond_name(record.class_name)
    state = _module_state(record, where)
    args, kwargs = state.get("_init_args") or (), state.get("_init_kwargs")
    if kwargs is None:
        raise ConfigError(f"{where} ({record.class_name}) was pickled without its constructor arguments "
                          f"(_record_init_args=False); localdiff cannot rebuild it")
    if not isinstance(args, (tuple, list)) or not isinstance(kwargs, dict):
        raise ConfigError(f"{where} ({record.class_name}) has constructor arguments of types "
                          f"{type(args).__name__} / {type(kwargs).__name__}")
    names = ["img_resolution", "img_channels", "label_dim", "use_fp16", *DEFAULTS[precond]]
    if len(args) > len(names):
        raise ConfigError(f"{record.class_name} given {len(args)} positional arguments; it takes at most {len(names)}")
    init_kwargs = {**dict(zip(names, args)), **kwargs}
    state_dict: dict[str, torch.Tensor] = {}
    classes: list[str] = []
    sources: dict[str, str | None] = {}
    _collect(record, "", state_dict, classes, sources)
    model = state["_modules"].get("model")
    model_type = init_kwargs.get("model_type", DEFAULTS[precond]["model_type"])
    if isinstance(model, PersistentRecord) and model.class_name != model_type:
        raise ConfigError(f"{where}: its model is a {model.class_name} but its arguments say model_type={model_type!r}")
    return NetworkParts(record.class_name, init_kwargs, state_dict, tuple(dict.fromkeys(classes)), sources)


def _plain(value, depth: int = 0):
    """A JSON-able summary of a non-network value (numbers, strings, lists, dicts; others by type name)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth > 8:
        return "..."
    if isinstance(value, dict):
        return {str(k): _plain(v, depth + 1) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_plain(v, depth + 1) for v in value]
    if isinstance(value, TensorRef):
        return f"{type(value.value).__name__}{list(getattr(value.value, 'shape', []))}"
    if isinstance(value, PersistentRecord):
        attrs = {k: _plain(v, depth + 1) for k, v in value.state.items() if not str(k).startswith("_")}
        return {"class_name": value.class_name, "attributes": attrs}
    return type(value).__name__


@dataclass(frozen=True)
class Snapshot:
    """What an EDM pickle holds: its networks by key (``ema``), and a JSON-able summary of everything else
    (``loss_fn``: class and attributes, ``augment_pipe``, ``dataset_kwargs`` ...)."""

    networks: dict[str, NetworkParts]
    other: dict[str, Any]


def read_edm_snapshot(path: str | Path) -> Snapshot:
    """Read an EDM ``.pkl`` (a snapshot dict, or one pickled network) without executing anything in it."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            tree = unpickle_snapshot(f)
    except OSError as exc:
        raise ConfigError(f"cannot read EDM snapshot {path}: {exc}") from exc
    if isinstance(tree, PersistentRecord):
        tree = {"ema": tree}
    if not isinstance(tree, dict):
        raise ConfigError(f"{path} holds a {type(tree).__name__}; an EDM snapshot is a dict with an 'ema' network")
    networks, other = {}, {}
    for key, value in tree.items():
        if isinstance(value, PersistentRecord) and "_modules" in value.state:
            networks[str(key)] = network_parts(value, f"{path.name}[{key!r}]")
        else:
            other[str(key)] = _plain(value)
    if not networks:
        raise ConfigError(f"{path} holds no network (keys: {sorted(map(str, tree))}); an EDM snapshot has 'ema'")
    return Snapshot(networks, other)
