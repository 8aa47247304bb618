"""Fisher-traffic model: what K-FAC's factor and inverse communication costs per rank, at any scale.

    python -m kfac_hvd.commodel --model resnet50 --ranks 128 --batch 16384 --epochs 36
    python -m kfac_hvd.commodel ... --trace runs/x/metrics.jsonl --update-threshold 0.25
    python -m kfac_hvd.commodel --time [--trace ...] [--markdown docs/results/commodel_time.md]

The communication scheme (wire model in :mod:`kfac_hvd.comm`), per update step and due layer:

* every factor (A, G; BatchNorm: F, a stack of C 2×2 blocks) is allreduced as its upper triangle(s),
  n(n+1)/2 values per matrix: ring allreduce, 2(P−1)/P · n bytes per rank;
* layers cheap to invert (every BatchNorm; Kronecker layers whose A and G are both at most
  ``local_inverse_max_dim`` wide) are inverted on every rank: their inverses never travel;
* the other layers' inverses (upper triangles) travel in ONE allgather per step, each owner's share
  packed into one buffer: ring allgather, (P−1)/P · n per rank for the n gathered bytes; rank 0 appends
  the due layers' new intervals (4 bytes each, control traffic, counted apart from Fisher traffic).

Without a trace every layer is due every step (λ = –). With a trace recorded by a real (small) run, the
trace's per-layer diffs drive Algorithm 1 at the large run's scale: see :func:`replay_trace`.
``--time`` adds the step-time model of :mod:`kfac_hvd.timemodel`.
"""

from __future__ import annotations

import argparse
import bisect
import json
import math
import shlex
import sys
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, assign_layers, inverted_everywhere
from .comm import allgather_wire_bytes, allreduce_wire_bytes, broadcast_wire_bytes
from .devices import DEVICES
from .factors import packed_numel
from .layers import Layer, make_layer
from .scheduler import IntervalScheduler

IMAGENET_TRAIN_IMAGES = 1_281_167
CONTROL_BYTES_PER_LAYER = 4  # one int32 interval per due layer, in rank 0's part of the allgather
PAPER_LAMBDA025_RATIO = 357 / 3000  # Table 1: 357 GB of 3.0 TB at λ = 0.25


def triangle_payload(layer: Layer, *, symmetric: bool = True, element_bytes: int = 4) -> int:
    """Bytes of one layer's factors (= of its inverses) as handed to Horovod."""
    return sum(packed_numel(shape, symmetric) for shape in layer.factor_shapes().values()) * element_bytes


def travels(layer: Layer, local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM) -> bool:
    """Whether the layer's inverses travel in the allgather (else every rank inverts it)."""
    return not inverted_everywhere(layer.factor_shapes(), local_inverse_max_dim)


