"""Step times that tell the truth on a GPU without synchronising on every step.

On CUDA a step's host time says when its kernels were queued, not when they ran. :class:`StepTimer`
records a CUDA event at the start and the end of each step instead and reads them only when asked
(on logged steps and at the end of an epoch): one wait for the newest event, after which every older
event is complete. On the CPU it reads the wall clock.
"""

from __future__ import annotations

import time
from typing import Union, cast

import torch

Mark = Union[float, "torch.cuda.Event"]


class StepTimer:
    """``start()`` and ``stop()`` around each step; ``take()`` returns the pending steps' seconds."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self._open: Mark | None = None
        self._pending: list[tuple[Mark, Mark]] = []

    def _mark(self) -> Mark:
        if not self.cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record()
        return event

    def start(self) -> None:
        self._open = self._mark()

    def stop(self) -> None:
        if self._open is None:
            raise RuntimeError("StepTimer.stop() without start()")
        self._pending.append((self._open, self._mark()))
        self._open = None

    def take(self) -> list[float]:
        """Seconds of each step stopped since the last call, oldest first (CUDA: waits once)."""
        pending, self._pending = self._pending, []
        if not pending:
            return []
        # Every mark is of one kind, which self.cuda decides.
        if not self.cuda:
            return [end - begin for begin, end in cast(list[tuple[float, float]], pending)]
        events = cast(list[tuple[torch.cuda.Event, torch.cuda.Event]], pending)
        events[-1][1].synchronize()
        return [begin.elapsed_time(end) / 1000.0 for begin, end in events]
