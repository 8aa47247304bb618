"""Which rank inverts which layer: greedy longest-processing-time partition by inversion cost."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

DEFAULT_LOCAL_INVERSE_MAX_DIM = 256


@dataclass(frozen=True)
class Assignment:
    owner: dict[str, int]  # layer name -> rank that inverts it and sends the inverses in the allgather
    load: list[float]  # total inversion cost per rank

    @property
    def imbalance(self) -> float:
        """max/mean of the per-rank load: 1.0 is perfect; with more ranks than layers it grows."""
        mean = sum(self.load) / len(self.load)
        return max(self.load) / mean if mean > 0 else 1.0

    def layers_of(self, rank: int) -> list[str]:
        return [name for name, owner in self.owner.items() if owner == rank]


def assign_layers(costs: Mapping[str, float], world_size: int) -> Assignment:
    """Largest cost first, each to the currently least-loaded rank (ties: lowest rank).

    Deterministic in ``costs`` and ``world_size`` alone, so every rank computes the same owners
    without communicating. Cost of a Kronecker layer: dim(A)³ + dim(G)³.
    """
    if world_size < 1:
        raise ValueError(f"world_size must be >= 1, got {world_size}")
    load = [0.0] * world_size
    owner: dict[str, int] = {}
    # Name breaks cost ties so that the order never depends on dict insertion.
    for name in sorted(costs, key=lambda n: (-costs[n], n)):
        rank = min(range(world_size), key=lambda r: (load[r], r))
        owner[name] = rank
        load[rank] += costs[name]
    return Assignment(owner={name: owner[name] for name in costs}, load=load)


def inverted_everywhere(factor_shapes: Mapping[str, tuple[int, ...]], local_inverse_max_dim: int) -> bool:
    """Whether a layer is cheap enough for every rank to invert it from the averaged factors, so that
    its inverses never travel: batched 2×2 blocks (unit-wise BatchNorm) always; matrices (Kronecker
    factors, a full 2C×2C BatchNorm block) when none is wider than ``local_inverse_max_dim`` (a 256-wide
    Cholesky inverse is ~17 MFLOP: microseconds on a GPU, far less than a collective's latency at 128
    ranks)."""
    shapes = list(factor_shapes.values())
    if all(len(shape) > 2 for shape in shapes):
        return True
    return max(shape[-1] for shape in shapes) <= local_inverse_max_dim
