#!/usr/bin/env python
"""The headline of a step-cost run, from its step_cost.json: the factor and inversion phases with each
path (autocast-dtype against fp32-copy products, batched against per-factor inversions), every step and
both steady states as multiples of SGD, each phase's fraction of the device's limit, and the targets for
one H200 (bf16, 224 px, 128 images, 1 rank). Prints Markdown; scripts/gpu_check.sh appends it to its report.

    python scripts/bench/step_cost_summary.py DIR/step_cost.json [--precision bf16] [--ranks 1]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _step_cost_limits import device_rates, limit_rows  # noqa: E402
from _step_cost_report import fmt, secs, summarise  # noqa: E402

# Targets on one H200 (bf16 autocast, 224 px, 128 images, 1 rank), seconds or multiples of SGD.
TARGETS = (("factor phase of an update step (s)", "every", "factor", 0.03),
           ("inversion phase of an update step (s)", "every", "inverse", 0.04),
           ("K-FAC every step (× SGD)", "every", "x_sgd", 3.0),
           ("real-schedule steady state (× SGD)", "replay", "x_sgd", 1.3))


def phase(run: Optional[Dict[str, Any]], timer: str) -> Optional[float]:
    update = (run or {}).get("kinds", {}).get("update")
    return update["phases"].get(timer) if update else None


def value(runs: Dict[str, Any], precision: str, config: str, what: str) -> Optional[float]:
    run = runs.get(f"{precision}/{config}")
    return (run or {}).get(what) if what == "x_sgd" else phase(run, what)


def summary_lines(data: Dict[str, Any], precision: str, ranks: str) -> List[str]:
    runs = summarise(data).get(ranks, {})
    rates = device_rates(data)
    device = rates["name"] if rates else data["settings"]["device"]
    s = data["settings"]
    lines = [f"### Step cost, {device}, {precision}, {s['image_size']} px, {s['batch']} images, {ranks} rank(s)", "",
             "| phase of an update step (s) | new path | earlier path |", "|---|---|---|",
             f"| factor computation (hooks): autocast-dtype products / fp32 copies | "
             f"{secs(value(runs, precision, 'every', 'factor'))} | {secs(value(runs, precision, 'every_wide', 'factor'))} |",
             f"| inversion: batched by size / one call per factor | {secs(value(runs, precision, 'every', 'inverse'))} | "
             f"{secs(value(runs, precision, 'every_unbatched', 'inverse'))} |", "",
             "| configuration | s/step | × SGD |", "|---|---|---|"]
    for config, title in (("sgd", "SGD"), ("every", "K-FAC every step"), ("every_wide", "every step, fp32-copy products"),
                          ("every_unbatched", "every step, per-factor inversions"),
                          ("lambda", "λ held still (worst case)"), ("replay", "recorded schedule replayed"),
                          ("floor", "preconditioning floor")):
        run = runs.get(f"{precision}/{config}")
        if run:
            lines.append(f"| {title} | {secs(run['wall'])} | {fmt(run['x_sgd'])} |")
    limits = [row for row in limit_rows(data, {ranks: runs}) if row["config"] == f"{precision}/every"]
    if limits:
        lines += ["", f"| phase (K-FAC every step) | measured s | limit s on {device} | fraction of the limit |",
                  "|---|---|---|---|"]
        lines += [f"| {row['phase']} | {secs(row['measured'])} | {row['limit']:.3g} | {fmt(row['fraction'], 3)} |"
                  for row in limits]
    applies = device == "H200" and precision == "bf16" and s["image_size"] == 224 and s["batch"] == 128
    lines += ["", "| target (one H200, bf16, 224 px, 128 images, 1 rank) | measured | verdict |", "|---|---|---|"]
    for title, config, what, limit in TARGETS:
        measured = value(runs, precision, config, what)
        verdict = "not measured" if measured is None else ("PASS" if measured <= limit else "MISS")
        if not applies:
            verdict = "target not for this setting"
        lines.append(f"| {title} ≤ {limit:g} | {secs(measured)} | {verdict} |")
    return lines


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("json", help="step_cost.json of a step_cost.py run")
    parser.add_argument("--precision", default="bf16", help="which precision's runs (default bf16)")
    parser.add_argument("--ranks", default="1", help="which launch (default 1 rank)")
    args = parser.parse_args(argv)
    try:
        with open(args.json) as handle:
            data = json.load(handle)
    except (OSError, ValueError) as error:
        parser.exit(2, f"step_cost_summary: {args.json}: {error}\n")
    print("\n".join(summary_lines(data, args.precision, args.ranks)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
