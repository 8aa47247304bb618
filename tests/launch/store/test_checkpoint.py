"""Checkpoints: atomic writes, and an interrupted 2-rank run resumed to the same result."""

import json
import os

import numpy as np
import pytest
import torch

from launch.store.checkpoint import atomic_save, resume_candidates
from tests.helpers.common import describe, horovod_ready, read_jsonl
from tests.helpers.jobs import job, tiny, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


def test_atomic_save_replaces_whole_file_and_leaves_no_temporaries(tmp_path):
    path = tmp_path / "ck" / "last.pt"
    atomic_save({"a": torch.arange(5)}, str(path))
    assert torch.equal(torch.load(path)["a"], torch.arange(5))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError("cannot pickle")

    with pytest.raises(RuntimeError, match="cannot pickle"):
        atomic_save({"a": torch.zeros(3), "b": Unpicklable()}, str(path))
    # The failed save neither touched the old checkpoint nor left a temporary file behind.
    assert torch.equal(torch.load(path)["a"], torch.arange(5))
    assert os.listdir(tmp_path / "ck") == ["last.pt"]


def test_resume_candidates_of_no_resume_and_of_an_explicit_file(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    assert resume_candidates(None, str(tmp_path)) == []
    assert resume_candidates("/some/file.pt", str(tmp_path)) == ["/some/file.pt"]
    assert resume_candidates("auto", str(tmp_path)) == [str(tmp_path / "last.pt")]  # an older layout


def load_ckpt(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)


def assert_same(a, b, path="checkpoint"):
    """``a`` and ``b`` equal bit for bit: tensors by dtype, shape and torch.equal, the rest by ==."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, path
        assert torch.equal(a, b), f"{path}: max difference {(a.double() - b.double()).abs().max().item()!r}"
    elif isinstance(a, dict):
        assert isinstance(b, dict) and sorted(a, key=str) == sorted(b, key=str), path
        for key in a:
            assert_same(a[key], b[key], f"{path}.{key}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{path}[{i}]")
    elif isinstance(a, np.ndarray):
        assert isinstance(b, np.ndarray) and a.dtype == b.dtype and np.array_equal(a, b), path
    else:
        assert a == b, f"{path}: {a!r} != {b!r}"


# Per-step record fields that measure time, not the computation.
TIMINGS = ("step_time", "images_per_s", "kfac_seconds")


def horovodrun(run_dir, *extra):
    """A tiny 2-rank run (jobs.tiny: 4 steps per epoch) under horovodrun."""
    proc, _ = job("horovodrun", train_cmd(tiny(run_dir, *extra)), timeout=300)
    return proc


@needs_horovod
def test_interrupted_run_resumes_exactly_under_2_ranks(tmp_path):
    """Run A: 2 epochs of 4 steps straight. Run B: stopped after 3 steps (mid-epoch, a clean stop with
    its checkpoint and an evaluation), then resumed with checkpoint.resume=auto. B must end where A
    ends bit for bit: weights, momentum, K-FAC state (factors, inverses, scheduler), every rank's RNG
    and BatchNorm statistics; and its per-step records must be A's."""
    common = ("train.epochs=2", "checkpoint.every_epochs=1")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    a = horovodrun(full, *common)
    assert a.returncode == 0, describe(a)
    b1 = horovodrun(part, *common, "train.max_steps=3")
    assert b1.returncode == 0, describe(b1)
    stopped = load_ckpt(part)
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (3, 0, 3)
    assert stopped["world_size"] == 2 and len(stopped["rng"]) == 2
    assert stopped["kfac"]["steps"] == 3
    b2 = horovodrun(part, *common, "checkpoint.resume=auto")
    assert b2.returncode == 0, describe(b2)
    assert "resumed from" in b2.stdout and "step 3, epoch 0, batch 3" in b2.stdout

    ca, cb = load_ckpt(full), load_ckpt(part)
    assert ca["step"] == cb["step"] == 8 and ca["epoch"] == cb["epoch"] == 1
    # Everything but the run's own paths (config) and its evaluation history (B evaluated at step 3).
    assert set(ca) == set(cb)
    for key in sorted(set(ca) - {"config", "extra"}):
        assert_same(ca[key], cb[key], key)
    assert any(not torch.equal(ca["model"][k], stopped["model"][k]) for k in ca["model"])  # B2 did train

    # metrics.jsonl of the resumed run: steps 1..8 once each, equal to run A's but for the timings.
    ma = [r for r in read_jsonl(os.path.join(full, "metrics.jsonl")) if "kfac" in r]
    mb = [r for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if "kfac" in r]
    assert [r["step"] for r in mb] == [r["step"] for r in ma] == list(range(1, 9))
    for x, y in zip(ma, mb):
        assert x["loss"] == y["loss"] and x["lr"] == y["lr"], x["step"]
        assert_same(
            {k: v for k, v in x.items() if k not in TIMINGS},
            {k: v for k, v in y.items() if k not in TIMINGS},
            f"metrics step {x['step']}",
        )
    # The evaluation history survives the restart (the stopped run evaluated at 3/4 of epoch 1); the
    # evaluations at the ends of epochs 1 and 2, and the training averages of epoch 2, are A's.
    ha = json.load(open(os.path.join(full, "summary.json")))["history"]
    hb = json.load(open(os.path.join(part, "summary.json")))["history"]
    assert [h["epoch"] for h in hb] == [0.75, 1, 2] and [h["epoch"] for h in ha] == [1, 2]
    assert [(h["step"], h["val_loss"], h["val_top1"]) for h in hb[1:]] == [
        (h["step"], h["val_loss"], h["val_top1"]) for h in ha
    ]
    assert (hb[2]["train_loss"], hb[2]["train_acc"]) == (ha[1]["train_loss"], ha[1]["train_acc"])
