"""Helpers of the run-folder tests: a seconds-long synthetic run, a byte-exact picture of a folder, planted pickles."""

from __future__ import annotations

import hashlib
import os

import torch

SYNTHETIC = (
    "model: {name: small_resnet, num_classes: 10, width: 4}\n"
    "data: {dataset: synthetic, synthetic_size: 32, synthetic_val_size: 16, image_size: 28, val_resize: 28,"
    " workers: 0, batch_size: 8}\n"
    "optim: {method: kfac, lr: 0.01, schedule: constant}\n"
    "train: {epochs: 1, device: cpu, threads: 1}\n"
    "checkpoint: {every_epochs: 1}\n"
    "log: {progress: false, tensorboard: false}\n"
)


def synthetic_config(folder: str) -> str:
    """A config file of 4 K-FAC steps on 32 synthetic 28x28 images, one checkpoint per epoch (one process)."""
    path = os.path.join(folder, "synthetic.yaml")
    with open(path, "w") as fh:
        fh.write(SYNTHETIC)
    return path


def snapshot(folder: str) -> dict[str, str]:
    """sha256 of every file under ``folder`` (hidden ones too), by relative path."""
    out = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as fh:
                out[os.path.relpath(path, folder)] = hashlib.sha256(fh.read()).hexdigest()
    return out


class Planted:
    """Unpickling this runs ``touch marker``: what a malicious checkpoint does."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def plant_pickle(path: str, marker: str) -> None:
    """A file that looks like a checkpoint of this launcher and runs code when it is unpickled."""
    torch.save(
        {
            "format": 2,
            "epoch": 9,
            "step": 99,
            "batch_in_epoch": 0,
            "model": {},
            "optimizer": {},
            "kfac": None,
            "rng": [],
            "payload": Planted(marker),
        },
        path,
    )


class OneRank:
    """hvd for a world of one (what the collectives of launch.store.checkpoint reduce to)."""

    def rank(self):
        return 0

    def size(self):
        return 1

    def broadcast_object(self, obj, root_rank=0, name=None):
        return obj


def lines(text: str) -> list[str]:
    return [line for line in text.strip().splitlines() if line.strip()]
