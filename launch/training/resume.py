"""Resuming and checkpointing a run: the newest usable checkpoint restored on every rank (or rank 0's
initial state broadcast), the resumed config checked against this run's, a checkpoint written."""

from __future__ import annotations

from typing import Any

from launch.record.console import log0
from launch.record.writer import evaluations_after_checkpoint
from launch.store import checkpoint as ckpt_mod
from launch.store.run_folder import resume_changes
from launch.training.run_state import Run, RunState, state_pieces


def resume_or_start(run: Run, candidates: list[str]) -> RunState:
    """Restore the newest usable checkpoint (rank 0's list decides), or broadcast rank 0's initial state."""
    cfg, hvd, t = run.cfg, run.hvd, run.trainer
    state = RunState()
    # Only rank 0 reads checkpoints (other nodes need not see the folder): its list decides for all.
    candidates = hvd.broadcast_object(
        candidates if hvd.rank() == 0 else None, root_rank=0, name="ckpt.candidates"
    )
    if not candidates:
        hvd.broadcast_parameters(t.model.state_dict(), root_rank=0)
        hvd.broadcast_optimizer_state(t.optimizer, root_rank=0)
        return state
    path = None
    try:
        path, saved = ckpt_mod.load_checkpoint(
            hvd, candidates, cfg.checkpoint.trust_unlisted, run.watchdog.beat
        )
        check_resume_config(run, path, saved)
        run.watchdog.beat(f"restoring the checkpoint {path}")
        ckpt_mod.restore(saved, hvd, state_pieces(run, state), seed=cfg.train.seed)
    except ckpt_mod.CheckpointError as exc:
        raise cfg.error("checkpoint.resume", str(exc)) from None
    except ValueError as exc:
        raise cfg.error("checkpoint.resume", f"{path} does not fit this run: {exc}") from None
    if state.skip_batches >= run.steps_per_epoch:
        state.epoch, state.skip_batches = state.epoch + 1, 0
    if hvd.rank() == 0:
        state.history += evaluations_after_checkpoint(cfg.run_dir, state.step, state.history)
    # Rank 0's history decides for every rank whether the checkpoint's evaluation still has to run.
    pending = state.pending_eval
    owed = pending is not None and not any(h.get("step") == pending.get("step") for h in state.history)
    state.pending_eval = pending if hvd.broadcast_object(owed, root_rank=0, name="ckpt.eval_owed") else None
    state.resume_path, state.last_saved_step = path, state.step
    log0(hvd, f"resumed from {path}: step {state.step}, epoch {state.epoch}, batch {state.skip_batches}")
    return state


def check_resume_config(run: Run, path: str, saved: dict[str, Any]) -> None:
    """Stop (exit code 2, on every rank alike) when the checkpoint's run computed otherwise than this one
    would; print the accepted differences (keys that may change on resume, checkpoint.allow_changes)."""
    cfg, hvd = run.cfg, run.hvd
    refused, accepted = resume_changes(
        saved.get("config") or {},
        cfg.to_dict(),
        saved.get("world_size"),
        hvd.size(),
        list(cfg.checkpoint.allow_changes),
    )
    if refused:
        keys = ", ".join(t.split(" ", 1)[0] for t in refused)
        raise cfg.error(
            "checkpoint.resume",
            f"{path} was written by a run with other settings: {'; '.join(refused)}; "
            f"resume with the checkpoint's values, start a new log.dir, or accept "
            f"the change knowingly with checkpoint.allow_changes=[{keys}]",
        )
    if accepted:
        log0(hvd, f"resume: changed since the checkpoint: {'; '.join(accepted)}")


def save(run: Run, state: RunState, batch_in_epoch: int, pending_eval: dict[str, Any] | None = None) -> None:
    run.watchdog.beat(f"the checkpoint of step {state.step}")
    if run.out is not None:
        run.out.flush()  # the metrics up to this step are on disk before the checkpoint
    cfg = run.cfg
    ckpt_mod.save_checkpoint(
        run.hvd,
        cfg.checkpoint_dir,
        state_pieces(run, state, batch_in_epoch=batch_in_epoch, pending_eval=pending_eval),
        step=state.step,
        config=cfg.to_dict(),
        keep_last=cfg.checkpoint.keep_last,
        keep_all=cfg.checkpoint.keep_all,
    )
    state.last_saved_step = state.step
    run.watchdog.beat(f"the checkpoint of step {state.step}")
