"""Inputs that used to cost a job silently: ranks that read different data (horovodrun and mpirun), an
unreadable validation image after an epoch of training, a disk that fills up during a checkpoint, YAML 1.1
surprises in overrides, a world size other than the config's (docs/RELIABILITY.md)."""

import json
import os
import shutil
import subprocess

import pytest

from launch.config.load import load_config, resolve_paths
from launch.dist.agreement import check_agreement, code_fingerprint, config_fingerprint, fingerprint
from launch.errors import ConfigError, RunStop
from launch.store import checkpoint as ck
from tests.helpers.common import describe, horovod_ready
from tests.helpers.images import make_image_tree
from tests.helpers.jobs import DEMO, job, per_rank_shell, shell_train, train_cmd
from tests.helpers.rundir import OneRank, lines, synthetic_config

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


def image_config(tmp_path, train_dir, val_dir, *extra):
    path = tmp_path / "inet.yaml"
    path.write_text(
        "model: {name: small_resnet, num_classes: 2, width: 4}\n"
        f"data: {{dataset: imagenet, train_dir: {train_dir}, val_dir: {val_dir}, image_size: 32, "
        "val_resize: 36, batch_size: 4, workers: 0}\n"
        "optim: {method: kfac, lr: 0.01, schedule: constant}\n"
        "train: {epochs: 1, device: cpu, threads: 1, watchdog_s: 30}\n"
        f"log: {{dir: {tmp_path}/run, progress: false, tensorboard: false}}\n" + "".join(extra)
    )
    return str(path)


# ---- 5. ranks agree on the data they read ---------------------------------------------------------
@needs_horovod
@pytest.mark.parametrize("launcher", ["horovodrun", pytest.param("mpirun", marks=needs_mpirun)])
def test_ranks_with_different_data_folders_stop_together(tmp_path, launcher):
    """The same config (a relative data.train_dir) started from two working directories: 16 training
    images on rank 0, 8 on rank 1. Both ranks exit 2 with the same line naming the ranks and the sizes
    (before: rank 0 took 2 steps per epoch, rank 1 one, and the job hung until the watchdog)."""
    for rank, per_class in ((0, 8), (1, 4)):
        make_image_tree(
            str(tmp_path / f"wd{rank}" / "data"),
            classes=("n01", "n02"),
            train_per_class=per_class,
            val_per_class=2,
        )
    cfg = image_config(tmp_path, "data/train", "data/val")
    out = tmp_path / "ranks"
    out.mkdir()
    template = (
        f"cd {tmp_path}/wd{{rank}} && "
        + shell_train(["--config", cfg]).replace("exec ", "")
        + f" 2> {out}/err.{{rank}}; echo $? > {out}/rc.{{rank}}"
    )
    proc, seconds = job(launcher, per_rank_shell(template), timeout=150)
    assert proc.returncode == 0, describe(proc)
    rcs = [open(out / f"rc.{r}").read().strip() for r in (0, 1)]
    errs = [lines(open(out / f"err.{r}").read()) for r in (0, 1)]
    assert rcs == ["2", "2"], errs
    assert errs[0][-1] == errs[1][-1], errs
    assert (
        f"config error: {cfg}: data.train_dir: ranks see different data (ranks differing from rank 0: 1): "
        f"train_images: 8 on rank 1, 16 on rank 0"
    ) in errs[0][-1]
    assert seconds < 120


def test_same_sizes_but_other_class_folders_are_a_disagreement(tmp_path):
    """Same image counts, other class names: the hash of the class names tells them apart."""
    cfg = load_config(DEMO, [f"log.dir={tmp_path}"])
    resolve_paths(cfg)
    digest, detail = code_fingerprint()
    mine = {
        "kind": "imagenet",
        "train_images": 12,
        "val_images": 4,
        "train_classes": "a" * 16,
        "val_classes": "b" * 16,
    }
    theirs = dict(mine, train_classes="c" * 16)

    class Gather:
        def allgather_object(self, obj):
            return [{**obj, "data": mine}, {**obj, "data": theirs}]

    layout = [
        {"rank": r, "config": config_fingerprint(cfg), "code": digest, "data": fingerprint(d)}
        for r, d in enumerate((mine, theirs))
    ]
    with pytest.raises(RunStop) as info:
        check_agreement(Gather(), cfg, layout, detail, mine)
    assert info.value.code == 2
    assert (
        "ranks see different data (ranks differing from rank 0: 1): train_classes: 'cccc"
        in info.value.message
    )


