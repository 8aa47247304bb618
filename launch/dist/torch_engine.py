"""The ``torch`` engine (``train.engine: torch``): what the launcher asks of Horovod, on torch.distributed.

:class:`TorchEngine` answers the calls the launcher makes on its engine object (rank, size, local and
cross rank and size, allreduce of small status tensors, broadcasts, allgather of objects, the
optimiser that averages gradients), so the training code is the same on both engines. Gradients are
averaged by :class:`BucketedAverage`, an optimiser whose gradient hooks allreduce buckets of gradients
while the backward pass goes on (as Horovod's DistributedOptimizer and DDP do), on a process group of
its own, so its collectives never interleave with K-FAC's (kfac_hvd.comm.TorchDistributedCommunicator,
picked by the library's ``default_communicator`` on the default group).

Start-up: under ``torchrun`` the env:// rendezvous; under ``mpirun`` (Open MPI) and ``srun`` the ranks
from their environment and a TCP rendezvous at MASTER_ADDR:MASTER_PORT, MASTER_ADDR defaulting to
127.0.0.1 when every rank is on one node, else (srun) the first node of the step's node list
(``scontrol show hostnames``) or SLURM_LAUNCH_NODE_IPADDR; Open MPI across nodes needs MASTER_ADDR
(``mpirun -x MASTER_ADDR=<first host>``). MASTER_PORT defaults to 29500.
"""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import torch
import torch.distributed as dist

from launch.dist.device import local_gpu_index, wants_cuda

DEFAULT_PORT = 29500
BUCKET_BYTES = 25 * 1024 * 1024  # DDP's default bucket size


@dataclass(frozen=True)
class Rendezvous:
    launcher: str  # torchrun, mpirun, srun, or none (a single process)
    rank: int
    size: int
    local_rank: int
    init_method: str


def _int_env(*keys: str) -> int | None:
    for key in keys:
        if key in os.environ:
            return int(os.environ[key])
    return None


def _first_slurm_node() -> str | None:
    nodelist = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST")
    if nodelist:
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, check=True
            ).stdout.split()
            if out:
                return out[0]
        except (OSError, subprocess.CalledProcessError):
            pass
    return os.environ.get("SLURM_LAUNCH_NODE_IPADDR")


