"""The one table of per-model test options: what the contract (``test_contract.py``, on the CPU and, where
there is one, on a CUDA device), the two-process comparison (``test_distributed.py`` and the torchrun
worker ``distributed_worker.py``) and the level-invariance test (``test_levels_and_samplers.py``) build.

Every registered model is covered without being listed: a model missing from :data:`TABLE` is tested
with its defaults, as one variant named after it (``test_contract.py`` fails, naming this file, when
building such a model with its defaults takes too long to be practical). An entry gives the model's
fast options (fewer SGD steps, smaller patches, fewer Monte Carlo draws; the same mathematics) and the
variants worth testing beside them: another arithmetic, an approximation, another mode. A variant says
what its options change in what the model declares (``declares``: the instance's ``Capabilities`` fields
that differ from its class's) and whether it runs under torchrun at all; which Jacobian rows are
compared between one and two processes follows from what the built model declares (closed-form rows
where ``closed_form_jacobian``, autograd rows unless ``piecewise_constant``), unless the entry turns
autograd off for speed.

The models the tests add the way a user does (one new file and ``register_model(cls)``) are in
:data:`ADDED`; :func:`added_models` registers them for as long as a test module needs them and leaves
the registry as it found it, so the other tests see localdiff's own models only.

This module is imported by the tests and by the worker, which torchrun starts from this directory.
"""

from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

from localdiff.denoisers import REGISTRY, register_model

from toy_model import ToyDenoiser

UNET = "<tiny unet>"  # an option value the tests replace by the directory of a tiny network of their own
ADDED = (ToyDenoiser,)  # models added the way a user adds one (tests/toy_model.py), not in localdiff's registry


@dataclass(frozen=True)
class Variant:
    """One way of building a model for the tests: ``make_denoiser(model, data, **options)``."""

    label: str  # the test id and the prefix of its results: the model's name, or "name.what" for a variant
    model: str
    options: dict = field(default_factory=dict)  # the entry's fast options, updated by the variant's own
    declares: dict = field(default_factory=dict)  # Capabilities fields the options change from the class's
    autograd: bool = True  # compare autograd Jacobian rows on two processes (when not piecewise constant)
    trajectory: bool = False  # compare a 10-step DDIM trajectory on two processes (where it takes every level)
    torchrun: bool = True  # False: it refuses a shard of the training set (a ConfigError) by design

    def build_options(self, unet_dir=None) -> dict:
        """The options with :data:`UNET` replaced by ``unet_dir``."""
        return {k: (str(unet_dir) if v == UNET else v) for k, v in self.options.items()}

    @property
    def dtype(self) -> str:
        """The arithmetic it computes in: its ``dtype`` option, else its Config's default (else float64)."""
        if "dtype" in self.options:
            return str(self.options["dtype"])
        fields = {f.name: f.default for f in dataclasses.fields(model_class(self.model).Config)}
        return str(fields.get("dtype", "float64"))


@dataclass(frozen=True)
class Entry:
    """A model's fast options and its variants (name suffix -> options and what they change)."""

    fast: dict = field(default_factory=dict)
    trajectory: bool = True  # the default variant's two-process DDIM trajectory (not for fitted timesteps)
    autograd: bool = True
    declares: dict = field(default_factory=dict)  # what the fast options change in the capabilities
    variants: dict[str, dict] = field(default_factory=dict)  # suffix -> {"options": ..., "declares": ..., ...}


LINEAR_TIMESTEPS = (999, 900, 500, 100, 0)  # both ends (the contract) and the levels test's 900, 500, 100
PATCH = {"patch_size": 3}

