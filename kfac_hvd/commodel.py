"""Fisher-traffic model: what K-FAC factor communication costs per rank, at any scale.

    python -m kfac_hvd.commodel --model resnet50 --ranks 128 --batch 16384 --epochs 36
    python -m kfac_hvd.commodel ... --trace runs/x/metrics.jsonl --update-threshold 0.25

Per step and layer, a due layer allreduces its factors and its owner broadcasts their inverses (wire
model in :mod:`kfac_hvd.comm`). Without a trace every layer is due every step (λ = –). With a trace
recorded by a real (small) run, the trace's per-layer diffs drive Algorithm 1 at the large run's
scale: see :func:`replay_trace` for the assumptions.
"""
from __future__ import annotations

import argparse
import bisect
import json
import math
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import torch
from torch import nn

from .comm import allreduce_wire_bytes, broadcast_wire_bytes, every_step_cost
from .factors import packed_numel
from .layers import Layer, make_layer
from .scheduler import IntervalScheduler

IMAGENET_TRAIN_IMAGES = 1_281_167


def layer_wire_bytes(layer: Layer, world_size: int, *, symmetric: bool, element_bytes: int) -> float:
    return sum(allreduce_wire_bytes(packed_numel(shape, symmetric) * element_bytes, world_size)
               + broadcast_wire_bytes(packed_numel(shape, symmetric) * element_bytes, world_size)
               for shape in layer.factor_shapes().values())


def model_layers(model: nn.Module, *, include_batchnorm: bool = True) -> List[Layer]:
    layers = [make_layer(name, module, include_batchnorm=include_batchnorm, factor_dtype=torch.float32)
              for name, module in model.named_modules()]
    return [layer for layer in layers if layer is not None]


def load_trace(path: str) -> List[Dict[str, Any]]:
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


def layer_type(layer: Layer) -> str:
    return "batchnorm" if "F" in layer.factor_shapes() else "kronecker"


def map_layers(targets: Dict[str, str], trace: Dict[str, str]) -> Dict[str, str]:
    """Target layer → trace layer (both given as ordered name → type). The same name if the trace has
    it, else the trace layer of the same type at the same relative depth, so that a small model's trace
    can stand in for a large model."""
    trace_by_type: Dict[str, List[str]] = {}
    for name, kind in trace.items():
        trace_by_type.setdefault(kind, []).append(name)
    target_by_type: Dict[str, List[str]] = {}
    for name, kind in targets.items():
        target_by_type.setdefault(kind, []).append(name)
    mapping = {}
    for kind, names in target_by_type.items():
        pool = trace_by_type.get(kind) or list(trace)
        for index, name in enumerate(names):
            position = index / max(1, len(names) - 1)
            mapping[name] = name if name in trace else pool[round(position * (len(pool) - 1))]
    return mapping


def replay_trace(records: Sequence[Dict[str, Any]], layers: Sequence[Layer], steps: int, world_size: int, *,
                 update_threshold: float, interval_policy: str = "modulo", symmetric: bool = True,
                 element_bytes: int = 4) -> Dict[str, Any]:
    """Predict the Fisher traffic of a ``steps``-step run whose layers behave like the trace's.

    Assumptions: a layer's Diff depends on the fraction of training done, not on the step count or
    on the gap between its updates (so the trace's diff at the same progress is reused); target layers
    borrow the diffs of the trace layer of the same type at the same relative depth unless the trace
    has their exact name; every rank holds the same schedule.
    """
    trace_names = list(records[0]["layers"])
    trace_types = {name: ("batchnorm" if "diff_F" in records[0]["layers"][name] else "kronecker")
                   for name in trace_names}
    mapping = map_layers({layer.name: layer_type(layer) for layer in layers}, trace_types)
    # Per trace layer: progress points at which it had a diff, and the diff.
    total = len(records)
    timeline: Dict[str, Tuple[List[float], List[float]]] = {name: ([], []) for name in trace_names}
    for index, record in enumerate(records):
        for name, entry in record["layers"].items():
            diffs = [v for k, v in entry.items() if k.startswith("diff_") and v is not None]
            if diffs and name in timeline:
                timeline[name][0].append(index / max(1, total - 1))
                timeline[name][1].append(max(diffs))
    scheduler = IntervalScheduler([layer.name for layer in layers], update_threshold=update_threshold,
                                  interval_policy=interval_policy)
    per_layer_wire = {layer.name: layer_wire_bytes(layer, world_size, symmetric=symmetric,
                                                   element_bytes=element_bytes) for layer in layers}
    wire = 0.0
    updates = 0
    for step in range(1, steps + 1):
        progress = (step - 1) / max(1, steps - 1)
        for layer in layers:
            if not scheduler.is_due(layer.name, step):
                continue
            updates += 1
            wire += per_layer_wire[layer.name]
            points, values = timeline[mapping[layer.name]]
            position = bisect.bisect_right(points, progress) - 1
            diff = values[position] if step > 1 and position >= 0 else None
            scheduler.record(layer.name, step, diff)
    every_step_wire = steps * sum(per_layer_wire.values())
    return {"wire_bytes_per_rank": wire, "every_step_wire_bytes_per_rank": every_step_wire,
            "ratio": wire / every_step_wire if every_step_wire else None, "layer_updates": updates,
            "mean_final_interval": sum(scheduler.interval.values()) / len(layers)}


