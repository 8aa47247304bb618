"""Fault injection (the ``debug`` section): rehearse what a real fault does to a job."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from typing import Any

import torch

from launch.record.console import logger


# --------------------------------------------------------------------------------------------------
# Fault injection (the ``debug`` section): rehearse what a real fault does to a job
# --------------------------------------------------------------------------------------------------
class Faults:
    def __init__(self, dcfg: Any, rank: int, size: int) -> None:
        self.rank, self.on = rank, dcfg.fault_rank == rank
        self.nan_step, self.kill_step, self.hang_step = dcfg.nan_step, dcfg.kill_step, dcfg.hang_step
        self.overflow_step = dcfg.overflow_step
        armed = [k for k in ("nan_step", "kill_step", "hang_step", "overflow_step") if dcfg[k] is not None]
        if armed and dcfg.fault_rank >= size:
            logger.warning(
                "debug.fault_rank is %d but there are %d rank(s): no fault is injected", dcfg.fault_rank, size
            )
        elif armed and self.on:
            logger.warning(
                "fault injection armed on this rank: %s", ", ".join(f"debug.{k}={dcfg[k]}" for k in armed)
            )

    def poison(self, step: int, x: torch.Tensor) -> torch.Tensor:
        """The input batch of ``step`` (1-based), with one NaN pixel at debug.nan_step."""
        if self.on and step == self.nan_step:
            logger.warning("debug.nan_step: NaN in the input batch of step %d", step)
            x = x.clone()
            x.view(-1)[0] = float("nan")
        return x

    def overflow(self, step: int, loss: torch.Tensor) -> torch.Tensor:
        """The loss that backward starts from: at debug.overflow_step, times Inf, so every gradient of this
        rank is non-finite while the loss itself (the value the step reports) stays finite, as when fp16
        gradients overflow under too large a loss scale."""
        if self.on and step == self.overflow_step:
            logger.warning("debug.overflow_step: infinite gradients from the finite loss of step %d", step)
            return loss * float("inf")
        return loss

    def hang(self, step: int) -> None:
        if self.on and step == self.hang_step:
            logger.warning("debug.hang_step: this rank stops making progress at step %d", step)
            for h in logging.getLogger().handlers:
                h.flush()
            while True:
                time.sleep(3600)

    def kill(self, step: int) -> None:
        if self.on and step == self.kill_step:
            print(
                f"debug.kill_step: rank {self.rank} sends itself SIGKILL after step {step}",
                file=sys.stderr,
                flush=True,
            )
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
