#!/usr/bin/env python
"""The headline of a step-cost run, from its step_cost.json: the factor and inversion phases with each
path (autocast-dtype against fp32-copy products, batched against per-factor inversions), every step and
both steady states as multiples of SGD, each phase's fraction of the device's limit, and the targets for
one H200 (bf16, 224 px, 128 images, 1 rank). Prints Markdown; scripts/gpu_check.sh appends it to its report.
``--limits KIND`` measures nothing: each phase's limit on a device kind of ``kfac_hvd.analysis.devices`` from the
layer shapes alone (the least time the datasheet allows, not a prediction of a measurement).

    python -m bench.step_cost_summary DIR/step_cost.json [--precision bf16] [--ranks 1]
    python -m bench.step_cost_summary --limits H200 [--image-size 224] [--batch 128]
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from bench._step_cost_limits import (
    PHASE_ROWS,
    device_rates,
    gpu_rates,
    layer_profile,
    limit_rows,
    phase_costs,
)
from bench._step_cost_report import fmt, secs, summarise

# Targets on one H200 (bf16 autocast, 224 px, 128 images, 1 rank), seconds or multiples of SGD.
TARGETS = (
    ("factor phase of an update step (s)", "every", "factor", 0.03),
    ("inversion phase of an update step (s)", "every", "inverse", 0.04),
    ("K-FAC every step (× SGD)", "every", "x_sgd", 3.0),
    ("real-schedule steady state (× SGD)", "replay", "x_sgd", 1.3),
)


def phase(run: dict[str, Any] | None, timer: str) -> float | None:
    update = (run or {}).get("kinds", {}).get("update")
    return update["phases"].get(timer) if update else None


def value(runs: dict[str, Any], precision: str, config: str, what: str) -> float | None:
    run = runs.get(f"{precision}/{config}")
    return (run or {}).get(what) if what == "x_sgd" else phase(run, what)


def summary_lines(data: dict[str, Any], precision: str, ranks: str) -> list[str]:
    runs = summarise(data).get(ranks, {})
    rates = device_rates(data)
    device = rates["name"] if rates else data["settings"]["device"]
    s = data["settings"]
    lines = [
        f"### Step cost, {device}, {precision}, {s['image_size']} px, {s['batch']} images, {ranks} rank(s)",
        "",
        "| phase of an update step (s) | new path | earlier path |",
        "|---|---|---|",
        f"| factor computation (hooks): autocast-dtype products / fp32 copies | "
        f"{secs(value(runs, precision, 'every', 'factor'))} | {secs(value(runs, precision, 'every_wide', 'factor'))} |",
        f"| inversion: batched by size / one call per factor | {secs(value(runs, precision, 'every', 'inverse'))} | "
        f"{secs(value(runs, precision, 'every_unbatched', 'inverse'))} |",
        "",
    ]
    if s["device"] == "cpu" or precision == "fp32":
        lines += [
            "(Here both factor paths multiply fp32 values: the narrow products take bf16/fp16 inputs on CUDA "
            "only.)",
            "",
        ]
    lines += ["| configuration | s/step | × SGD |", "|---|---|---|"]
    for config, title in (
        ("sgd", "SGD"),
        ("every", "K-FAC every step"),
        ("every_wide", "every step, fp32-copy products"),
        ("every_unbatched", "every step, per-factor inversions"),
        ("lambda", "λ held still (worst case)"),
        ("replay", "recorded schedule replayed"),
        ("floor", "preconditioning floor"),
    ):
        run = runs.get(f"{precision}/{config}")
        if run:
            lines.append(f"| {title} | {secs(run['wall'])} | {fmt(run['x_sgd'])} |")
    limits = [row for row in limit_rows(data, {ranks: runs}) if row["config"] == f"{precision}/every"]
    if limits:
        lines += [
            "",
            f"| phase (K-FAC every step) | measured s | limit s on {device} | fraction of the limit |",
            "|---|---|---|---|",
        ]
        lines += [
            f"| {row['phase']} | {secs(row['measured'])} | {row['limit']:.3g} | {fmt(row['fraction'], 3)} |"
            for row in limits
        ]
    applies = device == "H200" and precision == "bf16" and s["image_size"] == 224 and s["batch"] == 128
    lines += [
        "",
        "| target (one H200, bf16, 224 px, 128 images, 1 rank) | measured | verdict |",
        "|---|---|---|",
    ]
    for title, config, what, limit in TARGETS:
        measured = value(runs, precision, config, what)
        verdict = "not measured" if measured is None else ("PASS" if measured <= limit else "MISS")
        if not applies:
            verdict = "target not for this setting"
        lines.append(f"| {title} ≤ {limit:g} | {secs(measured)} | {verdict} |")
    return lines


def device_limit_lines(kind: str, model: str, image_size: int, batch: int) -> list[str]:
    """Each phase's roofline on ``kind`` for an update step with every layer due, one rank, fp32 and bf16 products."""
    rates = gpu_rates(kind)
    profile = layer_profile({"model": model, "num_classes": 1000, "seed": 0, "image_size": image_size})
    lines = [
        f"### Limits of an update step on one {kind} ({model}, {image_size} px, {batch} images; from the layer "
        "shapes and the datasheet, not measured)",
        "",
        f"Rates: {rates['source']}.",
        "",
        "| phase | GFLOP | GB | limit ms, fp32 products | limit ms, bf16 products |",
        "|---|---|---|---|---|",
    ]
    costs = {
        products: phase_costs(profile, batch, 1, input_bytes=4 if products == "fp32" else 2)
        for products in ("fp32", "bf16")
    }
    for phase, _ in PHASE_ROWS:
        if phase.endswith(("allreduce", "allgather")):
            continue
        limit = {}
        for products, table in costs.items():
            flop, nbytes = table[phase]
            peak = rates[products] if phase == "factor products" else rates["fp32"]
            limit[products] = 1e3 * max(flop / peak, nbytes / rates["memory_bandwidth"])
        flop, nbytes = costs["fp32"][phase]
        lines.append(
            f"| {phase} | {flop / 1e9:.4g} | {nbytes / 1e9:.3g} (fp32) / {costs['bf16'][phase][1] / 1e9:.3g} "
            f"(bf16) | {limit['fp32']:.3g} | {limit['bf16']:.3g} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", nargs="?", help="step_cost.json of a step_cost.py run")
    parser.add_argument("--limits", metavar="KIND", help="no run: each phase's limit on this device kind")
    parser.add_argument("--model", default="resnet50")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--precision", default="bf16", help="which precision's runs (default bf16)")
    parser.add_argument("--ranks", default="1", help="which launch (default 1 rank)")
    args = parser.parse_args(argv)
    if args.limits:
        if gpu_rates(args.limits) is None:
            parser.exit(2, f"step_cost_summary: no rates for {args.limits!r}\n")
        print("\n".join(device_limit_lines(args.limits, args.model, args.image_size, args.batch)))
        return 0
    if not args.json:
        parser.exit(2, "step_cost_summary: give a step_cost.json or --limits KIND\n")
    try:
        with open(args.json) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        parser.exit(2, f"step_cost_summary: {args.json}: {error}\n")
    print("\n".join(summary_lines(data, args.precision, args.ranks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
