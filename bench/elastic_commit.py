#!/usr/bin/env python
"""The cost of one elastic commit (``train.elastic``) as a ratio to a training step, in one process.

A commit copies the model's and the optimiser's state and K-FAC's state (factors, inverses, schedule:
``launch.training.elastic.snapshot``), then runs two tiny collectives (an allreduce of three numbers and the
host-change broadcast), which one process cannot measure and which are not included. Measured in turns,
so that the machine's load hits both alike: a K-FAC training step (forward, backward, ``kfac.step``,
SGD with momentum) and a snapshot. Two kinds of step:

- ``update``: every factor computed and inverted (``update_interval=1``), the most expensive step;
- ``plain``: no factor due (a fixed interval longer than the run): preconditioning only, the cheapest
  K-FAC step, so ``commit / plain`` is the largest ratio a commit can have.

Models: the small ResNet of the Fashion-MNIST configs (28 px, batch 64) and torchvision's ResNet-50
(its layer shapes, so its factors, at 64 px and batch 8 to keep a CPU step short; the factors' sizes do
not depend on the image size). Every layer is inverted in this one process, as on one rank.

    OMP_NUM_THREADS=1 nice -n 10 .venv/bin/python -m bench.elastic_commit --threads 1
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

import torch
import torchvision
from torch import nn

import kfac_hvd
from bench._common import command_line, git_revision, machine_info
from launch.training.elastic import snapshot


def small_resnet() -> nn.Module:
    from launch.training.models import SmallResNet

    return SmallResNet(num_classes=10, width=8, blocks=[1, 1, 1])


MODELS: dict[str, tuple[Callable[[], nn.Module], tuple[int, int, int], int, int]] = {
    # name: (model, input shape, classes, batch)
    "small_resnet": (small_resnet, (1, 28, 28), 10, 64),
    "resnet50": (lambda: torchvision.models.resnet50(zero_init_residual=True), (3, 64, 64), 1000, 8),
}


def state_bytes(state: Any) -> int:
    if isinstance(state, torch.Tensor):
        return state.numel() * state.element_size()
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def training_step(model, optimizer, kfac, criterion, x, y) -> Callable[[], None]:
    def step() -> None:
        optimizer.zero_grad()
        criterion(model(x), y).backward()
        kfac.step(lr=0.01)
        optimizer.step()

    return step


def measure(name: str, repeats: int) -> dict[str, Any]:
    build, shape, classes, batch = MODELS[name]
    torch.manual_seed(0)
    model = build()
    x, y = torch.randn(batch, *shape), torch.randint(0, classes, (batch,))
    criterion = nn.CrossEntropyLoss()
    out: dict[str, Any] = {"model": name, "batch": batch, "input": list(shape)}
    for kind, interval in (("update", 1), ("plain", 10**6)):
        kfac = kfac_hvd.KFAC(model, damping=1e-3, update_interval=interval, kl_clip=1e-3)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-5)

        step = training_step(model, optimizer, kfac, criterion, x, y)
        step()  # step 1: every factor and inverse, the optimiser's momentum created
        steps, commits = [], []
        for _ in range(repeats):
            t0 = time.perf_counter()
            step()
            steps.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            saved = snapshot(model, optimizer, kfac)
            commits.append(time.perf_counter() - t0)
        out[f"{kind}_step_s"] = statistics.median(steps)
        out[f"commit_s_{kind}"] = statistics.median(commits)
        out["commit_bytes"] = {part: state_bytes(saved[part]) for part in ("model", "optimizer", "kfac")}
        kfac.remove_hooks()
    out["commit_s"] = statistics.median([out["commit_s_update"], out["commit_s_plain"]])
    out["ratio_to_update_step"] = out["commit_s"] / out["update_step_s"]
    out["ratio_to_plain_step"] = out["commit_s"] / out["plain_step_s"]
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (0: torch's choice)")
    parser.add_argument("--out", help="also write the JSON here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {
        "command": command_line(),
        "revision": git_revision(),
        "machine": machine_info(),
        "threads": torch.get_num_threads(),
        "models": [measure(name, args.repeats) for name in args.models],
    }
    text = json.dumps(results, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as fh:
            fh.write(text + "\n")
    for m in results["models"]:
        mib = sum(m["commit_bytes"].values()) / 2**20
        print(
            f"{m['model']}: commit {m['commit_s'] * 1e3:.1f} ms ({mib:.1f} MiB) = "
            f"{m['ratio_to_plain_step']:.3f} x a plain step ({m['plain_step_s'] * 1e3:.0f} ms), "
            f"{m['ratio_to_update_step']:.3f} x an update step ({m['update_step_s'] * 1e3:.0f} ms)",
            file=sys.stderr,
        )


if __name__ == "__main__":
    main()
