"""The one denoiser interface ``(x_t, t) -> x0_hat`` shared by every model, and its registry."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from typing import Any, ClassVar, Iterator

import torch

from ..diffusion import DEFAULT_SCHEDULE, Schedule
from ..errors import ConfigError
from ..finite import check_finite_input, check_finite_output

REGISTRY: dict[str, type["Denoiser"]] = {}

DTYPES = {"float32": torch.float32, "float64": torch.float64}


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


def resolve_dtype(name: str) -> torch.dtype:
    if name not in DTYPES:
        raise ConfigError(f"unknown dtype '{name}': choose one of {', '.join(DTYPES)}")
    return DTYPES[name]


@dataclass
class DenoiserConfig:
    """Options every denoiser accepts."""

    device: str = "auto"


class Denoiser:
    """A map ``(x_t [B,C,H,W], t) -> x0_hat [B,C,H,W]``, the posterior-mean estimate of the clean image.

    Subclasses implement :meth:`denoise` on a validated input (float tensor on ``self.device``, int t)
    and declare their options as a ``Config`` dataclass; :func:`make_denoiser` builds them by name.
    """

    name: ClassVar[str] = "denoiser"
    Config: ClassVar[type] = DenoiserConfig

    def __init__(self, shape: tuple[int, int, int], config: Any, schedule: Schedule | None = None):
        self.shape = tuple(int(s) for s in shape)
        self.config = config
        self.schedule = schedule if schedule is not None else DEFAULT_SCHEDULE
        self.device = resolve_device(getattr(config, "device", None))

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def __call__(self, x_t: torch.Tensor, t) -> torch.Tensor:
        t = self.schedule.check_t(t)
        if not isinstance(x_t, torch.Tensor):
            raise ConfigError(f"x_t must be a torch.Tensor of shape [B, {', '.join(map(str, self.shape))}]")
        if x_t.ndim != 4 or tuple(x_t.shape[1:]) != self.shape:
            raise ConfigError(
                f"{self.name}: x_t must have shape [B, {', '.join(map(str, self.shape))}], got {tuple(x_t.shape)}"
            )
        if not x_t.is_floating_point():
            raise ConfigError(f"{self.name}: x_t must be a floating-point tensor, got {x_t.dtype}")
        check_finite_input(self.name, x_t)
        out = self.denoise(x_t.to(self.device), t)
        check_finite_output(self.name, out, x_t, t)
        return out.to(dtype=x_t.dtype, device=x_t.device)

    def denoise(self, x_t: torch.Tensor, t: int) -> torch.Tensor:  # pragma: no cover - interface
        raise NotImplementedError

    def settings(self) -> dict:
        """The options this denoiser was built with (for run records)."""
        out = dataclasses.asdict(self.config) if dataclasses.is_dataclass(self.config) else {}
        out["device"] = str(self.device)
        return {"model": self.name, **out}


def register(name: str):
    """Class decorator: make a Denoiser subclass constructible as ``make_denoiser(name, ...)``."""

    def deco(cls):
        cls.name = name
        REGISTRY[name] = cls
        return cls

    return deco


def parse_options(config_cls: type, options: dict[str, Any], *, model: str) -> Any:
    """Build ``config_cls`` from options, converting strings (from ``--opt key=value``) to field types."""
    fields = {f.name: f for f in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    unknown = sorted(set(options) - set(fields))
    if unknown:
        raise ConfigError(
            f"model '{model}' has no option {', '.join(repr(u) for u in unknown)}; "
            f"its options are: {', '.join(sorted(fields))}"
        )
    values = {}
    for key, value in options.items():
        try:
            values[key] = _coerce(value, hints[key])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model '{model}': option {key}={value!r} is not a valid {_type_name(hints[key])}") from exc
    return config_cls(**values)


def _type_name(tp) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp) -> Any:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None or (isinstance(value, str) and value.lower() in ("none", "null", "")):
            if type(None) in args:
                return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg)
            except (TypeError, ValueError) as exc:
                errors.append(exc)
        raise ValueError(f"{value!r} matches none of {args}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on"):
            return True
        if isinstance(value, str) and value.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"not a boolean: {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("bool is not an int")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    if tp is float:
        return float(value)
    if tp is str:
        return str(value)
    return value


class TrainingSet:
    """The training images as flat rows ``[k, n]`` on the compute device, streamed chunk by chunk.

    Resident by default when the float copy fits in ``max_resident_bytes`` (keeping the set on the
    device is the first win on a GPU); otherwise each pass converts chunks from the compact source.
    Squared norms ``||y_k||^2`` are computed once per chunk and reused.
    """

    def __init__(self, data, *, device: torch.device, dtype: torch.dtype, chunk: int = 4096,
                 resident: bool | None = None, max_resident_bytes: int = 4 << 30):
        if chunk < 1:
            raise ConfigError(f"chunk must be a positive number of images, got {chunk}")
        self.data, self.device, self.dtype, self.chunk = data, device, dtype, int(chunk)
        bytes_needed = len(data) * data.dim * torch.finfo(dtype).bits // 8
        self.resident = bytes_needed <= max_resident_bytes if resident is None else bool(resident)
        self._cache: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        if self.resident:
            self._cache = [(y, (y * y).sum(dim=1)) for y in self._convert()]

    def __len__(self) -> int:
        return len(self.data)

    def _convert(self) -> Iterator[torch.Tensor]:
        return self.data.chunks(self.chunk, device=self.device, dtype=self.dtype, flat=True)

    def __iter__(self) -> Iterator[tuple[int, torch.Tensor, torch.Tensor]]:
        """Yield ``(start, Y [k, n], ||Y||^2 [k])`` over the whole set."""
        start = 0
        if self._cache is not None:
            for y, y_sq in self._cache:
                yield start, y, y_sq
                start += y.shape[0]
        else:
            for y in self._convert():
                yield start, y, (y * y).sum(dim=1)
                start += y.shape[0]

    def rows(self, index: torch.Tensor) -> torch.Tensor:
        """Training images ``[*index.shape, n]`` by index."""
        flat = index.reshape(-1).cpu().numpy()
        raw = self.data.raw[flat]
        from ..data.dataset import _to_float

        y = _to_float(raw, device=self.device, dtype=self.dtype).reshape(len(flat), -1)
        return y.reshape(*index.shape, -1)
