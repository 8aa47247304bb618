"""The step-time model's flags, tables and text (the ``--time`` part of
``python -m kfac_hvd.analysis.commodel``).

Builds :class:`kfac_hvd.analysis.timemodel.StepModel` from the command line (the device's datasheet rates,
the precision of the factor products), formats its rows as text and Markdown, and adds the time each run
needs for the compared accuracy.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from typing import Any

from torch import nn

from . import timemodel as tm
from .devices import DEVICES, PRECISIONS
from .network import TOPOLOGIES

PAPER_LAMBDA025_RATIO = 357 / 3000  # Table 1: 357 GB of 3.0 TB at λ = 0.25


def add_time_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``--time``: the hardware, the precision of the factor products, the run compared."""
    time = parser.add_argument_group("step-time model (--time; a model, see kfac_hvd/analysis/timemodel.py)")
    time.add_argument(
        "--time", action="store_true", help="model seconds per step (α-β collectives + FLOP compute)"
    )
    time.add_argument(
        "--markdown", metavar="PATH", help="with --time: also write the table as markdown to PATH"
    )
    time.add_argument(
        "--note", default="", help="a paragraph for the --markdown file (e.g. where the trace is from)"
    )
    time.add_argument("--topology", default="flat", choices=TOPOLOGIES)
    time.add_argument("--gpus-per-node", type=int, default=4)
    time.add_argument(
        "--nvlink-gbs", type=float, default=50.0, help="GB/s per direction between GPUs of a node"
    )
    time.add_argument("--node-gbs", type=float, default=25.0, help="GB/s per direction per node (2 × IB EDR)")
    time.add_argument("--alpha-message-us", type=float, default=50.0, help="µs per collective")
    time.add_argument("--alpha-inter-us", type=float, default=5.0, help="µs per inter-node ring step")
    time.add_argument("--alpha-intra-us", type=float, default=2.0, help="µs per intra-node ring step")
    time.add_argument("--fusion-mib", type=float, default=64.0, help="Horovod fusion buffer, MiB")
    _add_compute_arguments(time)


def _add_compute_arguments(time: argparse._ArgumentGroup) -> None:
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


def factor_precisions(args: argparse.Namespace) -> list[str]:
    precisions = [p.strip() for p in args.factor_precision.split(",") if p.strip()]
    unknown = [p for p in precisions if p not in PRECISIONS]
    if unknown or not precisions:
        raise SystemExit(
            f"commodel: --factor-precision takes {', '.join(PRECISIONS)}, got {args.factor_precision!r}"
        )
    return precisions


def _network(args: argparse.Namespace) -> tm.Network:
    return tm.Network(
        gpus_per_node=args.gpus_per_node,
        nvlink_bandwidth=args.nvlink_gbs * 1e9,
        node_bandwidth=args.node_gbs * 1e9,
        alpha_message=args.alpha_message_us * 1e-6,
        alpha_intra=args.alpha_intra_us * 1e-6,
        alpha_inter=args.alpha_inter_us * 1e-6,
        fusion_bytes=int(args.fusion_mib * 2**20),
        topology=args.topology,
    )


