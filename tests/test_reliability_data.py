"""Unreadable images in an ImageFolder tree: a clean stop on every rank naming the file (default), or a
warning naming it and the image skipped (data.skip_unreadable) -- never a crashed loader worker that
leaves the other ranks waiting."""
import json
import os

import pytest

from launch_helpers.common import horovod_ready
from launch_helpers.images import make_image_tree
from launch_helpers.jobs import job, rank_lines, train_cmd

needs_horovod = pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")


@pytest.fixture
def tree(tmp_path):
    """2 classes x 8 training images (every image is used: 2 ranks x 2 batches of 4), 2 x 2 to
    evaluate; one training and one evaluation image are not images at all."""
    root = make_image_tree(str(tmp_path / "imagenet"), classes=("n01", "n02"), train_per_class=8,
                           val_per_class=2)
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
        f"log: {{dir: {tmp_path}/run, progress: false, tensorboard: false}}\n")
    return str(cfg), bad_train, bad_val


@needs_horovod
def test_unreadable_image_stops_every_rank_cleanly(tmp_path, tree):
    cfg, bad_train, _ = tree
    proc, seconds = job("horovodrun", train_cmd(["--config", cfg]), timeout=240)
    assert proc.returncode != 0 and "Exit code: 2" in proc.stderr, proc.stderr[-3000:]
    tagged = rank_lines(proc.stdout + proc.stderr, 0) + rank_lines(proc.stdout + proc.stderr, 1)
    stops = [l for l in tagged if l.startswith("data error:")]
    assert stops and all(l == stops[0] for l in stops)
    assert stops[0].startswith(f"data error: data.train_dir: unreadable image {bad_train} (")
    assert "data.skip_unreadable=true" in stops[0]
    assert not any("Traceback" in l or "DataLoader worker" in l for l in tagged)
    assert seconds < 150


def test_skip_unreadable_reports_and_goes_on(tmp_path, tree):
    cfg, bad_train, bad_val = tree
    proc, _ = job("none", train_cmd(["--config", cfg, "data.skip_unreadable=true"]), timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"unreadable image skipped (data.skip_unreadable): {bad_train}" in proc.stderr
    summary = json.load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert summary["steps"] == 4
    assert summary["history"][-1]["val_skipped_images"] == 1          # left out of the evaluation
