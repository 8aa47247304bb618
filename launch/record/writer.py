"""Rank 0's outputs: resolved config, metrics.jsonl, TensorBoard scalars, summary.json."""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from launch.config.load import Config


def metrics_records(path: str, bad_lines: list[int] | None = None) -> Iterator[dict[str, Any]]:
    """The records (JSON objects) of a metrics.jsonl in order. A line that is not JSON (a killed job's
    last, half-written line) is skipped, its number appended to ``bad_lines``."""
    with open(path, encoding="utf-8", errors="replace") as fh:
        for number, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if bad_lines is not None:
                    bad_lines.append(number)
                continue
            if isinstance(record, dict):
                yield record


def evaluations_after_checkpoint(
    log_dir: str, step: int, history: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """The evaluation of the checkpoint's own step, which ran after the checkpoint was written (so that
    a failing evaluation cannot lose the epoch) and is in metrics.jsonl only."""
    path = os.path.join(log_dir, "metrics.jsonl")
    found: list[dict[str, Any]] = []
    if not os.path.exists(path):
        return []
    for record in metrics_records(path):
        entry = record.get("eval")
        if isinstance(entry, dict) and record.get("step") == step and entry not in history + found:
            found.append(entry)
    return found


def _clean(value):
    """JSON-safe copy: non-finite floats become null, tensors become numbers."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if hasattr(value, "item") and callable(value.item):
        try:
            return _clean(value.item())
        except (ValueError, RuntimeError):
            return str(value)
    return value


class RunOutputs:
    """Everything rank 0 writes into the run folder (``log.dir``). Other ranks get ``None``."""

    def __init__(self, cfg: Config, resume_step: int | None) -> None:
        self.dir = cfg.run_dir
        os.makedirs(self.dir, exist_ok=True)
        with open(os.path.join(self.dir, "config.yaml"), "w", encoding="utf-8") as fh:
            fh.write(cfg.dump())
        self.metrics_path = os.path.join(self.dir, "metrics.jsonl")
        if resume_step is None:
            open(self.metrics_path, "w").close()
        else:
            self._truncate_after(resume_step)
        self.metrics = open(self.metrics_path, "a", encoding="utf-8")
        self.tb = None
        if cfg.log.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(
                os.path.join(self.dir, "tensorboard"), purge_step=(resume_step + 1) if resume_step else None
            )

    def _truncate_after(self, step: int) -> None:
        """On resume drop records of steps after the checkpoint (a crashed run may have logged them)."""
        if not os.path.exists(self.metrics_path):
            return
        keep = []
        with open(self.metrics_path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    entry = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if entry.get("step", 0) <= step:
                    keep.append(line if line.endswith("\n") else line + "\n")
        tmp = self.metrics_path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            fh.writelines(keep)
        os.replace(tmp, self.metrics_path)

    def record(self, entry: dict[str, Any]) -> None:
        """One line per record, flushed at once: a crash loses no record already made."""
        self.metrics.write(json.dumps(_clean(entry)) + "\n")
        self.metrics.flush()

    def flush(self) -> None:
        self.metrics.flush()
        if self.tb is not None:
            self.tb.flush()

    def scalars(self, step: int, values: dict[str, float | None]) -> None:
        if self.tb is None:
            return
        for tag, value in values.items():
            if value is not None:
                self.tb.add_scalar(tag, value, step)

    def summary(self, summary: dict[str, Any]) -> str:
        path = os.path.join(self.dir, "summary.json")
        tmp = path + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(_clean(summary), fh, indent=2)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        self.metrics.close()
        if self.tb is not None:
            self.tb.close()
