"""The ranks' world at start-up (and, in an elastic run, after every reset): agreement and layout."""

from __future__ import annotations

import torch

from launch.training.data import dataset_identity
from launch.dist.horovod_setup import controller_name, describe_layout, world_layout
from launch.dist.agreement import check_agreement, code_fingerprint, config_fingerprint, fingerprint


def check_world(cfg, hvd, how: str, device: torch.device, train_ds, val_ds) -> None:
    """Collective: every rank stops alike when the ranks' config, code or data differ; rank 0 prints the
    world's layout (hosts, ranks, devices)."""
    code_digest, code_detail = code_fingerprint()
    data_id = dataset_identity(cfg, train_ds, val_ds)
    digests = {"config": config_fingerprint(cfg), "code": code_digest, "data": fingerprint(data_id)}
    layout = world_layout(hvd, str(device), digests)
    check_agreement(hvd, cfg, layout, code_detail, data_id)
    if hvd.rank() == 0:
        print(describe_layout(layout, how, controller_name(hvd)), flush=True)
