"""The steady states of step_cost.py's report: the held-still λ run (the modulo rule's worst case) and the
replayed schedule of a recorded run, as multiples of SGD and of the floor."""

from __future__ import annotations

import math
import os

from bench._common import REPO, mean
from bench._step_cost_report import TARGET_LAMBDA, fmt, label, ratio, secs


def steady_table(data, summary) -> list[str]:
    """Every step, the held-still worst case and the replayed real schedule, as multiples of SGD."""
    rows = []
    for n, runs in summary.items():
        for key, run in runs.items():
            name = key.split("/")[1]
            if name not in ("every", "lambda", "replay", "floor"):
                continue
            if name == "replay":
                due = f"{100 * run['due_fraction']:.1f}% of the layers, mean over the replayed steps"
            elif name == "lambda":
                pattern = run["due_pattern"][run["window"][0] - 1 :]
                due = f"{100 * mean(pattern) / run['first']['layers']:.1f}% (due counts {' '.join(map(str, pattern))})"
            else:
                due = "100% (update every step)" if name == "every" else "0% after step 2"
            rows.append(
                f"| {n} | {label(key, data['settings'])} | {secs(run['wall'])} | {fmt(run['x_sgd'])} | "
                f"{fmt(run['cpu_x_sgd'])} | {due} |"
            )
    if not rows:
        return []
    trace = (
        os.path.relpath(
            data["settings"]["schedule_trace"],
            REPO,
        )
        if data["settings"].get("schedule_trace")
        else "–"
    )
    return [
        "",
        "## Steady states against SGD",
        "",
        "Held still: λ with lr 0 and one batch, where the modulo rule settles on an update every second step "
        f"(the worst case). Replayed: the due pattern of the last {data['settings'].get('replay_steps')} steps of "
        f"the recorded run `{trace}`, each layer due when the recorded layer of its type at the same relative "
        "depth was, imposed step by step.",
        "",
        "| ranks | configuration | s/step | × SGD (wall) | × SGD (CPU s) | layers due per step |",
        "|---|---|---|---|---|---|",
    ] + rows


def interval_needed(update: float | None, idle: float | None, floor: float | None) -> int | None:
    """Smallest k with (update + (k − 1) · idle) / k ≤ 1.5 · floor, or None."""
    if update is None or idle is None or floor is None or TARGET_LAMBDA * floor <= idle:
        return None
    return max(1, math.ceil((update - idle) / (TARGET_LAMBDA * floor - idle)))


def lambda_table(data, summary) -> list[str]:
    s = data["settings"]
    lines = [
        "",
        "## λ steady state",
        "",
        f"λ = {s['update_threshold']:g}, {s['policy']} policy, learning rate 0 and one batch reused: every Diff is "
        f"0, so every interval grows on each due step. Steady state: the mean over steps {s['lambda_steady_from']}–"
        f"{s['lambda_steps']}. With the modulo rule (the paper's) held-still factors are due at t = 1, 2, 4, 6, 8, …: "
        "every even step for good, so the steady state alternates an update step and a step with nothing due. "
        "A longer interval k would cost (update + (k − 1) · idle) / k per step: the last column gives the "
        "smallest k that meets the 1.5× target, from this run's medians (a projection, not a measurement).",
        "",
        "| ranks | update step s (CPU s) | nothing-due step s (CPU s) | steady state s/step | floor s/step (CPU s) | "
        "steady ÷ floor (wall / CPU) | nothing-due ÷ floor (wall / CPU) | layers due per step | "
        "k for ≤ 1.5× floor (wall / CPU) |",
        "|" + "---|" * 9,
    ]
    for n, runs in summary.items():
        for key, run in runs.items():
            floor = runs.get(key.replace("lambda", "floor"))
            if not key.endswith("/lambda") or floor is None:
                continue
            update, idle = run["kinds"].get("update", {}), run["kinds"].get("idle", {})
            k = [interval_needed(update.get(t), idle.get(t), floor[t]) for t in ("wall", "cpu")]
            lines.append(
                f"| {n} | {secs(update.get('wall'))} ({secs(update.get('cpu'))}) | {secs(idle.get('wall'))} "
                f"({secs(idle.get('cpu'))}) | {secs(run['wall'])} | {secs(floor['wall'])} ({secs(floor['cpu'])}) | "
                f"{fmt(run['x_floor'])} / {fmt(run['cpu_x_floor'])} | {fmt(ratio(idle.get('wall'), floor['wall']))}"
                f" / {fmt(ratio(idle.get('cpu'), floor['cpu']))} | {' '.join(str(d) for d in run['due_pattern'])}"
                f" | {k[0] or '–'} / {k[1] or '–'} |"
            )
    return lines
