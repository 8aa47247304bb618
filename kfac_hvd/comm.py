"""Collectives for K-FAC and their accounting.

Two communicators share one interface: :class:`HorovodCommunicator` (any number of ranks) and
:class:`LocalCommunicator` (one process, no Horovod needed, no collective issued). Every tensor handed
to Horovod goes through :class:`TrafficCounter`, which keeps per layer and kind

* payload bytes: ``numel × element_size`` of what this rank hands to Horovod (factor allreduce), or of a
  layer's share of the one gathered buffer (inverse allgather: what every rank ends up holding);
* modelled wire bytes per rank, with P ranks and an n-byte payload:
    - allreduce (ring: reduce-scatter then allgather): 2(P−1)/P · n sent (and received) per rank;
    - allgather (ring), n-byte share of the gathered buffer: (P−1)/P · n per rank;
    - broadcast (from one root): n per rank; P = 1 sends nothing.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, inverted_everywhere
from .factors import packed_numel


def allreduce_wire_bytes(payload: int, world_size: int) -> float:
    return 2.0 * (world_size - 1) / world_size * payload


def allgather_wire_bytes(payload: int, world_size: int) -> float:
    return (world_size - 1) / world_size * payload


def broadcast_wire_bytes(payload: int, world_size: int) -> float:
    return float(payload) if world_size > 1 else 0.0


WIRE_BYTES = {
    "allreduce": allreduce_wire_bytes,
    "allgather": allgather_wire_bytes,
    "broadcast": broadcast_wire_bytes,
}


def every_step_cost(
    layers: Iterable[Any],
    world_size: int,
    *,
    symmetric: bool = True,
    element_bytes: int | None = None,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> dict[str, float]:
    """One step with every factor of every layer updated: payload, wire and dense bytes, elements.

    Every factor is allreduced; the inverses of the layers that are not inverted on every rank travel
    in the step's inverse allgather.
    """
    cost = {
        "every_step_payload_bytes": 0,
        "every_step_wire_bytes": 0.0,
        "every_step_dense_payload_bytes": 0,
        "every_step_elements": 0,
    }
    for layer in layers:
        element = element_bytes or torch.finfo(layer.factor_dtype).bits // 8
        shapes = layer.factor_shapes()
        local = inverted_everywhere(shapes, local_inverse_max_dim)
        for shape in shapes.values():
            cost["every_step_elements"] += math.prod(shape)
            if world_size == 1:
                continue
            payload = packed_numel(shape, symmetric) * element
            dense = math.prod(shape) * element
            messages = 1 if local else 2  # factor allreduce (+ inverse allgather)
            cost["every_step_payload_bytes"] += messages * payload
            cost["every_step_dense_payload_bytes"] += messages * dense
            cost["every_step_wire_bytes"] += allreduce_wire_bytes(payload, world_size)
            if not local:
                cost["every_step_wire_bytes"] += allgather_wire_bytes(payload, world_size)
    return cost


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


class LocalCommunicator:
    """One process: averaging and broadcasting are identities, and nothing is sent."""

    rank = 0
    size = 1

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def allgather_async(self, tensor: torch.Tensor, name: str) -> torch.Tensor:
        return tensor

    def wait(self, handle: Any) -> torch.Tensor:
        return handle


class HorovodCommunicator:
    """Named, asynchronous in-place Horovod collectives, so Horovod can fuse and overlap them."""

    def __init__(self) -> None:
        import horovod.torch as hvd  # imported here: the library works without Horovod in one process

        self._hvd = hvd
        self.rank = hvd.rank()
        self.size = hvd.size()

    def allreduce_async(self, tensor: torch.Tensor, name: str) -> Any:
        return self._hvd.allreduce_async_(tensor, name=name, op=self._hvd.Average)

    def allgather_async(self, tensor: torch.Tensor, name: str) -> Any:
        """Concatenation of every rank's ``tensor`` (first dimensions may differ), in rank order."""
        return self._hvd.allgather_async(tensor, name=name)

    def wait(self, handle: Any) -> torch.Tensor:
        return self._hvd.synchronize(handle)


def default_communicator() -> HorovodCommunicator | LocalCommunicator:
    """Horovod when it is importable and initialised, else a single local process."""
    try:
        import horovod.torch as hvd
    except ImportError:
        return LocalCommunicator()
    return HorovodCommunicator() if hvd.is_initialized() else LocalCommunicator()
