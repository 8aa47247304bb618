"""What one step sends: the factor allreduces and the single inverse allgather.

* Factors travel as soon as they are final (:class:`FactorExchange`): the capture hooks hand each one
  over on the last micro-batch, so the engine moves A during the forward pass and G during the backward
  pass; ``KFAC.step`` only waits. Names: ``kfac.A.<layer>``, ``kfac.G.<layer>``, ``kfac.F.<layer>``.
* Inverses travel in one allgather per step (:func:`allgather_inverses`, name ``kfac.inverses``):
  each rank packs the inverses of the due layers it owns, rank 0 appends the new intervals of the due
  keys, and every rank knows the layout from the assignment and the due set (and so every part's
  length, which the engine is given). Horovod fuses allgathers but never broadcasts, so this replaces
  one broadcast per inverse.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .comm import Communicator, TrafficCounter
from .factors import pack, packed_numel

Key = tuple[str, str]  # (layer, kind)


@dataclass
class Arrived:
    """An averaged factor: as it travelled (flat: packed upper triangles, or the whole matrix without
    triangle packing) when several ranks averaged it, else the full local matrix."""

    shape: tuple[int, ...]
    values: torch.Tensor
    transported: bool
    noise: torch.Tensor | None = None  # split-half noise estimate, averaged over ranks (0-d)


class FactorExchange:
    def __init__(self, comm: Communicator, traffic: TrafficCounter, *, symmetric: bool) -> None:
        self.comm = comm
        self.traffic = traffic
        self.symmetric = symmetric
        self._in_flight: dict[Key, tuple[tuple[int, ...], Any, torch.Tensor | None]] = {}
        self.started_from = {"hooks": 0, "step": 0}

    @property
    def distributed(self) -> bool:
        return self.comm.size > 1

    def start(
        self,
        name: str,
        kind: str,
        factor: torch.Tensor,
        noise: torch.Tensor | None = None,
        *,
        from_step: bool = False,
    ) -> None:
        """Hand one final local factor (and its noise estimate, which rides in the same buffer as one
        more value) to the allreduce; the full matrix is released."""
        key = (name, kind)
        if key in self._in_flight:
            raise RuntimeError(f"K-FAC factor {kind} of layer '{name}' was started twice in one step")
        self.started_from["step" if from_step else "hooks"] += 1
        if not self.distributed:
            self._in_flight[key] = (tuple(factor.shape), (factor, noise), None)
            return
        size = packed_numel(tuple(factor.shape), self.symmetric)
        buffer = factor.new_empty(size + (noise is not None))
        pack(factor, self.symmetric, out=buffer[:size])
        if noise is not None:
            buffer[size:].copy_(noise.reshape(1))
        self.traffic.add(name, kind, "allreduce", buffer.numel() * buffer.element_size())
        self.traffic.add_totals(dense_payload_bytes=factor.numel() * factor.element_size())
        handle = self.comm.allreduce_async(buffer, name=f"kfac.{kind}.{name}")
        self._in_flight[key] = (tuple(factor.shape), handle, buffer)

    def wait(self) -> dict[str, dict[str, Arrived]]:
        """Every started factor, averaged over ranks; the exchange is empty afterwards."""
        arrived: dict[str, dict[str, Arrived]] = {}
        for (name, kind), (shape, handle, _buffer) in self._in_flight.items():
            if self.distributed:
                averaged = self.comm.wait(handle)
                size = packed_numel(shape, self.symmetric)
                noise = averaged[size] if averaged.numel() > size else None
                arrived.setdefault(name, {})[kind] = Arrived(shape, averaged[:size], True, noise)
            else:
                factor, noise = handle
                arrived.setdefault(name, {})[kind] = Arrived(shape, factor, False, noise)
        self._in_flight.clear()
        return arrived

    def reset_counts(self) -> dict[str, int]:
        counts, self.started_from = self.started_from, {"hooks": 0, "step": 0}
        return counts

    def buffer_bytes(self) -> int:
        return sum(
            buffer.numel() * buffer.element_size()
            for _, _, buffer in self._in_flight.values()
            if buffer is not None
        )


def allgather_inverses(
    comm: Communicator,
    traffic: TrafficCounter,
    *,
    layout: Sequence[Sequence[tuple[str, str, tuple[int, ...]]]],
    mine: dict[Key, torch.Tensor],
    control: Sequence[float] | None,
    control_count: int,
    symmetric: bool,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[dict[Key, torch.Tensor], list[float]]:
    """One allgather of every owner's packed inverses (and rank 0's ``control`` values).

    ``layout[r]`` lists (layer, kind, shape) of the inverses rank r sends, in order; rank 0's part ends
    with ``control_count`` control values. Returns the packed inverses of every rank's part, as views
    of the gathered buffer, and rank 0's control values (one host read, only when there are any).
    """
    rank = comm.rank
    pieces = [pack(mine[(name, kind)], symmetric).to(dtype) for name, kind, _ in layout[rank]]
    if rank == 0 and control_count:
        assert control is not None  # rank 0 sends what the others are told to expect
        pieces.append(torch.tensor(list(control), dtype=dtype, device=device))
    send = torch.cat(pieces) if pieces else torch.zeros(0, dtype=dtype, device=device)
    # Every rank's part length follows from the layout, so an engine that must know them (torch.distributed
    # pads to the longest) is told rather than reading them back from a device.
    sizes = [sum(packed_numel(shape, symmetric) for _, _, shape in part) for part in layout]
    sizes[0] += control_count
    gathered = comm.wait(comm.allgather_async(send, name="kfac.inverses", sizes=sizes))
    element = torch.finfo(dtype).bits // 8
    received: dict[Key, torch.Tensor] = {}
    offset = 0
    control_values: list[float] = []
    for part_rank, part in enumerate(layout):
        for name, kind, shape in part:
            size = packed_numel(shape, symmetric)
            received[(name, kind)] = gathered[offset : offset + size]
            traffic.add(name, f"{kind}_inv", "allgather", size * element)
            traffic.add_totals(dense_payload_bytes=math.prod(shape) * element)
            offset += size
        if part_rank == 0 and control_count:
            control_values = gathered[offset : offset + control_count].tolist()
            traffic.add_totals(control_payload_bytes=control_count * element)
            offset += control_count
    if offset != gathered.numel():
        raise RuntimeError(
            f"K-FAC inverse allgather: expected {offset} values, received {gathered.numel()}; "
            "ranks disagree on the due layers or their owners"
        )
    return received, control_values
