"""Checkpoints: atomic writes, and an interrupted 2-rank run resumed to the same result."""
import json
import os

import pytest
import torch

from launch.checkpoint import atomic_save, resolve_resume
from launch_helpers.common import describe, horovod_ready, horovodrun, read_jsonl, tiny_fashion_args

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


def test_resolve_resume(tmp_path):
    assert resolve_resume(None, str(tmp_path)) is None
    assert resolve_resume("auto", str(tmp_path)) is None
    (tmp_path / "last.pt").write_bytes(b"x")
    assert resolve_resume("auto", str(tmp_path)) == str(tmp_path / "last.pt")
    assert resolve_resume("/some/file.pt", str(tmp_path)) == "/some/file.pt"


def load_ckpt(run_dir):
    return torch.load(os.path.join(run_dir, "checkpoints", "last.pt"), map_location="cpu", weights_only=False)


@needs_horovod
def test_interrupted_run_resumes_exactly_under_2_ranks(tmp_path):
    """Run A: 2 epochs of 4 steps straight. Run B: stopped after 3 steps (mid-epoch), then resumed
    with checkpoint.resume=auto. B must end where A ends: same weights, optimiser, K-FAC state."""
    common = ("train.epochs=2", "data.train_subset=128", "checkpoint.every_epochs=1")
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    a = horovodrun(2, tiny_fashion_args(full, *common))
    assert a.returncode == 0, describe(a)
    b1 = horovodrun(2, tiny_fashion_args(part, *common, "train.max_steps=3"))
    assert b1.returncode == 0, describe(b1)
    stopped = load_ckpt(part)
    assert (stopped["step"], stopped["epoch"], stopped["batch_in_epoch"]) == (3, 0, 3)
    assert stopped["world_size"] == 2 and len(stopped["rng"]) == 2
    assert stopped["kfac"]["steps"] == 3
    b2 = horovodrun(2, tiny_fashion_args(part, *common, "checkpoint.resume=auto"))
    assert b2.returncode == 0, describe(b2)
    assert "resumed from" in b2.stdout and "step 3, epoch 0, batch 3" in b2.stdout

    ca, cb = load_ckpt(full), load_ckpt(part)
    assert ca["step"] == cb["step"] == 8 and ca["epoch"] == cb["epoch"] == 1
    for key, value in ca["model"].items():
        assert torch.allclose(value.float(), cb["model"][key].float(), rtol=1e-5, atol=1e-6), key
    for pid, state in ca["optimizer"]["state"].items():
        assert torch.allclose(state["momentum_buffer"], cb["optimizer"]["state"][pid]["momentum_buffer"],
                              rtol=1e-4, atol=1e-6)
    assert ca["kfac"]["scheduler"] == cb["kfac"]["scheduler"]
    assert ca["kfac"]["traffic"]["totals"] == pytest.approx(cb["kfac"]["traffic"]["totals"])

    # metrics.jsonl of the resumed run: steps 1..8 once each; the resumed steps match run A.
    ma = {r["step"]: r for r in read_jsonl(os.path.join(full, "metrics.jsonl")) if "kfac" in r}
    mb = [r for r in read_jsonl(os.path.join(part, "metrics.jsonl")) if "kfac" in r]
    assert [r["step"] for r in mb] == list(range(1, 9))
    # The evaluation history survives the restart (the stopped run evaluated at 3/4 of epoch 1).
    history = json.load(open(os.path.join(part, "summary.json")))["history"]
    assert [h["epoch"] for h in history] == [0.75, 1, 2]
    for r in mb:
        assert r["loss"] == pytest.approx(ma[r["step"]]["loss"], rel=1e-4, abs=1e-5), r["step"]
        due_a = {n: e["due"] for n, e in ma[r["step"]]["kfac"]["layers"].items()}
        assert {n: e["due"] for n, e in r["kfac"]["layers"].items()} == due_a
