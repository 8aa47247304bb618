"""Data: the ImageFolder path on a generated image tree, Fashion-MNIST IDX files, samplers."""

import os

import pytest
import torch

from launch.config.load import data_problems, load_config, resolve_paths
from launch.training.data import (
    ResumableDistributedSampler,
    ShardSampler,
    build_datasets,
    build_loaders,
    read_idx,
    start_epoch,
    steps_per_epoch,
)
from tests.helpers.common import FASHION, describe, horovod_ready, launch_cmd, read_jsonl, run
from tests.helpers.images import make_image_tree


@pytest.fixture
def tree(tmp_path):
    return make_image_tree(str(tmp_path / "imagenet"))


def imagenet_cfg(tmp_path, root, *overrides):
    path = tmp_path / "inet.yaml"
    path.write_text(
        "model: {name: small_resnet, num_classes: 3, width: 4}\n"
        f"data: {{dataset: imagenet, train_dir: {root}/train, val_dir: {root}/val, image_size: 32, "
        "val_resize: 36, batch_size: 4, workers: 0}\n"
        "optim: {method: kfac, lr: 0.01, schedule: constant}\n"
        "train: {epochs: 1, device: cpu, threads: 1}\n"
        f"log: {{dir: {tmp_path}/run, progress: false, tensorboard: false}}\n"
    )
    cfg = load_config(str(path), list(overrides))
    resolve_paths(cfg)
    return cfg, str(path)


def test_imagefolder_datasets_and_transforms(tmp_path, tree):
    cfg, _ = imagenet_cfg(tmp_path, tree)
    assert data_problems(cfg) == []
    train, val = build_datasets(cfg)
    assert len(train) == 18 and len(val) == 6
    assert train.classes == ["n01", "n02", "n03"]
    x, y = train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and y == 0
    xv, yv = val[5]
    assert xv.shape == (3, 32, 32) and yv == 2
    # Evaluation is deterministic (resize + centre crop), training is random (random-resized crop).
    assert torch.equal(val[1][0], val[1][0])
    torch.manual_seed(0)
    a = train[3][0]
    b = train[3][0]
    assert not torch.equal(a, b)
    # Normalised with the ImageNet statistics: values leave [0, 1].
    assert xv.min() < 0 or xv.max() > 1


def test_imagefolder_subset_spans_classes(tmp_path, tree):
    cfg, _ = imagenet_cfg(tmp_path, tree, "data.train_subset=6")
    train, _ = build_datasets(cfg)
    assert len(train) == 6
    assert sorted({train[i][1] for i in range(6)}) == [0, 1, 2]


def test_imagefolder_problems(tmp_path, tree):
    os.makedirs(tmp_path / "empty")
    cfg, _ = imagenet_cfg(tmp_path, tree, f"data.val_dir={tmp_path}/empty")
    problems = data_problems(cfg)
    assert len(problems) == 1 and "data.val_dir" in str(problems[0]) and "empty" in str(problems[0])
    os.makedirs(tmp_path / "noimg" / "n01")
    cfg, _ = imagenet_cfg(tmp_path, tree, f"data.train_dir={tmp_path}/noimg")
    assert "no image files" in str(data_problems(cfg)[0])
    # Val classes that differ from train's are refused when the data is read.
    os.rename(os.path.join(tree, "val", "n03"), os.path.join(tree, "val", "n09"))
    cfg, _ = imagenet_cfg(tmp_path, tree)
    with pytest.raises(Exception, match="class folders differ"):
        build_datasets(cfg)


def test_distributed_loaders_partition_the_data(tmp_path, tree):
    cfg, _ = imagenet_cfg(tmp_path, tree, "data.drop_last=false")
    train, val = build_datasets(cfg)
    seen_train, seen_val = [], []
    for rank in range(2):
        tl, vl, sampler = build_loaders(cfg, train, val, rank, 2, False)
        start_epoch(tl, sampler, 0, rank, 0, 0, cfg.data.batch_size)
        seen_train += list(iter(sampler))
        seen_val += list(vl.sampler)
        assert len(tl) == steps_per_epoch(18, 2, 4, False) == 3
    assert sorted(seen_train) == list(range(18))
    assert sorted(seen_val) == list(range(6))  # evaluation: every image exactly once


def test_resumable_sampler_skips_the_done_part_of_the_epoch():
    data = list(range(40))
    full = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    full.set_epoch(5)
    order = list(full)
    part = ResumableDistributedSampler(data, num_replicas=2, rank=1, shuffle=True, seed=3)
    part.set_epoch(5)
    part.set_skip(8)
    assert list(part) == order[8:] and len(part) == 12
    assert list(ShardSampler(7, 1, 3)) == [1, 4]


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="dataset-fashion-mnist not installed")
def test_fashion_mnist_idx_files(tmp_path):
    labels = read_idx(os.path.join(FASHION, "t10k-labels-idx1-ubyte.gz"))
    assert labels.shape == (10000,) and set(labels.tolist()) == set(range(10))
    path = tmp_path / "f.yaml"
    path.write_text(
        "model: {name: small_resnet, num_classes: 10}\ndata: {dataset: fashion_mnist, train_subset: 100}\n"
    )
    cfg = load_config(str(path))
    train, val = build_datasets(cfg)
    assert len(train) == 100 and len(val) == 10000
    x, y = val[0]
    assert x.shape == (1, 28, 28) and 0 <= int(y) < 10
    assert abs(float(val.images[:2000].mean())) < 0.2  # normalised


@pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
def test_training_run_on_the_image_tree(tmp_path, tree):
    """The launcher end to end on ImageFolder data (one process, no launcher needed)."""
    _, cfg_path = imagenet_cfg(tmp_path, tree)
    proc = run(launch_cmd(["--config", cfg_path, "data.workers=1", "checkpoint.every_epochs=0"]), timeout=240)
    assert proc.returncode == 0, describe(proc)
    records = [r for r in read_jsonl(os.path.join(tmp_path, "run", "metrics.jsonl")) if "kfac" in r]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # 18 images, batch 4, drop_last
    summary = __import__("json").load(open(os.path.join(tmp_path, "run", "summary.json")))
    assert summary["history"][-1]["val_top1"] is not None
    assert summary["world_size"] == 1 and summary["kfac"]["layers"] == 19
