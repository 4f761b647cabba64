"""U-Net training over the processes of a torchrun job with DistributedDataParallel (docs/DESIGN.md §9).

The recipe is the one-process recipe with the global batch ``P x batch_size``. Every rank draws the whole
global batch (image indices, timesteps, noise, flips) from the same generators and keeps its own rows of
it (``UNetTrainer._mine``), so the data order and the generators advance identically everywhere and one
checkpoint describes every rank; DDP averages the gradients, which is the gradient of the mean loss over
the global batch. A run on P processes therefore equals a one-process run with batch ``P x batch_size``
up to float round-off, when dropout is 0 (dropout masks are drawn per process, from the step's seed mixed
with the rank, so with dropout the runs agree in distribution only). Every rank holds the whole training
set (compact uint8), since a global batch may take any image.

Rank 0 alone writes checkpoints; a checkpoint of a P-process run resumes only on P processes (the global
batch is part of the recipe). Whatever fit() decides from the clock (the ``--minutes`` plan, the
deadline) uses rank 0's clock, and the first Ctrl-C or SIGTERM stops every rank after the same step, so
the ranks always run the same number of steps.
"""

from __future__ import annotations

import contextlib
from pathlib import Path

import torch

from ..distributed import collective, is_main, main_clock, world
from ..errors import ConfigError
from .checkpoints import step_name
from .signals import deferred_signals
from .training import UNetTrainer

_SIGNALS = (None, "SIGINT", "SIGTERM")


class DistributedTrainer(UNetTrainer):
    """:class:`UNetTrainer` on every rank of a torchrun job, the network wrapped in DDP."""

    def __init__(self, data, model_config, train_config=None, schedule=None):
        from torch.nn.parallel import DistributedDataParallel

        from ..schedules import DEFAULT_SCHEDULE

        w = world()
        if not w.active:
            raise ConfigError("DistributedTrainer needs a torchrun job of more than one process; use UNetTrainer")
        super().__init__(data, model_config, train_config, DEFAULT_SCHEDULE if schedule is None else schedule)
        self.rank, self.world_size = w.rank, w.size
        ids = None
        if self.cuda:  # this process's GPU
            ids = [self.device.index if self.device.index is not None else torch.cuda.current_device()]
        with collective("DistributedDataParallel's start (it checks the ranks' parameters)"):
            ddp = DistributedDataParallel(self.model, device_ids=ids)
        self.forward = torch.compile(ddp) if self.config.compile else ddp
        self.clock = main_clock  # decisions taken from the clock are rank 0's
        self._agreed: dict | None = None
        self._raw: dict | None = None

    @property
    def images_per_s(self) -> float | None:
        rate = super().images_per_s
        return None if rate is None else rate * self.world_size  # every process's images

    @contextlib.contextmanager
    def signal_flag(self, enabled: bool):
        """fit() reads a flag the ranks agree on after every step (train_step), not the raw one a signal
        sets, so every rank stops after the same step."""
        with deferred_signals(enabled) as raw:
            self._raw, self._agreed = raw, {"sig": None}
            try:
                yield self._agreed
            finally:
                self._raw = self._agreed = None

    def train_step(self) -> torch.Tensor:
        loss = super().train_step()
        if self._agreed is not None:
            import torch.distributed as dist

            code = torch.tensor([_SIGNALS.index(self._raw["sig"])], dtype=torch.int64)
            with collective("all_reduce of Ctrl-C/SIGTERM"):
                dist.all_reduce(code, op=dist.ReduceOp.MAX)
            self._agreed["sig"] = _SIGNALS[int(code)]
        return loss

    def _flush_losses(self) -> None:
        """The logged loss is the mean over the global batch: the ranks' pending losses are averaged first."""
        if self._pending:
            import torch.distributed as dist

            losses = torch.stack(self._pending)
            with collective("all_reduce of the losses"):
                dist.all_reduce(losses)
            self._pending = list((losses / self.world_size).unbind())
        super()._flush_losses()

    def save_checkpoint(self, root, *, keep: int = 1) -> Path:
        """Rank 0 writes the checkpoint (the state is the same on every rank); the others only note it."""
        self._flush_losses()  # collective: on every rank, before rank 0 writes
        if is_main():
            return super().save_checkpoint(root, keep=keep)
        self._saved_step = self.step
        return Path(root) / step_name(self.step)


def trainer_class() -> type[UNetTrainer]:
    """The trainer for this process: DDP in a torchrun job of more than one process."""
    return DistributedTrainer if world().active else UNetTrainer


__all__ = ["DistributedTrainer", "trainer_class"]