def layer_wire_bytes(
    layer: Layer,
    world_size: int,
    *,
    symmetric: bool = True,
    element_bytes: int = 4,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> float:
    """Wire bytes per rank of one update of ``layer``: factor allreduce (+ its share of the inverse allgather)."""
    payload = triangle_payload(layer, symmetric=symmetric, element_bytes=element_bytes)
    wire = allreduce_wire_bytes(payload, world_size)
    if travels(layer, local_inverse_max_dim):
        wire += allgather_wire_bytes(payload, world_size)
    return wire


def model_layers(model: nn.Module, *, include_batchnorm: bool = True) -> list[Layer]:
    layers = [
        make_layer(name, module, include_batchnorm=include_batchnorm, factor_dtype=torch.float32)
        for name, module in model.named_modules()
    ]
    return [layer for layer in layers if layer is not None]


def layer_type(layer: Layer) -> str:
    return "batchnorm" if "F" in layer.factor_shapes() else "kronecker"


def every_step_traffic(
    model: nn.Module | Iterable[Layer],
    world_size: int,
    steps: int,
    *,
    symmetric: bool = True,
    element_bytes: int = 4,
    include_batchnorm: bool = True,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> dict[str, Any]:
    """Per-rank Fisher traffic of ``steps`` steps that update every layer: a model's K-FAC layers, or
    the given layers (e.g. ``kfac.layers.values()``, which honours ``skip_layers``)."""
    layers = (
        model_layers(model, include_batchnorm=include_batchnorm)
        if isinstance(model, nn.Module)
        else list(model)
    )
    factors = sum(
        triangle_payload(layer, symmetric=symmetric, element_bytes=element_bytes) for layer in layers
    )
    moving = [layer for layer in layers if travels(layer, local_inverse_max_dim)]
    inverses = sum(
        triangle_payload(layer, symmetric=symmetric, element_bytes=element_bytes) for layer in moving
    )
    values = sum(math.prod(shape) for layer in layers for shape in layer.factor_shapes().values())
    factor_wire = allreduce_wire_bytes(factors, world_size)
    inverse_wire = allgather_wire_bytes(inverses, world_size) if inverses else 0.0
    return {
        "layers": len(layers),
        "locally_inverted_layers": len(layers) - len(moving),
        "travelling_layers": len(moving),
        "local_inverse_max_dim": local_inverse_max_dim,
        "factor_values": values,
        "factor_bytes": values * element_bytes,
        "factor_payload_bytes_per_step": factors,
        "inverse_payload_bytes_per_step": inverses,
        "factor_allreduce_tensors_per_step": sum(len(layer.factor_shapes()) for layer in layers),
        "inverse_allgathers_per_step": 1 if inverses and world_size > 1 else 0,
        "wire_bytes_per_step": factor_wire + inverse_wire,
        "factor_allreduce_wire_bytes_per_rank": steps * factor_wire,
        "inverse_allgather_wire_bytes_per_rank": steps * inverse_wire,
        "wire_bytes_per_rank": steps * (factor_wire + inverse_wire),
        "payload_bytes_per_rank": steps * (factors + inverses),
        "allreduce_only_dense_wire_bytes_per_rank": steps
        * allreduce_wire_bytes(values * element_bytes, world_size),
    }


def scheme_comparison(
    layers: Sequence[Layer],
    world_size: int,
    *,
    symmetric: bool = True,
    element_bytes: int = 4,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> dict[str, Any]:
    """One update step with every layer due, per rank: the broadcast scheme (one broadcast per inverse from
    its owner, every layer owned by some rank, + rank 0's schedule broadcast) against the allgather scheme
    (local inversion of cheap layers + one allgather), and what local inversion alone removes."""

    def payload(group: Iterable[Layer]) -> int:
        return sum(
            triangle_payload(layer, symmetric=symmetric, element_bytes=element_bytes) for layer in group
        )

    local = [layer for layer in layers if not travels(layer, local_inverse_max_dim)]
    moving = [layer for layer in layers if travels(layer, local_inverse_max_dim)]
    owners = assign_layers({layer.name: layer.inversion_cost() for layer in layers}, world_size).owner
    matrices = lambda group: sum(len(layer.factor_shapes()) for layer in group)  # noqa: E731
    control = CONTROL_BYTES_PER_LAYER * len(layers)
    return {
        "factor_allreduce": {
            "tensors": matrices(layers),
            "payload_bytes": payload(layers),
            "wire_bytes": allreduce_wire_bytes(payload(layers), world_size),
        },
        "broadcast_scheme": {
            "broadcasts": matrices(layers),
            "roots": len(set(owners.values())),
            "schedule_broadcasts": 1,
            "payload_bytes": payload(layers),
            "wire_bytes": sum(
                broadcast_wire_bytes(packed_numel(shape, symmetric) * element_bytes, world_size)
                for layer in layers
                for shape in layer.factor_shapes().values()
            ),
            "control_payload_bytes": control,
        },
        "allgather_scheme": {
            "allgathers": 1,
            "layers": len(moving),
            "matrices": matrices(moving),
            "payload_bytes": payload(moving),
            "wire_bytes": allgather_wire_bytes(payload(moving), world_size),
            "control_payload_bytes": control,
        },
        "local_inversion_removes": {
            "layers": len(local),
            "batchnorm_layers": sum(layer_type(layer) == "batchnorm" for layer in local),
            "kronecker_layers": sum(layer_type(layer) == "kronecker" for layer in local),
            "matrices": matrices(local),
            "payload_bytes": payload(local),
            "allgather_wire_bytes": allgather_wire_bytes(payload(local), world_size),
            "broadcast_wire_bytes": float(payload(local)) if world_size > 1 else 0.0,
        },
    }


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


def replay_trace(
    records: Sequence[dict[str, Any]],
    layers: Sequence[Layer],
    steps: int,
    world_size: int,
    *,
    update_threshold: float,
    interval_policy: str = "modulo",
    symmetric: bool = True,
    element_bytes: int = 4,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
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
    trace_names = list(records[0]["layers"])
    trace_types = {
        name: ("batchnorm" if "diff_F" in records[0]["layers"][name] else "kronecker") for name in trace_names
    }
    mapping = map_layers({layer.name: layer_type(layer) for layer in layers}, trace_types)
    # Per trace layer: progress points at which it had a diff, and the diff.
    total = len(records)
    timeline: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in trace_names}
    for index, record in enumerate(records):
        for name, entry in record["layers"].items():
            diffs = [v for k, v in entry.items() if k.startswith("diff_") and v is not None]
            if diffs and name in timeline:
                timeline[name][0].append(index / max(1, total - 1))
                timeline[name][1].append(max(diffs))
    scheduler = IntervalScheduler(
        [layer.name for layer in layers], update_threshold=update_threshold, interval_policy=interval_policy
    )
    factor_wire = {
        layer.name: allreduce_wire_bytes(
            triangle_payload(layer, symmetric=symmetric, element_bytes=element_bytes), world_size
        )
        for layer in layers
    }
    per_layer_wire = {
        layer.name: layer_wire_bytes(
            layer,
            world_size,
            symmetric=symmetric,
            element_bytes=element_bytes,
            local_inverse_max_dim=local_inverse_max_dim,
        )
        for layer in layers
    }
    wire = factor_part = control = 0.0
    allgathers = 0
    updates = dict.fromkeys(per_layer_wire, 0)
    schedule: list[list[str]] = []
    for step in range(1, steps + 1):
        progress = (step - 1) / max(1, steps - 1)
        due = [layer.name for layer in layers if scheduler.is_due(layer.name, step)]
        for name in due:
            updates[name] += 1
            wire += per_layer_wire[name]
            factor_part += factor_wire[name]
            points, values = timeline[mapping[name]]
            position = bisect.bisect_right(points, progress) - 1
            diff = values[position] if step > 1 and position >= 0 else None
            scheduler.record(name, step, diff)
        if due and world_size > 1:
            allgathers += 1
            control += allgather_wire_bytes(CONTROL_BYTES_PER_LAYER * len(due), world_size)
        if keep_schedule:
            schedule.append(due)
    every_step_wire = steps * sum(per_layer_wire.values())
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
        "due_fraction": sum(updates.values()) / (steps * len(layers)) if steps and layers else 0.0,
        "mean_final_interval": sum(scheduler.interval.values()) / len(layers),
    }
    if keep_schedule:
        result["schedule"] = schedule
    return result


def _build_model(name: str) -> nn.Module:
    import torchvision

    try:
        with torch.device("meta"):  # shapes only: no weights are initialised
            return getattr(torchvision.models, name)(weights=None)
    except AttributeError:
        raise SystemExit(f"commodel: unknown torchvision model '{name}'") from None


def format_bytes(value: float) -> str:
    for unit, size in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if value >= size:
            return f"{value / size:.2f} {unit}"
    return f"{value:.0f} B"


def _parser() -> argparse.ArgumentParser:
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
    parser.add_argument(
        "--local-inverse-max-dim",
        type=int,
        default=DEFAULT_LOCAL_INVERSE_MAX_DIM,
        help="Kronecker layers with both factors at most this wide are inverted on every rank "
        f"(default {DEFAULT_LOCAL_INVERSE_MAX_DIM}, the library's); BatchNorm always is",
    )
    parser.add_argument("--trace", help="metrics.jsonl of a recorded run to replay at this scale")
    parser.add_argument("--update-threshold", type=float, default=0.25, help="λ for --trace replay")
    parser.add_argument("--interval-policy", default="modulo", choices=("modulo", "since_last"))
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    time = parser.add_argument_group("step-time model (--time; a model, see kfac_hvd/timemodel.py)")
    time.add_argument(
        "--time", action="store_true", help="model seconds per step (α-β collectives + FLOP compute)"
    )
    time.add_argument(
        "--markdown", metavar="PATH", help="with --time: also write the table as markdown to PATH"
    )
    time.add_argument(
        "--note", default="", help="a paragraph for the --markdown file (e.g. where the trace is from)"
    )
    time.add_argument("--topology", default="flat", choices=("flat", "hierarchical"))
    time.add_argument("--gpus-per-node", type=int, default=4)
    time.add_argument(
        "--nvlink-gbs", type=float, default=50.0, help="GB/s per direction between GPUs of a node"
    )
    time.add_argument("--node-gbs", type=float, default=25.0, help="GB/s per direction per node (2 × IB EDR)")
    time.add_argument("--alpha-message-us", type=float, default=50.0, help="µs per collective")
    time.add_argument("--alpha-inter-us", type=float, default=5.0, help="µs per inter-node ring step")
    time.add_argument("--alpha-intra-us", type=float, default=2.0, help="µs per intra-node ring step")
    time.add_argument("--fusion-mib", type=float, default=64.0, help="Horovod fusion buffer, MiB")
    time.add_argument(
        "--device",
        default="V100",
        choices=sorted(DEVICES),
        help="device kind whose datasheet rates the model takes (default V100, the paper's)",
    )
    time.add_argument(
        "--factor-precision",
        default="fp32",
        help="input precision of the factor products (fp32, tf32, bf16, fp16; the device's peak for "
        "it; a comma list models each, e.g. fp32,fp16: the fp32 copy against tensor cores)",
    )
    time.add_argument("--peak-tflops", type=float, help="GPU fp32 peak, TFLOP/s (default: the device's)")
    time.add_argument(
        "--memory-gbs",
        type=float,
        help="memory bandwidth for the im2col traffic, GB/s (default: the device's; 0: not counted)",
    )
    time.add_argument(
        "--sgd-epochs",
        type=float,
        default=90,
        help="epochs SGD needs for the accuracy compared (default 90: Goyal et al.'s schedule)",
    )
    time.add_argument("--efficiency", type=float, default=0.6, help="fraction of peak for GEMM-like work")
    time.add_argument(
        "--inverse-efficiency", type=float, default=0.25, help="fraction of peak for inversions"
    )
    time.add_argument("--batch-per-gpu", type=int, help="default: batch / ranks")
    time.add_argument("--image-size", type=int, default=224)
    time.add_argument(
        "--due-fraction",
        type=float,
        default=PAPER_LAMBDA025_RATIO,
        help="share of layers due per step without a trace (default 0.119: the paper's λ = 0.25 "
        "traffic ratio, 357 GB / 3.0 TB)",
    )
    return parser


def traffic_lines(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    r, steps, s = result, result["steps"], result["scheme"]
    removed, before, after = s["local_inversion_removes"], s["broadcast_scheme"], s["allgather_scheme"]
    lines = [
        f"Fisher traffic per rank (a model): {args.model}, {r['layers']} K-FAC layers, {args.ranks} ranks, "
        f"batch {args.batch}, {steps} steps",
        f"  factors: {r['factor_values'] / 1e6:.1f} M values = {format_bytes(r['factor_bytes'])} at "
        f"{args.dtype_bytes} bytes each; {format_bytes(r['factor_payload_bytes_per_step'])} as "
        + ("upper triangles" if r["triangle_packing"] else "full matrices"),
        "  assumptions: every layer due every step; each factor allreduced (ring: 2(P-1)/P of a buffer per rank); "
        f"BatchNorm and Kronecker layers with both factors <= {args.local_inverse_max_dim} wide inverted on every rank "
        f"({r['locally_inverted_layers']} layers); the other {r['travelling_layers']} layers' inverses in one "
        "allgather per step (ring: (P-1)/P of the gathered buffer per rank); interval control bytes not counted",
        f"  every step, factor allreduce:    {format_bytes(r['factor_allreduce_wire_bytes_per_rank'])}",
        f"  every step, inverse allgather:   {format_bytes(r['inverse_allgather_wire_bytes_per_rank'])}",
        f"  every step, total:               {format_bytes(r['wire_bytes_per_rank'])} "
        f"({format_bytes(r['wire_bytes_per_step'])} per step)",
        f"  every step, dense factor allreduce only (no inverses, no packing): "
        f"{format_bytes(r['allreduce_only_dense_wire_bytes_per_rank'])}",
        "  the paper (Table 1, λ = –): 3.0 TB",
        "  per update step with every layer due:",
        f"    factor allreduce: {s['factor_allreduce']['tensors']} tensors (fused by Horovod), "
        f"{format_bytes(s['factor_allreduce']['wire_bytes'])} on the wire",
        f"    before: {before['broadcasts']} inverse broadcasts from {before['roots']} roots + "
        f"{before['schedule_broadcasts']} schedule broadcast, {format_bytes(before['wire_bytes'])} on the wire",
        f"    now:    {after['allgathers']} allgather of {after['matrices']} inverse matrices "
        f"({after['layers']} layers) + {after['control_payload_bytes']} control bytes, "
        f"{format_bytes(after['wire_bytes'])} on the wire",
        f"    local inversion removes {removed['matrices']} inverse messages ({removed['layers']} layers: "
        f"{removed['batchnorm_layers']} BatchNorm, {removed['kronecker_layers']} Kronecker), "
        f"{format_bytes(removed['payload_bytes'])} payload = {format_bytes(removed['allgather_wire_bytes'])} of "
        f"allgather wire ({format_bytes(removed['broadcast_wire_bytes'])} as broadcasts)",
    ]
    if "replay" in r:
        p = r["replay"]
        lines.append(
            f"  replay of {p['trace']} with λ = {p['update_threshold']} ({p['interval_policy']}): "
            f"{format_bytes(p['wire_bytes_per_rank'])} = "
            + (f"{100 * p['ratio']:.1f}%" if p["ratio"] is not None else "–")
            + " of every step "
            f"(factor allreduce {format_bytes(p['factor_allreduce_wire_bytes_per_rank'])}, inverse allgather "
            f"{format_bytes(p['inverse_allgather_wire_bytes_per_rank'])}; {p['inverse_allgathers']} "
            f"allgathers, + {format_bytes(p['control_wire_bytes_per_rank'])} control), due fraction "
            f"{p['due_fraction']:.3f}, mean final interval {p['mean_final_interval']:.1f}"
        )
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    steps = args.steps or int(args.epochs * args.train_images // args.batch)
    symmetric = not args.no_triangle
    model = _build_model(args.model)
    layers = model_layers(model, include_batchnorm=not args.no_batchnorm)
    options = dict(
        symmetric=symmetric, element_bytes=args.dtype_bytes, local_inverse_max_dim=args.local_inverse_max_dim
    )
    result: dict[str, Any] = {
        "model": args.model,
        "ranks": args.ranks,
        "batch": args.batch,
        "steps": steps,
        "dtype_bytes": args.dtype_bytes,
        "triangle_packing": symmetric,
        **every_step_traffic(layers, args.ranks, steps, **options),
        "scheme": scheme_comparison(layers, args.ranks, **options),
    }
    schedule = None
    if args.trace:
        try:
            records = load_trace(args.trace)
        except (OSError, ValueError) as error:
            parser.exit(2, f"commodel: {error}\n")
        replay = replay_trace(
            records,
            layers,
            steps,
            args.ranks,
            update_threshold=args.update_threshold,
            interval_policy=args.interval_policy,
            keep_schedule=args.time,
            **options,
        )
        schedule = replay.pop("schedule", None)
        result["replay"] = {
            **replay,
            "trace": args.trace,
            "update_threshold": args.update_threshold,
            "interval_policy": args.interval_policy,
        }
    if args.time:
        from .timereport import markdown, time_lines, time_model, time_summary

        result["time"] = time_model(args, model, schedule)
    text = traffic_lines(result, args) + ([""] + time_lines(result) if args.time else [])
    if args.markdown and args.time:
        command = "python -m kfac_hvd.commodel " + " ".join(
            shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:])
        )
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(
                markdown(
                    result, command, traffic_lines(result, args) + [""] + time_summary(result), args.note
                )
            )
    if args.json:
        time = result.get("time", {})
        for key in ("table", "markdown_table", "accuracy_table"):
            time.pop(key, None)
        print(json.dumps(result, indent=1))
        return 0
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
