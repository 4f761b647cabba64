"""Every model localdiff builds by name, in one list: adding a model is one new file (a ``Denoiser``
subclass with a ``name``) and one line here. The order is the order in which the study runs "every
analytical model"."""

from __future__ import annotations

from .base import Denoiser
from .empirical import NearestDenoiser, OptimalDenoiser
from .linear import TrainedLinearDenoiser
from .masked import MaskedDenoiser, MaskedEquivariantDenoiser, MaskedSoftDenoiser
from .patches import BoundaryELSDenoiser, ELSDenoiser, LSDenoiser, PSPCDenoiser
from .scfdm import SmoothedClosedFormDenoiser
from .unet import UNetDenoiser
from .wiener import WienerDenoiser
from .wiener_quadratic import WienerQuadraticDenoiser

MODELS: tuple[type[Denoiser], ...] = (
    WienerDenoiser,  # wiener
    OptimalDenoiser,  # optimal
    NearestDenoiser,  # nearest
    MaskedDenoiser,  # masked (the paper's model)
    MaskedSoftDenoiser,  # masked-soft
    LSDenoiser,  # ls
    ELSDenoiser,  # els
    BoundaryELSDenoiser,  # els-boundary
    MaskedEquivariantDenoiser,  # masked-equivariant
    WienerQuadraticDenoiser,  # wiener-quadratic
    PSPCDenoiser,  # pspc
    SmoothedClosedFormDenoiser,  # scfdm
    TrainedLinearDenoiser,  # linear
    UNetDenoiser,  # unet (diffusers is imported on use)
)
RENAMED = {"masked-quadratic": "wiener-quadratic"}  # old names still accepted, with a warning

REGISTRY: dict[str, type[Denoiser]] = {}


def register_model(cls: type[Denoiser]) -> type[Denoiser]:
    """Make ``cls`` buildable by its ``name`` (what a line of :data:`MODELS` does; for models defined
    outside localdiff, e.g. in a test or a user's script). A name already taken is an error."""
    name = cls.__dict__.get("name")
    if not isinstance(name, str) or not name:
        raise TypeError(f"{cls.__name__} must declare its model name as a class attribute `name = ...`")
    if name in REGISTRY and REGISTRY[name] is not cls:
        raise ValueError(f"model name '{name}' is taken by {REGISTRY[name].__name__}")
    REGISTRY[name] = cls
    return cls


for _cls in MODELS:
    register_model(_cls)

__all__ = ["MODELS", "REGISTRY", "RENAMED", "register_model"]
