"""Models: torchvision ResNet-50 (ImageNet) and a small ResNet for 28x28 inputs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

if TYPE_CHECKING:
    from launch.config.load import Config


def norm(channels: int, batchnorm: bool) -> nn.Module:
    """BatchNorm, or nothing: without it a step's gradients do not depend on how its images are split
    into micro-batches (train.accumulation_steps), which is what a test of accumulation needs."""
    return nn.BatchNorm2d(channels) if batchnorm else nn.Identity()


class BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, batchnorm: bool = True):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout, batchnorm)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(
                nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout, batchnorm)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + identity)


class SmallResNet(nn.Module):
    """CIFAR-style ResNet for small images: 3x3 stem, len(blocks) stages of basic blocks (the first
    at full resolution, then stride 2), global average pooling and a linear classifier."""

    def __init__(
        self,
        in_channels: int = 1,
        num_classes: int = 10,
        width: int = 16,
        blocks: Sequence[int] = (1, 1, 1),
        zero_init_residual: bool = False,
        batchnorm: bool = True,
    ):
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, width, 3, 1, 1, bias=False)
        self.bn1 = norm(width, batchnorm)
        self.relu = nn.ReLU(inplace=True)
        stages, cin = [], width
        for i, n in enumerate(blocks):
            cout = width * (2**i)
            layers = [BasicBlock(cin, cout, 1 if i == 0 else 2, batchnorm)]
            layers += [BasicBlock(cout, cout, 1, batchnorm) for _ in range(n - 1)]
            stages.append(nn.Sequential(*layers))
            cin = cout
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, num_classes)
        for mod in self.modules():
            if isinstance(mod, nn.Conv2d):
                nn.init.kaiming_normal_(mod.weight, mode="fan_out", nonlinearity="relu")
        if zero_init_residual:
            for mod in self.modules():
                if isinstance(mod, BasicBlock) and isinstance(mod.bn2, nn.BatchNorm2d):
                    nn.init.zeros_(mod.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.stages(x)
        return self.fc(torch.flatten(self.pool(x), 1))


def build_model(cfg: Config) -> nn.Module:
    m = cfg.model
    if m.name == "resnet50":
        import torchvision

        return torchvision.models.resnet50(
            weights=None, num_classes=m.num_classes, zero_init_residual=m.zero_init_residual
        )
    in_channels = 1 if cfg.data.dataset == "fashion_mnist" else 3
    return SmallResNet(in_channels, m.num_classes, m.width, m.blocks, m.zero_init_residual, m.batchnorm)


def input_shape(cfg: Config) -> tuple[int, int, int]:
    """(channels, height, width) of one training image."""
    d = cfg.data
    if d.dataset == "fashion_mnist":
        side = 28 // d.fashion_mnist_pool
        return (1, side, side)
    return (3, d.image_size, d.image_size)
