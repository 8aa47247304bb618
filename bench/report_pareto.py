"""Report of bench/pareto.py: the accuracy/traffic front, adaptive against fixed at equal traffic,
the batch transfer of λ, and the replay of the long runs' traces at the paper's scale."""

from __future__ import annotations

import json
import math
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from bench._common import interpolate_log_x, pct
from launch.record.reader import read_run

PAPER = {0.2: 0.169, 0.25: 0.119, 0.3: 0.109}  # Table 1: Fisher traffic as a fraction of every step


def load(path: Path) -> dict[str, Any]:
    """The summary and, at each record with a mean interval (none for SGD), that interval and the
    Fisher traffic ratio (None where the record has none)."""
    log = read_run(str(path))
    if log.mean_interval is None:
        return {"summary": log.summary, "steps": [], "mean_interval": [], "traffic": []}
    kept = np.isfinite(log.mean_interval)
    ratio = log.ratio[kept] if log.ratio is not None else np.full(kept.sum(), np.nan)
    return {
        "summary": log.summary,
        "steps": log.steps[kept].tolist(),
        "mean_interval": log.mean_interval[kept].tolist(),
        "traffic": [float(r) if np.isfinite(r) else None for r in ratio],
    }


def aggregate(runs: dict[tuple[str, int], tuple[str, Path]]) -> dict[str, dict[str, Any]]:
    """Per run name: label, seeds, mean and half-range of top-1, mean traffic and compute ratios."""
    grouped: dict[str, dict[str, Any]] = {}
    for (name, seed), (label, path) in sorted(runs.items()):
        data = load(path)
        summary = data["summary"]
        entry = grouped.setdefault(
            name,
            {
                "label": label,
                "seeds": [],
                "top1": [],
                "traffic": [],
                "compute": [],
                "wall_s": [],
                "mean_interval": [],
                "steps": summary["steps"],
                "paths": [],
            },
        )
        entry["seeds"].append(seed)
        entry["top1"].append(summary["final_top1"])
        fisher = summary.get("fisher") or {}
        entry["traffic"].append(fisher.get("ratio"))
        entry["compute"].append(fisher.get("compute_ratio"))
        entry["wall_s"].append(summary["wall_time_s"])
        entry["mean_interval"].append((summary.get("kfac") or {}).get("mean_interval"))
        entry["paths"].append(str(path))
        entry.setdefault("curves", {})[seed] = data
    for entry in grouped.values():
        entry["top1_mean"] = statistics.mean(entry["top1"])
        entry["top1_half_range"] = (max(entry["top1"]) - min(entry["top1"])) / 2
        ratios = [r for r in entry["traffic"] if r is not None]
        entry["traffic_mean"] = statistics.mean(ratios) if ratios else None
    return grouped


def fixed_front(groups: dict[str, dict[str, Any]]) -> list[tuple[float, float]]:
    """(traffic, top-1) of the fixed-interval runs, by traffic."""
    points = [
        (g["traffic_mean"], g["top1_mean"])
        for name, g in groups.items()
        if name.startswith("fixed") and g["traffic_mean"]
    ]
    return sorted(points)


def fixed_traffic_for(front: list[tuple[float, float]], accuracy: float) -> float | None:
    """The least traffic at which the fixed front (interpolated) reaches ``accuracy``."""
    if front and front[0][1] >= accuracy:
        return front[0][0]
    for (t0, a0), (t1, a1) in zip(front, front[1:]):
        if a0 < accuracy <= a1:
            w = (accuracy - a0) / (a1 - a0)
            return math.exp(math.log(t0) + w * (math.log(t1) - math.log(t0)))
    return None


