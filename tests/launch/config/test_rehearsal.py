"""A rehearsal of every shipped config: it resolves, it passes the launcher's device pre-check on the
GPUs it is meant for (compute capability simulated: nothing touches a device), and its recipe trains 2
steps at 2 ranks (horovodrun) on a generated image folder, with the model and the images shrunk by
overrides and the ranks on the CPU."""

import glob
import os

import pytest
import torch

from launch.config.load import load_config
from launch.dist.device import check_device
from launch.errors import ConfigError
from tests.helpers.common import CONFIGS, describe, horovod_ready
from tests.helpers.images import make_image_tree
from tests.helpers.jobs import job, train_cmd

SHIPPED = sorted(
    os.path.relpath(p, CONFIGS) for p in glob.glob(os.path.join(CONFIGS, "**", "*.yaml"), recursive=True)
)
# (name, compute capability, what torch was built for: a CUDA 12 build still has V100 kernels)
GPUS = {
    "V100": ((7, 0), ["sm_70", "sm_80", "sm_90"]),
    "A100": ((8, 0), ["sm_75", "sm_80", "sm_90", "sm_100"]),
    "H200": ((9, 0), ["sm_75", "sm_80", "sm_90", "sm_100"]),
}


def meant_for(config: str) -> list[str]:
    """The hardware a config is written for: the released recipe ran on V100s; the other ImageNet files
    are the modern-hardware variant (bf16); Fashion-MNIST runs on the CPU."""
    if config.startswith("imagenet/paper/"):
        return ["V100", "A100", "H200"]
    if config.startswith("imagenet/"):
        return ["A100", "H200"]
    return []


def pretend_gpu(monkeypatch, name: str) -> None:
    hvd = pytest.importorskip("horovod.torch")
    capability, arch_list = GPUS[name]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda index=None: f"NVIDIA {name}")
    monkeypatch.setattr(torch.cuda, "get_arch_list", lambda: arch_list)
    monkeypatch.setattr(hvd, "cuda_built", lambda: True)
    monkeypatch.setattr(hvd, "nccl_built", lambda: 2)


def test_every_config_is_rehearsed():
    assert len(SHIPPED) >= 16 and "imagenet/paper/resnet50_kfac_bs16k_baseline.yaml" in SHIPPED


@pytest.mark.parametrize("config", SHIPPED)
def test_config_passes_its_own_hardware_pre_check(config, monkeypatch):
    cfg = load_config(os.path.join(CONFIGS, config))
    if not meant_for(config):
        check_device(cfg)
        return
    verdicts = {}
    for name in GPUS:
        pretend_gpu(monkeypatch, name)
        try:
            check_device(load_config(os.path.join(CONFIGS, config), ["train.device=cuda"]))
            verdicts[name] = "ok"
        except ConfigError as exc:
            verdicts[name] = str(exc)
    print(config, verdicts)
    assert all(verdicts[name] == "ok" for name in meant_for(config)), verdicts


def shrunk(config: str, tmp_path) -> list[str]:
    """Overrides that keep the config's recipe (optimiser, K-FAC, precision, augmentation, micro-batches)
    and make it small: a 4-wide small ResNet, 32-pixel images, 8 images a rank, 2 steps, the CPU."""
    cfg = load_config(os.path.join(CONFIGS, config))
    out = [
        f"log.dir={tmp_path / 'run'}",
        "train.device=cpu",
        "train.world_size=null",
        "train.max_steps=2",
        "train.epochs=1",
        "data.workers=0",
        "data.batch_size=8",
        "data.val_batch_size=8",
        "log.progress=false",
        "log.tensorboard=false",
        "checkpoint.every_epochs=0",
        "model.width=4",
    ]
    if cfg.model.name == "resnet50":
        out += ["model.name=small_resnet", "model.blocks=[1, 1]", "model.num_classes=3"]
    if cfg.data.dataset == "imagenet":
        root = make_image_tree(str(tmp_path / "images"), train_per_class=8, val_per_class=2)
        out += [
            f"data.train_dir={os.path.join(root, 'train')}",
            f"data.val_dir={os.path.join(root, 'val')}",
            "data.image_size=32",
            "data.val_resize=36",
        ]
    elif cfg.data.dataset == "synthetic":
        out += ["data.synthetic_size=64", "data.image_size=32"]
    else:
        out += ["data.train_subset=64", "data.val_subset=16"]
    return out


@pytest.mark.skipif(not horovod_ready(), reason="horovod not installed")
@pytest.mark.parametrize("config", [c for c in SHIPPED if os.path.basename(c) != "base.yaml"])
def test_config_recipe_trains_two_steps_at_two_ranks(config, tmp_path):
    proc, _ = job(
        "horovodrun", train_cmd(["--config", os.path.join(CONFIGS, config), *shrunk(config, tmp_path)])
    )
    assert proc.returncode == 0, describe(proc)
    assert os.path.isfile(tmp_path / "run" / "summary.json")
