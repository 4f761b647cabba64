"""Datasets: built-in sets, readers for users' files, and synthetic sets with known statistics."""

from .dataset import ImageDataset
from .load import BUILTIN_DATASETS, load_dataset

__all__ = ["ImageDataset", "load_dataset", "BUILTIN_DATASETS"]
