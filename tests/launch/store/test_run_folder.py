"""The run folder loses nothing and trusts nothing: a checkpoint never runs code (explicit or automatic
resume), a fresh run never overwrites another run, a resume must match the run that wrote the checkpoint,
and one job at a time holds a folder (docs/RELIABILITY.md, Run folder)."""

import hashlib
import json
import logging
import os
import shutil
import signal
import subprocess
import time

import pytest
import torch

from launch.store import checkpoint as ck
from launch.store.rng import set_rng_state
from tests.helpers.common import describe, env, horovod_ready
from tests.helpers.jobs import job, train_cmd
from tests.helpers.rundir import OneRank, lines, plant_pickle, snapshot, synthetic_config

pytestmark = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


def launch(cfg, run_dir, *overrides, timeout=120):
    proc, _ = job("none", train_cmd(["--config", cfg, f"log.dir={run_dir}", *overrides]), timeout=timeout)
    return proc


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 4-step run (lr 0.01) with its checkpoint of step 4; tests work on copies of it."""
    root = tmp_path_factory.mktemp("finished")
    cfg = synthetic_config(str(root))
    proc = launch(cfg, str(root / "run"))
    assert proc.returncode == 0, describe(proc)
    return cfg, str(root / "run")


def copy_of(finished, tmp_path):
    cfg, run = finished
    shutil.copytree(run, tmp_path / "run")
    return cfg, str(tmp_path / "run")


# ---- 1. loading cannot run code -------------------------------------------------------------------
def test_planted_pickle_runs_no_code_on_automatic_or_explicit_resume(finished, tmp_path):
    cfg, run = copy_of(finished, tmp_path)
    folder = os.path.join(run, "checkpoints")
    marker = str(tmp_path / "marker")
    planted = os.path.join(folder, "step_0000099.pt")  # newer than any: tried first by 'auto'
    plant_pickle(planted, marker)

    auto = launch(cfg, run, "checkpoint.resume=auto")
    assert not os.path.exists(marker)
    assert auto.returncode == 0, describe(auto)
    assert (
        f"checkpoint {planted} is unusable (does not load: {folder}/checkpoints.json does not list it"
        in auto.stderr
    )
    assert f"resumed from {folder}/step_0000004.pt" in auto.stdout
    assert not os.path.exists(marker)

    # Listed with its true size and sha256 (someone edited the manifest): opened, and still runs no code.
    manifest = json.load(open(os.path.join(folder, "checkpoints.json")))
    data = open(planted, "rb").read()
    manifest["checkpoints"].insert(
        0,
        {
            "file": "step_0000099.pt",
            "step": 99,
            "epoch": 9,
            "batch_in_epoch": 0,
            "bytes": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
        },
    )
    json.dump(manifest, open(os.path.join(folder, "checkpoints.json"), "w"))
    with pytest.raises(
        ck.CheckpointError, match=r"step_0000099.pt: refused: it would build objects \((posix|os)"
    ):
        ck.load_checkpoint(OneRank(), [planted])
    assert not os.path.exists(marker)

    # An explicit file elsewhere, not listed: one line, even when the user trusts unlisted files.
    elsewhere = str(tmp_path / "shared" / "model.pt")
    os.makedirs(os.path.dirname(elsewhere))
    plant_pickle(elsewhere, marker)
    explicit = launch(cfg, str(tmp_path / "other"), f"checkpoint.resume={elsewhere}")
    assert not os.path.exists(marker)
    assert explicit.returncode == 2, describe(explicit)
    line = lines(explicit.stderr)
    assert (
        len(line) == 1 and f"checkpoint.resume: no usable checkpoint: {elsewhere}: does not load" in line[0]
    ), line
    assert "checkpoint.trust_unlisted=true" in line[0]
    with pytest.raises(ck.CheckpointError, match="refused: it would build objects"):
        ck.load_checkpoint(OneRank(), [elsewhere], trust_unlisted=True)
    assert not os.path.exists(marker)


def test_first_format_checkpoint_names_the_conversion_which_makes_it_loadable(tmp_path):
    """A checkpoint of the first format (numpy's RNG state pickled) is refused with the command that
    converts it; converted, it is listed in the manifest and loads."""
    import random

    import numpy as np

    state = {
        "format": 1,
        "epoch": 0,
        "step": 3,
        "batch_in_epoch": 3,
        "model": {"w": torch.ones(2)},
        "optimizer": {},
        "kfac": None,
        "rng": [
            {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        ],
    }
    old = str(tmp_path / "step_0000003.pt")
    torch.save(state, old)
    with pytest.raises(
        ck.CheckpointError, match="first checkpoint format .* python -m launch.checkpoint convert"
    ):
        ck.load_checkpoint(OneRank(), [old], trust_unlisted=True)
    from launch.store.convert import main as convert_main  # python -m launch.checkpoint convert FILE

    assert convert_main(["convert", old]) == 0
    path, loaded = ck.load_checkpoint(OneRank(), [old])
    assert loaded["format"] == ck.FORMAT and loaded["step"] == 3
    set_rng_state(loaded["rng"][0])  # the converted RNG state restores
    assert random.getstate() == state["rng"][0]["python"]


# ---- 2. a fresh run never overwrites; pruning deletes nothing newer ----------------------------------
def test_rerun_into_a_used_folder_changes_no_byte_and_overwrite_moves_it_aside(finished, tmp_path):
    cfg, run = copy_of(finished, tmp_path)
    before = snapshot(run)
    proc = launch(cfg, run, "train.max_steps=1")  # fresh: checkpoint.resume is null
    line = lines(proc.stderr)
    assert proc.returncode == 2 and len(line) == 1, describe(proc)
    assert f"log.dir: {run} holds another run's outputs" in line[0]
    for way in ("checkpoint.resume=auto", "another log.dir", "log.overwrite=true"):
        assert way in line[0], line[0]
    assert snapshot(run) == before

    moved = launch(cfg, run, "log.overwrite=true", "train.max_steps=1")
    assert moved.returncode == 0, describe(moved)
    aside = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
    assert len(aside) == 1 and f"moved to {tmp_path / aside[0]}" in moved.stdout
    kept = snapshot(str(tmp_path / aside[0]))
    assert kept == {k: v for k, v in before.items() if k != ".lock"}  # the old run, every byte
    assert json.load(open(os.path.join(run, "summary.json")))["steps"] == 1


def write(folder, step, keep_all=False):
    state = {
        "format": ck.FORMAT,
        "epoch": 0,
        "step": step,
        "batch_in_epoch": step,
        "model": {"w": torch.full((3,), step)},
        "optimizer": {},
        "kfac": None,
        "rng": [],
    }
    return ck.write_checkpoint(str(folder), state, keep_last=2, keep_all=keep_all)


def test_pruning_sets_aside_checkpoints_newer_than_the_resumed_one(tmp_path, caplog):
    """A run resumed from step 2 (step 3 failed to read, say) saves step 3: the checkpoints of steps 3 and
    4 it did not resume from are moved aside, still verifiable; only older ones beyond keep_last go."""
    for step in (1, 2, 3, 4):
        write(tmp_path, step, keep_all=True)
    originals = {s: open(tmp_path / f"step_000000{s}.pt", "rb").read() for s in (3, 4)}
    with caplog.at_level(logging.WARNING, logger="launch.checkpoint"):
        write(tmp_path, 3)
    assert sorted(f for f in os.listdir(tmp_path) if f.startswith("step_")) == [
        "step_0000002.pt",
        "step_0000003.pt",
    ]
    (stamp,) = os.listdir(tmp_path / "superseded")
    aside = tmp_path / "superseded" / stamp
    assert {s: open(aside / f"step_000000{s}.pt", "rb").read() for s in (3, 4)} == originals
    assert "checkpoints of steps 3, 4" in caplog.text and str(aside) in caplog.text
    path, state = ck.load_checkpoint(OneRank(), [str(aside / "step_0000004.pt")])  # verified, loads
    assert state["step"] == 4


# ---- 3. a resume must match the run that wrote the checkpoint -------------------------------------
def test_changed_lr_is_refused_and_an_allowed_change_accepted_and_printed(finished, tmp_path):
    cfg, run = copy_of(finished, tmp_path)
    before = snapshot(run)
    refused = launch(cfg, run, "checkpoint.resume=auto", "optim.lr=0.05", "model.zero_init_residual=true")
    line = lines(refused.stderr)
    assert refused.returncode == 2 and len(line) == 1, describe(refused)
    assert "checkpoint.resume: " in line[0] and "written by a run with other settings" in line[0]
    assert "model.zero_init_residual False → True; optim.lr 0.01 → 0.05" in line[0]
    assert "checkpoint.allow_changes=[model.zero_init_residual, optim.lr]" in line[0]
    assert snapshot(run) == before  # config.yaml untouched

    # A dead process's lock record (a job killed on this host) is taken over with a warning.
    dead = subprocess.Popen(["true"])
    dead.wait()
    with open(os.path.join(run, ".lock"), "w") as fh:
        json.dump({"host": os.uname().nodename, "pid": dead.pid, "started": "2026-01-01T00:00:00Z"}, fh)
    accepted = launch(
        cfg,
        run,
        "checkpoint.resume=auto",
        "optim.lr=0.05",
        "checkpoint.allow_changes=[optim.lr]",
        "train.epochs=2",
    )
    assert accepted.returncode == 0, describe(accepted)
    assert "optim.lr 0.01 → 0.05 (checkpoint.allow_changes)" in accepted.stdout
    assert "train.epochs 1 → 2" in accepted.stdout
    assert (
        f"taking over the lock left by pid {dead.pid}" in accepted.stderr
        and "(no longer running)" in accepted.stderr
    )
    assert open(os.path.join(run, ".lock")).read() == ""  # released at the end


# ---- 4. one job per run folder --------------------------------------------------------------------
def test_second_job_on_a_folder_is_refused_while_the_first_finishes(tmp_path):
    """The first job is paused (SIGSTOP) once it holds the folder, so that the second surely starts while
    the first is running; resumed (SIGCONT), the first finishes normally with its own checkpoints."""
    cfg = synthetic_config(str(tmp_path))
    run = str(tmp_path / "run")
    first = subprocess.Popen(
        train_cmd(["--config", cfg, f"log.dir={run}", "checkpoint.every_steps=1"]),
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        lock = os.path.join(run, ".lock")
        deadline = time.monotonic() + 90
        while not (os.path.exists(lock) and os.path.getsize(lock) > 0):  # the first job holds the folder
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        os.kill(first.pid, signal.SIGSTOP)
        try:
            second = launch(cfg, run, "checkpoint.resume=auto")
        finally:
            os.kill(first.pid, signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    finally:
        if first.poll() is None:
            first.kill()
    line = lines(second.stderr)
    assert second.returncode == 2 and len(line) == 1, describe(second)
    assert (
        f"run folder {run} is in use by another job: pid {first.pid} on host {os.uname().nodename}" in line[0]
    )
    assert first.returncode == 0, err[-3000:]
    assert json.load(open(os.path.join(run, "summary.json")))["steps"] == 4
    assert [e["step"] for e in ck.read_manifest(os.path.join(run, "checkpoints"))] == [4, 3]
