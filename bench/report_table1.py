"""Tables and plots for bench/table1.py (kept apart so the runner stays short)."""

from __future__ import annotations

import json
import statistics
from collections import OrderedDict
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from kfac_hvd.analysis.units import format_bytes


def save_figure(figure, path: Path) -> Path:
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def spread(values) -> str:
    mean = statistics.mean(values)
    if len(values) < 2:
        return f"{100 * mean:.2f}%"
    return f"{100 * mean:.2f}% ± {100 * (max(values) - min(values)) / 2:.2f}"


def group(loaded: dict) -> OrderedDict[str, dict]:
    configs: OrderedDict[str, dict] = OrderedDict()
    for (name, seed), (label, run) in loaded.items():
        configs.setdefault(name, {"label": label, "seeds": {}})["seeds"][seed] = run
    return configs


def table_rows(configs) -> list:
    rows = []
    every_step = configs.get("kfac_every_step")
    for name, config in configs.items():
        runs = list(config["seeds"].values())
        summaries = [run["summary"] for run in runs]
        accuracy = [s["final_top1"] for s in summaries]
        fisher = [s.get("fisher") for s in summaries]
        row = {
            "name": name,
            "label": config["label"],
            "seeds": len(runs),
            "top1": spread(accuracy),
            "top1_values": accuracy,
            "wall_s": statistics.mean(s["wall_time_s"] for s in summaries),
        }
        if fisher[0]:
            row["payload"] = statistics.mean(f["payload_bytes"] for f in fisher)
            row["dense"] = statistics.mean(f["dense_payload_bytes"] for f in fisher)
            row["ratio"] = statistics.mean(f["ratio"] for f in fisher)
            seconds = [s["kfac"]["seconds"] for s in summaries]
            row["factor_pct"] = statistics.mean(
                100 * sec["factor"] / s["train_time_s"] for sec, s in zip(seconds, summaries)
            )
            row["mean_interval"] = statistics.mean(s["kfac"]["mean_interval"] for s in summaries)
        rows.append(row)
    if every_step:
        base = every_step["seeds"]
        base_payload = statistics.mean(r["summary"]["fisher"]["payload_bytes"] for r in base.values())
        for row in rows:
            if "payload" in row:
                row["vs_every_step_run"] = row["payload"] / base_payload
    return rows


