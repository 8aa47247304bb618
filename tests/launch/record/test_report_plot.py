"""`python -m launch.report RUN_DIR ... --plot`: the figure of real runs (a 2-rank K-FAC run under
horovodrun, a one-process SGD run), of a killed run's truncated metrics.jsonl, of several runs side by
side, and the one-line errors. Large runs: the heatmap's downsampling and the capped layer labels."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from launch.record import plots
from launch.record.reader import RunLog, layer_groups, read_run
from launch.record.report import main as report_main
from tests.helpers.common import FASHION, PYTHON, horovod_ready, read_jsonl
from tests.helpers.common import run as run_cmd
from tests.helpers.jobs import job, tiny, train_cmd


def report(capsys, *args: str) -> subprocess.CompletedProcess:
    """launch.record.report's main in this process (the command line itself is run once, by the first test)."""
    code = report_main(list(args))
    out, err = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory) -> str:
    """8 steps of 2-rank K-FAC with λ and the noise-aware Diff (raw Diffs recorded too), 2 evaluations."""
    if not horovod_ready() or not os.path.isdir(FASHION):
        pytest.skip("Horovod or Fashion-MNIST not available")
    folder = str(tmp_path_factory.mktemp("plot") / "kfac")
    proc, _ = job(
        "horovodrun", train_cmd(tiny(folder, "train.epochs=2", "kfac.noise_aware_diff=true")), timeout=240
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def sgd_run(tmp_path_factory) -> str:
    """One process (a world of 1): the same data and model with momentum SGD."""
    if not os.path.isdir(FASHION):
        pytest.skip("Fashion-MNIST not installed")
    folder = str(tmp_path_factory.mktemp("plot") / "sgd")
    proc, _ = job("none", train_cmd(tiny(folder, "optim.method=sgd")), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return folder


def titles(figure) -> list:
    return [ax.get_title(loc="left") for ax in figure.axes]


def panel(figure, title: str):
    matches = [ax for ax in figure.axes if ax.get_title(loc="left").startswith(title)]
    assert len(matches) == 1, (title, titles(figure))
    return matches[0]


def png_size(path: str):
    with Image.open(path) as image:
        return image.size


def test_figure_of_a_kfac_run(kfac_run):
    proc = run_cmd([PYTHON, "-m", "launch.report", kfac_run, "--plot"], timeout=120)
    out = os.path.join(kfac_run, "report.png")
    assert proc.returncode == 0, proc.stderr
    assert f"figure: {out}" in proc.stdout
    assert "kfac, lambda=0.25" in proc.stdout  # the text table comes first
    run = read_run(kfac_run)
    width, height = plots.figure_size([run])
    assert png_size(out) == (round(width * plots.DPI), round(height * plots.DPI))

    figure = plots.build_figure([run])
    label = "kfac (kfac, lambda=0.25)"
    for title in (
        plots.INTERVALS.format(label),
        plots.LEARNING_RATE.format(label),
        plots.DIFF.format(label),
        plots.GROUPS.format(label),
        plots.TRAFFIC,
        plots.RATIO,
        plots.ACCURACY,
        plots.LOSS,
        plots.ACCURACY_TIME,
        plots.LOSS_TIME,
    ):
        panel(figure, title)
    # The heatmap shows each layer's interval at each step, layers in model order, as metrics.jsonl has them.
    records = [e for e in read_jsonl(os.path.join(kfac_run, "metrics.jsonl")) if "kfac" in e]
    layers = list(records[0]["kfac"]["layers"])
    expected = np.array([[r["kfac"]["layers"][name]["interval"] for r in records] for name in layers], float)
    heat = panel(figure, plots.INTERVALS.format(label))
    assert expected.shape == (19, 8) and expected.max() > 1
    np.testing.assert_array_equal(np.asarray(heat.images[0].get_array()), expected)
    assert [t.get_text() for t in heat.get_yticklabels()] in ([], [""] * len(layers))  # names on the strip
    strip_labels = [
        t.get_text() for ax in figure.axes for t in ax.get_yticklabels() if t.get_text() in layers
    ]
    assert strip_labels == layers
    # The Diff panel: λ as a line, raw and noise-aware Diffs as two point sets.
    diff = panel(figure, plots.DIFF.format(label))
    assert [line.get_ydata()[0] for line in diff.lines] == [0.25]
    assert {t.get_text() for t in diff.get_legend().get_texts()} == {
        "raw Diff",
        "noise-aware Diff",
        "λ = 0.25",
    }


def test_sgd_run_draws_only_what_applies(sgd_run, capsys):
    proc = report(capsys, sgd_run, "--plot")
    assert proc.returncode == 0, proc.stderr
    figure = plots.build_figure([read_run(sgd_run)])
    assert titles(figure) == [plots.ACCURACY, plots.LOSS, plots.ACCURACY_TIME, plots.LOSS_TIME]
    assert png_size(os.path.join(sgd_run, "report.png")) == tuple(
        round(v * plots.DPI) for v in plots.figure_size([read_run(sgd_run)])
    )


def test_truncated_metrics_draws_what_is_complete(kfac_run, tmp_path, capsys):
    killed = str(tmp_path / "killed")
    shutil.copytree(kfac_run, killed, ignore=shutil.ignore_patterns("checkpoints", "report.png"))
    os.remove(os.path.join(killed, "summary.json"))
    path = os.path.join(killed, "metrics.jsonl")
    lines = open(path).read().splitlines(keepends=True)
    steps = [i for i, line in enumerate(lines) if '"kfac"' in line]
    with open(path, "w") as fh:  # a job killed while writing its 6th record
        fh.writelines(lines[: steps[5]] + [lines[steps[5]][:200]])
    proc = report(capsys, killed, "--plot", str(tmp_path / "killed.png"))
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    assert "no summary.json" in proc.stderr and "not JSON" in proc.stderr
    assert os.path.getsize(tmp_path / "killed.png") > 0
    run = read_run(killed)
    assert run.method == "kfac, lambda=0.25"  # from config.yaml, as the table would say it
    heat = panel(plots.build_figure([run]), plots.INTERVALS.format(run.label))
    assert heat.images[0].get_array().shape == (19, 5)


def test_runs_side_by_side(kfac_run, sgd_run, tmp_path, capsys):
    second = str(tmp_path / "kfac_again")
    shutil.copytree(kfac_run, second, ignore=shutil.ignore_patterns("checkpoints"))
    out = str(tmp_path / "compare.png")
    proc = report(capsys, kfac_run, second, sgd_run, "--plot", out)
    assert proc.returncode == 0, proc.stderr
    runs = [read_run(p) for p in (kfac_run, second, sgd_run)]
    assert png_size(out) == tuple(round(v * plots.DPI) for v in plots.figure_size(runs))
    figure = plots.build_figure(runs)
    heatmaps = [t for t in titles(figure) if "factor-update interval" in t]
    assert [t.split(":")[0] for t in heatmaps] == [runs[0].label, runs[1].label]  # one column per K-FAC run
    legend = panel(figure, plots.ACCURACY).get_legend()
    assert [t.get_text() for t in legend.get_texts()] == [
        "kfac (kfac, lambda=0.25)",
        "kfac_again (kfac, lambda=0.25)",
        "sgd (sgd)",
    ]
    traffic = panel(figure, plots.TRAFFIC)
    assert len([line for line in traffic.lines if len(line.get_xdata())]) == 4  # 2 runs × (sent, every step)


def test_bad_input_gives_one_line_and_exit_2(kfac_run, tmp_path, capsys):
    empty = str(tmp_path / "not_a_run")
    os.makedirs(empty)
    cases = [
        ([empty, "--plot"], "not a run folder"),
        ([kfac_run, kfac_run, "--plot"], "needs the figure's path"),
        (["--plot", kfac_run, kfac_run], "must end in .png"),
        ([empty], "cannot read"),
    ]
    for args, message in cases:
        proc = report(capsys, *args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, (args, proc.stderr)


# Large runs, without a training job ---------------------------------------------------------------
def resnet_like(steps: int = 2000) -> RunLog:
    names = (
        ["conv1", "bn1"]
        + [
            f"layer{s}.{b}.{k}"
            for s in range(1, 5)
            for b in range(6)
            for k in ("conv1", "bn1", "conv2", "bn2")
        ]
        + ["fc"]
    )
    rng = np.random.default_rng(0)
    interval = np.minimum(1 + np.arange(steps)[None, :] // rng.integers(5, 50, (len(names), 1)), 300).astype(
        float
    )
    due = rng.random(interval.shape) < 1 / interval
    return RunLog(
        path="big",
        name="big",
        method="kfac, lambda=0.25",
        threshold=0.25,
        summary=None,
        steps=np.arange(1, steps + 1),
        lr=np.full(steps, 0.1),
        loss=np.ones(steps),
        acc=np.ones(steps),
        train_time=np.arange(steps, dtype=float),
        layers=names,
        batchnorm=np.array(["bn" in n for n in names]),
        interval=interval,
        due=due,
        diff=np.where(due, 0.3, np.nan),
        payload_bytes=due * 1000.0,
    )


def test_large_run_is_downsampled_and_labels_capped():
    run = resnet_like()
    data, starts = plots.heatmap_data(run)
    assert data.shape == (len(run.layers), plots.MAX_COLUMNS)
    # Each column is the largest interval of its steps.
    bounds = list(starts) + [run.interval.shape[1]]
    np.testing.assert_array_equal(data[:, 7], run.interval[:, bounds[7] : bounds[8]].max(axis=1))
    figure = plots.build_figure([run])
    labels = [t.get_text() for ax in figure.axes for t in ax.get_yticklabels() if "(" in t.get_text()]
    assert labels == ["stem (2)", "layer1 (24)", "layer2 (24)", "layer3 (24)", "layer4 (24)", "head (1)"]


def test_layer_groups():
    assert layer_groups(
        ["conv1", "bn1", "layer1.0.conv1", "layer1.0.downsample.0", "layer2.3.bn3", "fc"]
    ) == ["stem", "stem", "layer1", "layer1", "layer2", "head"]
    assert layer_groups(["conv1", "stages.0.0.conv1", "stages.1.0.downsample.1", "fc"]) == [
        "stem",
        "stages.0",
        "stages.1",
        "head",
    ]


def test_lr_jumps_are_milestones_not_smooth_decay():
    run = resnet_like(100)
    run.lr = np.where(run.steps <= 60, 0.1, 0.01)
    assert list(plots.lr_jumps(run)) == [61]
    run.lr = 0.1 * (1 - run.steps / 101) ** 2
    assert list(plots.lr_jumps(run)) == []


def test_run_without_layer_records_draws_traffic_and_learning(kfac_run, tmp_path):
    """log.layer_records=false: each record keeps only the count of due layers."""
    folder = tmp_path / "no_layers"
    folder.mkdir()
    shutil.copy(os.path.join(kfac_run, "summary.json"), folder)
    with open(os.path.join(kfac_run, "metrics.jsonl")) as src, open(folder / "metrics.jsonl", "w") as dst:
        for entry in map(json.loads, src):
            if "kfac" in entry:
                layers = entry["kfac"].pop("layers")
                entry["kfac"]["due_layers"] = sum(e["due"] for e in layers.values())
            dst.write(json.dumps(entry) + "\n")
    figure = plots.build_figure([read_run(str(folder))])
    assert [t.split(",")[0] for t in titles(figure)] == [
        plots.TRAFFIC,
        plots.RATIO,
        plots.ACCURACY,
        plots.LOSS,
        plots.ACCURACY_TIME,
        plots.LOSS_TIME,
    ]
