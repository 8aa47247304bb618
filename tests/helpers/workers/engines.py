"""The engine a worker runs on, chosen by the launcher (tests/helpers/multiproc.py sets KFAC_TEST_ENGINE):
Horovod under horovodrun/mpirun, torch.distributed (Gloo) under torchrun. Import this module before
kfac_hvd: with KFAC_TEST_BLOCK_HOROVOD=1 it makes every ``import horovod…`` fail first, so that a
torch.distributed run shows that neither the library nor the worker needs Horovod."""

import json
import os
import sys
from collections.abc import Callable
from typing import Any

if os.environ.get("KFAC_TEST_BLOCK_HOROVOD") == "1":
    sys.modules["horovod"] = None  # type: ignore[assignment]  # `import horovod.torch` raises ImportError

import torch
from torch import nn


def horovod_modules() -> list:
    """The Horovod modules this process has loaded (the blocking entry excepted)."""
    return sorted(name for name, module in sys.modules.items() if name.startswith("horovod") and module)


def horovod_importable() -> bool:
    """Whether ``import horovod`` works here: call it last, it imports Horovod where it can."""
    try:
        import horovod  # noqa: F401
    except ImportError:
        return False
    return True


class HorovodEngine:
    name = "horovod"

    def __init__(self) -> None:
        import horovod.torch as hvd

        if os.environ.get("KFAC_TEST_MPI4PY"):
            from mpi4py import MPI

            hvd.init(comm=MPI.COMM_WORLD)
        else:
            hvd.init()
        self.hvd = hvd
        self.rank, self.size = hvd.rank(), hvd.size()

    def data_parallel(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        """The module to call and the optimiser to step: gradients averaged by Horovod's optimiser."""
        return model, self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    def synchronize(self, optimizer: Any) -> None:
        optimizer.synchronize()

    def optimizer_step(self, optimizer: Any) -> None:
        with optimizer.skip_synchronize():
            optimizer.step()

    def finish(self) -> None:
        # One more collective: Horovod writes an operation's closing timeline events after handing back
        # its result, so without it the last step's allgather could miss its size when shutdown closes
        # the file.
        self.hvd.allreduce(torch.zeros(1), name="worker.done")
        self.hvd.shutdown()  # flushes Horovod's timeline


class TorchEngine:
    name = "torch"

    def __init__(self) -> None:
        import torch.distributed as dist

        dist.init_process_group("gloo")  # torchrun's environment: rank, world size, 127.0.0.1:port
        self.dist = dist
        self.rank, self.size = dist.get_rank(), dist.get_world_size()

    def data_parallel(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple:
        """DDP averages the gradients during the backward pass, beside K-FAC's factor allreduces.
        No buffer broadcast: like Horovod's optimiser, only gradients travel."""
        return nn.parallel.DistributedDataParallel(model, forward_sync_buffers=False), optimizer

    def synchronize(self, optimizer: Any) -> None:
        pass  # DDP's backward pass has averaged the gradients

    def optimizer_step(self, optimizer: Any) -> None:
        optimizer.step()

    def finish(self) -> None:
        self.dist.barrier()
        self.dist.destroy_process_group()


class CollectiveLog:
    """The torch.distributed collectives issued from Python, as (op, bytes of the tensor handed over),
    recorded while ``active``. DDP's gradient buckets go through its C++ reducer and are not seen."""

    OPS = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "all_to_all", "reduce_scatter")

    def __init__(self, dist: Any) -> None:
        self.calls: list = []
        self.active = False
        for op in self.OPS:
            if hasattr(dist, op):
                setattr(dist, op, self._logging(op, getattr(dist, op)))

    def _logging(self, op: str, original: Callable) -> Callable:
        def call(*args: Any, **kwargs: Any) -> Any:
            if self.active:
                tensor = args[0] if op in ("all_reduce", "broadcast") else args[1]
                if isinstance(tensor, torch.Tensor):
                    self.calls.append([op, tensor.numel() * tensor.element_size()])
                else:
                    self.calls.append([op, None])
            return original(*args, **kwargs)

        return call

    def take(self) -> list:
        calls, self.calls = self.calls, []
        return calls


def start_engine() -> Any:
    return TorchEngine() if os.environ.get("KFAC_TEST_ENGINE") == "torch" else HorovodEngine()


def finish(engine: Any, out_dir: str, result: dict) -> int:
    """Write this rank's ``result`` to ``out_dir/rank<r>.json`` (what tests/helpers/multiproc.py reads back), shut
    the engine down, and return the worker's exit status."""
    with open(os.path.join(out_dir, f"rank{engine.rank}.json"), "w") as handle:
        json.dump(result, handle)
    engine.finish()
    return 0