def every_step_traffic(model: nn.Module, world_size: int, steps: int, *, symmetric: bool = True,
                       element_bytes: int = 4, include_batchnorm: bool = True) -> Dict[str, float]:
    layers = model_layers(model, include_batchnorm=include_batchnorm)
    per_step = every_step_cost(layers, world_size, symmetric=symmetric, element_bytes=element_bytes)
    values = sum(math.prod(shape) for layer in layers for shape in layer.factor_shapes().values())
    return {"layers": len(layers), "factor_values": values,
            "factor_bytes": values * element_bytes,
            "allreduce_only_dense_wire_bytes_per_rank": steps * allreduce_wire_bytes(values * element_bytes, world_size),
            "wire_bytes_per_rank": steps * per_step["every_step_wire_bytes"],
            "payload_bytes_per_rank": steps * per_step["every_step_payload_bytes"]}


def _build_model(name: str) -> nn.Module:
    import torchvision

    try:
        return getattr(torchvision.models, name)(weights=None)
    except AttributeError:
        raise SystemExit(f"commodel: unknown torchvision model '{name}'") from None


def format_bytes(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m kfac_hvd.commodel", description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50", help="torchvision model name (default resnet50)")
    parser.add_argument("--ranks", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16384, help="global mini-batch")
    parser.add_argument("--epochs", type=float, default=36)
    parser.add_argument("--train-images", type=int, default=IMAGENET_TRAIN_IMAGES)
    parser.add_argument("--steps", type=int, help="optimiser steps (default: epochs × train-images / batch)")
    parser.add_argument("--dtype-bytes", type=int, default=4, help="bytes per factor value (4 = fp32)")
    parser.add_argument("--no-triangle", action="store_true", help="send full matrices, not upper triangles")
    parser.add_argument("--no-batchnorm", action="store_true", help="leave BatchNorm layers out of K-FAC")
    parser.add_argument("--trace", help="metrics.jsonl of a recorded run to replay at this scale")
    parser.add_argument("--update-threshold", type=float, default=0.25, help="λ for --trace replay")
    parser.add_argument("--interval-policy", default="modulo", choices=("modulo", "since_last"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    args = parser.parse_args(argv)
    steps = args.steps or int(args.epochs * args.train_images // args.batch)
    symmetric = not args.no_triangle
    model = _build_model(args.model)
    result: Dict[str, Any] = {
        "model": args.model, "ranks": args.ranks, "batch": args.batch, "steps": steps,
        "dtype_bytes": args.dtype_bytes, "triangle_packing": symmetric,
        **every_step_traffic(model, args.ranks, steps, symmetric=symmetric, element_bytes=args.dtype_bytes,
                             include_batchnorm=not args.no_batchnorm)}
    if args.trace:
        layers = model_layers(model, include_batchnorm=not args.no_batchnorm)
        try:
            records = load_trace(args.trace)
        except (OSError, ValueError) as error:
            parser.exit(2, f"commodel: {error}\n")
        result["replay"] = replay_trace(records, layers, steps, args.ranks,
                                        update_threshold=args.update_threshold, interval_policy=args.interval_policy,
                                        symmetric=symmetric, element_bytes=args.dtype_bytes)
        result["replay"].update(trace=args.trace, update_threshold=args.update_threshold,
                                interval_policy=args.interval_policy)
    if args.json:
        print(json.dumps(result, indent=1))
        return 0
    print(f"Fisher traffic per rank: {args.model}, {result['layers']} K-FAC layers, {args.ranks} ranks, "
          f"batch {args.batch}, {steps} steps")
    print(f"  factors: {result['factor_values'] / 1e6:.1f} M values = {format_bytes(result['factor_bytes'])} "
          f"at {args.dtype_bytes} bytes each")
    print("  assumptions: every factor every step; ring allreduce moves 2(P-1)/P of a buffer per rank; the "
          "owner's inverse broadcast moves the buffer once per rank; "
          + ("upper triangles (n(n+1)/2 values)" if symmetric else "full matrices"))
    print(f"  every step, factor allreduce + inverse broadcast: {format_bytes(result['wire_bytes_per_rank'])}")
    print(f"  every step, dense factor allreduce only (no broadcast, no packing): "
          f"{format_bytes(result['allreduce_only_dense_wire_bytes_per_rank'])}")
    print("  the paper (Table 1, λ = –): 3.0 TB")
    if args.trace:
        replay = result["replay"]
        print(f"  replay of {args.trace} with λ = {args.update_threshold} ({args.interval_policy}): "
              f"{format_bytes(replay['wire_bytes_per_rank'])} = {100 * replay['ratio']:.1f}% of every step, "
              f"mean final interval {replay['mean_final_interval']:.1f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
