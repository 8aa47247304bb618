"""A non-finite loss never reaches the weights: every rank skips that update (one status allreduce),
BatchNorm statistics are put back, K-FAC's numerics events are logged with the layer name, training
goes on; many bad steps in a row stop the run with exit code 4."""

import json
import math
import os

import pytest
import torch
from torch import nn

from launch.training.guards import BufferGuard, all_finite
from tests.helpers.common import horovod_ready, read_jsonl
from tests.helpers.jobs import job, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


def test_buffer_guard_puts_batchnorm_statistics_back():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2))
    model(torch.randn(4, 1, 6, 6))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    guard = BufferGuard(model)
    guard.save()
    x = torch.randn(4, 1, 6, 6)
    x[0, 0, 0, 0] = float("nan")
    model(x)
    assert not all_finite(list(model.buffers()))
    guard.restore()
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert all_finite([torch.ones(2), None]) and not all_finite([torch.tensor([1.0, float("inf")])])


@needs_horovod
def test_nan_batch_on_one_rank_is_skipped_on_every_rank(tmp_path):
    run_dir = str(tmp_path / "nan")
    proc, _ = job(
        "horovodrun",
        train_cmd(tiny(run_dir, "debug.nan_step=2", "debug.fault_rank=1", "checkpoint.every_epochs=1")),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # training went on after the bad batch
    assert "skipped" not in records[0] and "skipped" not in records[2]
    assert records[1]["skipped"] == {"nonfinite_loss_ranks": 1, "nonfinite_gradients": True}
    assert all(math.isfinite(r["loss"]) for r in records)  # rank 0's own loss stayed finite
    # K-FAC dropped the non-finite factors of the due layers, and said so, per layer.
    assert records[1]["kfac"]["numerics"] and not records[2]["kfac"]["numerics"]
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["skipped_steps"] == [2] and summary["rank_state_finite"] == [True, True]
    sums = summary["rank_weight_checksums"]
    assert len(set(sums)) == 1 and math.isfinite(sums[0])
    assert summary["kfac"]["numerics_events"] > 0
    # The warnings: rank 1 names its own non-finite loss, rank 0 the decision, K-FAC the layers.
    err = proc.stdout + proc.stderr
    assert "WARNING: rank 1: step 2: non-finite loss (nan) on this rank" in err
    assert (
        "WARNING: rank 0: step 2: optimiser step skipped on every rank (non-finite loss on 1 rank(s)" in err
    )
    assert "K-FAC step 2, layer 'fc': non-finite factor dropped, previous inverse kept" in err
    # The saved weights and BatchNorm statistics (rank 0's) are finite.
    state = torch.load(
        os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False
    )
    assert all(torch.isfinite(v.float()).all() for v in state["model"].values())
    for rank_buffers in state["rank_buffers"]:
        assert all(torch.isfinite(v.float()).all() for v in rank_buffers.values())


def test_divergence_stops_with_exit_code_4(tmp_path):
    """One process, plain SGD with an absurd learning rate: the loss becomes non-finite, two such
    steps in a row end the run with one line and exit code 4."""
    run_dir = str(tmp_path / "diverge")
    proc, _ = job(
        "none",
        train_cmd(
            tiny(
                run_dir,
                "optim.method=sgd",
                "optim.lr=1e30",
                "optim.schedule=constant",
                "optim.warmup_epochs=0",
                "train.max_bad_steps=2",
                "train.epochs=3",
            )
        ),
        timeout=240,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: 2 consecutive steps") and "train.max_bad_steps" in last
    assert "Traceback" not in proc.stderr