def rendezvous() -> Rendezvous:
    """Where this process stands, from its launcher's environment (nothing is contacted here)."""
    port = os.environ.get("MASTER_PORT", str(DEFAULT_PORT))
    if "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "MASTER_ADDR" in os.environ):
        return Rendezvous(
            "torchrun",
            int(os.environ["RANK"]),
            int(os.environ["WORLD_SIZE"]),
            int(os.environ.get("LOCAL_RANK", "0")),
            "env://",
        )
    if "OMPI_COMM_WORLD_RANK" in os.environ:
        rank, size = _int_env("OMPI_COMM_WORLD_RANK"), _int_env("OMPI_COMM_WORLD_SIZE")
        local_size = _int_env("OMPI_COMM_WORLD_LOCAL_SIZE")
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if local_size == size else None)
        if addr is None:
            raise RuntimeError(
                "engine torch under mpirun across nodes needs MASTER_ADDR: mpirun -x MASTER_ADDR=<first host>"
            )
        assert rank is not None and size is not None
        return Rendezvous(
            "mpirun", rank, size, _int_env("OMPI_COMM_WORLD_LOCAL_RANK") or 0, f"tcp://{addr}:{port}"
        )
    if "SLURM_PROCID" in os.environ:
        rank, size = _int_env("SLURM_PROCID"), _int_env("SLURM_NTASKS")
        one_node = _int_env("SLURM_STEP_NUM_NODES", "SLURM_NNODES") == 1
        addr = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if one_node else _first_slurm_node())
        assert rank is not None and size is not None and addr
        return Rendezvous("srun", rank, size, _int_env("SLURM_LOCALID") or 0, f"tcp://{addr}:{port}")
    return Rendezvous("none", 0, 1, 0, f"tcp://127.0.0.1:{os.environ.get('MASTER_PORT', _free_port())}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class TorchEngine:
    """Horovod's module-level calls that the launcher uses, on an initialised torch.distributed."""

    Sum = dist.ReduceOp.SUM
    Average = dist.ReduceOp.AVG  # only NCCL implements AVG; allreduce turns it into a sum and a division
    Compression = SimpleNamespace(none="none", fp16="fp16")

    def __init__(self, device_key: str) -> None:
        where = rendezvous()
        self.launcher = where.launcher
        self.backend = "nccl" if wants_cuda(device_key) else "gloo"
        if self.backend == "nccl":  # before the first collective: each rank's own GPU
            torch.cuda.set_device(local_gpu_index(where.local_rank, torch.cuda.device_count()))
        dist.init_process_group(
            self.backend, init_method=where.init_method, rank=where.rank, world_size=where.size
        )
        atexit.register(self.shutdown)
        self._rank, self._size, self._local_rank = dist.get_rank(), dist.get_world_size(), where.local_rank
        # A node is a host name; its index orders the nodes by their lowest rank (Horovod's cross rank).
        hosts = self.allgather_object(socket.gethostname())
        order = list(dict.fromkeys(hosts))
        mine = hosts[self._rank]
        self._local_size = hosts.count(mine)
        self._cross_rank, self._cross_size = order.index(mine), len(order)
        self._grad_group: Any = None

    # ---------------------------------------------------------------- the world
    def rank(self) -> int:
        return self._rank

    def size(self) -> int:
        return self._size

    def local_rank(self) -> int:
        return self._local_rank

    def local_size(self) -> int:
        return self._local_size

    def cross_rank(self) -> int:
        return self._cross_rank

    def cross_size(self) -> int:
        return self._cross_size

    def mpi_enabled(self) -> bool:
        return False

    def gloo_enabled(self) -> bool:
        return False  # the layout line names the backend through ``describe``

    def describe(self) -> str:
        return f"{self.launcher} (torch.distributed, {'NCCL' if self.backend == 'nccl' else 'Gloo'})"

    # ---------------------------------------------------------------- collectives
    def allreduce(self, tensor: torch.Tensor, op: Any = None, name: str | None = None) -> torch.Tensor:
        out = tensor.detach().clone()
        if op == self.Average:
            dist.all_reduce(out, op=self.Sum)
            return out.div_(self._size)
        dist.all_reduce(out, op=self.Sum if op is None else op)
        return out

    def broadcast(self, tensor: torch.Tensor, root_rank: int, name: str | None = None) -> torch.Tensor:
        out = tensor.detach().clone()
        dist.broadcast(out, src=root_rank)
        return out

    def broadcast_object(self, obj: Any, root_rank: int = 0, name: str | None = None) -> Any:
        box = [obj if self._rank == root_rank else None]
        dist.broadcast_object_list(box, src=root_rank)
        return box[0]

    def allgather_object(self, obj: Any, name: str | None = None) -> list:
        out: list = [None] * self._size
        dist.all_gather_object(out, obj)
        return out

    def broadcast_parameters(self, params: Any, root_rank: int) -> None:
        """Root's values into every rank's tensors (a state dict or (name, tensor) pairs), one flat
        broadcast per dtype and device."""
        items = params.items() if hasattr(params, "items") else params
        tensors = [t for _, t in items if isinstance(t, torch.Tensor)]
        groups: dict[tuple, list[torch.Tensor]] = {}
        for t in tensors:
            groups.setdefault((t.dtype, t.device), []).append(t)
        for group in groups.values():
            flat = torch.cat([t.detach().reshape(-1) for t in group])
            dist.broadcast(flat, src=root_rank)
            offset = 0
            for t in group:
                with torch.no_grad():
                    t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()

    def broadcast_optimizer_state(self, optimizer: torch.optim.Optimizer, root_rank: int) -> None:
        """Root's optimiser state everywhere. A new optimiser's state is first created by one step with
        zero gradients, as Horovod's broadcast_optimizer_state does (with weight decay that step moves
        the weights and fills the momentum), so that a run trains alike on both engines."""
        if not optimizer.state_dict()["state"]:
            for group in optimizer.param_groups:
                for p in group["params"]:
                    if p.requires_grad:
                        p.grad = torch.zeros_like(p)
            skip = getattr(optimizer, "skip_synchronize", None)
            if skip is not None:
                with skip():
                    optimizer.step()
            else:
                optimizer.step()
        mine = None
        if self._rank == root_rank:
            mine = _to_cpu(optimizer.state_dict())
        state = self.broadcast_object(mine, root_rank=root_rank)
        if self._rank != root_rank:
            optimizer.load_state_dict(state)

    def DistributedOptimizer(  # noqa: N802 - Horovod's name: the launcher calls either engine alike
        self,
        optimizer: torch.optim.Optimizer,
        named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
        compression: Any = "none",
        backward_passes_per_step: int = 1,
        groups: Any = None,
    ) -> torch.optim.Optimizer:
        """Horovod's signature. ``groups`` (Horovod's fixed fusion groups) is accepted and not used: this
        engine's buckets are fixed by construction, so reruns sum in the same order anyway."""
        if self._grad_group is None:
            self._grad_group = dist.new_group(backend=self.backend)
        return averaging_optimizer(
            optimizer,
            [p for _, p in named_parameters if p.requires_grad],
            group=self._grad_group,
            size=self._size,
            fp16=compression == self.Compression.fp16,
            backward_passes_per_step=backward_passes_per_step,
        )

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


class BucketedAverage:
    """Mixed into the optimiser's own class: gradients averaged over the ranks, bucket by bucket as the
    backward pass produces them (asynchronous allreduces launched from the gradient hooks, in bucket
    order on every rank), waited for in :meth:`synchronize`; :meth:`step` synchronises first unless
    inside :meth:`skip_synchronize`, as Horovod's optimiser does."""

    def _set_up_average(
        self,
        params: list[torch.nn.Parameter],
        group: Any,
        size: int,
        fp16: bool,
        backward_passes_per_step: int,
    ) -> None:
        self._group, self._world, self._fp16 = group, size, fp16
        self._passes = backward_passes_per_step
        # Buckets in reverse parameter order, the order in which the backward pass finishes gradients.
        self._buckets: list[list[torch.nn.Parameter]] = []
        filled = 0
        for p in reversed(params):
            key = (p.dtype, p.device)
            if (
                not self._buckets
                or filled + p.numel() * p.element_size() > BUCKET_BYTES
                or ((self._buckets[-1][0].dtype, self._buckets[-1][0].device) != key)
            ):
                self._buckets.append([])
                filled = 0
            self._buckets[-1].append(p)
            filled += p.numel() * p.element_size()
        self._bucket_of = {id(p): i for i, b in enumerate(self._buckets) for p in b}
        self._reset_pending()
        self._skip = False
        for p in params:
            p.register_post_accumulate_grad_hook(self._grad_ready)

    def _reset_pending(self) -> None:
        self._hooks_seen = {id(p): 0 for b in self._buckets for p in b}
        self._missing = [len(b) for b in self._buckets]
        self._launched: list[tuple[Any, torch.Tensor] | None] = [None] * len(self._buckets)
        self._next = 0

    def _grad_ready(self, p: torch.Tensor) -> None:
        key = id(p)
        self._hooks_seen[key] += 1
        if self._hooks_seen[key] != self._passes:
            return
        self._missing[self._bucket_of[key]] -= 1
        while self._next < len(self._buckets) and self._missing[self._next] == 0:
            self._launch(self._next)

    def _launch(self, i: int) -> None:
        grads = []
        for p in self._buckets[i]:
            if p.grad is None:  # unused in this pass: a zero contribution, as Horovod's optimiser sends
                p.grad = torch.zeros_like(p)
            grads.append(p.grad.reshape(-1))
        flat = torch.cat(grads)
        if self._fp16:
            flat = flat.half()
        work = dist.all_reduce(flat, group=self._group, async_op=True)
        self._launched[i] = (work, flat)
        self._next = i + 1

    def synchronize(self) -> None:
        while self._next < len(self._buckets):
            self._launch(self._next)
        for bucket, launched in zip(self._buckets, self._launched, strict=True):
            assert launched is not None
            work, flat = launched
            work.wait()
            flat = flat.to(bucket[0].grad.dtype).div_(self._world)  # type: ignore[union-attr]
            offset = 0
            for p in bucket:
                assert p.grad is not None
                p.grad.copy_(flat[offset : offset + p.numel()].view_as(p.grad))
                offset += p.numel()
        self._reset_pending()

    @contextmanager
    def skip_synchronize(self) -> Iterator[None]:
        self._skip = True
        try:
            yield
        finally:
            self._skip = False

    def step(self, closure: Any = None) -> Any:
        if not self._skip:
            self.synchronize()
        return super().step(closure)  # type: ignore[misc]


def averaging_optimizer(
    base: torch.optim.Optimizer,
    params: list[torch.nn.Parameter],
    *,
    group: Any,
    size: int,
    fp16: bool,
    backward_passes_per_step: int = 1,
) -> torch.optim.Optimizer:
    """``base`` turned into an instance of its own class with :class:`BucketedAverage` mixed in (its
    parameter groups and state carried over), so that checkpoints, GradScaler and the LR code see the
    optimiser they know."""
    cls: Any = type(type(base).__name__, (BucketedAverage, type(base)), {})
    opt = object.__new__(cls)
    opt.__dict__.update(base.__dict__)
    opt._set_up_average(params, group, size, fp16, backward_passes_per_step)
    return opt