def comparisons(groups: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    front = fixed_front(groups)
    rows = []
    for name, g in groups.items():
        if name.startswith(("raw", "noise")) and g["traffic_mean"]:
            equal_traffic = interpolate_log_x(front, g["traffic_mean"])
            equal_accuracy = fixed_traffic_for(front, g["top1_mean"])
            rows.append(
                {
                    "name": name,
                    "label": g["label"],
                    "traffic": g["traffic_mean"],
                    "top1": g["top1_mean"],
                    "gain_pt_at_equal_traffic": None
                    if equal_traffic is None
                    else 100 * (g["top1_mean"] - equal_traffic),
                    "traffic_vs_fixed_at_equal_accuracy": None
                    if equal_accuracy is None
                    else g["traffic_mean"] / equal_accuracy,
                }
            )
    return rows


def replay(root: Path, trace: str, lam: float) -> float | None:
    """The trace replayed through Algorithm 1 for ResNet-50, 128 ranks, 2,814 steps: traffic ratio."""
    command = [
        sys.executable,
        "-m",
        "kfac_hvd.analysis.commodel",
        "--model",
        "resnet50",
        "--ranks",
        "128",
        "--batch",
        "16384",
        "--steps",
        "2814",
        "--trace",
        trace,
        "--update-threshold",
        str(lam),
        "--json",
    ]
    result = subprocess.run(command, cwd=root, capture_output=True, text=True)
    if result.returncode != 0:
        return None
    return json.loads(result.stdout)["replay"]["ratio"]


def plot_front(groups: dict[str, dict[str, Any]], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    styles = {
        "fixed": ("k", "s", "fixed interval k"),
        "raw": ("tab:blue", "o", "λ, raw Diff"),
        "noise": ("tab:red", "^", "λ, noise-aware Diff"),
    }
    for family, (color, marker, label) in styles.items():
        points = sorted(
            (g["traffic_mean"], 100 * t, name)
            for name, g in groups.items()
            if name.startswith(family) and g["traffic_mean"]
            for t in g["top1"]
        )
        if points:
            ax.scatter(
                [p[0] * 100 for p in points], [p[1] for p in points], c=color, marker=marker, label=label
            )
    front = fixed_front(groups)
    ax.plot([t * 100 for t, _ in front], [a * 100 for _, a in front], "k--", lw=1)
    ax.set_xscale("log")
    ax.set_xlabel("Fisher traffic, % of every step (log)")
    ax.set_ylabel("test top-1 (%), each seed")
    ax.set_title("Accuracy against factor traffic, 1,404 steps at batch 512")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "front.png", dpi=110)
    plt.close(fig)


def plot_transfer(groups: dict[str, dict[str, Any]], out: Path) -> None:
    """Mean interval over the layers, and the cumulative Fisher traffic, against epochs."""
    import matplotlib.pyplot as plt

    fig, (intervals, traffic) = plt.subplots(1, 2, figsize=(11, 4.5))
    for name, g in sorted(groups.items()):
        if not name.startswith("transfer_"):
            continue
        data = next(iter(g["curves"].values()))
        steps_per_epoch = data["steps"][-1] / 2 if data["steps"] else 1
        epochs = [s / steps_per_epoch for s in data["steps"]]
        style = "-" if "noise" in name else "--"
        intervals.plot(epochs, data["mean_interval"], style, label=g["label"])
        traffic.plot(epochs, [100 * (r or 0) for r in data["traffic"]], style, label=g["label"])
    intervals.set_yscale("log")
    intervals.set_ylabel("mean interval over layers (steps, log)")
    traffic.set_ylabel("Fisher traffic so far, % of every step")
    for axis in (intervals, traffic):
        axis.set_xlabel("epoch")
        axis.grid(True, which="both", alpha=0.3)
    traffic.legend()
    fig.suptitle("λ = 0.25 at global batches 64 and 512 (learning rate scaled with the batch)")
    fig.tight_layout()
    fig.savefig(out / "transfer.png", dpi=110)
    plt.close(fig)


def row_order(name: str, group: dict[str, Any]) -> tuple[int, float]:
    """SGD, fixed intervals, raw-Diff λ, noise-aware λ, the runs without kl_clip; by traffic within."""
    families = ("sgd", "fixed", "raw", "noise", "noclip")
    family = next((i for i, prefix in enumerate(families) if name.startswith(prefix)), len(families))
    return family, -(group.get("traffic_mean") or 0.0)


def replay_table(
    groups: dict[str, dict], root: Path
) -> tuple[list[str], dict[tuple[str, float], float | None]]:
    """The λ = 0.25 runs' traces replayed at λ = 0.2, 0.25, 0.3 (mean over seeds), beside the paper's."""
    replays = {}
    for tag in ("raw", "noise"):
        traces = groups.get(f"{tag}0.25", {}).get("paths", [])
        for lam in sorted(PAPER):
            ratios = [replay(root, str(Path(p) / "metrics.jsonl"), lam) for p in traces]
            ratios = [r for r in ratios if r is not None]
            replays[(tag, lam)] = statistics.mean(ratios) if ratios else None
    lines = [
        "",
        "| replayed trace (λ = 0.25 runs, both seeds) | λ = 0.2 | λ = 0.25 | λ = 0.3 |",
        "|---|---|---|---|",
    ]
    for tag, label in (("raw", "raw Diff"), ("noise", "noise-aware Diff")):
        lines.append(f"| {label} | " + " | ".join(pct(replays[(tag, lam)]) for lam in sorted(PAPER)) + " |")
    lines.append("| the paper (Table 1) | " + " | ".join(pct(PAPER[lam]) for lam in sorted(PAPER)) + " |")
    return lines, replays


def write_report(runs: dict[tuple[str, int], tuple[str, Path]], out: Path, root: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    groups = aggregate(runs)
    rows = comparisons(groups)
    lines = [
        "| run | seeds | top-1 (mean ± half-range) | traffic, % of every step | factor work | final mean "
        "interval | wall s |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, g in sorted(groups.items(), key=lambda item: row_order(*item)):
        if name.startswith("transfer_"):
            continue
        compute = [c for c in g["compute"] if c is not None]
        intervals = [i for i in g["mean_interval"] if i is not None]
        lines.append(
            f"| {g['label']} | {len(g['seeds'])} | {100 * g['top1_mean']:.2f}% ± {100 * g['top1_half_range']:.2f}"
            f" | {pct(g['traffic_mean'])} | {pct(statistics.mean(compute)) if compute else '–'} | "
            f"{statistics.mean(intervals):.2f} | {statistics.mean(g['wall_s']):.0f} |"
            if intervals
            else f"| {g['label']} | {len(g['seeds'])} | {100 * g['top1_mean']:.2f}% ± {100 * g['top1_half_range']:.2f}"
            f" | – | – | – | {statistics.mean(g['wall_s']):.0f} |"
        )
    lines += [
        "",
        "| adaptive run | traffic | top-1 | vs fixed at equal traffic | traffic vs fixed at equal top-1 |",
        "|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda row: row_order(row["name"], groups[row["name"]])):
        gain = row["gain_pt_at_equal_traffic"]
        ratio = row["traffic_vs_fixed_at_equal_accuracy"]
        lines.append(
            f"| {row['label']} | {pct(row['traffic'])} | {100 * row['top1']:.2f}% | "
            f"{'–' if gain is None else f'{gain:+.2f} pt'} | {'–' if ratio is None else f'{ratio:.2f}×'} |"
        )
    lines += [
        "",
        "| batch transfer run | steps | traffic, % of every step | final mean interval |",
        "|---|---|---|---|",
    ]
    for name, g in sorted(groups.items()):
        if name.startswith("transfer_"):
            lines.append(
                f"| {g['label']} | {g['steps']} | {pct(g['traffic_mean'])} | "
                f"{statistics.mean(i for i in g['mean_interval'] if i is not None):.2f} |"
            )
    replay_rows, replays = replay_table(groups, root)
    lines += replay_rows
    (out / "pareto.md").write_text("\n".join(lines) + "\n")
    (out / "runs.json").write_text(
        json.dumps(
            {
                "groups": {name: {k: v for k, v in g.items() if k != "curves"} for name, g in groups.items()},
                "comparisons": rows,
                "replays": {f"{tag}@{lam}": r for (tag, lam), r in replays.items()},
                "transfer_curves": {
                    name: {
                        key: next(iter(g["curves"].values()))[key]
                        for key in ("steps", "mean_interval", "traffic")
                    }
                    for name, g in groups.items()
                    if name.startswith("transfer_")
                },
            },
            indent=1,
        )
    )
    plot_front(groups, out)
    plot_transfer(groups, out)
    print("\n".join(lines))