def step_models(args: argparse.Namespace, model: nn.Module, precisions: list[str]) -> list[tm.StepModel]:
    """One step model per precision of the factor products, all else alike."""
    overrides: dict[str, Any] = {"efficiency": args.efficiency, "inverse_efficiency": args.inverse_efficiency}
    if args.peak_tflops is not None:
        overrides["peak_flops"] = args.peak_tflops * 1e12
    if args.memory_gbs is not None:
        overrides["memory_bandwidth"] = args.memory_gbs * 1e9 or None
    setup = tm.Setup(
        world_size=args.ranks,
        batch_per_gpu=args.batch_per_gpu or max(1, args.batch // args.ranks),
        element_bytes=args.dtype_bytes,
        symmetric=not args.no_triangle,
        local_inverse_max_dim=args.local_inverse_max_dim,
    )
    profile = tm.profile_model(
        model,
        image_size=args.image_size,
        include_batchnorm=not args.no_batchnorm,
        batchnorm_fisher=args.batchnorm_fisher,
    )
    network = _network(args)
    try:
        return [
            tm.StepModel(
                profile, network, tm.Gpu.of(args.device, factor_precision=precision, **overrides), setup
            )
            for precision in precisions
        ]
    except ValueError as error:
        raise SystemExit(f"commodel: {error}") from None


def model_rows(
    args: argparse.Namespace,
    steps: Sequence[tm.StepModel],
    precisions: Sequence[str],
    schedule: list[list[str]] | None,
) -> list[dict[str, Any]]:
    """SGD once, then each precision's K-FAC rows (every step, the due fraction, the replayed trace)."""
    fraction_label = (
        f"λ = 0.25, due fraction {args.due_fraction:.3f} (paper's traffic ratio)"
        if args.due_fraction == PAPER_LAMBDA025_RATIO
        else f"due fraction {args.due_fraction:g}"
    )
    rows: list[dict[str, Any]] = []
    for step, precision in zip(steps, precisions):
        these = tm.time_rows(
            step,
            fractions=[(fraction_label, args.due_fraction)],
            schedules=[(f"λ = {args.update_threshold}, replayed trace ({args.interval_policy})", schedule)]
            if schedule is not None
            else [],
        )
        if len(precisions) > 1:
            for row in these[1:]:
                row["method"] += f" [{precision} factor products]"
        rows += these if not rows else these[1:]  # one SGD row: it has no factor products
    return rows


def time_model(
    args: argparse.Namespace, model: nn.Module, schedule: list[list[str]] | None
) -> dict[str, Any]:
    precisions = factor_precisions(args)
    steps = step_models(args, model, precisions)
    rows = model_rows(args, steps, precisions, schedule)
    step = steps[0]
    every = step.profile.layer_names
    kfac_steps = args.steps or int(args.epochs * args.train_images // args.batch)
    sgd_steps = int(args.sgd_epochs * args.train_images // args.batch)
    accuracy = tm.time_to_accuracy(rows, kfac_steps=kfac_steps, sgd_steps=sgd_steps)
    lines = describe_assumptions(step)
    rates = ", ".join(
        f"{p} {(s.gpu.factor_peak_flops or s.gpu.peak_flops) / 1e12:g} TFLOP/s "
        f"({s.gpu.factor_input_bytes}-byte im2col values)"
        for p, s in zip(precisions, steps)
    )
    lines.insert(
        3, f"device {args.device} ({DEVICES[args.device].source}); factor-product peaks modelled: {rates}"
    )
    return {
        "assumptions": tm.assumptions(step),
        "assumption_lines": lines,
        "rows": rows,
        "factor_precisions": precisions,
        "device": args.device,
        "device_source": DEVICES[args.device].source,
        "every_step_inverse_comm_seconds": {
            "broadcast_scheme": step.broadcast_scheme_seconds(every, adaptive=True),
            "allgather_scheme": step.phases(dict.fromkeys(every, 1.0), adaptive=True)["inverse_allgather"],
        },
        "time_to_accuracy": accuracy,
        "sgd_steps": sgd_steps,
        "sgd_epochs": args.sgd_epochs,
        "table": format_table(rows),
        "markdown_table": format_table(rows, markdown=True),
        "accuracy_table": format_accuracy_table(accuracy),
    }


def time_lines(result: dict[str, Any]) -> list[str]:
    t = result["time"]
    lines = ["Step time per GPU, milliseconds (a MODEL, not a measurement). Assumptions:"]
    lines += [f"  - {line}" for line in t["assumption_lines"]]
    return lines + ["", t["table"], ""] + time_summary(result)


def time_summary(result: dict[str, Any]) -> list[str]:
    """What the table implies: the inverse exchange before and after, throughput, run time, critical path."""
    t = result["time"]
    comm = t["every_step_inverse_comm_seconds"]
    sgd = t["rows"][0]["phases"]
    images = t["assumptions"]["setup"]["batch_per_gpu"] / (sgd["forward"] + sgd["backward"])
    lines = [
        f"inverse communication of one every-step update: {1e3 * comm['broadcast_scheme']:.1f} ms as one "
        f"broadcast per inverse + schedule broadcast, {1e3 * comm['allgather_scheme']:.1f} ms as one allgather "
        "with local inversion",
        f"SGD compute alone: {images:.0f} images/s per GPU (compare with a measured fp32 throughput to "
        "calibrate --efficiency)",
    ]
    lines.append(
        f"time to the compared accuracy: K-FAC {t['time_to_accuracy'][1]['steps']} steps, SGD "
        f"{t['sgd_steps']} steps ({t['sgd_epochs']:g} epochs at the same batch):"
    )
    lines += [f"  {e['method']}: {e['hours']:.2f} h = {e['x_sgd']:.2f}× SGD's" for e in t["time_to_accuracy"]]
    for row in t["rows"]:
        path = " -> ".join(f"{k} {1e3 * v:.1f}" for k, v in row["critical_path"].items())
        lines.append(
            f"{row['method']}: critical path (ms): {path}"
            + (
                ""
                if row["allreduce_hidden"]
                else f"; allreduces exceed the backward window by {1e3 * row['exposed_allreduce']:.1f} ms"
            )
        )
    return lines


def format_table(rows: Sequence[dict[str, Any]], *, markdown: bool = False) -> str:
    """The time table: phases and step times in milliseconds per step, per GPU."""
    head = [
        "method",
        "fwd+bwd",
        "factor",
        "grad AR",
        "factor AR",
        "inversion",
        "inv. allgather",
        "precond.",
        "step, no overlap",
        "step, overlap",
        "AR exposed",
        "bottleneck (overlap)",
    ]
    body = []
    for row in rows:
        p = row["phases"]
        ms = lambda value: f"{1e3 * value:.1f}"  # noqa: E731
        body.append(
            [
                row["method"],
                ms(p["forward"] + p["backward"]),
                ms(p["factor"]),
                ms(p["gradient_allreduce"]),
                ms(p["factor_allreduce"]),
                ms(p["inversion"]),
                ms(p["inverse_allgather"]),
                ms(p["precondition"]),
                ms(row["no_overlap"]),
                ms(row["overlap"]),
                ms(row["exposed_allreduce"]),
                row["bottleneck"],
            ]
        )
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        return "\n".join(lines + ["| " + " | ".join(cells) + " |" for cells in body])
    widths = [max(len(str(r[i])) for r in [head] + body) for i in range(len(head))]

    def fmt(cells: list) -> str:
        return "  ".join(
            str(c).ljust(w) if i in (0, len(head) - 1) else str(c).rjust(w)
            for i, (c, w) in enumerate(zip(cells, widths))
        )

    return "\n".join(
        line.rstrip() for line in [fmt(head), fmt(["-" * w for w in widths])] + [fmt(c) for c in body]
    )


def format_accuracy_table(entries: Sequence[dict[str, Any]]) -> str:
    lines = ["| method | steps | s/step (overlap) | hours | × SGD's time |", "|---|---|---|---|---|"]
    lines += [
        f"| {e['method']} | {e['steps']:,} | {e['step_seconds']:.3f} | {e['hours']:.2f} | {e['x_sgd']:.2f} |"
        for e in entries
    ]
    return "\n".join(lines)


def describe_assumptions(model: tm.StepModel) -> list[str]:
    net, gpu, s, prof = model.network, model.gpu, model.setup, model.profile
    nodes = math.ceil(s.world_size / net.gpus_per_node)
    ring = (
        "flat ring over all GPUs; every ring step costs the slowest (inter-node) edge"
        if net.topology == "flat"
        else "hierarchical: ring inside each node around a ring over the nodes"
    )
    return [
        f"{s.world_size} GPUs = {nodes} nodes × {net.gpus_per_node}; batch {s.batch_per_gpu} per GPU at "
        f"{prof.image_size} px; {len(prof.layers)} K-FAC layers, {len(model.travelling)} of them inverted by one "
        f"owner and allgathered, {len(prof.layers) - len(model.travelling)} inverted on every rank "
        + (
            f"(BatchNorm, and both factors ≤ {s.local_inverse_max_dim} wide)"
            if not any(model.costs[layer.name].full_batchnorm for layer in prof.layers)
            else f"(every factor, full 2C×2C BatchNorm blocks included, ≤ {s.local_inverse_max_dim} wide)"
        ),
        f"collectives: {ring}; NVLink {net.nvlink_bandwidth / 1e9:g} GB/s, node NICs {net.node_bandwidth / 1e9:g} GB/s "
        f"(per direction); α {1e6 * net.alpha_message:g} µs per collective + {1e6 * net.alpha_inter:g} µs per "
        f"inter-node ring step ({1e6 * net.alpha_intra:g} µs inside a node); allreduce 2(P−1)/P·n/B, allgather "
        f"(P−1)/P·n/B, broadcast n/B; fusion buffer {net.fusion_bytes / 2**20:g} MiB",
        f"compute: {gpu.peak_flops / 1e12:g} TFLOP/s peak × {gpu.efficiency:g} for forward/backward, BatchNorm's "
        f"factor sums and preconditioning, × {gpu.inverse_efficiency:g} for inversions; the Kronecker factor "
        f"products at {(gpu.factor_peak_flops or gpu.peak_flops) / 1e12:g} TFLOP/s peak ({gpu.factor_precision}) × "
        f"{gpu.efficiency:g}; "
        + (
            f"im2col columns ({gpu.factor_input_bytes} bytes a value) written and read at "
            f"{gpu.memory_bandwidth / 1e9:g} GB/s × {gpu.memory_efficiency:g}; "
            if gpu.memory_bandwidth
            else "im2col memory traffic not counted; "
        )
        + f"forward "
        f"{2 * prof.forward_macs_per_sample / 1e9:.2f} GFLOP per image (conv + linear MACs × 2), backward "
        "2 × forward",
        "factors 2·rows·dim² (rows = batch × output positions), inversion dim(A)³ + dim(G)³ on the most loaded "
        "rank plus every local layer, preconditioning 2(dG²·dA + dG·dA²) for every layer every step",
        f"gradient allreduce: {prof.parameters / 1e6:.1f} M parameters every step; {s.element_bytes} bytes per value; "
        + ("factors and inverses as upper triangles (n(n+1)/2 values)" if s.symmetric else "full matrices"),
        "overlap: gradient + factor allreduces run under the backward pass (and its factor hooks) as far as it "
        "lasts; inversion, inverse allgather and preconditioning are on the critical path",
        "not modelled: the last bucket's tail after backward, compute/communication contention, stragglers, "
        "optimiser update, data loading, triangle packing",
    ]


def markdown(result: dict[str, Any], command: str, text: list[str], note: str = "") -> str:
    t = result["time"]
    parts = (
        [
            f"# Step-time model of distributed K-FAC ({result['model']}, {result['ranks']} GPUs)",
            "",
            "**A model, not a measurement**: α-β collectives and FLOP-counted compute, every constant stated "
            "below. Generated by",
            "",
            "```bash",
            command,
            "```",
            "",
        ]
        + ([note, ""] if note else [])
        + [
            f"Milliseconds per step per GPU (the run: {result['steps']} steps). *fwd+bwd*, *factor*, *inversion*, "
            "*precond.*: compute; *grad AR*, "
            "*factor AR*: allreduces (hidden under the backward pass with overlap, as far as it lasts); *inv. "
            "allgather*: the one inverse allgather. Rows with a due fraction pay factor, factor-AR, inversion and "
            "allgather costs for the due layers only (replayed trace: averaged step by step).",
            "",
            t["markdown_table"],
            "",
            f"## Time to the compared accuracy ({result['steps']:,} K-FAC steps, {t['sgd_steps']:,} SGD steps)",
            "",
            f"Each row's steps × its step time with overlap. SGD: {t['sgd_epochs']:g} epochs at the same global "
            f"batch of {result['batch']:,} ({t['sgd_steps']:,} steps).",
            "",
            t["accuracy_table"],
            "",
            "## Assumptions",
            "",
        ]
    )
    parts += [f"- {line}" for line in t["assumption_lines"]]
    parts += ["", "## Traffic and critical path", "", "```text", *text, "```", ""]
    return "\n".join(parts)
