"""Datasets: built-in sets, readers for users' files, and synthetic sets with known statistics."""

from .dataset import ImageDataset
from .load import BUILTIN_DATASETS, as_dataset, load_dataset

__all__ = ["ImageDataset", "load_dataset", "as_dataset", "BUILTIN_DATASETS"]
