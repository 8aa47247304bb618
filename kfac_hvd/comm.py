"""Collectives for K-FAC and their accounting.

Two communicators share one interface: :class:`HorovodCommunicator` (any number of ranks) and
:class:`LocalCommunicator` (one process, no Horovod needed, no collective issued). Every tensor handed
to Horovod goes through :class:`TrafficCounter`, which keeps per layer and kind

* payload bytes: ``numel × element_size`` of what this rank hands to Horovod (factor allreduce), or of a
  layer's share of the one gathered buffer (inverse allgather: what every rank ends up holding);
* modelled wire bytes per rank (the ring model of :mod:`kfac_hvd.cost`).

What updating every layer on every step would cost, the counters' reference, is :func:`every_step_cost`.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

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
