"""What a run says on the console: warnings on stderr tagged with the rank, lines printed by rank 0."""

from __future__ import annotations

import logging
import sys
from typing import Any

# The launcher's warnings (a skipped step, a fault injected); setup_logging gives them the rank.
logger = logging.getLogger("launch")


def setup_logging(rank: int) -> None:
    """Warnings of the launcher and of kfac_hvd (numerics events) on stderr, tagged with the rank."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(levelname)s: rank {rank}: %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.WARNING)


def log0(hvd: Any, *args: object) -> None:
    if hvd.rank() == 0:
        print(*args, flush=True)
