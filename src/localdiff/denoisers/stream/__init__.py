"""Streaming the training set: the set on the device (:mod:`.training_set`), the mergeable softmax state
(:mod:`.softmax`) and the base of every streamed model (:mod:`.streamed`)."""

from .softmax import Log2SoftmaxState, SoftmaxState, merge
from .streamed import (BLOCK_ELEMENTS, StreamConfig, StreamedDenoiser, StreamOptions, image_blocks,
                       seeded_subset)
from .training_set import ColumnBlocks, TrainingSet

__all__ = ["SoftmaxState", "Log2SoftmaxState", "merge", "StreamConfig", "StreamOptions", "StreamedDenoiser",
           "image_blocks", "seeded_subset", "BLOCK_ELEMENTS", "TrainingSet", "ColumnBlocks"]
