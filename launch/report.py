"""Print a short table from one or more runs' summary.json: ``python -m launch.report RUN_DIR ...``."""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, Optional

from kfac_hvd.commodel import format_bytes


def _bytes(n) -> str:
    return "-" if n is None else format_bytes(n)


def load(path: str) -> dict:
    if os.path.isdir(path):
        path = os.path.join(path, "summary.json")
    with open(path, "r", encoding="utf-8") as fh:
        return json.load(fh)


def row(summary: dict, label: str) -> List[str]:
    fisher = summary.get("fisher") or {}
    kfac = summary.get("kfac") or {}
    top1 = summary.get("final_top1")
    ratio = fisher.get("ratio")
    lam = kfac.get("update_threshold") if kfac else None
    method = summary.get("method", "?")
    if method == "kfac":
        every = kfac.get("update_interval") or 1
        if lam is not None:
            method = f"kfac, lambda={lam}"
        else:
            method = "kfac, every step" if every == 1 else f"kfac, every {every} steps"
    return [
        label,
        method,
        f"{top1 * 100:.2f}%" if top1 is not None else "-",
        _bytes(fisher.get("wire_bytes")) if fisher else "-",
        _bytes(fisher.get("every_step_wire_bytes")) if fisher else "-",
        f"{ratio * 100:.1f}%" if ratio is not None else "-",
        f"{kfac['mean_interval']:.2f}" if kfac.get("mean_interval") is not None else "-",
        f"{summary.get('wall_time_s', 0):.0f} s",
    ]


def table(summaries: List[dict], labels: List[str]) -> str:
    head = ["run", "method", "test top-1", "Fisher/rank", "every-step", "ratio", "interval", "wall time"]
    rows = [head] + [row(s, l) for s, l in zip(summaries, labels)]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths)))  # noqa: E731
    lines = [fmt(rows[0]), "  ".join("-" * w for w in widths)] + [fmt(r) for r in rows[1:]]
    return "\n".join(lines)


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.report", description=__doc__)
    parser.add_argument("runs", nargs="+", help="run folders (or summary.json files)")
    args = parser.parse_args(argv)
    summaries, labels = [], []
    for path in args.runs:
        try:
            summaries.append(load(path))
        except (OSError, json.JSONDecodeError) as exc:
            print(f"report: cannot read {path}: {exc}", file=sys.stderr)
            return 1
        labels.append(os.path.basename(os.path.normpath(path if os.path.isdir(path) else os.path.dirname(path))))
    print(table(summaries, labels))
    print("Fisher/rank: factor allreduce + inverse allgather bytes per rank (ring wire model); "
          "ratio: payload vs updating every layer every step")
    return 0


if __name__ == "__main__":
    sys.exit(main())
