"""localdiff: analytical diffusion denoisers, sensitivity fields and locality, from data statistics."""

__version__ = "0.1.0"

from .data import ImageDataset, load_dataset
from .denoisers import Denoiser, available_models, make_denoiser
from .diffusion import DEFAULT_SCHEDULE, Schedule, Trajectory, sample
from .sensitivity import sensitivity_fields

__all__ = ["__version__", "ImageDataset", "load_dataset", "Denoiser", "make_denoiser", "available_models",
           "sample", "sensitivity_fields", "Schedule", "DEFAULT_SCHEDULE", "Trajectory"]
