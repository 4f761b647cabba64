"""Every denoiser behind one interface ``(x_t, t) -> x0_hat``, constructed by name."""

from __future__ import annotations

from ..diffusion import DEFAULT_SCHEDULE, Schedule
from ..errors import ConfigError
from .base import REGISTRY, Denoiser, parse_options, register
from . import empirical, linear  # noqa: F401  (registers wiener, optimal, nearest)
from . import trained_linear  # noqa: F401  (registers linear)
from . import patches  # noqa: F401  (registers ls, els, els-boundary, pspc, scfdm)
from . import unet  # noqa: F401  (registers unet; diffusers is imported on use)
from . import local  # noqa: F401  (registers masked)


def make_denoiser(name: str, data=None, *, schedule: Schedule = DEFAULT_SCHEDULE, **options) -> Denoiser:
    """Build the denoiser ``name`` fitted on ``data``; ``options`` are its Config fields (strings allowed)."""
    if name not in REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available models: {', '.join(sorted(REGISTRY))}")
    if not isinstance(schedule, Schedule):
        raise ConfigError(f"schedule must be a localdiff Schedule (the noise schedule), got {type(schedule).__name__}; "
                          "a patch-size schedule file is the option patch_schedule")
    cls = REGISTRY[name]
    config = parse_options(cls.Config, options, model=name)
    if data is None:
        raise ConfigError(f"model '{name}' needs a dataset: make_denoiser('{name}', load_dataset(...))")
    return cls(data, config, schedule)


def available_models() -> list[str]:
    return sorted(REGISTRY)


__all__ = ["Denoiser", "make_denoiser", "available_models", "register", "REGISTRY"]
