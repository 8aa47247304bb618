"""Augmentation on the device, after the batch is formed: the released recipe's running mixup and its
random erasing after mixup (tyohei/chainerkfac, examples/imagenet/models/resnet50_d.py).

Random draws come from numpy's global stream on the host (as the per-batch mixup's λ does), so that a
step draws the same numbers whatever the device, a checkpoint's RNG state covers them, and nothing is
read back from the device.
"""

from __future__ import annotations

import numpy as np
import torch


class RunningMixup:
    """Mixup with a per-sample λ ~ Beta(α, α), λ = max(λ, 1 − λ), whose partner is the previous mixed
    batch (``running_mixup: true`` of the release): x ← λ x + (1 − λ) x_prev, soft targets likewise, and
    the mixed batch becomes the next partner. The first batch (and the first after a resume or a change
    of batch shape, such as an epoch's shorter last batch) is not mixed: there is no partner.

    The partner is per rank and not checkpointed: a resumed run starts it afresh, as the release's first
    batch does. It holds one batch and its soft targets on the device.
    """

    def __init__(self, alpha: float, classes: int):
        self.alpha, self.classes = alpha, classes
        self.prior_x: torch.Tensor | None = None
        self.prior_targets: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed inputs, soft targets: one row of class probabilities a sample)."""
        targets = torch.nn.functional.one_hot(y, self.classes).to(torch.float32)
        lam_host = np.random.beta(self.alpha, self.alpha, x.size(0)).astype(np.float32)
        lam = torch.from_numpy(np.maximum(lam_host, 1.0 - lam_host)).to(x.device, non_blocking=True)
        if self.prior_x is not None and self.prior_x.shape == x.shape:
            assert self.prior_targets is not None
            x = torch.lerp(self.prior_x, x, lam.view(-1, 1, 1, 1).to(x.dtype))
            targets = torch.lerp(self.prior_targets, targets, lam.view(-1, 1))
        self.prior_x, self.prior_targets = x.detach(), targets
        return x, targets

    def reset(self) -> None:
        self.prior_x = self.prior_targets = None


def erase_batch(
    x: torch.Tensor, rate: float, area: tuple[float, float], min_aspect: float = 0.3
) -> torch.Tensor:
    """Each sample, with probability ``rate``, gets a zero rectangle of U(area) of its pixels and aspect
    U(min_aspect, 1) (height and width swapped half the time), as the release erases after mixup. One
    mask for the batch, built on the device from the host's draws."""
    n, _, h, w = x.shape
    chosen = np.random.uniform(0, 1, n) <= rate
    size = h * w * np.random.uniform(area[0], area[1], n)
    aspect = np.random.uniform(min_aspect, 1.0, n)
    eh = np.floor(np.sqrt(size * aspect) + 0.5).astype(np.int64)
    ew = np.floor(np.sqrt(size / aspect) + 0.5).astype(np.int64)
    swap = np.random.randint(0, 2, n).astype(bool)
    eh, ew = np.where(swap, ew, eh), np.where(swap, eh, ew)
    eh, ew = np.minimum(eh, h), np.minimum(ew, w)
    top = np.floor(np.random.uniform(0, 1, n) * (np.maximum(h - eh - 1, 0) + 1)).astype(np.int64)
    left = np.floor(np.random.uniform(0, 1, n) * (np.maximum(w - ew - 1, 0) + 1)).astype(np.int64)
    bounds = np.stack([top, top + eh, left, left + ew, chosen]).astype(np.int64)
    b = torch.from_numpy(bounds).to(x.device, non_blocking=True)
    rows = torch.arange(h, device=x.device).view(1, h, 1)
    cols = torch.arange(w, device=x.device).view(1, 1, w)
    inside = (
        (rows >= b[0].view(-1, 1, 1))
        & (rows < b[1].view(-1, 1, 1))
        & (cols >= b[2].view(-1, 1, 1))
        & (cols < b[3].view(-1, 1, 1))
        & b[4].bool().view(-1, 1, 1)
    )
    return x.masked_fill(inside.unsqueeze(1), 0)
