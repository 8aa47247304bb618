"""What one update of a K-FAC layer costs: bytes and messages on the wire, FLOPs of its phases.

The one statement of these rules, built on the layer's own facts (:mod:`kfac_hvd.layers`: its factor
shapes and inversion cost). The runtime's traffic accounting (:mod:`kfac_hvd.comm`, ``KFAC``'s step
records), the launcher's dry run and the models of :mod:`kfac_hvd.analysis` all take a layer's cost from
:func:`layer_cost`.

Per update of a layer:

* each factor (A, G; BatchNorm: F, a stack of C 2×2 blocks, or one 2C×2C block with
  ``batchnorm_fisher="full"``) is allreduced as one message, its upper triangle(s) (n(n+1)/2 values
  per matrix) when ``symmetric``;
* its inverses *travel* (their share of the step's one inverse allgather, the same payload again) unless
  every rank inverts the layer (:func:`kfac_hvd.assignment.inverted_everywhere`): 2 messages per factor
  when it travels, else 1.

Wire bytes per rank, with P ranks and an n-byte payload:

* allreduce (ring: reduce-scatter then allgather): 2(P−1)/P · n sent (and received) per rank;
* allgather (ring), n-byte share of the gathered buffer: (P−1)/P · n per rank;
* broadcast (from one root): n per rank; P = 1 sends nothing.

FLOPs (FLOP = 2 × multiply-add), for ``rows`` = samples × output positions: a factor product costs
2 · rows · (values of the factor), i.e. 2·rows·dim² for A (forward hook) and G (backward hook), 8 per
activation for BatchNorm's F (backward hook); a full 2C×2C BatchNorm block adds the outer products of
the per-sample gradients, 2 · samples · (2C)²; the inversion the layer's ``inversion_cost()`` (≈ n³ per
n×n factor, 8 per BatchNorm channel, (2C)³ for a full block); preconditioning G⁻¹·∇W·A⁻¹
2(dim G²·dim A + dim G·dim A²), BatchNorm 2 per value of its inverse (8 per channel unit-wise, 2(2C)² for
a full block).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import torch

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, inverted_everywhere
from .factors import packed_numel
from .layers import Layer


def allreduce_wire_bytes(payload: float, world_size: int) -> float:
    return 2.0 * (world_size - 1) / world_size * payload


def allgather_wire_bytes(payload: float, world_size: int) -> float:
    return (world_size - 1) / world_size * payload


def broadcast_wire_bytes(payload: float, world_size: int) -> float:
    return float(payload) if world_size > 1 else 0.0


WIRE_BYTES = {
    "allreduce": allreduce_wire_bytes,
    "allgather": allgather_wire_bytes,
    "broadcast": broadcast_wire_bytes,
}


@dataclass(frozen=True)
class LayerCost:
    """One layer's cost per update under one communication scheme (see the module docstring).

    ``kinds`` arguments name the factors updated (all of them when omitted: with separate intervals a
    step may update only A or only G)."""

    name: str
    kind: str  # "kronecker" | "batchnorm"
    factor_shapes: Mapping[str, tuple[int, ...]]
    element_bytes: int
    symmetric: bool
    travels: bool  # inverses in the step's allgather; False: every rank inverts the layer
    inversion_flop: float

    @property
    def messages(self) -> int:
        """Messages per updated factor: its allreduce, and its inverse in the allgather when it travels."""
        return 2 if self.travels else 1

    @property
    def values(self) -> int:
        """Values of all the layer's factors, unpacked."""
        return sum(math.prod(shape) for shape in self.factor_shapes.values())

    @property
    def matrices(self) -> int:
        """Factor tensors: one allreduce each (and one inverse each in the allgather when it travels)."""
        return len(self.factor_shapes)

    def _shapes(self, kinds: Iterable[str] | None) -> list[tuple[int, ...]]:
        return [self.factor_shapes[kind] for kind in (self.factor_shapes if kinds is None else kinds)]

    def payload_bytes(self, kinds: Iterable[str] | None = None) -> int:
        """Bytes of the factors as handed to Horovod (packed): one message each, = their inverses' bytes."""
        return sum(packed_numel(shape, self.symmetric) for shape in self._shapes(kinds)) * self.element_bytes

    def dense_bytes(self, kinds: Iterable[str] | None = None) -> int:
        """Bytes of the factors unpacked."""
        return sum(math.prod(shape) for shape in self._shapes(kinds)) * self.element_bytes

    def update_payload_bytes(self, kinds: Iterable[str] | None = None) -> int:
        """Payload of one update on more than one rank: factor allreduce (+ inverse allgather)."""
        return self.messages * self.payload_bytes(kinds)

    def update_dense_bytes(self, kinds: Iterable[str] | None = None) -> int:
        return self.messages * self.dense_bytes(kinds)

    def allreduce_wire_bytes(self, world_size: int, kinds: Iterable[str] | None = None) -> float:
        return allreduce_wire_bytes(self.payload_bytes(kinds), world_size)

    def allgather_wire_bytes(self, world_size: int, kinds: Iterable[str] | None = None) -> float:
        """This layer's share of the inverse allgather (0 when it does not travel)."""
        return allgather_wire_bytes(self.payload_bytes(kinds), world_size) if self.travels else 0.0

    def wire_bytes(self, world_size: int, kinds: Iterable[str] | None = None) -> float:
        """Wire bytes per rank of one update: factor allreduce + its share of the inverse allgather."""
        return self.allreduce_wire_bytes(world_size, kinds) + self.allgather_wire_bytes(world_size, kinds)

    @property
    def full_batchnorm(self) -> bool:
        """A BatchNorm layer with one 2C×2C block (``batchnorm_fisher="full"``) rather than C 2×2 blocks."""
        return self.kind == "batchnorm" and len(self.factor_shapes["F"]) == 2

    def factor_flop(self, rows: int, samples: int | None = None) -> dict[str, float]:
        """FLOP of the factor products for ``rows`` rows (of ``samples`` samples: a full BatchNorm
        block's outer products are per sample; default ``rows``), by the hook that computes them."""
        flop = {"forward": 0.0, "backward": 0.0}
        if self.full_batchnorm:
            width = self.factor_shapes["F"][0]
            per_sample = rows if samples is None else samples
            flop["backward"] = 2.0 * rows * 2 * width + 2.0 * per_sample * width**2
            return flop
        for kind, shape in self.factor_shapes.items():
            flop["forward" if kind == "A" else "backward"] += 2.0 * rows * math.prod(shape)
        return flop

    @property
    def precondition_flop(self) -> float:
        if self.kind == "batchnorm":
            # (C, 2, 2) blocks times (C, 2) gradients: 8 per channel; a (2C, 2C) block times 2C values
            return 2.0 * self.values
        a, g = self.factor_shapes["A"][0], self.factor_shapes["G"][0]
        return 2.0 * (g**2 * a + g * a**2)


def layer_kind(layer: Layer) -> str:
    return "batchnorm" if "F" in layer.factor_kinds else "kronecker"


def layer_cost(
    layer: Layer,
    *,
    symmetric: bool = True,
    element_bytes: int | None = None,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> LayerCost:
    """The cost of ``layer``; ``element_bytes`` defaults to its factors' dtype (4 for fp32)."""
    shapes = layer.factor_shapes()
    return LayerCost(
        name=layer.name,
        kind=layer_kind(layer),
        factor_shapes=shapes,
        element_bytes=element_bytes or torch.finfo(layer.factor_dtype).bits // 8,
        symmetric=symmetric,
        travels=not inverted_everywhere(shapes, local_inverse_max_dim),
        inversion_flop=layer.inversion_cost(),
    )


def layer_costs(
    layers: Iterable[Layer],
    *,
    symmetric: bool = True,
    element_bytes: int | None = None,
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
) -> dict[str, LayerCost]:
    """:func:`layer_cost` of each layer, by name, in order."""
    return {
        layer.name: layer_cost(
            layer,
            symmetric=symmetric,
            element_bytes=element_bytes,
            local_inverse_max_dim=local_inverse_max_dim,
        )
        for layer in layers
    }
