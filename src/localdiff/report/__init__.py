"""Figures and pages for people: image grids, matplotlib figures and the self-contained HTML report."""

from .grid import image_grid, save_grid

__all__ = ["image_grid", "save_grid"]
