"""Every denoiser behind one interface ``(x_t, t) -> x0_hat``, constructed by name."""

from __future__ import annotations

import warnings

from ..data.shards import shard_of
from ..schedules import DEFAULT_SCHEDULE, NoiseSchedule
from ..errors import ConfigError
from .base import Capabilities, Denoiser, DenoiserConfig
from .options import parse_options
from .registry import MODELS, REGISTRY, RENAMED, register_model


def make_denoiser(name: str, data=None, *, schedule: NoiseSchedule = DEFAULT_SCHEDULE, spectrum=None,
                  **options) -> Denoiser:
    """Build the denoiser ``name`` fitted on ``data``; ``options`` are its Config fields (strings allowed).

    ``data`` is an :class:`~localdiff.data.ImageDataset`, a built-in name or path, or images held in memory
    (a numpy array or torch tensor ``[N, C, H, W]``, uint8 0..255 or floats in [0, 1], the convention of
    files; see :func:`localdiff.data.as_dataset`).

    ``spectrum`` (a :class:`localdiff.stats.Spectrum` of ``data``, e.g. from ``data_spectrum``) hands the
    data's statistics to the models that read them (``uses_statistics``: wiener, masked, linear) instead
    of each one reading them from the cache; the other models ignore it.
    """
    if name in RENAMED and name not in REGISTRY:
        warnings.warn(f"model '{name}' is now called '{RENAMED[name]}'", DeprecationWarning, stacklevel=2)
        name = RENAMED[name]
    if name not in REGISTRY:
        raise ConfigError(f"unknown model '{name}'; available models: {', '.join(sorted(REGISTRY))}")
    if not isinstance(schedule, NoiseSchedule):
        raise ConfigError(f"schedule must be a localdiff Schedule (the noise schedule), got {type(schedule).__name__}; "
                          "a patch-size schedule file is the option patch_schedule")
    cls = REGISTRY[name]
    config = parse_options(cls.Config, options, model=name)
    if data is None:
        raise ConfigError(f"model '{name}' needs a dataset: make_denoiser('{name}', load_dataset(...))")
    from ..data import as_dataset

    data = as_dataset(data, what=f"the data of model '{name}'")
    if shard_of(data) is not None and not cls.takes_shards():  # a torchrun job: this model needs every image
        warnings.warn(f"model '{name}' does not merge the states of the processes: each of them builds it on the "
                      "whole training set, gathered from the shards", RuntimeWarning, stacklevel=2)
        data = data.gathered()
    if spectrum is None or not cls.uses_statistics:
        return cls(data, config, schedule)
    fingerprint = getattr(data, "fingerprint", "")
    if spectrum.fingerprint and fingerprint and spectrum.fingerprint != fingerprint:
        raise ConfigError(f"model '{name}': the statistics given were computed on other data than the training set "
                          f"({spectrum.fingerprint[:12]} vs {fingerprint[:12]})")
    if spectrum.dim != data.dim:
        raise ConfigError(f"model '{name}': statistics of {spectrum.dim} pixels for images of {data.dim}")
    return cls(data, config, schedule, spectrum=spectrum)


def available_models() -> list[str]:
    """Every registered model name, sorted."""
    return sorted(REGISTRY)


__all__ = ["Capabilities", "Denoiser", "DenoiserConfig", "make_denoiser", "available_models", "register_model",
           "REGISTRY", "MODELS"]
