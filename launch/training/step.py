"""One training step on every rank: forward, backward, gradient allreduce, the shared verdict, the update.

The step reads from the device once: a small allreduce (``train.status``) says how many ranks saw a
non-finite loss, whether any gradient is non-finite and how many images could not be read; the same
host read fetches this rank's loss and correct-prediction count. The verdict comes before K-FAC: after
Horovod's ``optimizer.synchronize()`` the backward pass has finished anyway, and a step that every
rank skips calls ``kfac.skip_step()`` instead of preconditioning gradients that will not be used.

Verdicts:

- ``ok``: ``kfac.step()``, the optimiser step, weight rescaling.
- ``overflow`` (fp16 only): every loss finite, some gradient not: a GradScaler overflow. Skipped on
  every rank, the loss scale backs off; expected early in fp16 training, so it is not divergence.
- ``diverged``: a non-finite loss on some rank, or (without loss scaling) a non-finite gradient.
  Skipped on every rank, BatchNorm statistics put back; the loop counts these towards
  ``train.max_bad_steps``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from kfac_hvd import KFAC
from launch.dist.mixed_precision import MixedPrecision
from launch.errors import EXIT_INPUT, RunStop
from launch.training.augment import RunningMixup, erase_batch
from launch.training.data import unreadable_paths
from launch.training.faults import Faults
from launch.training.guards import BufferGuard
from launch.training.schedules import rescale_weights, set_lr

OK, OVERFLOW, DIVERGED = "ok", "overflow", "diverged"


@dataclass
class Trainer:
    """What a training step works with (built once by the loop's set-up)."""

    hvd: Any
    model: nn.Module
    optimizer: Any  # hvd.DistributedOptimizer
    kfac: KFAC | None  # None: SGD
    criterion: nn.Module
    precision: MixedPrecision
    buffers: BufferGuard
    params: list[torch.Tensor]
    rescaled_weights: list[torch.Tensor] | None
    faults: Faults
    dataset: Any  # the training set (to name unreadable images)
    mixup_alpha: float
    momentum_correction: bool
    accumulation_steps: int = 1  # micro-batches a step (train.accumulation_steps)
    running_mixup: RunningMixup | None = None  # data.mixup_mode: running
    batch_erasing: tuple[float, tuple[float, float]] | None = None  # after mixup: (rate, area)


@dataclass
class StepOutcome:
    verdict: str
    loss: float  # this rank's loss (host value)
    correct: int  # this rank's correct predictions
    images: int  # this rank's batch size
    lr: float
    nonfinite_loss_ranks: int
    nonfinite_gradients: bool
    record: dict[str, Any] | None  # K-FAC's step record
    sums: torch.Tensor  # (loss * images, correct) on the device, for the epoch's averages

    @property
    def skipped(self) -> bool:
        return self.verdict != OK


def mixup(x: torch.Tensor, y: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor, float]:
    lam = float(np.random.beta(alpha, alpha))
    perm = torch.randperm(x.size(0), device=x.device)
    return lam * x + (1 - lam) * x[perm], y[perm], lam


def forward_loss(t: Trainer, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(output, loss) under the run's autocast. Batch mixup mixes the inputs and the two labels' losses;
    running mixup mixes inputs and targets with the previous batch; erasing after mixup comes next."""
    with t.precision.autocast():
        if t.running_mixup is not None:
            mixed, targets = t.running_mixup(x, y)
            output = t.model(erase_after_mixup(t, mixed))
            loss = t.criterion(output, targets)
        elif t.mixup_alpha > 0:
            mixed, y2, lam = mixup(x, y, t.mixup_alpha)
            output = t.model(erase_after_mixup(t, mixed))
            loss = lam * t.criterion(output, y) + (1 - lam) * t.criterion(output, y2)
        else:
            output = t.model(erase_after_mixup(t, x))
            loss = t.criterion(output, y)
    return output, loss


def erase_after_mixup(t: Trainer, x: torch.Tensor) -> torch.Tensor:
    return x if t.batch_erasing is None else erase_batch(x, *t.batch_erasing)


def forward_backward(
    t: Trainer, x: torch.Tensor, y: torch.Tensor, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over the step's micro-batches (train.accumulation_steps of them): each
    micro-batch's mean loss weighted by its share of the step's images, so that the gradients and K-FAC's
    factors are those of the mean loss over the whole step. Horovod's optimiser allreduces once, after the
    last backward pass (``backward_passes_per_step``). Returns the step's (mean loss, correct count) on the
    device: no host read."""
    total, correct = None, None
    for xs, ys in zip(x.chunk(t.accumulation_steps), y.chunk(t.accumulation_steps)):
        output, loss = forward_loss(t, xs, ys)
        weighted = loss * (ys.numel() / y.numel())
        t.precision.backward(t.faults.overflow(step, weighted))
        hits = (output.argmax(1) == ys).sum()
        total = weighted.detach() if total is None else total + weighted.detach()
        correct = hits if correct is None else correct + hits
    assert total is not None and correct is not None  # a batch has at least one image
    return total, correct


def nonfinite_flag(tensors: list[torch.Tensor | None], like: torch.Tensor) -> torch.Tensor:
    """1.0 when any element of any tensor (None: none) is NaN or Inf, else 0.0: a device tensor, no host
    read.

    The max-norm of each tensor keeps NaN and Inf and cannot overflow for finite values.
    """
    present = [t for t in tensors if t is not None]
    if not present:
        return torch.zeros((), dtype=torch.float32, device=like.device)
    norms = torch._foreach_norm(present, float("inf"))
    return (~torch.isfinite(torch.stack([n.float() for n in norms]))).any().float()


def exchange_status(
    t: Trainer, loss: torch.Tensor, correct: torch.Tensor, unreadable: torch.Tensor
) -> list[float]:
    """The step's one host read: [non-finite-loss ranks, non-finite-gradient ranks, unreadable images
    (all summed over ranks), this rank's loss, this rank's correct count]."""
    loss = loss.detach().float()
    flags = torch.stack(
        [
            (~torch.isfinite(loss)).float(),
            nonfinite_flag([p.grad for p in t.params], loss),
            unreadable.float(),
        ]
    )
    flags = t.hvd.allreduce(flags, op=t.hvd.Sum, name="train.status")
    return torch.cat([flags, loss.reshape(1), correct.float().reshape(1)]).tolist()


def judge(nonfinite_loss_ranks: int, nonfinite_gradient_ranks: int, loss_scaling: bool) -> str:
    if nonfinite_loss_ranks:
        return DIVERGED
    if nonfinite_gradient_ranks:
        return OVERFLOW if loss_scaling else DIVERGED
    return OK


def train_step(t: Trainer, x: torch.Tensor, y_host: torch.Tensor, step: int, lr: float) -> StepOutcome:
    """Step ``step`` (1-based) on this rank; every rank takes the same verdict. One host read."""
    x = t.precision.inputs(t.faults.poison(step, x))
    y = y_host.to(t.precision.device, non_blocking=True)
    unreadable = (y < 0).sum()  # marker labels of images the loader could not read
    y = y.clamp(min=0)
    set_lr(t.optimizer, lr, t.momentum_correction)
    t.optimizer.zero_grad()
    t.buffers.save()
    loss, correct = forward_backward(t, x, y, step)
    t.optimizer.synchronize()  # gradients averaged over ranks
    t.precision.unscale_(t.optimizer)
    bad_loss, bad_grad, unreadable_total, loss_value, correct_value = exchange_status(
        t, loss, correct, unreadable
    )
    if unreadable_total:
        stop_for_unreadable(t.hvd, unreadable_paths(t.dataset, y_host), "data.train_dir")
    verdict = judge(int(bad_loss), int(bad_grad), t.precision.scaler is not None)
    if verdict == OK:
        record = t.kfac.step(lr=lr, loss_scale=t.precision.loss_scale()) if t.kfac is not None else None
        with t.optimizer.skip_synchronize():
            t.optimizer.step()
        if t.rescaled_weights is not None:
            rescale_weights(t.rescaled_weights)
    else:
        # An fp16 overflow is expected and already reported by the loop: no per-layer K-FAC warnings.
        record = t.kfac.skip_step(check_factors=verdict == DIVERGED) if t.kfac is not None else None
        if verdict == DIVERGED:
            t.buffers.restore()  # BatchNorm statistics from before the batch
    t.precision.end_step(t.optimizer, any_rank_nonfinite=bool(bad_grad))
    sums = torch.stack([loss.detach().double() * y.numel(), correct.double()])
    return StepOutcome(
        verdict, loss_value, int(correct_value), y.numel(), lr, int(bad_loss), bool(bad_grad), record, sums
    )


def stop_for_unreadable(hvd: Any, local: list[str], key: str) -> None:
    """Collective (every rank knows that some rank found unreadable images): stop with their paths."""
    found = [p for paths in hvd.allgather_object(local) for p in paths]
    first = found[0] if found else "an image"
    more = f" (+{len(found) - 1} more)" if len(found) > 1 else ""
    raise RunStop(
        EXIT_INPUT,
        f"data error: {key}: unreadable image {first}{more}; "
        f"set data.skip_unreadable=true to skip unreadable images",
    )
