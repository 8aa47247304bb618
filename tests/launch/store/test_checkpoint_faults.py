"""Checkpoints: atomic, the last K kept, verified on load (a truncated or corrupt file is reported and the
one before it used); a 2-rank run killed with SIGKILL and resumed repeats the uninterrupted run's
per-step losses exactly, K-FAC schedule included."""

import json
import logging
import os

import pytest
import torch

from launch.store import checkpoint as ck
from launch.store.snapshot import training_pieces
from tests.helpers.common import horovod_ready, read_jsonl
from tests.helpers.jobs import job, tiny, train_cmd


class OneRank:
    """hvd for a world of one (what the collectives of launch.store.checkpoint reduce to)."""

    def rank(self):
        return 0

    def size(self):
        return 1

    def allgather_object(self, obj):
        return [obj]

    def broadcast_object(self, obj, root_rank=0, name=None):
        return obj


def save(folder, step, keep_last=3, keep_all=False):
    state = {
        "format": 1,
        "epoch": 0,
        "step": step,
        "batch_in_epoch": step,
        "model": {"w": torch.full((3,), step)},
        "optimizer": {},
        "kfac": None,
        "rng": [],
    }
    return ck.write_checkpoint(str(folder), state, keep_last=keep_last, keep_all=keep_all)


def test_keep_last_manifest_and_last_link(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step)
        (tmp_path / f".tmp-step_{step:07d}.pt.abc").write_bytes(b"partial")  # as left by a crash
    names = sorted(f for f in os.listdir(tmp_path) if not f.startswith("."))
    assert names == ["checkpoints.json", "last.pt", "step_0000003.pt", "step_0000004.pt", "step_0000005.pt"]
    manifest = json.load(open(tmp_path / "checkpoints.json"))
    assert [e["step"] for e in manifest["checkpoints"]] == [5, 4, 3] and manifest["last"] == "step_0000005.pt"
    assert all(len(e["sha256"]) == 64 and e["bytes"] > 0 for e in manifest["checkpoints"])
    assert os.path.samefile(tmp_path / "last.pt", tmp_path / "step_0000005.pt")  # a hard link, no copy
    assert ck.resume_candidates("auto", str(tmp_path)) == [
        str(tmp_path / f"step_000000{s}.pt") for s in (5, 4, 3)
    ]
    # keep_all keeps everything; a later save from an earlier step (a resumed run) drops the
    # checkpoints of the abandoned steps after it.
    for step in range(6, 8):
        save(tmp_path, step, keep_all=True)
    save(tmp_path, 4, keep_all=True)
    steps = sorted(int(f[5:12]) for f in os.listdir(tmp_path) if f.startswith("step_"))
    assert steps == [3, 4]


