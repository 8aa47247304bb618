"""Runs under horovodrun or torchrun (any number of ranks): the communicator interface of kfac_hvd.comm
on the engine default_communicator() picks, checked directly; writes rank<r>.json into --out.

allreduce: in place, the mean over ranks, several in flight and waited for out of order;
allgather: rank r sends r rows of 3 (rank 0 none), with every rank's length given (sizes=) and without;
and equal parts. Host reads are counted around the collectives that are told the lengths."""

import argparse
import sys

import torch

from kfac_hvd.comm import default_communicator
from kfac_hvd.diagnostics import HostSyncCounter
from tests.helpers.workers.engines import finish, start_engine  # before kfac_hvd: it may block Horovod


def part(rank: int) -> torch.Tensor:
    return torch.arange(rank * 3, dtype=torch.float64).reshape(rank, 3) + 100 * rank


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    engine = start_engine()
    comm = default_communicator()
    rank, size = comm.rank, comm.size
    with HostSyncCounter() as syncs:
        tensors = [torch.full((5,), float(rank + 1 + k), dtype=torch.float64) for k in range(3)]
        handles = [comm.allreduce_async(t, name=f"test.reduce.{k}") for k, t in enumerate(tensors)]
        averaged = [comm.wait(handle) for handle in reversed(handles)][::-1]
        sizes = list(range(size))
        told = comm.wait(comm.allgather_async(part(rank), name="test.gather.told", sizes=sizes))
        equal = comm.wait(
            comm.allgather_async(torch.full((4,), float(rank)), name="test.gather.equal", sizes=[4] * size)
        )
    untold = comm.wait(comm.allgather_async(part(rank), name="test.gather.untold"))
    result = {
        "rank": engine.rank,
        "size": engine.size,
        "communicator": type(comm).__name__,
        "averaged": [t.tolist() for t in averaged],
        "in_place": [a.data_ptr() == t.data_ptr() for a, t in zip(averaged, tensors)],
        "told": told.tolist(),
        "untold": untold.tolist(),
        "equal": equal.tolist(),
        "host_syncs": syncs.count,
        "where": syncs.where,
    }
    return finish(engine, args.out, result)


if __name__ == "__main__":
    sys.exit(main())
