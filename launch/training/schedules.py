"""Learning-rate schedules as pure functions of the (fractional) epoch, and optimiser helpers. (The fixed
factor interval's warm-up is K-FAC's own: ``KFACOptions.interval_warmup_steps``.)"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

if TYPE_CHECKING:
    pass


def learning_rate(optim_cfg: Any, epoch: float) -> float:
    """Learning rate at fractional epoch ``epoch`` (= step / steps_per_epoch, starting at 0).

    poly:     alpha_0 * (1 - (e - e_start) / (e_end - e_start)) ** p for e >= e_start, alpha_0
              before (the recipe of Osawa et al.), clamped at 0 after e_end.
    step:     alpha_0 * gamma ** (number of milestones <= e).
    constant: alpha_0.
    A linear warm-up from ``warmup_init_lr`` to the schedule's value covers the first
    ``warmup_epochs`` epochs for every schedule.
    """
    o = optim_cfg
    if o.schedule == "poly":
        if epoch < o.poly_start_epoch:
            lr = o.lr
        else:
            frac = (epoch - o.poly_start_epoch) / (o.poly_end_epoch - o.poly_start_epoch)
            lr = o.lr * max(0.0, 1.0 - frac) ** o.poly_power
    elif o.schedule == "step":
        lr = o.lr * o.gamma ** sum(1 for m in o.milestones if epoch >= m)
    else:
        lr = o.lr
    if o.warmup_epochs > 0 and epoch < o.warmup_epochs:
        lr = o.warmup_init_lr + (lr - o.warmup_init_lr) * (epoch / o.warmup_epochs)
    return lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float, correct_momentum: bool) -> None:
    """Set ``lr`` on every parameter group.

    PyTorch's SGD keeps the momentum buffer without the learning rate (v = mu v + g, p -= lr v), which
    is the same as Chainer's (v = mu v - lr g, p += v) with v rescaled by lr/lr_prev whenever lr
    changes, i.e. the momentum correction of Osawa et al.  With ``correct_momentum=False`` the buffer is
    rescaled by lr_prev/lr so that the update follows Chainer's rule without the correction.
    """
    for group in optimizer.param_groups:
        prev = group["lr"]
        if not correct_momentum and prev > 0 and lr > 0 and prev != lr:
            for p in group["params"]:
                buf = optimizer.state.get(p, {}).get("momentum_buffer")
                if buf is not None:
                    buf.mul_(prev / lr)
        group["lr"] = lr


def rescalable_weights(model: nn.Module) -> list[torch.Tensor]:
    """Weights of conv and linear layers (the ones weight rescaling applies to)."""
    return [m.weight for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]


@torch.no_grad()
def rescale_weights(weights: list[torch.Tensor]) -> None:
    """Rescale each weight to norm sqrt(2 * out) when its norm exceeds that (chainerkfac's recipe in
    place of weight decay).

    Computed on the device: the norms, then a per-weight factor that is 1 where the norm is within the
    bound, so the step never waits for the device to decide.
    """
    if not weights:
        return
    norms = torch._foreach_norm(weights)
    for w, norm in zip(weights, norms):
        target = math.sqrt(2.0 * w.shape[0])
        w.mul_(torch.where(norm > target, target / norm, torch.ones_like(norm)))
