"""Phase timers that tell the truth on CUDA without synchronising the device per phase.

On the CPU a phase is timed with ``time.perf_counter``: the work is done when the call returns. On
CUDA the work is only queued when the call returns, so a phase records a pair of CUDA events and the
elapsed times are read when the caller asks (:meth:`PhaseTimer.collect`), with one synchronisation
at most, on the last event.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch


class PhaseTimer:
    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._pending: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []

    @contextmanager
    def phase(self, name: str, device: torch.device) -> Iterator[None]:
        if device.type == "cuda":
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._pending.append((name, start, end))
            return
        started = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - started)

    def add(self, name: str, seconds: float) -> None:
        self._seconds[name] = self._seconds.get(name, 0.0) + seconds

    def fold_finished(self) -> None:
        """Turn event pairs the device has already passed into seconds (no synchronisation), so that
        a caller who never collects does not accumulate events."""
        while self._pending and self._pending[0][2].query():
            name, start, end = self._pending.pop(0)
            self.add(name, start.elapsed_time(end) / 1e3)

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the last call (then reset); waits for the last recorded event."""
        if self._pending:
            self._pending[-1][2].synchronize()
            for name, start, end in self._pending:
                self.add(name, start.elapsed_time(end) / 1e3)
            self._pending.clear()
        seconds, self._seconds = self._seconds, {}
        return seconds
