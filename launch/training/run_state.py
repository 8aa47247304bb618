"""What a training run holds: :class:`Run` (fixed once set up) and :class:`RunState` (what it has done)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from kfac_hvd import KFAC
from launch.config.load import Config
from launch.record.progress import Progress
from launch.record.writer import RunOutputs
from launch.store.snapshot import StatePiece, training_pieces
from launch.training.guards import Watchdog
from launch.training.step import Trainer
from launch.training.step_timer import StepTimer


@dataclass
class Run:
    """What stays fixed during a run (built by :func:`set_up`)."""

    cfg: Config
    hvd: Any
    device: torch.device
    trainer: Trainer
    train_loader: Any
    val_loader: Any
    sampler: Any
    steps_per_epoch: int
    total_steps: int
    timer: StepTimer
    out: RunOutputs | None = None  # rank 0's outputs, once the run has resumed or started
    watchdog: Watchdog = field(default_factory=lambda: Watchdog(None, 0))  # silent until run() starts one
    progress: Progress | None = None

    @property
    def kfac(self) -> KFAC | None:
        return self.trainer.kfac


@dataclass
class RunState:
    """What a run has done so far (what a checkpoint restores, plus this process's tallies)."""

    step: int = 0
    epoch: int = 0
    skip_batches: int = 0
    history: list[dict[str, Any]] = field(default_factory=list)
    resume_path: str | None = None
    pending_eval: dict[str, Any] | None = None  # an epoch's evaluation the resumed checkpoint still owes
    last_eval: dict[str, Any] = field(default_factory=dict)
    last_saved_step: int = -1
    train_time: float = 0.0
    images_done: int = 0
    kfac_seconds: dict[str, float] = field(default_factory=dict)
    kfac_events: int = 0
    skipped_steps: list[int] = field(default_factory=list)
    overflow_steps: list[int] = field(default_factory=list)
    bad_in_a_row: int = 0
    done: bool = False


def state_pieces(
    run: Run, state: RunState, *, batch_in_epoch: int = 0, pending_eval: dict[str, Any] | None = None
) -> list[StatePiece]:
    """The one list of a run's state (:mod:`launch.store.snapshot`): what a checkpoint writes and a resume
    puts back. ``batch_in_epoch`` and ``pending_eval`` are the moment a checkpoint is written at (the
    step's place in its epoch, the evaluation still owed); a resume puts them into ``skip_batches`` and
    ``pending_eval``. An elastic run adds the pieces that only its commits hold
    (:func:`launch.training.elastic.ElasticState.pieces`)."""
    t = run.trainer

    def put_into(field_name: str, convert: Any = None) -> Any:
        def setter(value: Any) -> None:
            setattr(state, field_name, convert(value) if convert else value)

        return setter

    return [
        *training_pieces(t.model, t.optimizer, lambda: t.kfac, run.hvd),
        StatePiece(
            "loss_scaler", t.precision.state_dict, t.precision.load_state_dict, ("extra", "grad_scaler")
        ),
        StatePiece("step", lambda: state.step, put_into("step"), ("step",), elastic="none"),
        StatePiece("epoch", lambda: state.epoch, put_into("epoch"), ("epoch",), elastic="none"),
        StatePiece(
            "batch_in_epoch",
            lambda: batch_in_epoch,
            put_into("skip_batches"),
            ("batch_in_epoch",),
            elastic="none",
        ),
        StatePiece(
            "history",
            lambda: state.history,
            put_into("history", lambda v: list(v or [])),
            ("extra", "history"),
            elastic="none",
        ),
        StatePiece(
            "pending_eval",
            lambda: pending_eval,
            put_into("pending_eval"),
            ("extra", "pending_eval"),
            elastic="none",
        ),
    ]