@pytest.mark.parametrize("damage", ["truncate", "flip", "garbage"])
def test_damaged_newest_checkpoint_is_reported_and_the_previous_used(tmp_path, caplog, damage):
    for step in (1, 2, 3):
        save(tmp_path, step)
    newest = tmp_path / "step_0000003.pt"
    data = bytearray(newest.read_bytes())
    if damage == "truncate":
        data = data[: len(data) // 2]
    elif damage == "flip":  # a flipped bit inside the tensor data: still loads
        data[len(data) // 2] ^= 0x01
    else:
        data = b"\0" * len(data)
    newest.write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="launch.checkpoint"):
        path, state = ck.load_checkpoint(OneRank(), ck.resume_candidates("auto", str(tmp_path)))
    assert path == str(tmp_path / "step_0000002.pt") and state["step"] == 2
    assert torch.equal(state["model"]["w"], torch.full((3,), 2))
    warning = caplog.records[0].getMessage()
    assert str(newest) in warning and "trying" in warning
    assert {"truncate": "truncated", "flip": "sha256", "garbage": "sha256"}[damage] in warning


def test_no_usable_checkpoint_is_an_error_naming_each_file(tmp_path):
    save(tmp_path, 1)
    (tmp_path / "step_0000001.pt").write_bytes(b"")
    with pytest.raises(ck.CheckpointError, match="step_0000001.pt: truncated"):
        ck.load_checkpoint(OneRank(), ck.resume_candidates("auto", str(tmp_path)))
    # A file from elsewhere (no manifest) must at least load and look like a checkpoint.
    other = tmp_path / "other" / "x.pt"
    other.parent.mkdir()
    torch.save({"weights": 1}, other)
    with pytest.raises(ck.CheckpointError, match="not a checkpoint of this launcher"):
        ck.load_checkpoint(OneRank(), [str(other)])


def metrics(run_dir):
    records = read_jsonl(os.path.join(run_dir, "metrics.jsonl"))
    return ([r for r in records if "loss" in r], [r["eval"] for r in records if "eval" in r])


@pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
def test_sigkill_and_resume_repeats_the_uninterrupted_losses_exactly(tmp_path):
    """Run A: 2 epochs x 4 steps uninterrupted. Run B: rank 0 SIGKILLs itself after step 7 (its
    checkpoint of step 7 never written); then its newest checkpoint (step 6) is truncated, as by a
    failing disk; the resumed run reports it, resumes from step 5 and must produce A's per-step
    losses bit for bit, with A's K-FAC schedule (adaptive lambda) and evaluations."""
    common = (
        "train.epochs=2",
        "checkpoint.every_steps=1",
        "checkpoint.keep_last=3",
        "kfac.update_threshold=0.05",
    )
    full, part = str(tmp_path / "full"), str(tmp_path / "part")
    a, _ = job("horovodrun", train_cmd(tiny(full, *common)), timeout=300)
    assert a.returncode == 0, a.stderr[-3000:]

    b1, _ = job(
        "horovodrun", train_cmd(tiny(part, *common, "debug.kill_step=7", "debug.fault_rank=0")), timeout=300
    )
    assert b1.returncode != 0 and "debug.kill_step: rank 0 sends itself SIGKILL after step 7" in b1.stderr
    folder = os.path.join(part, "checkpoints")
    kept = sorted(f for f in os.listdir(folder) if f.startswith("step_"))
    assert kept == ["step_0000004.pt", "step_0000005.pt", "step_0000006.pt"]
    newest = os.path.join(folder, "step_0000006.pt")
    with open(newest, "r+b") as fh:
        fh.truncate(os.path.getsize(newest) // 3)

    b2, _ = job("horovodrun", train_cmd(tiny(part, *common, "checkpoint.resume=auto")), timeout=300)
    assert b2.returncode == 0, b2.stderr[-3000:]
    assert f"checkpoint {newest} is unusable (truncated" in b2.stderr
    assert (
        "resumed from " + os.path.join(folder, "step_0000005.pt") + ": step 5, epoch 1, batch 1" in b2.stdout
    )

    (ra, ea), (rb, eb) = metrics(full), metrics(part)
    assert [r["step"] for r in rb] == [r["step"] for r in ra] == list(range(1, 9))
    assert [r["loss"] for r in rb] == [r["loss"] for r in ra]  # exactly, not approximately
    for x, y in zip(ra, rb):
        assert x["lr"] == y["lr"]
        assert {n: (e["due"], e["interval"]) for n, e in x["kfac"]["layers"].items()} == {
            n: (e["due"], e["interval"]) for n, e in y["kfac"]["layers"].items()
        }, x["step"]
    assert any(not e["due"] for r in ra[1:] for e in r["kfac"]["layers"].values())  # the schedule mattered
    assert [(e["step"], e["val_loss"], e["val_top1"]) for e in eb] == [
        (e["step"], e["val_loss"], e["val_top1"]) for e in ea
    ]
    sa = json.load(open(os.path.join(full, "summary.json")))
    sb = json.load(open(os.path.join(part, "summary.json")))
    assert sa["rank_weight_checksums"] == sb["rank_weight_checksums"]
    assert [h["epoch"] for h in sb["history"]] == [1, 2]


def test_checkpoint_of_another_model_is_refused_with_a_reason():
    """The loop turns this ValueError into exit code 2 naming checkpoint.resume, on every rank alike."""
    small, big = torch.nn.Linear(2, 2), torch.nn.Linear(3, 2)
    state = {
        "model": small.state_dict(),
        "optimizer": torch.optim.SGD(small.parameters(), lr=0.1).state_dict(),
        "kfac": None,
        "rng": [],
        "step": 1,
    }
    with pytest.raises(ValueError, match="does not fit this model"):
        ck.restore(
            state,
            OneRank(),
            training_pieces(big, torch.optim.SGD(big.parameters(), lr=0.1), lambda: None),
            seed=0,
        )
    with pytest.raises(ValueError, match="SGD run"):
        ck.restore(
            state,
            OneRank(),
            training_pieces(small, torch.optim.SGD(small.parameters(), lr=0.1), lambda: object()),
            seed=0,
        )
