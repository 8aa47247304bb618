"""The training run in phases: set-up, epochs of training steps, epoch end (evaluation, checkpoint), summary.

Host synchronisations per training step: the step's status read (:mod:`launch.training.step`) and, on logged
steps only, one read of what the record needs from the device (timers, K-FAC's kl_scale, the loss
scale). Everything else stays on the device, the epoch's loss and accuracy sums included.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Any

import torch

from launch.errors import EXIT_DIVERGED, RunStop
from launch.record.console import log0, logger
from launch.record.progress import Progress, wants_bar
from launch.record.writer import RunOutputs
from launch.training.data import start_epoch as start_epoch_data
from launch.training.evaluation import evaluate
from launch.training.resume import resume_or_start, save
from launch.training.run_state import Run, RunState
from launch.training.schedules import (
    learning_rate,
)
from launch.training.step import DIVERGED, OVERFLOW, StepOutcome, train_step
from launch.training.summary import log_record


# --------------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------------
@dataclass
class EpochTally:
    """This rank's sums over the epoch's applied steps (on the device) and the epoch's position."""

    sums: torch.Tensor  # loss * images, correct
    images: int = 0
    batch_in_epoch: int = 0


def train_epoch(run: Run, state: RunState) -> None:
    """The steps of ``state.epoch`` (from the batch a resumed run stopped at), then the epoch's end."""
    cfg = run.cfg
    start_epoch_data(
        run.train_loader,
        run.sampler,
        cfg.train.seed,
        run.hvd.rank(),
        state.epoch,
        state.skip_batches,
        cfg.data.batch_size,
    )
    tally = EpochTally(torch.zeros(2, dtype=torch.float64, device=run.device), 0, state.skip_batches)
    state.skip_batches = 0
    run.trainer.model.train()
    t_epoch = time.perf_counter()
    run.watchdog.beat(f"the start of epoch {state.epoch + 1}")
    run.timer.start()  # a step's time includes loading its batch, not logging or checkpoints
    for x, y in run.train_loader:
        run_step(run, state, tally, x, y)
        state.done = state.step >= run.total_steps
        # Mid-epoch checkpoints; the last batch of an epoch is checkpointed after its evaluation.
        every = cfg.checkpoint.every_steps
        if (
            every
            and state.step % every == 0
            and not state.done
            and tally.batch_in_epoch < run.steps_per_epoch
        ):
            save(run, state, tally.batch_in_epoch)
        if state.done:
            break
        run.timer.start()
    state.train_time += sum(run.timer.take())
    end_epoch(run, state, tally, time.perf_counter() - t_epoch)


def run_step(run: Run, state: RunState, tally: EpochTally, x: torch.Tensor, y: torch.Tensor) -> StepOutcome:
    """One training step with its bookkeeping: tallies, the record of a logged step, progress, faults."""
    run.watchdog.beat(f"step {state.step + 1}")
    run.trainer.faults.hang(state.step + 1)
    lr = learning_rate(run.cfg.optim, state.step / run.steps_per_epoch)
    outcome = train_step(run.trainer, x, y, state.step + 1, lr)
    run.timer.stop()
    count_step(run, state, outcome)
    tally.batch_in_epoch += 1
    if not outcome.skipped:
        tally.sums += outcome.sums
        tally.images += outcome.images
    if state.step % run.cfg.log.every_steps == 0 or state.step == run.total_steps or outcome.skipped:
        log_step(run, state, outcome, state.epoch + tally.batch_in_epoch / run.steps_per_epoch)
    if run.progress is not None:
        run.progress.update(
            state.step,
            state.epoch + 1,
            outcome.loss,
            lr,
            outcome.images * run.hvd.size(),
            run.kfac.mean_interval() if run.kfac is not None else None,
        )
    run.trainer.faults.kill(state.step)
    return outcome


def count_step(run: Run, state: RunState, outcome: StepOutcome) -> None:
    """The step's tallies; skipped steps are reported, and too many bad ones in a row stop the run."""
    state.step += 1
    state.images_done += outcome.images * run.hvd.size()
    if outcome.record is not None:
        state.kfac_events += len(outcome.record.get("numerics") or {})
    if outcome.verdict == OVERFLOW:  # expected under fp16: neither divergence nor its end
        state.overflow_steps.append(state.step)
        if run.hvd.rank() == 0:
            logger.warning(
                "step %d: fp16 gradients overflowed at the current loss scale (the loss is finite): "
                "step skipped on every rank, the loss scale backs off",
                state.step,
            )
        return
    if outcome.verdict != DIVERGED:
        state.bad_in_a_row = 0
        return
    state.skipped_steps.append(state.step)
    state.bad_in_a_row += 1
    if not math.isfinite(outcome.loss):
        logger.warning("step %d: non-finite loss (%r) on this rank", state.step, outcome.loss)
    if run.hvd.rank() == 0:
        logger.warning(
            "step %d: optimiser step skipped on every rank (non-finite loss on %d rank(s), non-finite "
            "gradients: %s)",
            state.step,
            outcome.nonfinite_loss_ranks,
            "yes" if outcome.nonfinite_gradients else "no",
        )
    max_bad = run.cfg.train.max_bad_steps
    if state.bad_in_a_row >= max_bad:
        raise RunStop(
            EXIT_DIVERGED,
            f"error: training diverged: {state.bad_in_a_row} consecutive steps (up to step {state.step}) "
            f"with a non-finite loss or gradient (train.max_bad_steps = {max_bad}); the last checkpoint "
            f"is in {run.cfg.checkpoint.dir}",
        )


