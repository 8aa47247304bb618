"""A run's pictures (``python -m launch.report RUN_DIR ... --plot``): per K-FAC run the factor-update
interval of every layer over training, its Diffs against λ and where its Fisher bytes went; for all runs
together the Fisher traffic against the every-step amount, accuracy and loss against step and time.

Drawn on matplotlib's Agg canvas (no display, no pyplot state). Large runs stay fast and legible: the
heatmap has at most MAX_COLUMNS step columns (each the largest interval of its steps) and at most
MAX_LABELS layer labels."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib import colormaps
from matplotlib.axes import Axes
from matplotlib.colors import ListedColormap, LogNorm
from matplotlib.figure import Figure
from matplotlib.gridspec import SubplotSpec
from matplotlib.lines import Line2D
from matplotlib.ticker import FuncFormatter, PercentFormatter

from kfac_hvd.analysis.units import format_bytes
from launch.record.reader import RunLog, layer_groups

MAX_COLUMNS = 600  # heatmap step columns (about one per pixel of the panel)
MAX_LABELS = 28  # layer labels on the heatmap's axis
DPI = 100
BYTES = FuncFormatter(lambda value, _: format_bytes(value) if value > 0 else "0")
BN_COLOUR, KRON_COLOUR = "#d95f02", "#1b9e77"

# Axes titles, one format per panel (the tests find the panels by them).
INTERVALS, LEARNING_RATE, DIFF, GROUPS = (
    "{}: factor-update interval per layer",
    "{}: learning rate",
    "{}: Diff at update steps",
    "{}: Fisher payload by layer group",
)
TRAFFIC, RATIO = "Fisher traffic per rank (cumulative)", "Fisher traffic / every step"
ACCURACY, LOSS = "accuracy against step", "loss against step"
ACCURACY_TIME, LOSS_TIME = "accuracy against training time", "loss against training time"


def figure_size(runs: Sequence[RunLog]) -> tuple[float, float]:
    """Inches (width, height) of the figure of ``runs``: a column per K-FAC run with layer records, rows
    for what applies."""
    layered = sum(r.interval is not None for r in runs)
    height = 3.0  # accuracy and loss
    if any(r.wire_bytes is not None for r in runs):
        height += 2.6  # traffic
    if layered:
        height += 0.8 + 3.6 + 2.6 + 2.4  # lr strip, heatmap, Diff, groups
    return max(15.0, 8.0 * layered), height


def build_figure(runs: Sequence[RunLog]) -> Figure:
    """The figure of one or several runs (see the module's docstring)."""
    fig = Figure(figsize=figure_size(runs), dpi=DPI, layout="constrained")
    colours = {id(r): f"C{i % 10}" for i, r in enumerate(runs)}
    layered = [r for r in runs if r.interval is not None]
    traffic = [r for r in runs if r.wire_bytes is not None]
    heights = ([0.8 + 3.6 + 2.6 + 2.4] if layered else []) + ([2.6] if traffic else []) + [3.0]
    rows = iter(fig.add_gridspec(len(heights), 1, height_ratios=heights))
    if layered:
        columns = next(rows).subgridspec(1, len(layered), wspace=0.08)
        for i, run in enumerate(layered):
            _run_column(fig, columns[0, i], run)
    if traffic:
        _traffic(fig, next(rows), traffic, colours)
    _learning(fig, next(rows), runs, colours)
    return fig


def save(runs: Sequence[RunLog], out: str) -> str:
    build_figure(runs).savefig(out, dpi=DPI)
    return out


# Per-run panels -----------------------------------------------------------------------------------
def _recorded(values: np.ndarray | None) -> np.ndarray:
    """A RunLog array a panel draws: the panel is drawn only for runs that recorded it."""
    if values is None:
        raise ValueError("this run has no such records")
    return values


def _bins(count: int, limit: int = MAX_COLUMNS) -> np.ndarray:
    """Start indices of at most ``limit`` contiguous bins over ``count`` records."""
    if count <= limit:
        return np.arange(count)
    return np.unique(np.linspace(0, count, limit, endpoint=False).astype(int))


def heatmap_data(run: RunLog) -> tuple[np.ndarray, np.ndarray]:
    """(layers × columns intervals, each column's first record index): a column is the largest interval
    of its records; with at most MAX_COLUMNS records the intervals themselves."""
    interval = _recorded(run.interval)
    starts = _bins(interval.shape[1])
    filled = np.where(np.isnan(interval), -np.inf, interval)
    data = np.maximum.reduceat(filled, starts, axis=1)
    return np.where(np.isneginf(data), np.nan, data), starts


def lr_jumps(run: RunLog) -> np.ndarray:
    """Steps at which the learning rate jumps (a step schedule's milestones): a change of more than 5%
    after a step without change. Smooth schedules (warm-up, poly) have none."""
    lr = run.lr
    if lr.size < 3:
        return np.array([], int)
    change = np.abs(np.diff(lr)) > 0.05 * np.maximum(np.abs(lr[1:]), np.abs(lr[:-1]))
    flat_before = np.concatenate([[False], np.diff(lr)[:-1] == 0])
    return run.steps[1:][change & flat_before]


def _run_column(fig: Figure, spec: SubplotSpec, run: RunLog) -> None:
    cells = spec.subgridspec(
        4, 3, height_ratios=[0.8, 3.6, 2.6, 2.4], width_ratios=[0.5, 30, 0.7], wspace=0.02, hspace=0.05
    )
    heat = fig.add_subplot(cells[1, 1])
    strip = fig.add_subplot(cells[0, 1], sharex=heat)
    kinds = fig.add_subplot(cells[1, 0], sharey=heat)
    jumps = lr_jumps(run)

    strip.plot(run.steps, run.lr, color="k", lw=1)
    strip.set_title(LEARNING_RATE.format(run.label), fontsize=10, loc="left")
    strip.tick_params(labelbottom=False, labelsize=7)
    strip.set_ylabel("lr", fontsize=8)

    data, starts = heatmap_data(run)
    steps = run.steps
    edges = np.append(steps[starts] - 0.5, steps[-1] + 0.5)
    vmax = max(2.0, float(np.nanmax(data)) if np.isfinite(data).any() else 2.0)
    n_layers = data.shape[0]
    image = heat.imshow(
        data,
        aspect="auto",
        interpolation="nearest",
        norm=LogNorm(vmin=1, vmax=vmax),
        cmap=colormaps["viridis"].with_extremes(bad="0.85"),  # grey: no record
        extent=(edges[0], edges[-1], n_layers - 0.5, -0.5),
    )
    # Update steps: a dot per (layer, column) with an update in it.
    has_update = np.logical_or.reduceat(_recorded(run.due), starts, axis=1)
    rows, cols = np.nonzero(has_update)
    centres = (edges[:-1] + edges[1:]) / 2
    heat.scatter(
        centres[cols],
        rows,
        s=max(0.3, min(6.0, 900.0 / max(n_layers, len(starts)))),
        c="white",
        marker=".",
        linewidths=0,
        alpha=0.8,
    )
    for step in jumps:
        for ax in (heat, strip):
            ax.axvline(step, color="red", lw=1, ls="--")
    _head(
        heat,
        INTERVALS.format(run.label),
        "step   (white dots: factor updates; grey: no record"
        + ("; red dashes: learning-rate changes)" if len(jumps) else ")"),
    )
    heat.tick_params(labelleft=False, labelsize=8)
    heat.set_xlim(edges[0], edges[-1])
    colourbar = fig.colorbar(image, cax=fig.add_subplot(cells[1, 2]))
    colourbar.set_label("interval (steps)", fontsize=8)
    colourbar.ax.tick_params(labelsize=7)

    groups = layer_groups(run.layers)
    _layer_kinds(kinds, heat, strip, run, groups)
    _diff(fig.add_subplot(cells[2, :]), run, jumps)
    _groups(fig.add_subplot(cells[3, :]), run, groups)


def _layer_kinds(kinds: Axes, heat: Axes, strip: Axes, run: RunLog, groups: list[str]) -> None:
    """The strip of layer kinds left of the heatmap, the stage boundaries across both, their legend."""
    n_layers = len(run.layers)
    kinds.imshow(
        _recorded(run.batchnorm)[:, None].astype(float),
        aspect="auto",
        interpolation="nearest",
        cmap=ListedColormap([KRON_COLOUR, BN_COLOUR]),
        vmin=0,
        vmax=1,
        extent=(0, 1, n_layers - 0.5, -0.5),
    )
    kinds.set_xticks([])
    _layer_labels(kinds, run.layers, groups)
    for boundary in [i for i in range(1, n_layers) if groups[i] != groups[i - 1]]:
        heat.axhline(boundary - 0.5, color="black", lw=0.8)
        kinds.axhline(boundary - 0.5, color="black", lw=0.8)
    strip.legend(
        handles=[
            Line2D([], [], color=KRON_COLOUR, lw=6, label="Kronecker layer (left strip)"),
            Line2D([], [], color=BN_COLOUR, lw=6, label="BatchNorm layer"),
        ],
        loc="best",
        ncols=2,
        fontsize=7,
        framealpha=0.8,
    )


def _layer_labels(ax: Axes, names: list[str], groups: list[str]) -> None:
    """Every layer's name when they fit, else the stage names (at most MAX_LABELS)."""
    if len(names) <= MAX_LABELS:
        ax.set_yticks(range(len(names)), names, fontsize=max(5, min(8, 200 // len(names))))
        return
    spans: list[tuple[str, int, int]] = []
    for i, group in enumerate(groups):
        if spans and spans[-1][0] == group:
            spans[-1] = (group, spans[-1][1], i)
        else:
            spans.append((group, i, i))
    keep = spans[:: max(1, -(-len(spans) // MAX_LABELS))]
    ax.set_yticks([(a + b) / 2 for _, a, b in keep], [f"{g} ({b - a + 1})" for g, a, b in keep], fontsize=8)


def _head(ax: Axes, title: str, note: str) -> None:
    """A panel's title, and under it (as the x label) how to read it."""
    ax.set_title(title, fontsize=10, loc="left")
    ax.set_xlabel(note, fontsize=8)


def _nothing(ax: Axes, message: str) -> None:
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes)
    ax.set_xticks([])
    ax.set_yticks([])


def _diff(ax: Axes, run: RunLog, jumps: np.ndarray) -> None:
    """Each layer's Diff where it was computed (its update steps), coloured by depth; λ as a line."""
    _head(
        ax,
        DIFF.format(run.label),
        "step   (a layer's largest factor Diff; colour: layer depth, input to "
        "output" + ("; below λ the layer's interval grows by one)" if run.threshold is not None else ")"),
    )
    diff = _recorded(run.diff)
    measured = np.isfinite(diff)
    if not measured.any():
        _nothing(ax, "no Diff recorded")
        return
    positive = diff[measured & (diff > 0)]
    floor = (positive.min() if positive.size else 1e-3) / 2
    rows, cols = np.nonzero(measured)
    depth = rows / max(1, len(run.layers) - 1)
    size = max(0.5, min(8.0, 4000.0 / rows.size))
    if run.raw_diff is not None:
        raw_rows, raw_cols = np.nonzero(np.isfinite(run.raw_diff))
        ax.scatter(
            run.steps[raw_cols],
            np.maximum(run.raw_diff[raw_rows, raw_cols], floor),
            s=size,
            c="0.6",
            linewidths=0,
            label="raw Diff",
            rasterized=True,
        )
    ax.scatter(
        run.steps[cols],
        np.maximum(diff[rows, cols], floor),
        s=size,
        c=depth,
        cmap="plasma",
        vmin=0,
        vmax=1,
        linewidths=0,
        rasterized=True,
        label="noise-aware Diff" if run.raw_diff is not None else "Diff",
    )
    if run.threshold is not None:
        ax.axhline(run.threshold, color="k", lw=1.2, label=f"λ = {run.threshold:g}")
    for step in jumps:
        ax.axvline(step, color="red", lw=1, ls="--")
    ax.set_yscale("log")
    ax.set_xlim(run.steps[0] - 0.5, run.steps[-1] + 0.5)
    ax.set_ylabel("Diff" + (" (0 drawn at the bottom)" if (diff[measured] <= 0).any() else ""), fontsize=8)
    ax.legend(loc="upper right", fontsize=7, markerscale=3)
    ax.tick_params(labelsize=8)


def _groups(ax: Axes, run: RunLog, groups: list[str]) -> None:
    """Per stage the payload sent (stacked: Kronecker, BatchNorm) against every layer on every step."""
    _head(
        ax,
        GROUPS.format(run.label),
        "layer group   (bars: payload sent per rank; dashed: every layer on every step; %: the ratio)",
    )
    payload, batchnorm = np.nan_to_num(_recorded(run.payload_bytes)), _recorded(run.batchnorm)
    if not payload.any():
        _nothing(ax, "no Fisher payload (one rank?)")
        return
    names = list(dict.fromkeys(groups))
    member = np.array([[g == name for g in groups] for name in names])  # groups × layers
    sent = payload.sum(axis=1)
    every = payload.max(axis=1) * payload.shape[1]  # a layer's payload when due, on every record
    x = np.arange(len(names))
    kron = member @ (sent * ~batchnorm)
    bn = member @ (sent * batchnorm)
    ax.bar(x, member @ every, color="none", edgecolor="0.3", ls="--", lw=1)
    ax.bar(x, kron, color=KRON_COLOUR, label="Kronecker layers")
    ax.bar(x, bn, bottom=kron, color=BN_COLOUR, label="BatchNorm layers")
    for xi, s, e in zip(x, kron + bn, member @ every):
        ax.annotate(f"{s / e * 100:.0f}%" if e else "", (xi, s), ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x, names, fontsize=8)
    ax.yaxis.set_major_formatter(BYTES)
    ax.tick_params(labelsize=8)
    ax.legend(loc="upper left", fontsize=7)


# Panels shared by all runs ------------------------------------------------------------------------
def _traffic(fig: Figure, spec: SubplotSpec, runs: Sequence[RunLog], colours: dict[int, str]) -> None:
    grid = spec.subgridspec(1, 2, width_ratios=[3, 2])
    cumulative, ratio = fig.add_subplot(grid[0, 0]), fig.add_subplot(grid[0, 1])
    for run in runs:
        colour = colours[id(run)]
        cumulative.plot(run.steps, _recorded(run.wire_bytes), color=colour, lw=1.5, label=run.label)
        cumulative.plot(run.steps, _recorded(run.every_step_wire_bytes), color=colour, lw=1, ls="--")
        ratio.plot(run.steps, _recorded(run.ratio), color=colour, lw=1.5, label=run.label)
    cumulative.plot([], [], color="0.4", ls="--", lw=1, label="every layer every step")
    cumulative.set_title(TRAFFIC + ", ring wire model", fontsize=10, loc="left")
    cumulative.yaxis.set_major_formatter(BYTES)
    ratio.set_title(RATIO + ", payload so far", fontsize=10, loc="left")
    ratio.yaxis.set_major_formatter(PercentFormatter(1.0))
    ratio.set_ylim(0, 1.05)
    for ax in (cumulative, ratio):
        ax.set_xlabel("step")
        ax.tick_params(labelsize=8)
        ax.legend(fontsize=7, loc="upper left" if ax is cumulative else "lower left")


def smooth(values: np.ndarray, window: int | None = None) -> np.ndarray:
    """Running mean over ``window`` records (default a fiftieth of the run), NaN-aware."""
    window = window or max(1, values.size // 50)
    if window <= 1:
        return values
    finite = np.isfinite(values)
    kernel = np.ones(window)
    total = np.convolve(np.where(finite, values, 0.0), kernel, mode="same")
    count = np.convolve(finite.astype(float), kernel, mode="same")
    return np.divide(total, count, out=np.full_like(total, np.nan), where=count > 0)


def _learning(fig: Figure, spec: SubplotSpec, runs: Sequence[RunLog], colours: dict[int, str]) -> None:
    grid = spec.subgridspec(1, 4)
    axes = [fig.add_subplot(grid[0, i]) for i in range(4)]
    titles = (ACCURACY, LOSS, ACCURACY_TIME, LOSS_TIME)
    for run in runs:
        colour = colours[id(run)]
        eval_steps = np.array([e["step"] for e in run.evals if isinstance(e.get("step"), (int, float))])
        eval_time = np.interp(eval_steps, run.steps, run.train_time) if eval_steps.size else eval_steps
        for ax, (train, key), x, x_eval in zip(
            axes,
            [(run.acc, "val_top1"), (run.loss, "val_loss")] * 2,
            [run.steps] * 2 + [run.train_time] * 2,
            [eval_steps] * 2 + [eval_time] * 2,
        ):
            ax.plot(x, smooth(train), color=colour, lw=1, alpha=0.6)
            values = np.array(
                [e.get(key, np.nan) for e in run.evals if isinstance(e.get("step"), (int, float))], float
            )
            if values.size:
                ax.plot(x_eval, values, color=colour, lw=1.8, marker="o", ms=4, label=run.label)
            else:
                ax.plot([], [], color=colour, lw=1.8, label=run.label)
    style = [
        Line2D([], [], color="0.3", lw=1, alpha=0.6, label="train (rank 0's batches, running mean)"),
        Line2D([], [], color="0.3", lw=1.8, marker="o", ms=4, label="test (evaluation)"),
    ]
    for i, (ax, title) in enumerate(zip(axes, titles)):
        ax.set_title(title, fontsize=10, loc="left")
        ax.set_xlabel("step" if i < 2 else "training time (s, sum of step times)", fontsize=8)
        ax.tick_params(labelsize=8)
        if i % 2 == 0:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    axes[0].legend(fontsize=7, loc="lower right")
    axes[1].legend(handles=style, fontsize=7, loc="upper right")