def markdown_table(rows) -> str:
    lines = [
        "| run | seeds | test top-1 (mean ± half-range) | Fisher payload / rank (triangles) | "
        "(full matrices) | % of every step | factor time % of training | final mean interval | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        if "payload" in row:
            lines.append(
                f"| {row['label']} | {row['seeds']} | {row['top1']} | {format_bytes(row['payload'], digits=1, unit='MB')} | "
                f"{format_bytes(row['dense'], digits=1, unit='MB')} | {100 * row['ratio']:.1f}% | {row['factor_pct']:.1f}% | "
                f"{row['mean_interval']:.2f} | {row['wall_s']:.0f} |"
            )
        else:
            lines.append(
                f"| {row['label']} | {row['seeds']} | {row['top1']} | – | – | – | – | – | "
                f"{row['wall_s']:.0f} |"
            )
    return "\n".join(lines)


def first_seed(config):
    return config["seeds"][min(config["seeds"])]


def plot_intervals(configs, out: Path) -> list:
    names = [n for n in ("lambda0.25", "lambda0.25_since_last") if n in configs]
    if not names:
        return []
    figure, axes = plt.subplots(1, len(names), figsize=(6 * len(names), 4.5), squeeze=False)
    for axis, name in zip(axes[0], names):
        run = first_seed(configs[name])
        matrix = list(map(list, zip(*run["intervals"])))  # layers × steps
        image = axis.imshow(
            matrix,
            aspect="auto",
            interpolation="nearest",
            cmap="viridis",
            extent=(run["steps"][0] - 0.5, run["steps"][-1] + 0.5, len(matrix) - 0.5, -0.5),
        )
        axis.set_yticks(range(len(run["layer_names"])))
        axis.set_yticklabels(run["layer_names"], fontsize=6)
        axis.set_xlabel("step")
        axis.set_title(f"interval per layer, {configs[name]['label']}")
        figure.colorbar(image, ax=axis, label="interval")
    path = save_figure(figure, out / "intervals_heatmap.png")
    return [path]


def plot_traffic(configs, out: Path) -> list:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    for name, config in configs.items():
        run = first_seed(config)
        if run["cumulative_payload_bytes"] and name != "sgd":
            axis.plot(run["steps"], [b / 1e6 for b in run["cumulative_payload_bytes"]], label=config["label"])
    axis.set_xlabel("step")
    axis.set_ylabel("cumulative Fisher payload per rank (MB)")
    axis.set_title("Fisher traffic over training (seed 0)")
    axis.legend(fontsize=8)
    path = save_figure(figure, out / "cumulative_traffic.png")
    return [path]


def accuracy_curves(config) -> tuple[list, list]:
    curves = [
        [(h["epoch"], h["val_top1"]) for h in run["summary"]["history"]] for run in config["seeds"].values()
    ]
    length = min(len(c) for c in curves)
    epochs = [curves[0][i][0] for i in range(length)]
    means = [statistics.mean(c[i][1] for c in curves) for i in range(length)]
    return epochs, means


def plot_accuracy(configs, out: Path, target: float) -> tuple[list, dict[str, float | None]]:
    figure, axis = plt.subplots(figsize=(7, 4.5))
    reached: dict[str, float | None] = {}
    for name, config in configs.items():
        epochs, means = accuracy_curves(config)
        axis.plot(epochs, [100 * m for m in means], marker="o", label=config["label"])
        reached[name] = next((e for e, m in zip(epochs, means) if m >= target), None)
    axis.axhline(100 * target, color="grey", linestyle=":", linewidth=1)
    axis.set_xlabel("epoch")
    axis.set_ylabel("test top-1 (%), mean over seeds")
    axis.legend(fontsize=8)
    path = save_figure(figure, out / "accuracy_per_epoch.png")

    figure, axis = plt.subplots(figsize=(7, 4))
    labels = [configs[n]["label"] for n in reached]
    values = [reached[n] if reached[n] is not None else 0 for n in reached]
    bars = axis.barh(labels, values, color=["tab:red" if n == "sgd" else "tab:blue" for n in reached])
    for bar, name in zip(bars, reached):
        text = f"{reached[name]:g}" if reached[name] is not None else "not reached"
        axis.text(bar.get_width() + 0.05, bar.get_y() + bar.get_height() / 2, text, va="center", fontsize=8)
    axis.set_xlabel(f"epochs to {100 * target:.0f}% test top-1 (mean over seeds)")
    axis.invert_yaxis()
    bar_path = save_figure(figure, out / "epochs_to_target.png")
    return [path, bar_path], reached


def timeline_section(configs, timeline) -> str:
    run = first_seed(configs["lambda0.25"])
    fisher = run["summary"]["fisher"]
    allreduce = [(n, e) for (op, n), e in timeline.items() if op == "allreduce"]
    broadcast = [(n, e) for (op, n), e in timeline.items() if op == "broadcast" and n != "kfac.schedule"]
    allreduce_bytes = sum(e[1] for _, e in allreduce)
    counted_allreduce = (
        fisher["payload_bytes"] / 2
    )  # a due factor's allreduce and its inverse broadcast have one size
    sized_broadcasts = sum(e[1] for _, e in broadcast)
    return "\n".join(
        [
            "| | library counters (rank 0) | Horovod timeline |",
            "|---|---|---|",
            f"| factor allreduces | payload {format_bytes(counted_allreduce, digits=1, unit='MB')} | "
            f"{sum(e[0] for _, e in allreduce)} ops, {format_bytes(allreduce_bytes, digits=1, unit='MB')} |",
            f"| inverse broadcasts | payload {format_bytes(fisher['payload_bytes'] / 2, digits=1, unit='MB')} | "
            f"{sum(e[0] for _, e in broadcast)} ops; sized (rooted at rank 1): {format_bytes(sized_broadcasts, digits=1, unit='MB')} |",
        ]
    )


def write_report(args, loaded: dict, timeline, out: Path) -> None:
    configs = group(loaded)
    rows = table_rows(configs)
    images = plot_intervals(configs, out) + plot_traffic(configs, out)
    accuracy_images, reached = plot_accuracy(configs, out, args.target)
    images += accuracy_images
    (out / "runs.json").write_text(
        json.dumps(
            {
                f"{name}_s{seed}": {
                    "label": label,
                    "summary": run["summary"],
                    "steps": run["steps"],
                    "cumulative_payload_bytes": run["cumulative_payload_bytes"],
                    "due_layers": run["due_layers"],
                    "layer_names": run["layer_names"],
                    "intervals": run["intervals"],
                }
                for (name, seed), (label, run) in loaded.items()
            },
            separators=(",", ":"),
        )
    )
    parts = [
        f"Generated by `.venv/bin/python -m bench.table1 --seeds {' '.join(map(str, args.seeds))} "
        f"--epochs {args.epochs} --train-subset {args.train_subset} --val-subset {args.val_subset}`.",
        "",
        markdown_table(rows),
        "",
        f"Epochs to {100 * args.target:.0f}% test top-1 (mean over seeds): "
        + ", ".join(
            f"{configs[n]['label']}: {reached[n] if reached[n] is not None else 'not reached'}"
            for n in reached
        ),
    ]
    if timeline and "lambda0.25" in configs:
        parts += ["", "Timeline cross-check (λ = 0.25, seed 0):", "", timeline_section(configs, timeline)]
    parts += ["", *[f"![{p.stem}]({p.name})" for p in images]]
    (out / "table1.md").write_text("\n".join(parts) + "\n")
