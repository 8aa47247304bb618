"""Fisher traffic per rank of updating every layer on every step, and the inverse exchange before and
after the allgather scheme: the per-layer costs of :func:`kfac_hvd.cost.layer_cost`, summed.

The communication scheme, per update step and due layer:

* every factor (A, G; BatchNorm: F, a stack of C 2×2 blocks, or one 2C×2C block with
  ``batchnorm_fisher="full"``) is allreduced as its upper triangle(s), n(n+1)/2 values per matrix: ring
  allreduce, 2(P−1)/P · n bytes per rank;
* layers cheap to invert (every unit-wise BatchNorm; Kronecker layers and full BatchNorm blocks at most
  ``local_inverse_max_dim`` wide) are inverted on every rank: their inverses never travel;
* the other layers' inverses (upper triangles) travel in ONE allgather per step, each owner's share
  packed into one buffer: ring allgather, (P−1)/P · n per rank for the n gathered bytes; rank 0 appends
  the due layers' new intervals (4 bytes each, control traffic, counted apart from Fisher traffic).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn

from ..assignment import assign_layers
from ..cost import LayerCost, allgather_wire_bytes, allreduce_wire_bytes, broadcast_wire_bytes
from ..layers import Layer, make_layer

CONTROL_BYTES_PER_LAYER = 4  # one int32 interval per due layer, in rank 0's part of the allgather


def model_layers(
    model: nn.Module, *, include_batchnorm: bool = True, batchnorm_fisher: str = "unit_wise"
) -> list[Layer]:
    """The K-FAC layers of ``model`` (fp32 factors), in model order."""
    layers = [
        make_layer(
            name,
            module,
            include_batchnorm=include_batchnorm,
            factor_dtype=torch.float32,
            batchnorm_fisher=batchnorm_fisher,
        )
        for name, module in model.named_modules()
    ]
    return [layer for layer in layers if layer is not None]


def _payload(costs: Iterable[LayerCost]) -> int:
    return sum(cost.payload_bytes() for cost in costs)


def every_step_traffic(costs: Iterable[LayerCost], world_size: int, steps: int) -> dict[str, Any]:
    """Per-rank Fisher traffic of ``steps`` steps that update every layer: of a model's layers
    (:func:`model_layers`), or a run's own (``kfac.layer_costs``, which honours ``skip_layers``)."""
    costs = list(costs)
    moving = [cost for cost in costs if cost.travels]
    factors, inverses = _payload(costs), _payload(moving)
    values = sum(cost.values for cost in costs)
    element_bytes = costs[0].element_bytes if costs else 4
    factor_wire = allreduce_wire_bytes(factors, world_size)
    inverse_wire = allgather_wire_bytes(inverses, world_size) if inverses else 0.0
    return {
        "layers": len(costs),
        "locally_inverted_layers": len(costs) - len(moving),
        "travelling_layers": len(moving),
        "factor_values": values,
        "factor_bytes": values * element_bytes,
        # The paper's Table 1 accounting: every factor's dense values, every step (no ranks, no packing)
        "dense_factor_bytes_per_rank": steps * values * element_bytes,
        "factor_payload_bytes_per_step": factors,
        "inverse_payload_bytes_per_step": inverses,
        "factor_allreduce_tensors_per_step": sum(cost.matrices for cost in costs),
        "inverse_allgathers_per_step": 1 if inverses and world_size > 1 else 0,
        "wire_bytes_per_step": factor_wire + inverse_wire,
        "factor_allreduce_wire_bytes_per_rank": steps * factor_wire,
        "inverse_allgather_wire_bytes_per_rank": steps * inverse_wire,
        "wire_bytes_per_rank": steps * (factor_wire + inverse_wire),
        "payload_bytes_per_rank": steps * (factors + inverses),
        "allreduce_only_dense_wire_bytes_per_rank": steps
        * allreduce_wire_bytes(values * element_bytes, world_size),
    }


def scheme_comparison(costs: Sequence[LayerCost], world_size: int) -> dict[str, Any]:
    """One update step with every layer due, per rank: the broadcast scheme (one broadcast per inverse from
    its owner, every layer owned by some rank, + rank 0's schedule broadcast) against the allgather scheme
    (local inversion of cheap layers + one allgather), and what local inversion alone removes."""
    local = [cost for cost in costs if not cost.travels]
    moving = [cost for cost in costs if cost.travels]
    owners = assign_layers({cost.name: cost.inversion_flop for cost in costs}, world_size).owner
    control = CONTROL_BYTES_PER_LAYER * len(costs)
    return {
        "factor_allreduce": {
            "tensors": sum(cost.matrices for cost in costs),
            "payload_bytes": _payload(costs),
            "wire_bytes": allreduce_wire_bytes(_payload(costs), world_size),
        },
        "broadcast_scheme": {
            "broadcasts": sum(cost.matrices for cost in costs),
            "roots": len(set(owners.values())),
            "schedule_broadcasts": 1,
            "payload_bytes": _payload(costs),
            "wire_bytes": sum(
                broadcast_wire_bytes(cost.payload_bytes([kind]), world_size)
                for cost in costs
                for kind in cost.factor_shapes
            ),
            "control_payload_bytes": control,
        },
        "allgather_scheme": {
            "allgathers": 1,
            "layers": len(moving),
            "matrices": sum(cost.matrices for cost in moving),
            "payload_bytes": _payload(moving),
            "wire_bytes": allgather_wire_bytes(_payload(moving), world_size),
            "control_payload_bytes": control,
        },
        "local_inversion_removes": {
            "layers": len(local),
            "batchnorm_layers": sum(cost.kind == "batchnorm" for cost in local),
            "kronecker_layers": sum(cost.kind == "kronecker" for cost in local),
            "matrices": sum(cost.matrices for cost in local),
            "payload_bytes": _payload(local),
            "allgather_wire_bytes": allgather_wire_bytes(_payload(local), world_size),
            "broadcast_wire_bytes": broadcast_wire_bytes(_payload(local), world_size),
        },
    }
