"""Collectives for K-FAC and their accounting.

Three communicators share one interface (:class:`Communicator`): :class:`HorovodCommunicator` and
:class:`TorchDistributedCommunicator` (any number of ranks, on Horovod or on ``torch.distributed``) and
:class:`LocalCommunicator` (one process, no collective issued). Neither engine is imported before a
communicator of its own is made. Every tensor handed to a collective goes through
:class:`TrafficCounter` (the calls are in :mod:`kfac_hvd.exchange`, the same for every engine), which
keeps per layer and kind

* payload bytes: ``numel × element_size`` of what this rank hands to the engine (factor allreduce), or
  of a layer's share of the one gathered buffer (inverse allgather: what every rank ends up holding;
  the torch engine's padding is not counted);
* modelled wire bytes per rank (the ring model of :mod:`kfac_hvd.cost`).

What updating every layer on every step would cost, the counters' reference, is :func:`every_step_cost`.
"""

from __future__ import annotations

import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from .cost import WIRE_BYTES, LayerCost


def every_step_cost(costs: Iterable[LayerCost], world_size: int) -> dict[str, float]:
    """One step with every factor of every layer updated: payload, wire and dense bytes, elements.

    Every factor is allreduced; the inverses of the layers that travel are in the step's inverse
    allgather. One rank sends nothing but computes every factor.
    """
    costs = list(costs)
    sends = world_size > 1
    return {
        "every_step_payload_bytes": sum(c.update_payload_bytes() for c in costs) if sends else 0,
        "every_step_wire_bytes": sum(c.wire_bytes(world_size) for c in costs),
        "every_step_dense_payload_bytes": sum(c.update_dense_bytes() for c in costs) if sends else 0,
        "every_step_elements": sum(c.values for c in costs),
    }