def log_step(run: Run, state: RunState, outcome: StepOutcome, epoch_position: float) -> None:
    """A logged step, on every rank alike: the timers and K-FAC's phase times are collected (bounded
    bookkeeping everywhere); rank 0 writes the record (one more host read)."""
    seconds = run.timer.take()
    state.train_time += sum(seconds)
    phases = run.kfac.collect_times() if run.kfac is not None else {}
    for phase, value in phases.items():
        state.kfac_seconds[phase] = state.kfac_seconds.get(phase, 0.0) + float(value or 0.0)
    if run.out is not None:
        log_record(run, state.step, epoch_position, outcome, seconds[-1], phases)


def end_epoch(run: Run, state: RunState, tally: EpochTally, epoch_time: float) -> None:
    """Train averages over ranks, the end-of-epoch checkpoint when due, then evaluation when due."""
    cfg, hvd = run.cfg, run.hvd
    batch_in_epoch = tally.batch_in_epoch
    totals = torch.cat([tally.sums, tally.sums.new_tensor([float(tally.images)])])
    loss_sum, correct_sum, n = hvd.allreduce(totals, op=hvd.Sum, name="train.sums").tolist()
    n = max(n, 1.0)
    epoch_complete = batch_in_epoch >= run.steps_per_epoch
    last_epoch = state.epoch + 1 >= cfg.train.epochs or state.done
    every = cfg.train.eval_every
    due = last_epoch or bool(every and (state.epoch + 1) % every == 0 and epoch_complete)
    entry = {
        "epoch": state.epoch + 1 if epoch_complete else state.epoch + batch_in_epoch / run.steps_per_epoch,
        "step": state.step,
        "train_loss": loss_sum / n,
        "train_acc": correct_sum / n,
        "epoch_time": epoch_time,
    }
    # The checkpoint first, holding the evaluation still owed: one that fails (an unreadable image, a lost
    # rank) loses no training, and the resumed run evaluates that epoch first.
    ck = cfg.checkpoint
    enabled = ck.every_epochs > 0 or ck.every_steps is not None
    epoch_due = bool(ck.every_epochs and epoch_complete and (state.epoch + 1) % ck.every_epochs == 0)
    step_due = bool(ck.every_steps and state.step % ck.every_steps == 0)
    if (
        enabled
        and (epoch_due or state.done or last_epoch or step_due)
        and state.last_saved_step != state.step
    ):
        save(run, state, batch_in_epoch, pending_eval=entry if due else None)
    if due:
        evaluate_epoch(run, state, entry)


def evaluate_epoch(run: Run, state: RunState, entry: dict[str, Any]) -> None:
    """Evaluate, complete the epoch's history ``entry`` with it, record and print it."""
    hvd = run.hvd
    state.last_eval = ev = evaluate(
        run.trainer.model,
        run.val_loader,
        run.trainer.precision,
        hvd,
        run.cfg.data.skip_unreadable,
        run.watchdog,
    )
    entry = {
        **{k: v for k, v in entry.items() if k != "epoch_time"},
        "val_loss": ev["loss"],
        "val_top1": ev["top1"],
        "epoch_time": entry["epoch_time"],
    }
    if ev.get("skipped_images"):
        entry["val_skipped_images"] = ev["skipped_images"]
    state.history.append(entry)
    if run.out is not None:
        run.out.record({"eval": entry, "step": entry["step"]})
        run.out.scalars(
            entry["step"],
            {
                "val/top1": ev["top1"],
                "val/loss": ev["loss"],
                "train/epoch_loss": entry["train_loss"],
                "train/epoch_acc": entry["train_acc"],
            },
        )
        run.out.flush()
    message = (
        f"epoch {entry['epoch']:g}: train loss {entry['train_loss']:.4f} acc {entry['train_acc']:.4f}"
        f" | val loss {ev['loss']:.4f} top-1 {ev['top1']:.4f} | {entry['epoch_time']:.1f}s"
    )
    if run.progress is not None:
        run.progress.write(message)
    else:
        log0(hvd, message)


# --------------------------------------------------------------------------------------------------
# The run
# --------------------------------------------------------------------------------------------------
def start(r: Run, resume_candidates: list[str]) -> RunState:
    """Resume or start, open rank 0's outputs, announce the run, take an evaluation the checkpoint owes."""
    cfg, rank, size = r.cfg, r.hvd.rank(), r.hvd.size()
    state = resume_or_start(r, resume_candidates)
    r.out = RunOutputs(cfg, state.step if state.resume_path else None) if rank == 0 else None
    log0(
        r.hvd,
        f"training: {cfg.optim.method}, {size} rank(s) x {cfg.data.batch_size} = "
        f"{size * cfg.data.batch_size} images per step, {r.steps_per_epoch} steps per epoch, "
        f"{r.total_steps} steps",
    )
    if rank == 0 and cfg.log.progress:
        r.progress = Progress(
            r.total_steps, state.step, cfg.train.epochs, cfg.log.progress_every_s, wants_bar()
        )
    if state.pending_eval is not None:
        evaluate_epoch(r, state, state.pending_eval)
    state.done = state.step >= r.total_steps
    return state
