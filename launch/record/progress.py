"""Rank 0's progress report: a tqdm bar on a terminal, a plain line every few seconds elsewhere.

tqdm redraws its bar with carriage returns. Under horovodrun or mpirun each rank's output is prefixed
line by line, so a whole epoch of redraws arrives as one garbled line; in a batch job's log file it is
the same. There a plain line is printed every ``log.progress_every_s`` seconds instead.
"""

from __future__ import annotations

import sys
import time
from typing import TextIO

from tqdm import tqdm

from launch.dist.horovod_setup import under_launcher


def wants_bar(stream: TextIO | None = None) -> bool:
    """A tqdm bar only for a person watching a terminal: stderr is a tty and no launcher is in between."""
    stream = stream if stream is not None else sys.stderr
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty()) and not under_launcher()


class Progress:
    """``update()`` after every step; ``write()`` for a line that must not break the bar."""

    def __init__(self, total_steps: int, done_steps: int, epochs: int, every_s: float, bar: bool):
        self.total, self.epochs, self.every_s = total_steps, epochs, every_s
        self.bar = None
        if bar:
            self.bar = tqdm(
                total=total_steps,
                initial=done_steps,
                unit="step",
                dynamic_ncols=True,
                file=sys.stderr,
                mininterval=1.0,
            )
        self._last_time = time.monotonic()
        self._last_step = done_steps
        self._images = 0

    def update(
        self, step: int, epoch: int, loss: float, lr: float, images: int, mean_interval: float | None
    ) -> None:
        """``epoch``: 1-based; ``images``: images of this step over all ranks. Reads only host values."""
        self._images += images
        if self.bar is not None:
            post = {"epoch": epoch, "loss": f"{loss:.3f}", "lr": f"{lr:.3g}"}
            if mean_interval is not None:
                post["interval"] = f"{mean_interval:.2f}"
            self.bar.set_postfix(post, refresh=False)
            self.bar.update(step - self.bar.n)
            return
        now = time.monotonic()
        if now - self._last_time < self.every_s and step < self.total:
            return
        seconds = max(now - self._last_time, 1e-9)
        steps = max(step - self._last_step, 1)
        line = (
            f"progress: step {step}/{self.total} ({100.0 * step / max(self.total, 1):.0f}%), epoch {epoch}/{self.epochs}, "
            f"loss {loss:.4f}, {self._images / seconds:.1f} images/s, {seconds / steps:.3f} s/step, lr {lr:.4g}"
        )
        if mean_interval is not None:
            line += f", K-FAC mean interval {mean_interval:.2f}"
        print(line, flush=True)
        self._last_time, self._last_step, self._images = now, step, 0

    def write(self, message: str) -> None:
        if self.bar is not None:
            self.bar.write(message)
        else:
            print(message, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
