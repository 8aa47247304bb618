"""The traffic model: every-step figures for ResNet-50 and the replay of a recorded schedule."""
import json
import subprocess
import sys

import pytest
from torch import nn

from kfac_hvd import commodel
from kfac_hvd.scheduler import IntervalScheduler


def test_resnet50_every_step_traffic_at_paper_scale():
    from torchvision.models import resnet50
    result = commodel.every_step_traffic(resnet50(), 128, 2814)
    assert result["layers"] == 107
    assert result["factor_values"] == 153_957_802  # METHOD.md: 153.9 M values, 615 MB in fp32
    dense_allreduce = 2814 * 2 * 127 / 128 * 153_957_802 * 4
    assert result["allreduce_only_dense_wire_bytes_per_rank"] == pytest.approx(dense_allreduce)
    assert 3.3e12 < dense_allreduce < 3.5e12
    # packed: allreduce 2(P-1)/P n plus broadcast n, for n = triangle bytes
    assert 2.0e12 < result["wire_bytes_per_rank"] < 3.0e12


def trace_records(layers, steps, diff):
    """A synthetic metrics.jsonl: ``layers`` kronecker layers whose diff is always ``diff``."""
    return [{"step": t, "layers": {name: {"due": True, "diff_A": None if t == 1 else diff, "diff_G": None}
                                   for name in layers}} for t in range(1, steps + 1)]


def linear_layers(count):
    model = nn.Sequential(*[nn.Linear(4, 4) for _ in range(count)])
    return commodel.model_layers(model)


def test_replay_with_same_names_reproduces_the_scheduler():
    layers = linear_layers(3)
    records = trace_records([layer.name for layer in layers], 50, 0.0)
    replay = commodel.replay_trace(records, layers, 40, 4, update_threshold=0.25)
    scheduler = IntervalScheduler(["x"], update_threshold=0.25)
    due = [t for t in range(1, 41) if scheduler.is_due("x", t) and scheduler.record("x", t, 0.0 if t > 1 else None)]
    assert replay["layer_updates"] == 3 * len(due)
    assert replay["ratio"] == pytest.approx(len(due) / 40)


def test_replay_of_changing_factors_is_every_step():
    layers = linear_layers(2)
    records = trace_records(["a", "b", "c"], 20, 0.9)  # other names: mapped by depth
    replay = commodel.replay_trace(records, layers, 100, 8, update_threshold=0.25)
    assert replay["ratio"] == pytest.approx(1.0)


def test_map_layers_by_type_and_depth():
    mapping = commodel.map_layers({"x1": "kronecker", "x2": "batchnorm", "x3": "kronecker"},
                                  {"a": "kronecker", "b": "batchnorm", "c": "kronecker", "d": "kronecker"})
    assert mapping == {"x1": "a", "x3": "d", "x2": "b"}


def test_cli_prints_paper_scale_and_replays_a_trace(tmp_path):
    trace = tmp_path / "metrics.jsonl"
    layers = commodel.model_layers(__import__("torchvision").models.resnet50())
    with trace.open("w") as handle:
        for record in trace_records([layer.name for layer in layers if "F" not in layer.factor_shapes()], 30, 0.0):
            handle.write(json.dumps({"kfac": record}) + "\n")
    out = subprocess.run([sys.executable, "-m", "kfac_hvd.commodel", "--model", "resnet50", "--ranks", "128",
                          "--batch", "16384", "--epochs", "36", "--trace", str(trace), "--json"],
                         capture_output=True, text=True, check=True).stdout
    result = json.loads(out)
    assert result["layers"] == 107 and result["steps"] == 2815
    assert 0 < result["replay"]["ratio"] < 0.6
    text = subprocess.run([sys.executable, "-m", "kfac_hvd.commodel"], capture_output=True, text=True,
                          check=True).stdout
    assert "TB" in text and "3.0 TB" in text


def test_bad_trace_is_one_clear_error(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        commodel.load_trace(str(bad))
