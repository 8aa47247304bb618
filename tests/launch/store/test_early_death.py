"""``checkpoint.resume: auto`` always goes on: a 2-rank job killed before its first checkpoint (preemption,
a node lost in the first epoch) and resubmitted unchanged moves the dead attempt aside and starts anew;
a changed config in such a folder is still refused with one line; a checkpoint still resumes
(docs/RELIABILITY.md, Run folder)."""

import json
import os
import signal
import subprocess
import time

import pytest

from tests.helpers.common import REPO, describe, env, horovod_ready, read_jsonl
from tests.helpers.jobs import first_failure, job, launcher_cmd, rank_lines, tiny, train_cmd
from tests.helpers.rundir import snapshot

pytestmark = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")

# 64 images, batch 8 on 2 ranks: 4 steps an epoch; 40 epochs is long enough to be killed mid-way, and
# the first checkpoint is the one at the end of epoch 40.
LONG = ("train.epochs=40", "checkpoint.every_epochs=40", "checkpoint.resume=auto")


def logged_steps(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    try:
        with open(path, encoding="utf-8") as fh:
            return sum(1 for line in fh if line.endswith("\n") and '"loss"' in line)
    except FileNotFoundError:
        return 0


def killed_after(run_dir: str, steps: int, *extra: str) -> None:
    """Start the 2-rank run under horovodrun and SIGKILL the whole job once metrics.jsonl holds
    ``steps`` step records (an observable event, not a sleep): an attempt that died before any checkpoint."""
    proc = subprocess.Popen(
        launcher_cmd("horovodrun", 2, train_cmd(tiny(run_dir, *LONG, *extra))),
        cwd=REPO,
        env=env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + 240
        while logged_steps(run_dir) < steps:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(
                    f"rc={proc.poll()} before {steps} steps\n{proc.communicate()[0][-4000:]}"
                )
            time.sleep(0.05)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
    assert not os.path.exists(os.path.join(run_dir, "checkpoints", "checkpoints.json"))


def resubmit(run_dir: str, *extra: str) -> subprocess.CompletedProcess:
    proc, _ = job("horovodrun", train_cmd(tiny(run_dir, *LONG, *extra)), timeout=300)
    return proc


def test_auto_resubmitted_after_an_early_death_moves_the_attempt_aside_and_starts_anew(tmp_path):
    run = str(tmp_path / "run")
    killed_after(run, 3)
    before = snapshot(run)
    assert "config.yaml" in before and "metrics.jsonl" in before

    # A changed config in such a folder is refused as a resume would be: one line, no byte changed.
    # Rank 0 refuses before Horovod starts; horovodrun then ends rank 1 and prints its own traceback
    # (horovodrun's, outside the launcher), so the line is looked for among the ranks' own lines.
    changed = resubmit(run, "optim.lr=0.5")
    assert first_failure(changed.stderr) == (0, 2), describe(changed)
    line = rank_lines(changed.stderr, 0)
    assert len(line) == 1, describe(changed)
    assert f"log.dir: {run} holds an attempt that wrote no checkpoint" in line[0], line[0]
    assert "optim.lr 0.05 → 0.5" in line[0], line[0]
    assert "Traceback" not in "\n".join(line + rank_lines(changed.stderr, 1)), describe(changed)
    assert snapshot(run) == before

    # Unchanged: the attempt goes aside, every byte kept, and the run starts anew and completes.
    again = resubmit(run)
    assert again.returncode == 0, describe(again)
    (aside,) = [d for d in os.listdir(tmp_path) if d.startswith("run.old-")]
    assert f"moved to {tmp_path / aside}" in again.stdout, describe(again)
    assert snapshot(str(tmp_path / aside)) == {k: v for k, v in before.items() if k != ".lock"}
    assert [r["step"] for r in read_jsonl(os.path.join(run, "metrics.jsonl")) if "loss" in r] == list(
        range(1, 161)
    )
    assert json.load(open(os.path.join(run, "summary.json")))["steps"] == 160

    # A folder with a checkpoint still resumes, nothing moved aside (the run is finished: it evaluates).
    resumed = resubmit(run)
    assert resumed.returncode == 0, describe(resumed)
    assert "resumed from" in resumed.stdout and "step 160" in resumed.stdout, describe(resumed)
    assert [d for d in os.listdir(tmp_path) if d.startswith("run.old-")] == [aside]


def test_outputs_without_a_readable_config_yaml_are_refused_and_kept(tmp_path):
    """Without a config.yaml nothing shows that the outputs are an earlier attempt of this job: rank 0's
    claim refuses with one line and moves nothing."""
    from launch.config.load import load_config, resolve_paths
    from launch.errors import ConfigError
    from launch.store.run_folder import claim

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 2.3}\n')
    (run / "config.yaml").write_bytes(b"\xff\xfe: [")  # cut short: neither UTF-8 nor YAML
    before = snapshot(str(run))
    cfg = load_config(tiny(str(run))[1], tiny(str(run), "checkpoint.resume=auto")[2:])
    resolve_paths(cfg)
    with pytest.raises(ConfigError) as refused:
        claim(cfg, fresh=True)
    text = str(refused.value)
    assert "\n" not in text and f"log.dir: {run} holds another run's outputs" in text, text
    assert "no readable config.yaml" in text, text
    left = {k: v for k, v in snapshot(str(run)).items() if k != ".lock"}  # the lock it took, empty
    assert left == before and not list(tmp_path.glob("run.old-*"))
