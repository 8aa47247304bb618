"""The benchmarks' side of a training run: bench._common.train starts launch.train (here in a
TrainWorker process, as the freshness sweep does), its exit code is the launcher's, and the run folder
is read back through launch.record.reader into the records the table1 and pareto reports keep (checked
against metrics.jsonl read line by line)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from bench import _freshness_plan, report_pareto, table1
from bench._common import TrainWorker, train
from launch.errors import EXIT_INPUT
from tests.helpers.common import FASHION, read_jsonl, tiny_fashion_args


@pytest.fixture(scope="module")
def worker():
    started = TrainWorker()
    yield started
    if started.process is not None:
        started.process.stdin.close()
        started.process.wait(timeout=60)


@pytest.fixture(scope="module")
def kfac_run(tmp_path_factory, worker) -> str:
    """A few single-rank K-FAC steps with λ = 0.25, trained in the worker."""
    if not os.path.isdir(FASHION):
        pytest.skip("Fashion-MNIST not installed")
    folder = str(tmp_path_factory.mktemp("bench") / "kfac")
    code = train(
        "test",
        "kfac",
        folder,
        tiny_fashion_args(folder, "log.every_steps=2", "train.world_size=null"),
        ranks=1,
        worker=worker,
    )
    assert code == 0, open(os.path.join(folder, "stdout.txt")).read()[-3000:]
    return folder


def test_a_refused_config_returns_the_launchers_exit_code(tmp_path, worker):
    folder = str(tmp_path / "bad")
    code = train("test", "bad", folder, tiny_fashion_args(folder, "train.epochs=-1"), ranks=1, worker=worker)
    assert code == EXIT_INPUT
    assert "train.epochs" in open(os.path.join(folder, "stdout.txt")).read()


def test_table1_records_of_a_run(kfac_run):
    records = [
        r for r in read_jsonl(os.path.join(kfac_run, "metrics.jsonl")) if "fisher" in r and "loss" in r
    ]
    assert len(records) >= 2
    loaded = table1.load_run(Path(kfac_run))
    with open(os.path.join(kfac_run, "summary.json")) as fh:
        assert loaded["summary"] == json.load(fh)
    assert loaded["steps"] == [r["step"] for r in records]
    assert loaded["cumulative_payload_bytes"] == [r["fisher"]["payload_bytes"] for r in records]
    assert loaded["intervals"] == [[v["interval"] for v in r["kfac"]["layers"].values()] for r in records]
    assert loaded["due_layers"] == [sum(v["due"] for v in r["kfac"]["layers"].values()) for r in records]
    assert loaded["layer_names"] == list(records[0]["kfac"]["layers"])
    assert all(type(v) is int for row in loaded["intervals"] for v in row)  # runs.json keeps ints as ints


def test_pareto_records_of_a_run(kfac_run):
    records = [
        r for r in read_jsonl(os.path.join(kfac_run, "metrics.jsonl")) if "mean_interval" in r and "loss" in r
    ]
    assert records
    loaded = report_pareto.load(Path(kfac_run))
    assert loaded["steps"] == [r["step"] for r in records]
    assert loaded["mean_interval"] == [r["mean_interval"] for r in records]
    assert loaded["traffic"] == [(r.get("fisher") or {}).get("ratio") for r in records]


def test_freshness_outcome_of_a_run(kfac_run, tmp_path):
    path = Path(kfac_run)
    result = _freshness_plan.outcome(path)
    with open(path / "summary.json") as fh:
        summary = json.load(fh)
    assert result["top1"] == summary["final_top1"] and result["traffic"] == summary["fisher"]["ratio"]
    assert _freshness_plan.outcome(tmp_path) is None
