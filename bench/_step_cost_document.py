"""step_cost.py's written report: step_cost.json (the raw data with the target checks) and step_cost.md
(the tables of :mod:`_step_cost_report`, :mod:`_step_cost_steady`, :mod:`_step_cost_tables` and
:mod:`_step_cost_limits`)."""

from __future__ import annotations

import json
import os
from typing import Any

from bench._step_cost_limits import limits_table
from bench._step_cost_report import checks, header, label, notes, summarise
from bench._step_cost_steady import lambda_table, steady_table
from bench._step_cost_tables import (
    collectives_table,
    comparison_table,
    memory_table,
    phases_table,
    steps_table,
    targets_table,
    work_table,
)


def markdown(data: dict[str, Any]) -> str:
    summary = summarise(data)
    lines = (
        header(data) + targets_table(data, summary) + steps_table(data, summary) + steady_table(data, summary)
    )
    lines += lambda_table(data, summary)
    lines += comparison_table(data, summary) + work_table(data, summary) + collectives_table(data, summary)
    lines += memory_table(data, summary)
    lines += phases_table(data, summary) + limits_table(data, summary, label) + notes(data) + [""]
    return "\n".join(lines)


def write(data: dict[str, Any], out: str) -> list[str]:
    paths = [os.path.join(out, "step_cost.json"), os.path.join(out, "step_cost.md")]
    summary = summarise(data)
    data["checks"] = [
        {"target": t, "measured": m, "verdict": v} for t, m, v in checks(summary, data["settings"])
    ]
    with open(paths[0], "w") as handle:
        json.dump(data, handle, indent=1)
    with open(paths[1], "w") as handle:
        handle.write(markdown(data))
    return paths


def rerender(out: str) -> None:
    with open(os.path.join(out, "step_cost.json")) as handle:
        data = json.load(handle)
    print("[step_cost] rewrote " + " and ".join(write(data, out)))
