"""Report of bench/freshness.py: every point's seeds, the adaptive runs against the fixed intervals
at equal factor work (seed by seed), divergence counted apart from accuracy, one panel per regime."""

from __future__ import annotations

import json
import statistics
from pathlib import Path
from typing import Any

from bench._common import interpolate_log_x, pct
from bench._freshness_plan import REGIMES, SCHEDULES, outcome, run_dir

FAMILIES = {  # prefix -> plot style and legend
    "fixed": ("k", "s", "fixed k (1, 2, 5, 10, 20)"),
    "warm": ("tab:green", "D", "warm-up of every-step updates, then k"),
    "raw": ("tab:blue", "o", "λ, raw Diff"),
    "noise": ("tab:red", "^", "λ, noise-aware Diff"),
    "since": ("tab:purple", "v", "λ = 0.5, raw, since_last"),
}
ADAPTIVE = ("raw", "noise", "since")


def collect(runs_dir: Path) -> dict[str, dict[str, dict[int, dict[str, Any]]]]:
    """regime -> schedule -> seed -> outcome, for every finished run."""
    found: dict[str, dict[str, dict[int, dict[str, Any]]]] = {}
    for regime in REGIMES:
        for schedule in SCHEDULES:
            for seed in range(3):
                result = outcome(run_dir(runs_dir, regime.name, schedule, seed))
                if result is not None:
                    found.setdefault(regime.name, {}).setdefault(schedule, {})[seed] = result
    return found


def fixed_front(points: dict[str, dict[int, dict[str, Any]]], seed: int) -> list[tuple[float, float]]:
    """(factor work, top-1) of the fixed intervals without warm-up, by work: the same seed's run, or the mean
    over the seeds run when that seed was not. A collapsed run keeps its top-1 (the cost of its stale
    curvature); a diverged one counts as 10%, chance."""
    front = []
    for schedule, seeds in points.items():
        runs = [seeds[seed]] if seed in seeds else list(seeds.values())
        runs = [r for r in runs if r.get("work")]
        if schedule.startswith("fixed") and runs:
            front.append(
                (
                    statistics.mean(r["work"] for r in runs),
                    statistics.mean(r["top1"] if r["top1"] is not None else 0.1 for r in runs),
                )
            )
    return sorted(front)


def gains(points: dict[str, dict[int, dict[str, Any]]]) -> dict[str, list[tuple[int, float]]]:
    """Per adaptive or warm-up schedule: (seed, top-1 minus the same seed's fixed front at its work)."""
    result: dict[str, list[tuple[int, float]]] = {}
    for schedule, seeds in points.items():
        if not schedule.startswith(ADAPTIVE + ("warm",)):
            continue
        for seed, run in sorted(seeds.items()):
            front = fixed_front(points, seed)
            if not run.get("work") or len(front) < 2:
                continue
            top1 = run["top1"] if run["top1"] is not None else 0.1
            reference = interpolate_log_x(front, run["work"])
            if reference is not None:
                result.setdefault(schedule, []).append((seed, top1 - reference))
    return result


def cell(run: dict[str, Any]) -> str:
    if run["top1"] is None:
        return f"{run['status']} (exit {run.get('exit')})"
    mark = {"ok": "", "collapsed": " (collapsed)", "diverged": " (diverged)"}[run["status"]]
    skipped = run.get("skipped_steps") or 0
    return f"{100 * run['top1']:.1f}{mark}" + (f" ({skipped} non-finite steps skipped)" if skipped else "")


def summary_row(schedule: str, seeds: dict[int, dict[str, Any]], gain: list[tuple[int, float]] | None) -> str:
    runs = [seeds[s] for s in sorted(seeds)]
    healthy = [r["top1"] for r in runs if r["status"] == "ok"]
    bad = sum(1 for r in runs if r["status"] != "ok")
    work = [r["work"] for r in runs if r.get("work")]
    per_seed = ", ".join(f"s{s}: {cell(seeds[s])}" for s in sorted(seeds))
    gain_text = "–"
    if gain:
        values = [100 * g for _, g in gain]
        gain_text = f"{statistics.mean(values):+.1f} pt ({min(values):+.1f} to {max(values):+.1f})"
    mean_top1 = pct(statistics.mean(healthy), 2) if healthy else "–"
    return (
        f"| {SCHEDULES[schedule][0]} | {per_seed} | {bad} of {len(runs)} | {mean_top1} | "
        f"{pct(statistics.mean(work)) if work else '–'} | {gain_text} |"
    )


