"""A run's set-up on every rank: the data, Horovod, the device, the model, the optimiser and K-FAC, the
loaders; what stays fixed for the whole run (:class:`~launch.training.run_state.Run`)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

import kfac_hvd
from launch.config.load import Config
from launch.dist.device import apply_backend_flags, describe_device, host_collectives_warning, pick_device
from launch.dist.engine import start_engine
from launch.dist.horovod_setup import gradient_groups
from launch.dist.mixed_precision import MixedPrecision
from launch.dist.world import check_world
from launch.record.console import log0, setup_logging
from launch.store.rng import seed_every_rng
from launch.training.augment import RunningMixup
from launch.training.data import build_datasets, build_loaders, dataset_size
from launch.training.faults import Faults
from launch.training.guards import BufferGuard
from launch.training.models import build_model
from launch.training.run_state import Run
from launch.training.schedules import (
    rescalable_weights,
)
from launch.training.step import Trainer
from launch.training.step_timer import StepTimer


# --------------------------------------------------------------------------------------------------
# Set-up
# --------------------------------------------------------------------------------------------------
def build_optimizer(cfg: Config, model: nn.Module, hvd: Any) -> torch.optim.Optimizer:
    o = cfg.optim
    base = torch.optim.SGD(
        model.parameters(), lr=o.lr, momentum=o.momentum, nesterov=o.nesterov, weight_decay=o.weight_decay
    )
    compression = hvd.Compression.fp16 if cfg.horovod.fp16_allreduce else hvd.Compression.none
    return hvd.DistributedOptimizer(
        base,
        named_parameters=model.named_parameters(),
        compression=compression,
        backward_passes_per_step=cfg.train.accumulation_steps,  # one allreduce per step
        # Elastic: hosts come and go, so reruns cannot agree anyway, and Horovod's fixed groups do not
        # survive its re-initialisation in a new world (the leave-and-join test hangs with them).
        groups=None if cfg.train.elastic else gradient_groups(cfg.horovod, model),
    )


def set_up(cfg: Config) -> Run:
    # The data first: a folder or file that cannot be read ends every rank alike before the engine starts.
    train_ds, val_ds = build_datasets(cfg)
    hvd, how = start_engine(cfg)
    rank, size = hvd.rank(), hvd.size()
    setup_logging(rank)
    if cfg.train.threads:
        torch.set_num_threads(cfg.train.threads)
    device = pick_device(cfg.train.device, hvd.local_rank())
    flags = apply_backend_flags(cfg.train.tf32, cfg.train.cudnn_benchmark)
    if (
        not cfg.train.elastic
    ):  # elastic: collectives only inside Horovod's elastic loop (launch.training.elastic)
        check_world(cfg, hvd, how, device, train_ds, val_ds)
    precision = MixedPrecision(cfg.train.precision, cfg.train.channels_last, device)
    log0(hvd, describe_device(cfg.train.device, device))
    log0(hvd, precision.describe() + ("; " + ", ".join(flags) if device.type == "cuda" else ""))
    warning = host_collectives_warning(device, cfg.train.engine)
    if warning:
        log0(hvd, warning)
    if cfg.train.world_size is not None and cfg.train.world_size != size:
        raise cfg.error(
            "train.world_size",
            f"is {cfg.train.world_size} but {size} rank(s) were launched (a global "
            f"batch of {cfg.data.batch_size * size}, not "
            f"{cfg.data.batch_size * cfg.train.world_size}); launch "
            f"{cfg.train.world_size} rank(s), or set train.world_size=null",
        )

    # Same initial weights everywhere (also broadcast later); distinct data randomness per rank.
    seed_every_rng(cfg.train.seed)
    model = precision.prepare_model(build_model(cfg))
    seed_every_rng(cfg.train.seed + 1000 * rank + 1)
    train_loader, val_loader, sampler = build_loaders(
        cfg, train_ds, val_ds, rank, size, device.type == "cuda"
    )
    if len(train_loader) == 0:
        raise cfg.error(
            "data.batch_size",
            f"no full batch of {cfg.data.batch_size} per rank: "
            f"{dataset_size(train_ds)} training images over {size} rank(s)",
        )
    faults = Faults(cfg.debug, rank, size)
    trainer = build_trainer(cfg, hvd, model, precision, train_loader.dataset, faults, len(train_loader))
    total_steps = len(train_loader) * cfg.train.epochs
    if cfg.train.max_steps is not None:
        total_steps = min(total_steps, cfg.train.max_steps)
    return Run(
        cfg=cfg,
        hvd=hvd,
        device=device,
        trainer=trainer,
        train_loader=train_loader,
        val_loader=val_loader,
        sampler=sampler,
        steps_per_epoch=len(train_loader),
        total_steps=total_steps,
        timer=StepTimer(device),
    )


def build_trainer(
    cfg: Config,
    hvd: Any,
    model: nn.Module,
    precision: MixedPrecision,
    dataset: Dataset,
    faults: Faults,
    steps_per_epoch: int,
) -> Trainer:
    optimizer = build_optimizer(cfg, model, hvd)
    kfac = None
    if cfg.optim.method == "kfac":
        kfac = kfac_hvd.KFAC(model, options=cfg.kfac_options(steps_per_epoch))
    return Trainer(
        hvd=hvd,
        model=model,
        optimizer=optimizer,
        kfac=kfac,
        criterion=nn.CrossEntropyLoss(label_smoothing=cfg.optim.label_smoothing),
        precision=precision,
        buffers=BufferGuard(model),
        params=[p for p in model.parameters() if p.requires_grad],
        rescaled_weights=rescalable_weights(model) if cfg.optim.weight_rescaling else None,
        faults=faults,
        dataset=dataset,
        mixup_alpha=cfg.data.mixup_alpha,
        momentum_correction=cfg.optim.momentum_correction,
        accumulation_steps=cfg.train.accumulation_steps,
        running_mixup=(
            RunningMixup(cfg.data.mixup_alpha, cfg.model.num_classes)
            if cfg.data.mixup_mode == "running" and cfg.data.mixup_alpha > 0
            else None
        ),
        batch_erasing=(
            (cfg.data.random_erasing, (cfg.data.random_erasing_area[0], cfg.data.random_erasing_area[1]))
            if cfg.data.random_erasing > 0 and cfg.data.random_erasing_order == "after_mixup"
            else None
        ),
    )
