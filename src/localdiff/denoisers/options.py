"""Model options: one ``Config`` dataclass per model, with typed fields (``Literal`` choices, int tuples).

Options arrive as Python values (``make_denoiser("masked", data, tile=(2, 4))``) or as the strings of
``--opt key=value`` (``tile=2x4``, ``timesteps=900,500``, ``normalize=sym``, ``top_k=none``); both go
through :func:`coerce`, which converts a string to the field's type and checks every value against
it, so no model validates choices or parses lists by hand.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any, Literal

from ..errors import ConfigError

_NONE = ("none", "null", "")
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")
_INT_SEPARATORS = re.compile(r"[\s,;\[\]()]+")  # "900,500", "[900 500]", "(2, 4)"
_SHAPE = re.compile(r"\s*(\d+)\s*[x×]\s*(\d+)\s*")  # "2x4": rows x columns


def describe(tp) -> str:
    """What a value of type ``tp`` looks like, for error messages."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        parts = [describe(a) for a in args if a is not type(None)]
        return " or ".join(parts) + (" or none" if type(None) in args else "")
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return "integers such as 900,500,100" if args[0] is int else f"a list of {describe(args[0])}"
        return f"{len(args)} integers such as 2x4" if set(args) == {int} else f"a tuple of {len(args)} values"
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string"}.get(tp, str(tp))


def coerce(value: Any, tp) -> Any:
    """``value`` as the type ``tp`` (strings converted); ValueError/TypeError when it is not one."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            if type(None) in args:
                return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg)
            except (TypeError, ValueError):
                continue
        raise ValueError(f"{value!r} is not {describe(tp)}")
    if origin is Literal:
        choice = value.strip() if isinstance(value, str) else value
        if choice not in args:
            raise ValueError(f"{value!r} is not one of {args}")
        return choice
    if origin is tuple:
        return _coerce_tuple(value, args)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
            return value.strip().lower() in _TRUE
        raise ValueError(f"not a boolean: {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise TypeError("bool is not an int")
        if isinstance(value, float) and not value.is_integer():
            raise ValueError(f"not an integer: {value!r}")
        return int(value)
    if tp is float:
        if isinstance(value, bool):
            raise TypeError("bool is not a number")
        return float(value)
    if tp is str:
        return str(value)
    return value


def _coerce_tuple(value: Any, args: tuple) -> tuple:
    if isinstance(value, str) and args == (int, int) and _SHAPE.fullmatch(value):
        parts = list(_SHAPE.fullmatch(value).groups())
    elif isinstance(value, str):
        parts = [p for p in _INT_SEPARATORS.split(value) if p] if int in args else \
            [p.strip() for p in value.split(",") if p.strip()]
    elif isinstance(value, (list, tuple, range)) or (hasattr(value, "__iter__") and not isinstance(value, dict)):
        parts = list(value)
    else:  # a single value for a tuple of any length
        parts = [value]
    if len(args) == 2 and args[1] is Ellipsis:
        if not parts:
            raise ValueError("empty")
        return tuple(coerce(p, args[0]) for p in parts)
    if len(parts) != len(args):
        raise ValueError(f"needs {len(args)} values, got {len(parts)}")
    return tuple(coerce(p, a) for p, a in zip(parts, args))


def parse_options(config_cls: type, options: dict[str, Any], *, model: str) -> Any:
    """Build ``config_cls`` from options, converting strings (from ``--opt key=value``) to field types."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(options) - fields)
    if unknown:
        raise ConfigError(
            f"model '{model}' has no option {', '.join(repr(u) for u in unknown)}; "
            f"its options are: {', '.join(sorted(fields))}"
        )
    return check_config(config_cls(**options), model=model)


def check_config(config: Any, *, model: str) -> Any:
    """``config`` with every field converted to and checked against its declared type (a new instance
    when something changed); ConfigError naming the option and what it must be otherwise."""
    if not dataclasses.is_dataclass(config):
        return config
    hints = typing.get_type_hints(type(config))
    changes = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        try:
            typed = coerce(value, hints[f.name])
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"model '{model}': option {f.name} must be {describe(hints[f.name])}, "
                              f"got {value!r}") from exc
        if typed is not value:
            changes[f.name] = typed
    return dataclasses.replace(config, **changes) if changes else config


__all__ = ["parse_options", "check_config", "coerce", "describe"]