@dataclass
class TrafficCounter:
    """Cumulative Fisher traffic of this rank, and what updating every factor every step would cost."""

    world_size: int
    per_layer: dict[str, dict[str, dict[str, float]]] = field(
        default_factory=lambda: defaultdict(
            lambda: defaultdict(lambda: {"count": 0, "payload_bytes": 0, "wire_bytes": 0.0})
        )
    )
    totals: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    def add(self, layer: str, kind: str, op: str, payload: int) -> None:
        wire = WIRE_BYTES[op](payload, self.world_size)
        entry = self.per_layer[layer][kind]
        entry["count"] += 1
        entry["payload_bytes"] += payload
        entry["wire_bytes"] += wire
        self.totals["payload_bytes"] += payload
        self.totals["wire_bytes"] += wire

    def add_totals(self, **amounts: float) -> None:
        for key, value in amounts.items():
            self.totals[key] += value

    def summary(self) -> dict[str, Any]:
        totals = dict(self.totals)
        for key in (
            "payload_bytes",
            "wire_bytes",
            "dense_payload_bytes",
            "every_step_payload_bytes",
            "every_step_wire_bytes",
            "every_step_dense_payload_bytes",
            "computed_elements",
            "every_step_elements",
            "control_payload_bytes",
        ):
            totals.setdefault(key, 0.0)

        def ratio(numerator: str, denominator: str) -> float | None:
            return totals[numerator] / totals[denominator] if totals[denominator] else None

        return {
            "world_size": self.world_size,
            **{
                k: (int(v) if k.endswith("payload_bytes") or k.endswith("elements") else v)
                for k, v in totals.items()
            },
            "ratio": ratio("payload_bytes", "every_step_payload_bytes"),
            "compute_ratio": ratio("computed_elements", "every_step_elements"),
            "per_layer": {
                layer: {kind: dict(entry) for kind, entry in kinds.items()}
                for layer, kinds in self.per_layer.items()
            },
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "totals": dict(self.totals),
            "per_layer": {
                layer: {kind: dict(entry) for kind, entry in kinds.items()}
                for layer, kinds in self.per_layer.items()
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.totals.clear()
        self.totals.update(state["totals"])
        self.per_layer.clear()
        for layer, kinds in state["per_layer"].items():
            for kind, entry in kinds.items():
                self.per_layer[layer][kind].update(entry)


class Communicator(Protocol):
    """What K-FAC asks of an engine: this rank, the number of ranks, two asynchronous collectives.

    ``allreduce_async`` averages ``tensor`` over the ranks in place; ``allgather_async`` concatenates
    every rank's ``tensor`` along the first dimension, in rank order (first dimensions may differ:
    ``sizes``, when given, lists every rank's first dimension so that the engine need not exchange
    them). Both return a handle; ``wait`` returns the result. ``name`` identifies the collective to
    engines that use names (Horovod fuses and records by name).
    """

    rank: int
    size: int

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> Any: ...

    def allgather_async(
        self, tensor: torch.Tensor, name: str, *, sizes: Sequence[int] | None = None
    ) -> Any: ...

    def wait(self, handle: Any) -> torch.Tensor: ...


class LocalCommunicator:
    """One process: averaging and broadcasting are identities, and nothing is sent."""

    rank = 0
    size = 1

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def allgather_async(
        self, tensor: torch.Tensor, name: str, *, sizes: Sequence[int] | None = None
    ) -> torch.Tensor:
        return tensor

    def wait(self, handle: Any) -> torch.Tensor:
        return handle


class HorovodCommunicator:
    """Named, asynchronous in-place Horovod collectives, so Horovod can fuse and overlap them.

    Under ``HOROVOD_DISABLE_GROUP_FUSION=1`` Horovod fuses none of them (each lone allreduce is a group of
    its own): every factor then travels alone, in a buffer of its own, and its sum has the same order in
    every run. Fused with whatever else is ready in a cycle, a factor's place in the buffer, and so the
    order of a ring allreduce's sum at 3+ ranks, would depend on timing."""

    def __init__(self) -> None:
        import horovod.torch as hvd  # imported here: the library works without Horovod in one process

        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> Any:
        return self._hvd.allreduce_async_(tensor, name=name, op=self._hvd.Average)

    def allgather_async(self, tensor: torch.Tensor, name: str, *, sizes: Sequence[int] | None = None) -> Any:
        """Concatenation of every rank's ``tensor`` (first dimensions may differ), in rank order.
        ``sizes`` is not needed: Horovod's controller exchanges the first dimensions itself."""
        return self._hvd.allgather_async(tensor, name=name)

    def wait(self, handle: Any) -> torch.Tensor:
        return self._hvd.synchronize(handle)


class _PendingAverage:
    """An in-flight sum whose result is divided by the number of ranks once it has arrived."""

    def __init__(self, work: Any, tensor: torch.Tensor, scale: float) -> None:
        self.work, self.tensor, self.scale = work, tensor, scale

    def result(self) -> torch.Tensor:
        self.work.wait()
        # A multiplication by 1/P, as Horovod's Average does (its post-scale factor): the same rounding
        # as Horovod's, and a device-side operation with a host scalar, so no host synchronisation.
        return self.tensor.mul_(self.scale)


class _PendingGather:
    """An in-flight gather of equal, padded parts; trimmed to each rank's own first dimension on arrival."""

    def __init__(self, work: Any, parts: torch.Tensor, sizes: Sequence[int], send: torch.Tensor) -> None:
        self.work, self.parts, self.sizes = work, parts, list(sizes)
        self.send = send  # held until the collective is done: an engine may read it asynchronously

    def result(self) -> torch.Tensor:
        if self.work is not None:
            self.work.wait()
        longest = self.parts.shape[1]
        if all(size == longest for size in self.sizes):
            return self.parts.flatten(0, 1)  # nothing was padded: a view, no copy
        return torch.cat([part[:size] for part, size in zip(self.parts, self.sizes)])


class TorchDistributedCommunicator:
    """Asynchronous ``torch.distributed`` collectives (Gloo on the CPU, NCCL on GPUs), for jobs started by
    ``torchrun``: call ``torch.distributed.init_process_group`` first.

    The factor allreduces are issued with ``async_op=True`` from the capture hooks, so they run while the
    backward pass goes on. Averages are sums scaled by 1/P on arrival (Gloo has no average). The inverse
    allgather pads every rank's part to the longest and trims on arrival: one collective, with every
    rank's length passed down by the caller (``sizes``), so that none is read back from a device. Tensor
    names mean nothing to ``torch.distributed`` and are not used: it matches collectives by the order in
    which they are issued, which is the same on every rank because every rank runs the same layers, due
    on the same steps (rank 0's intervals), in the same order (DDP asks the same of the model).
    """

    def __init__(self, group: Any = None) -> None:
        import torch.distributed as dist  # here: importing kfac_hvd sets nothing up

        if not (dist.is_available() and dist.is_initialized()):
            raise RuntimeError(
                "TorchDistributedCommunicator needs torch.distributed.init_process_group() to have run"
            )
        self._dist = dist
        self._group = group
        self.rank: int = dist.get_rank(group)
        self.size: int = dist.get_world_size(group)

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> _PendingAverage:
        work = self._dist.all_reduce(tensor, op=self._dist.ReduceOp.SUM, group=self._group, async_op=True)
        return _PendingAverage(work, tensor, 1.0 / self.size)

    def allgather_async(
        self, tensor: torch.Tensor, name: str, *, sizes: Sequence[int] | None = None
    ) -> _PendingGather:
        """Every rank's ``tensor`` concatenated along the first dimension, in rank order. Without
        ``sizes`` the first dimensions are gathered first (one more collective and one host read)."""
        if sizes is None:
            sizes = self._gather_sizes(tensor)
        if len(sizes) != self.size or sizes[self.rank] != tensor.shape[0]:
            raise ValueError(
                f"allgather '{name}': sizes {list(sizes)} do not fit {self.size} ranks with a part of "
                f"{tensor.shape[0]} rows at rank {self.rank}"
            )
        longest = max(sizes)
        parts = tensor.new_empty((self.size, longest, *tensor.shape[1:]))
        if longest == 0:  # every rank knows that every part is empty: no collective at all
            return _PendingGather(None, parts, sizes, tensor)
        if tensor.shape[0] == longest:
            send = tensor.contiguous()
        else:
            send = tensor.new_zeros((longest, *tensor.shape[1:]))  # the padding travels too: no garbage
            send[: tensor.shape[0]] = tensor
        # One collective into views of one buffer (Gloo's allgather wants equal parts).
        work = self._dist.all_gather(list(parts.unbind(0)), send, group=self._group, async_op=True)
        return _PendingGather(work, parts, sizes, send)

    def wait(self, handle: _PendingAverage | _PendingGather) -> torch.Tensor:
        return handle.result()

    def _gather_sizes(self, tensor: torch.Tensor) -> list[int]:
        mine = torch.tensor([tensor.shape[0]], dtype=torch.int64, device=tensor.device)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        self._dist.all_gather(every, mine, group=self._group)
        return torch.cat(every).tolist()


def default_communicator() -> TorchDistributedCommunicator | HorovodCommunicator | LocalCommunicator:
    """Horovod when it is initialised, else ``torch.distributed`` when that is, else a single local
    process. Neither engine is imported here: Horovod is initialised only if ``horovod.torch`` was
    imported, and ``torch.distributed`` is part of ``import torch``."""
    hvd = sys.modules.get("horovod.torch")
    if hvd is not None and hvd.is_initialized():
        return HorovodCommunicator()
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return TorchDistributedCommunicator()
    return LocalCommunicator()
