"""Top-1 and loss over the whole evaluation set: per-rank sums on the device, one allreduce, one read."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader

from launch.dist.mixed_precision import MixedPrecision
from launch.training.data import unreadable_paths
from launch.training.step import stop_for_unreadable

if TYPE_CHECKING:
    from launch.training.guards import Watchdog


@torch.no_grad()
def evaluate(
    model: torch.nn.Module,
    loader: DataLoader,
    precision: MixedPrecision,
    hvd: Any,
    skip_unreadable: bool = False,
    watchdog: Watchdog | None = None,
) -> dict[str, float]:
    """Each rank evaluates its disjoint shard under the run's autocast; the sums are added over ranks.

    Unreadable images (marker labels < 0, checked on the host labels) are left out with
    ``skip_unreadable``; otherwise every rank stops with exit code 2 and the files' paths.
    """
    device = precision.device
    model.eval()
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss, correct
    images, unreadable = 0, 0
    bad: list[str] = []
    for x, y in loader:
        if watchdog is not None:
            watchdog.beat("an evaluation batch")
        if (y < 0).any():
            keep = y >= 0
            unreadable += int((~keep).sum())
            if not skip_unreadable:
                bad += unreadable_paths(loader.dataset, y)
            x, y = x[keep], y[keep]
            if y.numel() == 0:
                continue
        x, y = precision.inputs(x), y.to(device, non_blocking=True)
        with precision.autocast():
            out = model(x)
        sums += torch.stack(
            [F.cross_entropy(out.float(), y, reduction="sum").double(), (out.argmax(1) == y).sum().double()]
        )
        images += y.numel()
    model.train()
    counts = torch.tensor([images, unreadable], dtype=torch.float64, device=device)
    loss, correct, images_total, unreadable_total = hvd.allreduce(
        torch.cat([sums, counts]), op=hvd.Sum, name="eval.sums"
    ).tolist()
    if unreadable_total > 0 and not skip_unreadable:
        stop_for_unreadable(hvd, bad, "data.val_dir")
    n = max(images_total, 1.0)
    return {
        "loss": loss / n,
        "top1": correct / n,
        "images": int(images_total),
        "skipped_images": int(unreadable_total),
    }
