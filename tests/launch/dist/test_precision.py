"""Mixed precision through the launcher on the CPU: bf16 + channels_last on 2 ranks (with the plain
progress line under horovodrun), fp16 with a forced loss-scale overflow that every rank skips without
counting it as divergence, fp16 divergence that still stops the run, and train.device=cuda without CUDA."""

import json
import math
import os

import pytest
import torch
from tests.helpers.common import describe, horovod_ready, horovodrun, read_jsonl, tiny_fashion_args
from tests.helpers.jobs import job, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


def load_last(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)


def step_records(run_dir):
    return [r for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if "loss" in r]


@pytest.fixture(scope="module")
def bf16_run(tmp_path_factory):
    """2 ranks, bf16 autocast, channels_last inputs, a plain progress line on every step."""
    run_dir = str(tmp_path_factory.mktemp("bf16") / "run")
    proc = horovodrun(
        2,
        tiny_fashion_args(
            run_dir,
            "train.precision=bf16",
            "train.channels_last=true",
            "log.progress=true",
            "log.progress_every_s=0",
            "log.every_steps=3",
        ),
    )
    return run_dir, proc


@needs_horovod
def test_bf16_channels_last_two_ranks(bf16_run):
    run_dir, proc = bf16_run
    assert proc.returncode == 0, describe(proc)
    assert "precision: bf16 autocast (no loss scaling); memory format channels_last" in proc.stdout
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["precision"] == "bf16" and summary["steps"] == 8
    # Data parallelism under autocast: finite weights, identical on both ranks.
    sums = summary["rank_weight_checksums"]
    assert len(sums) == 2 and sums[0] == sums[1] and math.isfinite(sums[0])
    assert summary["rank_state_finite"] == [True, True]
    # K-FAC's phase seconds: totals in the summary, per logged step in metrics.jsonl.
    seconds = summary["kfac"]["seconds"]
    assert seconds and all(v >= 0 for v in seconds.values()) and sum(seconds.values()) > 0
    records = step_records(run_dir)
    assert [r["step"] for r in records] == [3, 6, 8]
    assert all(r["kfac_seconds"] and set(r["kfac_seconds"]) <= set(seconds) for r in records)
    assert all(r["step_time"] > 0 for r in records) and summary["train_time_s"] > 0
    # The factors, previous factors and inverses K-FAC keeps stay fp32 whatever autocast computed in.
    kfac_state = load_last(run_dir)["kfac"]
    tensors = [
        t
        for group in ("previous", "inverses")
        for kinds in kfac_state[group].values()
        for t in kinds.values()
    ]
    assert len(tensors) > 19 and {t.dtype for t in tensors} == {torch.float32}


@needs_horovod
def test_plain_progress_lines_under_horovodrun(bf16_run):
    run_dir, proc = bf16_run
    assert proc.returncode == 0, describe(proc)
    output = proc.stdout + proc.stderr
    assert "\r" not in output  # no tqdm redraws
    lines = [l for l in proc.stdout.splitlines() if l.startswith("[0]<stdout>:progress: ")]
    assert len(lines) == 8, proc.stdout[-3000:]
    assert lines[0].startswith("[0]<stdout>:progress: step 1/8 (12%), epoch 1/1, loss ")
    assert "images/s" in lines[0] and "lr " in lines[0] and "K-FAC mean interval" in lines[0]
    assert not any(l.startswith("[1]") and "progress:" in l for l in output.splitlines())  # rank 0 only


@needs_horovod
def test_fp16_overflow_is_skipped_on_every_rank_and_is_not_divergence(tmp_path):
    """Rank 1's gradients of step 2 become infinite (its loss stays finite): both ranks skip the step,
    the loss scale halves, K-FAC does not advance, and train.max_bad_steps=1 does not stop the run."""
    run_dir = str(tmp_path / "fp16")
    proc, _ = job(
        "horovodrun",
        train_cmd(
            tiny(
                run_dir,
                "train.precision=fp16",
                "debug.overflow_step=2",
                "debug.fault_rank=1",
                "train.max_bad_steps=1",
                "checkpoint.every_epochs=1",
            )
        ),
        timeout=240,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = step_records(run_dir)
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert records[1]["skipped"] == {
        "nonfinite_loss_ranks": 0,
        "nonfinite_gradients": True,
        "loss_scale_overflow": True,
    }
    assert "skipped" not in records[0] and "skipped" not in records[2]
    scales = [r["loss_scale"] for r in records]
    assert scales[1] == scales[0] / 2 and scales[2] == scales[1]
    assert all(math.isfinite(r["loss"]) for r in records)
    summary = json.load(open(os.path.join(run_dir, "summary.json")))
    assert summary["loss_scale_overflow_steps"] == [2] and summary["skipped_steps"] == []
    sums = summary["rank_weight_checksums"]
    assert sums[0] == sums[1] and math.isfinite(sums[0]) and summary["rank_state_finite"] == [True, True]
    saved = load_last(run_dir)
    assert saved["kfac"]["steps"] == 3  # 4 steps, one of them skipped
    assert saved["extra"]["grad_scaler"]["scale"] == scales[-1]
    assert "step 2: fp16 gradients overflowed at the current loss scale" in proc.stdout + proc.stderr
    assert "training diverged" not in proc.stderr


def test_fp16_non_finite_loss_still_counts_as_divergence(tmp_path):
    """A NaN input under fp16 is a non-finite loss, not an overflow: with train.max_bad_steps=1 the run
    stops with exit code 4."""
    run_dir = str(tmp_path / "fp16nan")
    proc, _ = job(
        "none",
        train_cmd(
            tiny(
                run_dir,
                "train.precision=fp16",
                "debug.nan_step=2",
                "train.max_bad_steps=1",
                "train.world_size=1",
            )
        ),
        timeout=240,
    )
    assert proc.returncode == 4, proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: training diverged: 1 consecutive steps (up to step 2)")


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_without_cuda_is_one_line_naming_the_fix(tmp_path):
    proc, _ = job("none", train_cmd(tiny(str(tmp_path / "run"), "train.device=cuda")), timeout=120)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    line = lines[0]
    assert (
        line.startswith("config error: ")
        and "(command line): train.device: cuda, but CUDA is not available" in line
    )
    assert f"torch {torch.__version__}" in line and "set train.device=cpu" in line
    assert "Traceback" not in proc.stderr and proc.stdout == ""
