"""What rank 0 writes about a run: the per-step record of metrics.jsonl and the end-of-run summary."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from kfac_hvd.analysis.units import format_bytes
from launch.training.guards import all_finite
from launch.training.step import OVERFLOW, StepOutcome

if TYPE_CHECKING:
    from launch.training.run_state import Run, RunState


def read_logged_values(record: dict[str, Any] | None, loss_scale: Any) -> dict[str, float | None]:
    """K-FAC's kl_scale and the fp16 loss scale as numbers, in one host read (either may be absent)."""
    values: dict[str, Any] = {
        "kl_scale": record.get("kl_scale") if record else None,
        "loss_scale": loss_scale,
    }
    on_device = {k: v for k, v in values.items() if isinstance(v, torch.Tensor)}
    if on_device:
        names = list(on_device)
        device = on_device[names[0]].device
        read = torch.stack([on_device[k].detach().float().reshape(()).to(device) for k in names]).tolist()
        values.update(zip(names, read))
    return {k: (float(v) if v is not None else None) for k, v in values.items()}


def log_record(
    run: Run,
    step: int,
    epoch_position: float,
    outcome: StepOutcome,
    step_time: float,
    kfac_seconds: dict[str, float],
) -> None:
    """One line of metrics.jsonl and the TensorBoard scalars of a logged step (rank 0)."""
    size, kfac = run.hvd.size(), run.kfac
    logged = read_logged_values(outcome.record, run.trainer.precision.loss_scale())
    entry: dict[str, Any] = {
        "step": step,
        "epoch": epoch_position,
        "lr": outcome.lr,
        "loss": outcome.loss,
        "acc": outcome.correct / outcome.images,
        "step_time": step_time,
        "images_per_s": outcome.images * size / step_time if step_time > 0 else None,
    }
    if outcome.skipped:
        entry["skipped"] = {
            "nonfinite_loss_ranks": outcome.nonfinite_loss_ranks,
            "nonfinite_gradients": outcome.nonfinite_gradients,
        }
        if outcome.verdict == OVERFLOW:
            entry["skipped"]["loss_scale_overflow"] = True
    scalars: dict[str, float | None] = {
        "train/loss": outcome.loss,
        "train/acc": entry["acc"],
        "train/lr": outcome.lr,
    }
    if logged["loss_scale"] is not None:
        entry["loss_scale"] = scalars["train/loss_scale"] = logged["loss_scale"]
    if kfac is not None:
        stats = kfac.comm_stats()
        entry["fisher"] = {
            k: stats.get(k)
            for k in (
                "payload_bytes",
                "wire_bytes",
                "every_step_payload_bytes",
                "every_step_wire_bytes",
                "ratio",
            )
        }
        entry["mean_interval"] = kfac.mean_interval()
        entry["kfac_seconds"] = kfac_seconds
        assert outcome.record is not None  # K-FAC's step and skip_step both return one
        record = dict(outcome.record, kl_scale=logged["kl_scale"])
        if not run.cfg.log.layer_records:
            layers = record.pop("layers")
            record["due_layers"] = sum(1 for e in layers.values() if e["due"])
        entry["kfac"] = record
        scalars.update(
            {
                "fisher/payload_bytes": stats.get("payload_bytes"),
                "fisher/wire_bytes": stats.get("wire_bytes"),
                "fisher/ratio": stats.get("ratio"),
                "kfac/mean_interval": entry["mean_interval"],
            }
        )
    assert run.out is not None  # rank 0's
    run.out.record(entry)
    run.out.scalars(step, scalars)


def summarize(run: Run, state: RunState, wall_time: float) -> dict[str, Any] | None:
    """Collective: every rank's weight checksum and finiteness; rank 0 writes summary.json and prints it."""
    cfg, hvd, kfac, model = run.cfg, run.hvd, run.kfac, run.trainer.model
    if kfac is not None:
        for phase, value in kfac.collect_times().items():
            state.kfac_seconds[phase] = state.kfac_seconds.get(phase, 0.0) + float(value or 0.0)
    # Data parallelism keeps every rank's weights identical: record one checksum per rank.
    with torch.no_grad():
        checksum = float(sum(p.double().sum() + (p.double() ** 2).sum() for p in model.parameters()))
        state_finite = all_finite(list(model.parameters()) + list(model.buffers()))
    per_rank = hvd.allgather_object((checksum, state_finite))
    if run.out is None:
        return None
    history, last_eval, size = state.history, state.last_eval, hvd.size()
    summary: dict[str, Any] = {
        "config": cfg.path,
        "method": cfg.optim.method,
        "world_size": size,
        "device": str(run.device),
        "precision": cfg.train.precision,
        "batch_per_rank": cfg.data.batch_size,
        "global_batch": cfg.data.batch_size * size,
        "steps": state.step,
        "epochs": history[-1]["epoch"] if history else None,
        "final_top1": last_eval.get("top1"),
        "best_top1": max((h["val_top1"] for h in history), default=None),
        "final_val_loss": last_eval.get("loss"),
        "history": history,
        "wall_time_s": wall_time,
        "train_time_s": state.train_time,
        "images_per_s": state.images_done / state.train_time if state.train_time > 0 else None,
        "resumed_from": state.resume_path,
        "rank_weight_checksums": [c for c, _ in per_rank],
        "rank_state_finite": [f for _, f in per_rank],
        "skipped_steps": state.skipped_steps[:1000],
        "skipped_step_count": len(state.skipped_steps),
        "loss_scale_overflow_steps": state.overflow_steps[:1000],
        "loss_scale_overflow_step_count": len(state.overflow_steps),
    }
    if kfac is not None:
        summary["kfac"] = {
            "update_threshold": cfg.kfac.update_threshold,
            "update_interval": cfg.kfac.update_interval,
            "interval_warmup_epochs": cfg.kfac.interval_warmup_epochs,
            "interval_policy": cfg.kfac.interval_policy,
            "layers": len(kfac.layer_names),
            "mean_interval": kfac.mean_interval(),
            "seconds": state.kfac_seconds,
            "numerics_events": state.kfac_events,
        }
        summary["fisher"] = {k: v for k, v in kfac.comm_stats().items() if k != "per_layer"}
    path = run.out.summary(summary)
    run.out.close()
    print(f"summary: {path}", flush=True)
    print(format_summary(summary), flush=True)
    return summary


def format_summary(s: dict[str, Any]) -> str:
    top1 = s.get("final_top1")
    lines = [f"  final top-1        {top1 * 100:.2f}%" if top1 is not None else "  final top-1        -"]
    f = s.get("fisher")
    if f:
        ratio = f.get("ratio")
        lines.append(
            f"  Fisher traffic     {format_bytes(f.get('wire_bytes'))} per rank (wire model), "
            f"{format_bytes(f.get('payload_bytes'))} payload"
            + (f" = {ratio * 100:.1f}% of every step" if ratio is not None else "")
        )
        lines.append(f"  mean interval      {s['kfac']['mean_interval']:.2f}")
        seconds = s["kfac"].get("seconds") or {}
        if seconds:
            lines.append(
                "  K-FAC seconds      "
                + ", ".join(
                    f"{k} {v:.2f}"
                    for k, v in sorted(seconds.items())
                    if isinstance(v, (int, float)) and math.isfinite(v)
                )
            )
    lines.append(
        f"  wall time          {s['wall_time_s']:.1f} s ({s['steps']} steps, "
        f"{s['images_per_s'] or 0:.0f} images/s)"
    )
    return "\n".join(lines)
