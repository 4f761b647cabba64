"""The U-Net baseline: architectures (``configs``), training with exact resume (``training``).

The trained network is used as a denoiser through ``make_denoiser("unet", data, path=DIR)``
(:mod:`localdiff.denoisers.unet`). diffusers is imported only when a network is built or loaded.
"""

from .configs import (CONFIG_NAMES, PAPER_28, PAPER_32, SMALL, TRAIN_RECIPES, TrainConfig, UNetConfig, build_unet,
                      unet_config)
from .training import (MANIFEST_NAME, DataOrder, TrainingInterrupted, UNetTrainer, find_checkpoint,
                       list_checkpoints)

__all__ = ["UNetConfig", "TrainConfig", "PAPER_28", "PAPER_32", "SMALL", "TRAIN_RECIPES", "CONFIG_NAMES",
           "unet_config", "build_unet", "UNetTrainer", "TrainingInterrupted", "DataOrder", "find_checkpoint",
           "list_checkpoints", "MANIFEST_NAME"]
