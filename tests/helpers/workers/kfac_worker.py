"""Runs under horovodrun/mpirun (Horovod) or torchrun (torch.distributed), see tests/helpers/workers/engines.py;
each rank writes rank<r>.json into --out for the test to read.

Modes:
  equivalence  two ranks on halves of a fixed batch vs. one process on the whole batch, several steps
  schedule     adaptive interval (λ, policy) on real ranks: per-step records of every rank
"""

import argparse
import copy
import sys

import torch
from torch import nn

import kfac_hvd
from kfac_hvd.comm import LocalCommunicator
from kfac_hvd.diagnostics import HostSyncCounter
from tests.helpers.workers.engines import (  # before kfac_hvd: it may block Horovod
    CollectiveLog,
    finish,
    horovod_importable,
    horovod_modules,
    start_engine,
)


def small_cnn():
    return nn.Sequential(
        nn.Conv2d(1, 4, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(4, 6, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(6 * 3 * 3, 5),
    )


def batches(count, size):
    generator = torch.Generator().manual_seed(1234)
    return [
        (torch.randn(size, 1, 8, 8, generator=generator), torch.randint(0, 5, (size,), generator=generator))
        for _ in range(count)
    ]


def equivalence(engine, args):
    torch.manual_seed(0)
    model = small_cnn().double()
    reference_model = copy.deepcopy(model)
    options = dict(damping=1e-3, symmetric_comm=args.symmetric, local_inverse_max_dim=args.local_max_dim)
    # --from-step: factors of one pass with accumulation_steps=2 are started by kfac.step(), not the hooks.
    kfac = kfac_hvd.KFAC(model, accumulation_steps=2 if args.from_step else 1, **options)
    reference = kfac_hvd.KFAC(reference_model, comm=LocalCommunicator(), **options)
    train_model, optimizer = engine.data_parallel(
        model, torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    )
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    half = args.batch // engine.size
    worst = 0.0
    started = []
    for x, y in batches(args.steps, args.batch):
        x = x.double()
        local = slice(engine.rank * half, (engine.rank + 1) * half)
        optimizer.zero_grad()
        nn.functional.cross_entropy(train_model(x[local]), y[local]).backward()
        engine.synchronize(optimizer)
        started.append(kfac.step()["factor_allreduces_started"])
        reference_optimizer.zero_grad()
        nn.functional.cross_entropy(reference_model(x), y).backward()
        reference.step()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            worst = max(worst, ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item())
        engine.optimizer_step(optimizer)
        reference_optimizer.step()
    parameter_gap = max(
        (p - q).abs().max().item() for p, q in zip(model.parameters(), reference_model.parameters())
    )
    return {
        "max_relative_grad_gap": worst,
        "parameter_gap": parameter_gap,
        "owners": kfac.assignment.owner,
        "load": kfac.assignment.load,
        "stats": kfac.comm_stats(),
        "started": started,
        "parameters": [p.tolist() for p in model.parameters()],
        "inverses": {
            f"{name}.{kind}": inverse.tolist()
            for name, kinds in kfac.inverses.items()
            for kind, inverse in kinds.items()
        },
        "communicator": type(kfac.comm).__name__,
    }


def schedule(engine, args):
    torch.manual_seed(0)
    model = nn.Sequential(small_cnn()[:4], nn.BatchNorm2d(6), nn.Flatten(), nn.Linear(6 * 3 * 3, 5))
    kfac = kfac_hvd.KFAC(
        model,
        damping=1e-2,
        update_threshold=args.threshold,
        interval_policy=args.policy,
        local_inverse_max_dim=args.local_max_dim,
        noise_aware_diff=args.noise_aware,
    )
    train_model, optimizer = engine.data_parallel(
        model, torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    )
    # torch.distributed only: the collectives K-FAC issues, step by step (Horovod's timeline does this
    # for Horovod). Forward, backward and kfac.step() are logged: the hooks start the factor allreduces.
    collectives = CollectiveLog(engine.dist) if engine.name == "torch" else None
    records = []
    # Ranks see different data, so their local factors differ; the averaged ones drive the schedule.
    generator = torch.Generator().manual_seed(100 + engine.rank)
    for _ in range(args.steps):
        x, y = (
            torch.randn(args.batch, 1, 8, 8, generator=generator),
            torch.randint(0, 5, (args.batch,), generator=generator),
        )
        optimizer.zero_grad()
        if collectives is not None:
            collectives.active = True
        nn.functional.cross_entropy(train_model(x), y).backward()
        engine.synchronize(optimizer)
        with HostSyncCounter() as syncs:
            records.append(kfac.step())
        records[-1]["host_syncs"] = syncs.count
        if collectives is not None:
            collectives.active = False
            records[-1]["collectives"] = collectives.take()
        engine.optimizer_step(optimizer)
    return {
        "records": records,
        "stats": kfac.comm_stats(),
        "layers": kfac.layer_names,
        "owners": kfac.assignment.owner,
        "communicator": type(kfac.comm).__name__,
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=("equivalence", "schedule"))
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--threshold", type=float, default=0.25)
    parser.add_argument("--policy", default="modulo")
    parser.add_argument("--no-symmetric", dest="symmetric", action="store_false")
    parser.add_argument("--local-max-dim", type=int, default=0, help="KFAC local_inverse_max_dim")
    parser.add_argument("--from-step", action="store_true", help="start the factor allreduces in kfac.step()")
    parser.add_argument("--noise-aware", action="store_true", help="KFAC noise_aware_diff")
    args = parser.parse_args()
    torch.set_num_threads(1)
    engine = start_engine()
    result = {"equivalence": equivalence, "schedule": schedule}[args.mode](engine, args)
    result.update(rank=engine.rank, size=engine.size, engine=engine.name, horovod_modules=horovod_modules())
    result.update(horovod_importable=horovod_importable())
    return finish(engine, args.out, result)


if __name__ == "__main__":
    sys.exit(main())
