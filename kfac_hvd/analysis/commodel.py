"""Fisher-traffic model: what K-FAC's factor and inverse communication costs per rank, at any scale.

    python -m kfac_hvd.analysis.commodel --model resnet50 --ranks 128 --batch 16384 --epochs 36
    python -m kfac_hvd.analysis.commodel ... --trace runs/x/metrics.jsonl --update-threshold 0.25
    python -m kfac_hvd.analysis.commodel --time [--trace ...] [--markdown docs/results/commodel_time.md]

Every layer's bytes and messages are :func:`kfac_hvd.cost.layer_cost`'s, the runtime's own accounting;
the scheme is described in :mod:`kfac_hvd.analysis.traffic`. Without a trace every layer is due every
step (λ = –). With a trace recorded by a real (small) run, the trace's per-layer diffs drive Algorithm 1
at the large run's scale: see :func:`kfac_hvd.analysis.replay.replay_trace`. ``--time`` adds the
step-time model of :mod:`kfac_hvd.analysis.timemodel`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM
from ..cost import layer_costs
from ..layers import BATCHNORM_FISHERS
from .replay import load_trace, replay_trace
from .timereport import add_time_arguments, markdown, time_lines, time_model, time_summary
from .traffic import every_step_traffic, model_layers, scheme_comparison
from .units import format_bytes

IMAGENET_TRAIN_IMAGES = 1_281_167
PROG = "python -m kfac_hvd.analysis.commodel"


def _build_model(name: str) -> nn.Module:
    import torchvision

    try:
        with torch.device("meta"):  # shapes only: no weights are initialised
            return getattr(torchvision.models, name)(weights=None)
    except AttributeError:
        raise SystemExit(f"commodel: unknown torchvision model '{name}'") from None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=(__doc__ or "").split("\n")[0])
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
        "--batchnorm-fisher",
        default="unit_wise",
        choices=BATCHNORM_FISHERS,
        help="BatchNorm's Fisher: 2x2 blocks per channel (default, the library's) or one 2Cx2C block per "
        "layer (full, the paper's released code)",
    )
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
    add_time_arguments(parser)
    return parser


def traffic_lines(result: dict[str, Any], args: argparse.Namespace) -> list[str]:
    r, steps, s = result, result["steps"], result["scheme"]
    removed, before, after = s["local_inversion_removes"], s["broadcast_scheme"], s["allgather_scheme"]
    lines = [
        f"Fisher traffic per rank (a model): {args.model}, {r['layers']} K-FAC layers, {args.ranks} ranks, "
        f"batch {args.batch}, {steps} steps, BatchNorm Fisher {args.batchnorm_fisher}",
        f"  factors: {r['factor_values'] / 1e6:.1f} M values = {format_bytes(r['factor_bytes'])} at "
        f"{args.dtype_bytes} bytes each; {format_bytes(r['factor_payload_bytes_per_step'])} as "
        + ("upper triangles" if r["triangle_packing"] else "full matrices"),
        "  assumptions: every layer due every step; each factor allreduced (ring: 2(P-1)/P of a buffer per rank); "
        + (
            "BatchNorm and Kronecker layers with both factors"
            if args.batchnorm_fisher == "unit_wise"
            else "Kronecker layers with both factors, and full BatchNorm blocks,"
        )
        + f" <= {args.local_inverse_max_dim} wide inverted on every rank "
        f"({r['locally_inverted_layers']} layers); the other {r['travelling_layers']} layers' inverses in one "
        "allgather per step (ring: (P-1)/P of the gathered buffer per rank); interval control bytes not counted",
        f"  every step, factor allreduce:    {format_bytes(r['factor_allreduce_wire_bytes_per_rank'])}",
        f"  every step, inverse allgather:   {format_bytes(r['inverse_allgather_wire_bytes_per_rank'])}",
        f"  every step, total:               {format_bytes(r['wire_bytes_per_rank'])} "
        f"({format_bytes(r['wire_bytes_per_step'])} per step)",
        f"  every step, dense factor allreduce only (no inverses, no packing): "
        f"{format_bytes(r['allreduce_only_dense_wire_bytes_per_rank'])}",
        f"  every step, dense fp32 values of every factor (the paper's Table 1 accounting): "
        f"{format_bytes(r['factor_bytes'], digits=1, unit='MB')} per step × {steps} steps = "
        f"{format_bytes(r['dense_factor_bytes_per_rank'])}",
        "  the paper (Table 1, λ = –): 3.0 TB (= the line above with --batchnorm-fisher full)",
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


def traffic_result(
    args: argparse.Namespace, model: nn.Module, parser: argparse.ArgumentParser
) -> dict[str, Any]:
    """The every-step traffic, the scheme comparison and (with ``--trace``) the replay, as one dict; the
    replayed schedule stays under ``"schedule"`` of the replay for the time model."""
    steps = args.steps or int(args.epochs * args.train_images // args.batch)
    costs = list(
        layer_costs(
            model_layers(
                model, include_batchnorm=not args.no_batchnorm, batchnorm_fisher=args.batchnorm_fisher
            ),
            symmetric=not args.no_triangle,
            element_bytes=args.dtype_bytes,
            local_inverse_max_dim=args.local_inverse_max_dim,
        ).values()
    )
    result: dict[str, Any] = {
        "model": args.model,
        "ranks": args.ranks,
        "batch": args.batch,
        "steps": steps,
        "dtype_bytes": args.dtype_bytes,
        "triangle_packing": not args.no_triangle,
        **every_step_traffic(costs, args.ranks, steps),
        "local_inverse_max_dim": args.local_inverse_max_dim,
        "scheme": scheme_comparison(costs, args.ranks),
    }
    if args.trace:
        try:
            replay = replay_trace(
                load_trace(args.trace),
                costs,
                steps,
                args.ranks,
                update_threshold=args.update_threshold,
                interval_policy=args.interval_policy,
                keep_schedule=args.time,
            )
        except (OSError, ValueError) as error:  # an unreadable trace, or λ / the policy out of range
            parser.exit(2, f"commodel: {error}\n")
        result["replay"] = {
            **replay,
            "trace": args.trace,
            "update_threshold": args.update_threshold,
            "interval_policy": args.interval_policy,
        }
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    model = _build_model(args.model)
    result = traffic_result(args, model, parser)
    schedule = result.get("replay", {}).pop("schedule", None)
    if args.time:
        result["time"] = time_model(args, model, schedule)
    if args.markdown and args.time:
        command = f"{PROG} " + " ".join(shlex.quote(a) for a in (argv if argv is not None else sys.argv[1:]))
        text = traffic_lines(result, args) + [""] + time_summary(result)
        with open(args.markdown, "w", encoding="utf-8") as handle:
            handle.write(markdown(result, command, text, args.note))
    if args.json:
        for key in ("table", "markdown_table", "accuracy_table"):
            result.get("time", {}).pop(key, None)
        print(json.dumps(result, indent=1))
        return 0
    print("\n".join(traffic_lines(result, args) + ([""] + time_lines(result) if args.time else [])))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
