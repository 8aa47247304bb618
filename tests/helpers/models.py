"""Small networks and batches that several library tests train."""

import torch
from torch import nn


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(inplace=True),
        nn.Conv2d(4, 4, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(4 * 3 * 3, 5),
    )


def batches(count, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator))
        for _ in range(count)
    ]


def stack(layers: int) -> nn.Sequential:
    """``layers`` K-FAC layers: alternating 3×3 conv and BatchNorm, then a linear classifier."""
    body = []
    for index in range(layers - 1):
        body.append(nn.Conv2d(4, 4, 3, padding=1) if index % 2 == 0 else nn.BatchNorm2d(4))
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), *body[1:], nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
