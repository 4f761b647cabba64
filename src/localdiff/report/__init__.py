"""Figures and pages for people: image grids now; plots and the HTML report build on these."""

from .grid import image_grid, save_grid

__all__ = ["image_grid", "save_grid"]
