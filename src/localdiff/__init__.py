"""localdiff: analytical diffusion denoisers, sensitivity fields and locality, from data statistics."""

__version__ = "0.1.0"

from .data import ImageDataset, load_dataset
from .denoisers import Capabilities, Denoiser, available_models, make_denoiser
from .diffusion import Trajectory, sample
from .metrics import r2_score
from .probing import probe
from .schedules import DEFAULT_SCHEDULE, ContinuousSchedule, NoiseLevel, Schedule, add_noise, schedule_named
from .sensitivity import sensitivity_fields
from .stats import data_spectrum

__all__ = ["__version__", "ImageDataset", "load_dataset", "Denoiser", "Capabilities", "make_denoiser",
           "available_models", "sample", "sensitivity_fields", "data_spectrum", "r2_score", "Schedule",
           "ContinuousSchedule", "NoiseLevel", "schedule_named", "add_noise", "DEFAULT_SCHEDULE", "Trajectory",
           "probe"]
