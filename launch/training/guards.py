"""Guards of a training run: the watchdog, the buffers kept against a skipped step, finiteness."""

from __future__ import annotations

import os
import threading
import time
from typing import TYPE_CHECKING, Any

import torch

from launch.errors import EXIT_ABORTED

if TYPE_CHECKING:
    pass


# --------------------------------------------------------------------------------------------------
# Watchdog: a rank that makes no progress exits instead of hanging the job
# --------------------------------------------------------------------------------------------------
class Watchdog:
    """A daemon thread that ends the process (exit code 3) when ``beat`` is not called for ``timeout`` s.

    The training loop beats on every step, evaluation batch and checkpoint, so the timeout bounds a
    rank blocked in a collective whose peer has stopped (or a rank that deadlocked itself); the
    launcher (horovodrun, mpirun) then ends the other ranks.
    """

    def __init__(self, timeout: float | None, rank: int):
        self.timeout, self.rank = timeout, rank
        self.last, self.what = time.monotonic(), "start-up"
        self._stop = threading.Event()
        self._thread = None
        if timeout:
            self._thread = threading.Thread(
                target=self._watch, args=(timeout,), name="launch-watchdog", daemon=True
            )
            self._thread.start()

    def beat(self, what: str) -> None:
        self.last, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self, timeout: float) -> None:
        poll = min(5.0, max(0.05, timeout / 10))
        while not self._stop.wait(poll):
            idle = time.monotonic() - self.last
            if idle > timeout:
                msg = (
                    f"error: rank {self.rank}: no progress for {idle:.0f} s (train.watchdog_s = "
                    f"{timeout:g}) since {self.what}; a rank died, hung or stopped answering. "
                    f"Exiting with code {EXIT_ABORTED} so the job ends instead of hanging.\n"
                )
                try:
                    os.write(2, msg.encode())
                finally:
                    os._exit(EXIT_ABORTED)


# --------------------------------------------------------------------------------------------------
# Non-finite steps
# --------------------------------------------------------------------------------------------------
class BufferGuard:
    """Copies of the model's buffers (BatchNorm running statistics) from before the forward pass.

    A batch with NaN inputs poisons the running statistics during the forward pass already; a skipped
    step puts them back.
    """

    def __init__(self, model: torch.nn.Module):
        self.groups: dict[tuple[Any, Any], tuple[list[torch.Tensor], list[torch.Tensor]]] = {}
        for buf in model.buffers():
            live, saved = self.groups.setdefault((buf.device, buf.dtype), ([], []))
            live.append(buf)
            saved.append(buf.detach().clone())

    @torch.no_grad()
    def save(self) -> None:
        for live, saved in self.groups.values():
            _copy(saved, live)

    @torch.no_grad()
    def restore(self) -> None:
        for live, saved in self.groups.values():
            _copy(live, saved)


def _copy(dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    if hasattr(torch, "_foreach_copy_"):
        torch._foreach_copy_(dst, src)
    else:  # pragma: no cover - older torch
        for d, s in zip(dst, src):
            d.copy_(s)


def all_finite(tensors: list[torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device synchronisation)."""
    tensors = [t for t in tensors if t is not None]
    if not tensors:
        return True
    return bool(torch.stack([torch.isfinite(t).all() for t in tensors]).all())
