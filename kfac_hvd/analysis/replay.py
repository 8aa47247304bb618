"""A recorded run's schedule replayed at another scale: the per-layer Diffs of a trace (a metrics.jsonl)
drive Algorithm 1 over a target model's layers and step count, and the due layers pay their costs
(:func:`kfac_hvd.cost.layer_cost`)."""

from __future__ import annotations

import bisect
import json
from collections.abc import Sequence
from typing import Any

from ..cost import LayerCost, allgather_wire_bytes
from ..options import KFACOptions
from ..scheduler import IntervalScheduler
from .traffic import CONTROL_BYTES_PER_LAYER


def load_trace(path: str) -> list[dict[str, Any]]:
    """K-FAC step records from a metrics.jsonl (a line is a record, or holds one under "kfac")."""
    records = []
    with open(path) as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{number}: not JSON ({error.msg})") from None
            record = entry.get("kfac", entry) if isinstance(entry, dict) else None
            if isinstance(record, dict) and "layers" in record:
                records.append(record)
    if not records:
        raise ValueError(f"{path}: no K-FAC step records (lines with a 'layers' field)")
    return records


def trace_kinds(record: dict[str, Any]) -> dict[str, str]:
    """Layer name → "batchnorm" or "kronecker" of a trace's step record, in its order."""
    return {
        name: ("batchnorm" if "diff_F" in entry else "kronecker") for name, entry in record["layers"].items()
    }


def map_layers(targets: dict[str, str], trace: dict[str, str]) -> dict[str, str]:
    """Target layer → trace layer (both given as ordered name → type). The same name if the trace has
    it, else the trace layer of the same type at the same relative depth, so that a small model's trace
    can stand in for a large model."""
    trace_by_type: dict[str, list[str]] = {}
    for name, kind in trace.items():
        trace_by_type.setdefault(kind, []).append(name)
    target_by_type: dict[str, list[str]] = {}
    for name, kind in targets.items():
        target_by_type.setdefault(kind, []).append(name)
    mapping = {}
    for kind, names in target_by_type.items():
        pool = trace_by_type.get(kind) or list(trace)
        for index, name in enumerate(names):
            position = index / max(1, len(names) - 1)
            mapping[name] = name if name in trace else pool[round(position * (len(pool) - 1))]
    return mapping


def diff_timelines(records: Sequence[dict[str, Any]]) -> dict[str, tuple[list[float], list[float]]]:
    """Per trace layer: the fractions of training at which it had a Diff, and that Diff (the larger of
    its factors')."""
    total = len(records)
    timeline: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in records[0]["layers"]}
    for index, record in enumerate(records):
        for name, entry in record["layers"].items():
            diffs = [v for k, v in entry.items() if k.startswith("diff_") and v is not None]
            if diffs and name in timeline:
                timeline[name][0].append(index / max(1, total - 1))
                timeline[name][1].append(max(diffs))
    return timeline


def replay_trace(
    records: Sequence[dict[str, Any]],
    costs: Sequence[LayerCost],
    steps: int,
    world_size: int,
    *,
    update_threshold: float,
    interval_policy: str = "modulo",
    keep_schedule: bool = False,
) -> dict[str, Any]:
    """Predict the Fisher traffic of a ``steps``-step run whose layers behave like the trace's.

    Assumptions: a layer's Diff depends on the fraction of training done, not on the step count or
    on the gap between its updates (so the trace's diff at the same progress is reused); target layers
    borrow the diffs of the trace layer of the same type at the same relative depth unless the trace
    has their exact name; every rank holds the same schedule. A due layer costs its factor allreduce,
    plus its share of the inverse allgather unless it is inverted on every rank; each step with a due
    layer has one allgather, carrying 4 control bytes per due layer (reported apart).
    ``keep_schedule``: also return ``schedule``, the due layer names of every step (for the time model).
    """
    mapping = map_layers({cost.name: cost.kind for cost in costs}, trace_kinds(records[0]))
    timeline = diff_timelines(records)
    # KFACOptions checks λ and the policy as a training run would (a ValueError naming the option).
    options = KFACOptions(update_threshold=update_threshold, interval_policy=interval_policy)
    scheduler = IntervalScheduler([cost.name for cost in costs], options.schedule)
    by_name = {cost.name: cost for cost in costs}
    wire = factor_part = control = 0.0
    allgathers = 0
    updates = dict.fromkeys(by_name, 0)
    schedule: list[list[str]] = []
    for step in range(1, steps + 1):
        progress = (step - 1) / max(1, steps - 1)
        due = [name for name in by_name if scheduler.is_due(name, step)]
        for name in due:
            updates[name] += 1
            wire += by_name[name].wire_bytes(world_size)
            factor_part += by_name[name].allreduce_wire_bytes(world_size)
            points, values = timeline[mapping[name]]
            position = bisect.bisect_right(points, progress) - 1
            scheduler.record(name, step, values[position] if step > 1 and position >= 0 else None)
        if due and world_size > 1:
            allgathers += 1
            control += allgather_wire_bytes(CONTROL_BYTES_PER_LAYER * len(due), world_size)
        if keep_schedule:
            schedule.append(due)
    every_step_wire = steps * sum(cost.wire_bytes(world_size) for cost in costs)
    result = {
        "steps": steps,
        "wire_bytes_per_rank": wire,
        "factor_allreduce_wire_bytes_per_rank": factor_part,
        "inverse_allgather_wire_bytes_per_rank": wire - factor_part,
        "inverse_allgathers": allgathers,
        "control_wire_bytes_per_rank": control,
        "every_step_wire_bytes_per_rank": every_step_wire,
        "ratio": wire / every_step_wire if every_step_wire else None,
        "layer_updates": sum(updates.values()),
        "updates_per_layer": updates,
        "due_fraction": sum(updates.values()) / (steps * len(costs)) if steps and costs else 0.0,
        "mean_final_interval": sum(scheduler.interval.values()) / len(costs),
    }
    return {**result, "schedule": schedule} if keep_schedule else result