TABLE: dict[str, Entry] = {
    "wiener": Entry(),
    "optimal": Entry(variants={
        "float32": {"options": {"dtype": "float32"}},
        "top_k": {"options": {"top_k": 5}, "declares": {"closed_form_jacobian": False}},
    }),
    "nearest": Entry(),
    "masked": Entry(variants={  # float32 products by default
        "float64": {"options": {"dtype": "float64"}},
        "dense": {"options": {"dtype": "float64", "path": "dense"}},
        "chunk_average": {"options": {"chunk_average": 8}, "declares": {"closed_form_jacobian": False},
                          "torchrun": False},  # the official chunk-normalised softmax depends on the blocks
    }),
    "masked-soft": Entry(variants={"float64": {"options": {"dtype": "float64"}}}),
    "ls": Entry(fast=PATCH),
    "els": Entry(fast=PATCH, variants={
        "float64": {"options": {"dtype": "float64"}},
        "subset": {"options": {"dtype": "float64", "max_train": 20}},
    }),
    "els-boundary": Entry(fast=PATCH, variants={"float64": {"options": {"dtype": "float64"}}}),
    "masked-equivariant": Entry(variants={"float64": {"options": {"dtype": "float64"}}}),
    "wiener-quadratic": Entry(),
    "pspc": Entry(fast=PATCH),
    "scfdm": Entry(fast={"num_samples": 4}, variants={
        "data": {"options": {"smoothing": "data", "sigma": 0.2}, "declares": {"single_image_exact": False}},
        "nearest_k": {"options": {"nearest_k": 5}, "declares": {"closed_form_jacobian": False}},
    }),
    "linear": Entry(fast={"steps": 40, "batch_size": 16, "timesteps": LINEAR_TIMESTEPS, "progress": False},
                    declares={"fitted_timesteps": LINEAR_TIMESTEPS}),
    "unet": Entry(fast={"path": UNET}),
}


def model_class(name: str):
    """The class of a registered or added model."""
    if name in REGISTRY:
        return REGISTRY[name]
    for cls in ADDED:
        if cls.name == name:
            return cls
    raise KeyError(f"no model '{name}' is registered or added by the tests")


def model_names() -> list[str]:
    """Every model the tests cover: localdiff's registry (with whatever else is registered now) and
    :data:`ADDED`, in registration order."""
    names = list(REGISTRY)
    return names + [cls.name for cls in ADDED if cls.name not in names]


def variants_of(name: str) -> list[Variant]:
    """The model's default variant (its fast options) and the entry's others; defaults when not in TABLE."""
    entry = TABLE.get(name, Entry())
    out = [Variant(name, name, dict(entry.fast), dict(entry.declares), entry.autograd, entry.trajectory)]
    for suffix, spec in entry.variants.items():
        unknown = set(spec) - {"options", "declares", "autograd", "trajectory", "torchrun"}
        if unknown:
            raise KeyError(f"model_table: variant {name}.{suffix} has unknown keys {sorted(unknown)}")
        out.append(Variant(f"{name}.{suffix}", name, {**entry.fast, **spec.get("options", {})},
                           {**entry.declares, **spec.get("declares", {})}, spec.get("autograd", entry.autograd),
                           spec.get("trajectory", False), spec.get("torchrun", True)))
    return out


def variants() -> list[Variant]:
    """Every variant of every covered model (:func:`model_names`)."""
    return [v for name in model_names() for v in variants_of(name)]


def labels(where: str = "contract") -> list[str]:
    """Variant labels for parametrising tests: every one (``contract``) or those that run under torchrun."""
    return [v.label for v in variants() if where == "contract" or v.torchrun]


def variant(label: str) -> Variant:
    return next(v for v in variants() if v.label == label)


@contextmanager
def added_models() -> Iterator[None]:
    """:data:`ADDED` registered as a user registers a model, for the duration; the registry is then left as
    it was found (a model registered for good would change what every other test sees)."""
    new = [cls for cls in ADDED if REGISTRY.get(cls.name) is not cls]
    for cls in new:
        register_model(cls)
    try:
        yield
    finally:
        for cls in new:
            REGISTRY.pop(cls.name, None)
