"""Runs under horovodrun/mpirun (2 ranks); each rank writes rank<r>.json into --out for the test to read.

Modes:
  equivalence  two ranks on halves of a fixed batch vs. one process on the whole batch, several steps
  schedule     adaptive interval (λ, policy) on real ranks: per-step records of every rank
"""

import argparse
import copy
import json
import os
import sys

import horovod.torch as hvd
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.comm import LocalCommunicator
from kfac_hvd.diagnostics import HostSyncCounter


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


def init():
    if os.environ.get("KFAC_TEST_MPI4PY"):
        from mpi4py import MPI

        hvd.init(comm=MPI.COMM_WORLD)
    else:
        hvd.init()


def equivalence(args):
    torch.manual_seed(0)
    model = small_cnn().double()
    reference_model = copy.deepcopy(model)
    options = dict(damping=1e-3, symmetric_comm=args.symmetric, local_inverse_max_dim=args.local_max_dim)
    # --from-step: factors of one pass with accumulation_steps=2 are started by kfac.step(), not the hooks.
    kfac = kfac_hvd.KFAC(model, accumulation_steps=2 if args.from_step else 1, **options)
    reference = kfac_hvd.KFAC(reference_model, comm=LocalCommunicator(), **options)
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), named_parameters=model.named_parameters()
    )
    reference_optimizer = torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9)
    half = args.batch // hvd.size()
    worst = 0.0
    started = []
    for x, y in batches(args.steps, args.batch):
        x = x.double()
        local = slice(hvd.rank() * half, (hvd.rank() + 1) * half)
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x[local]), y[local]).backward()
        optimizer.synchronize()
        started.append(kfac.step()["factor_allreduces_started"])
        reference_optimizer.zero_grad()
        nn.functional.cross_entropy(reference_model(x), y).backward()
        reference.step()
        for p, q in zip(model.parameters(), reference_model.parameters()):
            worst = max(worst, ((p.grad - q.grad).abs().max() / q.grad.abs().max()).item())
        with optimizer.skip_synchronize():
            optimizer.step()
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
    }


def schedule(args):
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
    optimizer = hvd.DistributedOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9), named_parameters=model.named_parameters()
    )
    records = []
    # Ranks see different data, so their local factors differ; the averaged ones drive the schedule.
    generator = torch.Generator().manual_seed(100 + hvd.rank())
    for _ in range(args.steps):
        x, y = (
            torch.randn(args.batch, 1, 8, 8, generator=generator),
            torch.randint(0, 5, (args.batch,), generator=generator),
        )
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.synchronize()
        with HostSyncCounter() as syncs:
            records.append(kfac.step())
        records[-1]["host_syncs"] = syncs.count
        with optimizer.skip_synchronize():
            optimizer.step()
    return {
        "records": records,
        "stats": kfac.comm_stats(),
        "layers": kfac.layer_names,
        "owners": kfac.assignment.owner,
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
    init()
    result = {"equivalence": equivalence, "schedule": schedule}[args.mode](args)
    result.update(rank=hvd.rank(), size=hvd.size())
    with open(os.path.join(args.out, f"rank{hvd.rank()}.json"), "w") as handle:
        json.dump(result, handle)
    # One more collective: Horovod writes an operation's closing timeline events after handing back its
    # result, so without it the last step's allgather could miss its size when shutdown closes the file.
    hvd.allreduce(torch.zeros(1), name="worker.done")
    hvd.shutdown()  # flushes Horovod's timeline
    return 0


if __name__ == "__main__":
    sys.exit(main())
