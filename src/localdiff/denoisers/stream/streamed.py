"""The base of every model computed by streaming the training set (docs/DESIGN.md §8): it owns the
training set on the device, its shard in a torchrun job, and the merge of the ranks' states; a model
writes the state of one block and how the merged state becomes ``x0_hat``.

A streamed model declares its options as a subclass of :class:`StreamOptions` (``chunk``, ``dtype``,
``resident``: one :class:`StreamConfig`), and subclasses :class:`StreamedDenoiser`. The training images
come as ``self.train_set`` (image-major rows, :class:`TrainingSet`; a model may build another layout in
:meth:`StreamedDenoiser.training_set`, as the masked model does with pixel-major columns), and the
model folds block states with :meth:`StreamedDenoiser.fold`, which merges the ranks' states at the end
(:func:`localdiff.distributed.merge_ranks`), so every rank holds the same result. ``rank_input`` marks
what enters a rank's share, so that autograd through the merge counts each shard once.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar, Iterator, Literal, Protocol, TypeVar

import torch

from ...data.dataset import DEFAULT_CHUNK
from ...data.shards import total_images
from ...device import resolve_dtype
from ...distributed import merge_ranks, rank_input
from ...errors import ConfigError
from ..base import Denoiser, DenoiserConfig
from .softmax import merge
from .training_set import TrainingSet

BLOCK_ELEMENTS = 1 << 20  # default bound on a block's largest temporary (about cache-sized: speed depends on it)


class Mergeable(Protocol):
    def merge(self, other): ...


S = TypeVar("S", bound=Mergeable)


@dataclass(frozen=True)
class StreamConfig:
    """How a model streams the training set: images per chunk (None: the model chooses), arithmetic, and
    whether the float copy is kept on the device (None: if it fits)."""

    chunk: int | None = DEFAULT_CHUNK
    dtype: torch.dtype = torch.float64
    resident: bool | None = None

    def __post_init__(self):
        if self.chunk is not None and int(self.chunk) < 1:
            raise ConfigError(f"chunk must be a positive number of images, got {self.chunk}")


@dataclass
class StreamOptions(DenoiserConfig):
    """The options of every streamed model (a model may change their defaults)."""

    chunk: int = DEFAULT_CHUNK  # training images per streamed chunk (the result does not depend on it)
    dtype: Literal["float32", "float64"] = "float64"  # arithmetic of the streamed products
    resident: bool | None = None  # keep the float training set on the device (default: if it fits)

    def stream(self) -> StreamConfig:
        return StreamConfig(chunk=self.chunk, dtype=resolve_dtype(self.dtype), resident=self.resident)


def seeded_subset(data, max_train: int | None, seed: int, name: str):
    """``data`` or its seeded subset of ``max_train`` images (the whole set's subset under torchrun)."""
    if max_train is None:
        return data
    if max_train < 1:
        raise ConfigError(f"{name}: max_train must be a positive number of images or None, got {max_train}")
    return data if total_images(data) <= max_train else data.subset(max_train, seed=seed)


def image_blocks(y: torch.Tensor, per_image: int, block: int) -> Iterator[torch.Tensor]:
    """Split a chunk of training images ``y`` [k, ...] into blocks whose temporaries hold at most about
    ``block`` elements when each image needs ``per_image`` of them."""
    k = max(1, block // max(1, per_image))
    for s in range(0, y.shape[0], k):
        yield y[s:s + k]


class StreamedDenoiser(Denoiser):
    """A denoiser computed from the training set streamed in blocks (module docstring).

    Subclasses set ``Config`` (a :class:`StreamOptions`), may override :meth:`training_data` (e.g. a
    seeded subset) and :meth:`training_set` (another layout), and compute with :meth:`fold`,
    :meth:`images` and :meth:`merge_ranks`.
    """

    Config: ClassVar[type] = StreamOptions

    def __init__(self, data, config, schedule=None):
        super().__init__(data.shape, config, schedule)
        self.validate()
        self.stream_config = self.stream_options()
        self.dtype = self.stream_config.dtype
        self.num_data = total_images(data)  # images of the whole set given (before any subset)
        self.train_set = self.training_set(self.training_data(data))

    # -- what a model may override ------------------------------------------------------------------
    def validate(self) -> None:
        """Check the options (``self.config``, typed) before anything is built; ConfigError if wrong."""

    def stream_options(self) -> StreamConfig:
        """The model's :class:`StreamConfig` (default: from its ``StreamOptions``)."""
        return self.config.stream()

    def training_data(self, data):
        """The images this model streams (default: all of ``data``)."""
        return data

    def training_set(self, data):
        """The training set on the device, image-major (:class:`TrainingSet`)."""
        c = self.stream_config
        return TrainingSet(data, device=self.device, dtype=c.dtype, chunk=c.chunk, resident=c.resident)

    # -- what a model computes with -----------------------------------------------------------------
    @property
    def shard(self):
        """This rank's shard of the training set (None outside a torchrun job)."""
        return self.train_set.shard

    @property
    def total(self) -> int:
        """Images in the whole (streamed) training set, over every rank."""
        return self.train_set.total

    def rank_input(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` as the input of this rank's share (see :func:`localdiff.distributed.rank_input`)."""
        return rank_input(x, self.shard)

    def merge_ranks(self, state: S) -> S:
        """The whole set's state from every rank's state of its shard (identity in one process)."""
        return merge_ranks(state, self.shard)

    def fold(self, block_state: Callable[[int, torch.Tensor, torch.Tensor], S]) -> S:
        """``block_state(start, Y [k, n], ||Y||^2 [k])`` over the training set, merged block by block and
        then over the ranks."""
        state = None
        for start, y, y_sq in self.train_set:
            state = merge(state, block_state(start, y, y_sq))
        return self.merge_ranks(state)

    def images(self, per_image: int | None = None, block: int = BLOCK_ELEMENTS) -> Iterator[torch.Tensor]:
        """The training images as blocks [k, C, H, W]; with ``per_image``, blocks small enough that
        temporaries of ``per_image`` elements per image stay within about ``block`` elements."""
        for _, y, _ in self.train_set:
            y = y.view(y.shape[0], *self.shape)
            if per_image is None:
                yield y
            else:
                yield from image_blocks(y, per_image, block)


__all__ = ["StreamConfig", "StreamOptions", "StreamedDenoiser", "seeded_subset", "image_blocks", "BLOCK_ELEMENTS"]
