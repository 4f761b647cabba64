"""Ctrl-C and SIGTERM during training: the first one is deferred to the end of the current step (which is
then checkpointed); a second Ctrl-C aborts at once."""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path


class TrainingInterrupted(KeyboardInterrupt):
    """Raised by :meth:`UNetTrainer.fit` after Ctrl-C / SIGTERM, once the current step is checkpointed."""

    def __init__(self, step: int, checkpoint: Path | None, signame: str):
        super().__init__(f"training interrupted by {signame} at step {step}")
        self.step, self.checkpoint, self.signame = step, checkpoint, signame


@contextlib.contextmanager
def deferred_signals(enabled: bool):
    """Turn the first SIGINT/SIGTERM into a flag checked between steps; a second Ctrl-C aborts at once."""
    flag: dict[str, str | None] = {"sig": None}
    if not enabled or threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}

    def handler(signum, frame):
        if flag["sig"] is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        flag["sig"] = signal.Signals(signum).name

    try:
        for s in previous:
            signal.signal(s, handler)
        yield flag
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
