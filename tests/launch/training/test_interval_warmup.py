"""kfac.interval_warmup_epochs: every factor on every step for the warm-up, then the fixed interval, also
across a resume before and after the switch (one process: the switch is the same decision on every rank)."""

import json
import os

import pytest

from tests.helpers.common import CONFIGS, describe, horovod_ready, launch_cmd, read_jsonl, run

pytestmark = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")

# 64 synthetic images in batches of 8: 8 steps per epoch, 16 in all; the warm-up ends with step 4.
TINY = [
    "--config",
    os.path.join(CONFIGS, "fashion_mnist", "small_resnet_kfac_every_step.yaml"),
    "data.dataset=synthetic",
    "data.synthetic_size=64",
    "data.synthetic_val_size=16",
    "data.image_size=28",
    "data.val_resize=28",
    "data.batch_size=8",
    "model.width=4",
    "train.epochs=2",
    "train.world_size=null",
    "train.eval_every=0",
    "checkpoint.every_epochs=1",
    "log.progress=false",
    "log.tensorboard=false",
    "kfac.update_interval=3",
    "kfac.interval_warmup_epochs=0.5",
]
EXPECTED_DUE = [1, 2, 3, 4, 6, 9, 12, 15]  # every step to 4, then the multiples of 3


def train(run_dir, *extra):
    proc = run(launch_cmd(TINY + [f"log.dir={run_dir}", *extra]), timeout=300)
    assert proc.returncode == 0, describe(proc)
    return proc


def due_steps(run_dir):
    records = [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "kfac" in r]
    assert all(
        len({e["due"] for e in r["kfac"]["layers"].values()}) == 1 for r in records
    )  # all layers alike
    return [r["step"] for r in records if r["kfac"]["layers"]["conv1"]["due"]]


def test_warmup_then_fixed_interval_across_resumes_before_and_after_the_switch(tmp_path):
    run_dir = str(tmp_path / "run")
    train(run_dir, "train.max_steps=2")  # stops in the warm-up
    train(run_dir, "train.max_steps=7", "checkpoint.resume=auto")  # switches, stops after it
    proc = train(run_dir, "checkpoint.resume=auto")  # the intervals come from the checkpoint
    assert "resumed from" in proc.stdout and "step 7" in proc.stdout
    assert due_steps(run_dir) == EXPECTED_DUE
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["fisher"]["compute_ratio"] == pytest.approx(len(EXPECTED_DUE) / 16)
    assert summary["kfac"]["interval_warmup_epochs"] == 0.5 and summary["kfac"]["update_interval"] == 3
