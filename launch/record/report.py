"""A short table from one or more runs' summary.json, and with ``--plot`` their figure:
``python -m launch.report RUN_DIR [RUN_DIR ...] [--plot [OUT.png]]``. Exit code 2 when a run cannot be read."""

from __future__ import annotations

import argparse
import json
import os
import sys

from kfac_hvd.analysis.units import format_bytes
from launch.record.reader import NotARun, method_label, read_run


def load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    with open(path, encoding="utf-8") as fh:
        return json.load(fh)


def row(summary: dict, label: str) -> list[str]:
    fisher = summary.get("fisher") or {}
    kfac = summary.get("kfac") or {}
    top1 = summary.get("final_top1")
    ratio = fisher.get("ratio")
    return [
        label,
        method_label(summary),
        f"{top1 * 100:.2f}%" if top1 is not None else "-",
        format_bytes(fisher.get("wire_bytes")) if fisher else "-",
        format_bytes(fisher.get("every_step_wire_bytes")) if fisher else "-",
        f"{ratio * 100:.1f}%" if ratio is not None else "-",
        f"{kfac['mean_interval']:.2f}" if kfac.get("mean_interval") is not None else "-",
        f"{summary.get('wall_time_s', 0):.0f} s",
    ]


LEGEND = (
    "Fisher/rank: factor allreduce + inverse allgather bytes per rank (ring wire model); "
    "ratio: payload vs updating every layer every step"
)


def table(summaries: list[dict], labels: list[str]) -> str:
    head = ["run", "method", "test top-1", "Fisher/rank", "every-step", "ratio", "interval", "wall time"]
    rows = [head] + [row(s, label) for s, label in zip(summaries, labels)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]

    def fmt(r: list[str]) -> str:
        return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))

    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def _plot(paths: list[str], out: str | None) -> int:
    from launch.record import plots

    folders = [
        path if os.path.isdir(path) or not path.endswith(".json") else os.path.dirname(path) or "."
        for path in paths
    ]
    if out is None and len(folders) > 1:
        print("report: --plot with several runs needs the figure's path: --plot OUT.png", file=sys.stderr)
        return 2
    out = out or os.path.join(folders[0], "report.png")
    if not out.lower().endswith(".png"):
        print(
            f"report: --plot {out}: the figure's path must end in .png (run folders go before --plot)",
            file=sys.stderr,
        )
        return 2
    runs = []
    for folder in folders:
        try:
            runs.append(read_run(folder))
        except (NotARun, OSError) as exc:
            print(f"report: {exc}", file=sys.stderr)
            return 2
    finished = [(r.summary, r.name) for r in runs if r.summary is not None]
    if finished:
        print(table([summary for summary, _ in finished], [name for _, name in finished]))
        print(LEGEND, flush=True)
    for run in runs:
        for problem in run.problems:
            print(f"report: {run.path}: {problem}", file=sys.stderr)
    try:
        plots.save(runs, out)
    except OSError as exc:
        print(f"report: cannot write {out}: {exc}", file=sys.stderr)
        return 2
    print(f"figure: {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (or summary.json files)")
    parser.add_argument(
        "--plot",
        nargs="?",
        const="",
        metavar="OUT.png",
        help="also draw the runs' figure (default RUN_DIR/report.png for one run)",
    )
    args = parser.parse_args(argv)
    if args.plot is not None:
        return _plot(args.runs, args.plot or None)
    summaries, labels = [], []
    for path in args.runs:
        try:
            summaries.append(load(path))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            return 2
        labels.append(
            os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path)))
        )
    print(table(summaries, labels))
    print(LEGEND)
    return 0
