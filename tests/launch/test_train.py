"""2-rank end-to-end runs under both launchers: horovodrun --gloo and mpirun (mpi4py)."""

import glob
import json
import os
import shutil

import pytest
import yaml

from tests.helpers.common import (
    CONFIGS,
    describe,
    horovod_ready,
    horovodrun,
    launch_cmd,
    mpirun,
    read_jsonl,
    run,
    tiny_fashion_args,
)

pytestmark = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


def check_outputs(run_dir, world_size=2, kfac=True):
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["world_size"] == world_size and summary["global_batch"] == 16 * world_size
    assert 0.0 <= summary["final_top1"] <= 1.0 and summary["history"]
    assert summary["wall_time_s"] > 0 and summary["images_per_s"] > 0
    # Data parallelism: every rank ends with the same weights.
    sums = summary["rank_weight_checksums"]
    assert len(sums) == world_size and len(set(sums)) == 1
    resolved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert resolved["log"]["dir"] == run_dir
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    steps_per_epoch = 256 // world_size // 16
    assert [r["step"] for r in records] == list(range(1, steps_per_epoch + 1))
    assert summary["steps"] == steps_per_epoch
    if kfac:
        layers = records[0]["kfac"]["layers"]
        assert len(layers) == 19 and all(e["due"] for e in layers.values())  # t = 1: all due
        # The bytes of the per-step records add up to the run's Fisher payload.
        step_bytes = sum(e["payload_bytes"] for r in records for e in r["kfac"]["layers"].values())
        fisher = summary["fisher"]
        assert step_bytes == fisher["payload_bytes"] > 0
        assert fisher["ratio"] == pytest.approx(fisher["payload_bytes"] / fisher["every_step_payload_bytes"])
    return summary, records


def test_horovodrun_gloo_two_ranks_adaptive(tmp_path):
    run_dir = str(tmp_path / "gloo")
    proc = horovodrun(2, tiny_fashion_args(run_dir, "log.tensorboard=true", "kfac.update_threshold=10"))
    assert proc.returncode == 0, describe(proc)
    assert "world: 2 rank(s) on 1 host(s); init via horovod, controller Gloo" in proc.stdout
    assert proc.stdout.count("world: ") == 1  # printed once, by rank 0
    summary, records = check_outputs(run_dir)
    # lambda = 10: every diff is below it, so intervals grow and most layers skip most steps.
    assert summary["fisher"]["ratio"] < 0.75
    assert records[-1]["mean_interval"] > 1
    skipped = [e for r in records[1:] for e in r["kfac"]["layers"].values() if not e["due"]]
    assert skipped and all(e["payload_bytes"] == 0 for e in skipped)
    assert glob.glob(os.path.join(run_dir, "tensorboard", "events.out.tfevents.*"))
    assert os.path.exists(os.path.join(run_dir, "checkpoints", "last.pt"))


@pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")
def test_mpirun_two_ranks_every_step(tmp_path):
    run_dir = str(tmp_path / "mpi")
    proc = mpirun(2, tiny_fashion_args(run_dir, "kfac.update_threshold=null", "checkpoint.every_epochs=0"))
    assert proc.returncode == 0, describe(proc)
    assert "init via mpi4py, controller MPI" in proc.stdout
    summary, records = check_outputs(run_dir)
    assert summary["fisher"]["ratio"] == pytest.approx(1.0)
    assert all(e["due"] for r in records for e in r["kfac"]["layers"].values())
    assert not os.path.exists(os.path.join(run_dir, "checkpoints"))


def test_single_process_sgd_baseline_on_synthetic_data(tmp_path):
    """No launcher at all (a world of one), the SGD baseline, synthetic images."""
    run_dir = str(tmp_path / "sgd")
    proc = run(
        launch_cmd(
            [
                "--config",
                os.path.join(CONFIGS, "fashion_mnist", "small_resnet_sgd.yaml"),
                f"log.dir={run_dir}",
                "data.dataset=synthetic",
                "data.synthetic_size=64",
                "data.synthetic_val_size=32",
                "data.image_size=28",
                "data.val_resize=28",
                "data.batch_size=16",
                "model.width=4",
                "train.epochs=2",
                "train.world_size=null",
                "log.progress=false",
                "log.tensorboard=false",
                "checkpoint.every_epochs=0",
            ]
        )
    )
    assert proc.returncode == 0, describe(proc)
    assert "world: 1 rank(s)" in proc.stdout
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["method"] == "sgd" and "fisher" not in summary and summary["steps"] == 8
    assert [h["epoch"] for h in summary["history"]] == [1, 2]
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]
    assert len(records) == 8 and "kfac" not in records[0]
