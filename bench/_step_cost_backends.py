"""The step-cost worker's processes: Horovod ranks, or one process without Horovod."""

from __future__ import annotations


class LocalBackend:
    """One process without Horovod: the library's local communicator and a plain optimiser."""

    horovod, rank, size, local_rank = False, 0, 1, 0

    def wrap(self, optimizer, model):
        return optimizer

    def synchronize(self, optimizer) -> None:
        pass

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()

    def barrier(self) -> None:
        pass

    def broadcast(self, model) -> None:
        pass

    def mark(self, name: str, device) -> None:
        pass


class HorovodBackend:
    horovod = True

    def __init__(self) -> None:
        import horovod.torch as hvd

        hvd.init()
        self.hvd, self.rank, self.size, self.local_rank = hvd, hvd.rank(), hvd.size(), hvd.local_rank()

    def wrap(self, optimizer, model):
        return self.hvd.DistributedOptimizer(optimizer, named_parameters=model.named_parameters())

    def synchronize(self, optimizer) -> None:
        optimizer.synchronize()

    def optimizer_step(self, optimizer) -> None:
        with optimizer.skip_synchronize():
            optimizer.step()

    def barrier(self) -> None:
        self.hvd.barrier()

    def broadcast(self, model) -> None:
        self.hvd.broadcast_parameters(model.state_dict(), root_rank=0)

    def mark(self, name: str, device) -> None:
        """A one-value allreduce before the step, outside its timing: the timeline is split at these."""
        import torch

        if self.size > 1:
            self.hvd.allreduce(torch.zeros(1, device=device), name=name)


def make_backend(args):
    if args.launcher == "direct":
        return LocalBackend()
    return HorovodBackend()