# ---- 6. a bad validation image loses no training ----------------------------------------------------
@needs_horovod
def test_truncated_val_jpeg_after_an_epoch_leaves_a_checkpoint_to_resume_from(tmp_path):
    root = make_image_tree(
        str(tmp_path / "imagenet"), classes=("n01", "n02"), train_per_class=4, val_per_class=2
    )
    bad = os.path.join(root, "val", "n02", "img_0.JPEG")
    with open(bad, "r+b") as fh:
        fh.truncate(os.path.getsize(bad) // 2)
    cfg = image_config(tmp_path, f"{root}/train", f"{root}/val", "checkpoint: {every_epochs: 1}\n")
    first, _ = job("none", train_cmd(["--config", cfg]), timeout=120)
    line = lines(first.stderr)
    assert first.returncode == 2 and len(line) == 1, describe(first)
    assert line[0].startswith(f"data error: data.val_dir: unreadable image {bad} ("), line[0]
    folder = os.path.join(tmp_path, "run", "checkpoints")
    assert [e["step"] for e in ck.read_manifest(folder)] == [2]  # the epoch's training is kept

    again, _ = job(
        "none",
        train_cmd(["--config", cfg, "checkpoint.resume=auto", "data.skip_unreadable=true"]),
        timeout=120,
    )
    assert again.returncode == 0, describe(again)
    assert f"resumed from {folder}/step_0000002.pt: step 2" in again.stdout
    summary = json.load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert summary["steps"] == 2 and summary["final_top1"] is not None
    (epoch,) = summary["history"]  # the owed evaluation, with the epoch's training averages
    assert (
        epoch["epoch"] == 1
        and epoch["step"] == 2
        and epoch["train_loss"] > 0
        and epoch["val_skipped_images"] == 1
    )


# ---- 7. disk full: one line, exit code 5, the previous checkpoint intact ---------------------------
@pytest.fixture
def small_disk(tmp_path):
    """A 64 MiB tmpfs folder (skipped where it cannot be mounted: not root, no mount namespace)."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], capture_output=True, text=True
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip() or proc.returncode}")
    try:
        yield str(mnt)
    finally:
        subprocess.run(["umount", "-l", str(mnt)], check=False)


@needs_horovod
def test_disk_full_during_a_checkpoint_is_one_line_and_exit_code_5(tmp_path, small_disk):
    cfg = synthetic_config(str(tmp_path))
    folder = os.path.join(small_disk, "checkpoints")
    common = [f"log.dir={tmp_path}/run", f"checkpoint.dir={folder}", "checkpoint.every_steps=1"]
    first, _ = job("none", train_cmd(["--config", cfg, *common, "train.max_steps=1"]), timeout=120)
    assert first.returncode == 0, describe(first)
    kept = open(os.path.join(folder, "step_0000001.pt"), "rb").read()
    stat = os.statvfs(small_disk)
    with open(os.path.join(small_disk, "filler"), "wb") as fh:  # leave 32 KiB: the disk is full
        fh.write(b"\0" * (stat.f_bavail * stat.f_frsize - 32 * 1024))

    full, _ = job(
        "none",
        train_cmd(["--config", cfg, *common, "train.max_steps=2", "checkpoint.resume=auto"]),
        timeout=120,
    )
    line = lines(full.stderr)
    assert full.returncode == 5 and len(line) == 1, describe(full)
    assert line[0] == (
        f"error: cannot write the checkpoint of step 2 in {folder}: No space left on device (ENOSPC); "
        f"the previous checkpoint step_0000001.pt (step 1) is intact"
    )
    assert sorted(os.listdir(folder)) == [".lock", "checkpoints.json", "last.pt", "step_0000001.pt"]
    assert open(os.path.join(folder, "step_0000001.pt"), "rb").read() == kept
    assert ck.load_checkpoint(OneRank(), ck.resume_candidates("auto", folder))[1]["step"] == 1


# ---- 8. overrides by YAML 1.2, once each; the planned world size -----------------------------------
def test_overrides_follow_yaml_1_2_and_a_repeated_one_is_an_error(tmp_path):
    cfg = load_config(DEMO, ["train.epochs=010", "log.dir=1:30", "optim.lr=1e-3", "horovod.timeline=yes"])
    assert (cfg.train.epochs, cfg.log.dir, cfg.optim.lr, cfg.horovod.timeline) == (10, "1:30", 0.001, "yes")
    assert load_config(DEMO, ["train.epochs=0o10"]).train.epochs == 8
    with pytest.raises(ConfigError, match=r"train.epochs: given twice \(train.epochs=2 and train.epochs=3\)"):
        load_config(DEMO, ["train.epochs=2", "train.epochs=3"])
    with pytest.raises(ConfigError, match="train.tf32: must be true or false, got 'yes'"):
        load_config(DEMO, ["train.tf32=yes"])


@needs_horovod
def test_world_size_other_than_planned_stops_with_exit_code_2(tmp_path):
    cfg = synthetic_config(str(tmp_path))
    proc, _ = job(
        "none", train_cmd(["--config", cfg, f"log.dir={tmp_path}/run", "train.world_size=2"]), timeout=120
    )
    line = lines(proc.stderr)
    assert proc.returncode == 2 and len(line) == 1, describe(proc)
    assert (
        "train.world_size: is 2 but 1 rank(s) were launched" in line[0] and "train.world_size=null" in line[0]
    )
    assert not os.path.exists(tmp_path / "run" / "metrics.jsonl")
