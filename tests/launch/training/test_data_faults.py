"""Unreadable images in an ImageFolder tree: a clean stop on every rank naming the file (default), or a
warning naming it and the image skipped (data.skip_unreadable) -- never a crashed loader worker that
leaves the other ranks waiting."""

import json
import os
import shutil

import pytest

from tests.helpers.common import describe, horovod_ready
from tests.helpers.images import make_image_tree
from tests.helpers.jobs import first_failure, job, rank_exit_codes, rank_stderr, recorded_train, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
needs_mpirun = pytest.mark.skipif(shutil.which("mpirun") is None, reason="mpirun not installed")


@pytest.fixture
def tree(tmp_path):
    """2 classes x 8 training images (every image is used: 2 ranks x 2 batches of 4), 2 x 2 to
    evaluate; one training and one evaluation image are not images at all."""
    root = make_image_tree(
        str(tmp_path / "imagenet"), classes=("n01", "n02"), train_per_class=8, val_per_class=2
    )
    bad_train = os.path.join(root, "train", "n02", "img_3.png")
    bad_val = os.path.join(root, "val", "n01", "img_1.png")
    for path in (bad_train, bad_val):
        with open(path, "wb") as fh:
            fh.write(b"\x89PNG\r\n\x1a\n" + b"this is not image data" * 10)
    cfg = tmp_path / "inet.yaml"
    cfg.write_text(
        "model: {name: small_resnet, num_classes: 2, width: 4}\n"
        f"data: {{dataset: imagenet, train_dir: {root}/train, val_dir: {root}/val, image_size: 32, "
        "val_resize: 36, batch_size: 4, workers: 1}\n"
        "optim: {method: kfac, lr: 0.01, schedule: constant}\n"
        "train: {epochs: 1, device: cpu, threads: 1}\n"
        "checkpoint: {every_epochs: 0}\n"
        f"log: {{dir: {tmp_path}/run, progress: false, tensorboard: false}}\n"
    )
    return str(cfg), bad_train, bad_val


@needs_horovod
@pytest.mark.parametrize("launcher", ["horovodrun", pytest.param("mpirun", marks=needs_mpirun)])
def test_unreadable_image_stops_every_rank_cleanly(tmp_path, tree, launcher):
    """Every rank stops with exit code 2 and the same single line on stderr (docs/RELIABILITY.md, Data).

    Each rank's own exit code and stderr are kept in files (jobs.recorded_train). Under horovodrun the
    wrapper passes the code on, so horovodrun's own report is checked too: job exit code 1 and the
    first failed rank's code, 2 (its per-rank "Process N exit with status code" lines are not: the
    rank that exits second may be SIGTERMed by horovodrun while exiting). mpirun SIGTERMs a rank's
    whole process group, which no wrapper can keep from the launcher process, so there the wrapper
    exits 0 and no rank is ended by mpirun (mpirun itself would return the first failed rank's code and
    print it as "Exit code: 2")."""
    cfg, bad_train, _ = tree
    out = str(tmp_path / "ranks")
    os.mkdir(out)
    command = recorded_train(["--config", cfg], out, stderr_to_file=True, pass_code=launcher == "horovodrun")
    proc, seconds = job(launcher, command, timeout=240)
    errs = {rank: rank_stderr(out, rank) for rank in (0, 1)}
    detail = f"{errs}\n{describe(proc)}"
    assert rank_exit_codes(out) == {0: 2, 1: 2}, detail
    line = errs[0][-1] if errs[0] else ""
    assert errs == {0: [line], 1: [line]}, detail  # one line, the same on every rank
    assert line.startswith(f"data error: data.train_dir: unreadable image {bad_train} ("), line
    assert line.endswith("); set data.skip_unreadable=true to skip unreadable images"), line
    if launcher == "horovodrun":
        assert proc.returncode == 1 and first_failure(proc.stdout + proc.stderr)[1] == 2, detail
    else:
        assert proc.returncode == 0, detail
    assert seconds < 150


def test_skip_unreadable_reports_and_goes_on(tmp_path, tree):
    cfg, bad_train, bad_val = tree
    proc, _ = job("none", train_cmd(["--config", cfg, "data.skip_unreadable=true"]), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"unreadable image skipped (data.skip_unreadable): {bad_train}" in proc.stderr
    summary = json.load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert summary["steps"] == 4
    assert summary["history"][-1]["val_skipped_images"] == 1  # left out of the evaluation