def plot(found: dict[str, dict[str, dict[int, dict[str, Any]]]], out: Path) -> None:
    import matplotlib.pyplot as plt

    regimes = [r for r in REGIMES if r.name in found]
    columns = min(3, len(regimes))
    rows = -(-len(regimes) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.6 * rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(regimes) :]:
        ax.set_visible(False)
    for ax, regime in zip(axes.flat, regimes):
        points = found[regime.name]
        for prefix, (color, marker, label) in FAMILIES.items():
            xs, ys = [], []
            for schedule, seeds in points.items():
                if schedule.startswith(prefix):
                    for run in seeds.values():
                        if run.get("work"):
                            xs.append(100 * run["work"])
                            ys.append(100 * (run["top1"] if run["top1"] is not None else 0.0))
            if xs:
                ax.scatter(xs, ys, c=color, marker=marker, s=22, alpha=0.8, label=label)
        means = []
        for schedule, seeds in points.items():
            runs = [r for r in seeds.values() if r.get("work")]
            if schedule.startswith("fixed") and runs:
                means.append(
                    (
                        100 * statistics.mean(r["work"] for r in runs),
                        100 * statistics.mean(r["top1"] or 0.0 for r in runs),
                    )
                )
        if means:
            ax.plot(*zip(*sorted(means)), "k--", lw=1)
        sgd = [r["top1"] for r in points.get("sgd", {}).values() if r["top1"] is not None]
        if sgd:
            ax.axhline(100 * statistics.mean(sgd), color="grey", ls=":", lw=1, label="SGD")
        ax.axhline(100 * 0.2, color="tab:orange", ls="-", lw=0.6, alpha=0.6)
        ax.set_xscale("log")
        ax.set_title(f"{regime.name}: {regime.label}", fontsize=9)
        ax.set_xlabel("factor work, % of every step (log)", fontsize=8)
        ax.grid(True, which="both", alpha=0.3)
    for row in axes:
        row[0].set_ylabel("test top-1 (%), each seed", fontsize=8)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(
        "Fashion-MNIST, 3 epochs on 10,000 images: one point per run (orange: 20%, below it a run "
        "has collapsed; dotted: SGD)",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(out / "freshness.png", dpi=100)
    plt.close(fig)


def overview(found: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> list[str]:
    """One row per schedule, one column per regime: every seed's top-1 (✗: collapsed or diverged), then
    the mean factor work."""
    regimes = [r for r in REGIMES if r.name in found]
    lines = ["| schedule | " + " | ".join(r.name for r in regimes) + " |", "|---|" + "---|" * len(regimes)]
    for schedule, (label, _) in SCHEDULES.items():
        cells = []
        for regime in regimes:
            seeds = found[regime.name].get(schedule, {})
            if not seeds:
                cells.append("")
                continue
            top1 = " / ".join(
                "–"
                if seeds[s]["top1"] is None
                else f"{100 * seeds[s]['top1']:.1f}" + ("✗" if seeds[s]["status"] != "ok" else "")
                for s in sorted(seeds)
            )
            work = [r["work"] for r in seeds.values() if r.get("work")]
            cells.append(top1 + (f" · {pct(statistics.mean(work), 0)}" if work else ""))
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def gain_overview(found: dict[str, dict[str, dict[int, dict[str, Any]]]]) -> list[str]:
    """One row per adaptive or warm-up schedule, one column per regime: top-1 minus the fixed intervals'
    at the same factor work, mean over seeds (range)."""
    regimes = [r for r in REGIMES if r.name in found]
    per_regime = {r.name: gains(found[r.name]) for r in regimes}
    lines = ["| schedule | " + " | ".join(r.name for r in regimes) + " |", "|---|" + "---|" * len(regimes)]
    for schedule, (label, _) in SCHEDULES.items():
        cells = []
        for regime in regimes:
            values = [100 * g for _, g in per_regime[regime.name].get(schedule, [])]
            cells.append(
                ""
                if not values
                else f"{statistics.mean(values):+.1f}"
                if len(values) == 1
                else f"{statistics.mean(values):+.1f} ({min(values):+.1f} to {max(values):+.1f})"
            )
        if any(cells):
            lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return lines


def write_report(runs_dir: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    found = collect(runs_dir)
    legend = "Regimes: " + "; ".join(f"{r.name} = {r.label}" for r in REGIMES if r.name in found) + "."
    lines: list[str] = [
        legend,
        "",
        "Top-1 (%) of seeds 0 / 1 / 2 as run (✗: collapsed below 20% or diverged) · mean "
        "factor work, % of every step:",
        "",
        *overview(found),
        "",
        "Top-1 minus the fixed intervals' (k = 1, 2, 5, 10, 20; the same seed, or the mean of the "
        "seeds run where that seed was not; linear in log work) at the same factor work, points; "
        "mean over seeds (range):",
        "",
        *gain_overview(found),
        "",
    ]
    all_gains = {}
    for regime in REGIMES:
        points = found.get(regime.name)
        if not points:
            continue
        regime_gains = gains(points)
        all_gains[regime.name] = regime_gains
        lines += [
            f"### {regime.name}: {regime.label}",
            "",
            "| schedule | top-1 per seed (%) | diverged or collapsed | mean top-1 of the rest | factor work "
            "| vs fixed k at equal work, per seed (mean, range) |",
            "|---|---|---|---|---|---|",
        ]
        for schedule in SCHEDULES:
            if schedule in points:
                lines.append(summary_row(schedule, points[schedule], regime_gains.get(schedule)))
        lines.append("")
    (out / "freshness.md").write_text("\n".join(lines))
    (out / "runs.json").write_text(
        json.dumps(
            {
                "runs": found,
                "gains_vs_fixed": {r: {s: g for s, g in v.items()} for r, v in all_gains.items()},
                "regimes": {
                    r.name: {"label": r.label, "overrides": list(r.overrides), "ranks": r.ranks}
                    for r in REGIMES
                },
                "schedules": {
                    name: {"label": label, "overrides": list(o)} for name, (label, o) in SCHEDULES.items()
                },
            },
            indent=1,
        )
    )
    if found:  # no finished run yet: the tables say so, there is nothing to draw
        plot(found, out)
    print("\n".join(lines))
