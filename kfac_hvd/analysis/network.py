"""The hardware of the step-time model: α-β collectives (:class:`Network`) and compute rates (:class:`Gpu`).

Defaults describe the paper's ABCI nodes (Osawa et al., Table 1): 4 V100 (SXM2, fp32 peak 15.7 TFLOP/s)
per node on NVLink, 2 × InfiniBand EDR (2 × 100 Gb/s) per node. Every constant is an argument here and
a flag of ``python -m kfac_hvd.analysis.commodel --time``.

Collectives (P ranks, n bytes; the same ring wire bytes as :mod:`kfac_hvd.cost`):

* flat ring over all P GPUs (NCCL's default, Horovod without HOROVOD_HIERARCHICAL_ALLREDUCE). Ring steps
  run in lockstep, so every step costs the slowest edge: once P spans more than one node, the inter-node
  edge (α_inter, and the node's NIC bandwidth B_node, which NCCL's channels spread over both NICs).
    allreduce  α_msg + 2(P−1)·α_step + 2(P−1)/P · n / B
    allgather  α_msg +  (P−1)·α_step +  (P−1)/P · n / B      (n: the whole gathered buffer)
    broadcast  α_msg +  (P−1)·α_step +            n / B      (pipelined chain)
  B = min(B_nvlink, B_node) and α_step = α_inter across nodes; B_nvlink, α_intra within one node.
* hierarchical (option): a ring inside each node of g GPUs (NVLink) around a ring over the N nodes, the
  node's NICs carrying its node's data (2(g−1)/g·n/B_nvlink + 2(N−1)/N·n/B_node for an allreduce, and
  so on). Its bytes per link differ from the flat wire model that the traffic figures use.

Fusion: Horovod packs allreduces into fusion buffers (64 MiB): the gradient and the factor allreduces
each cost ⌈bytes/fusion⌉ messages (they are not fused with each other, to keep the phases apart).

Compute runs at ``peak × efficiency`` (``inverse_efficiency`` for inversions); the Kronecker factor
products at the peak of the precision they run in (:data:`kfac_hvd.analysis.devices.DEVICES`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .devices import DEVICES

TOPOLOGIES = ("flat", "hierarchical")


@dataclass(frozen=True)
class Network:
    """α-β constants. Defaults: ABCI compute node (4 × V100 SXM2 on NVLink, 2 × IB EDR)."""

    gpus_per_node: int = 4
    nvlink_bandwidth: float = 50e9  # B/s per direction between two GPUs of a node (2 NVLink2 links)
    node_bandwidth: float = 25e9  # B/s per direction per node: 2 × 100 Gb/s InfiniBand EDR
    alpha_message: float = 50e-6  # s per collective: launch and Horovod's negotiation
    alpha_intra: float = 2e-6  # s per ring step inside a node
    alpha_inter: float = 5e-6  # s per ring step across nodes
    fusion_bytes: int = 64 * 2**20  # Horovod's fusion buffer
    topology: str = "flat"

    def __post_init__(self) -> None:
        if self.topology not in TOPOLOGIES:
            raise ValueError(f"topology must be one of {TOPOLOGIES}, got {self.topology!r}")

    def _stages(self, world_size: int) -> list[tuple]:
        """(ranks, α per step, bandwidth) of each ring a collective runs through."""
        nodes = math.ceil(world_size / self.gpus_per_node)
        if nodes == 1:
            return [(world_size, self.alpha_intra, self.nvlink_bandwidth)]
        if self.topology == "flat":
            return [(world_size, self.alpha_inter, min(self.nvlink_bandwidth, self.node_bandwidth))]
        return [
            (min(world_size, self.gpus_per_node), self.alpha_intra, self.nvlink_bandwidth),
            (nodes, self.alpha_inter, self.node_bandwidth),
        ]

    def allreduce(self, payload: float, world_size: int) -> float:
        if world_size <= 1 or payload <= 0:
            return 0.0
        return self.alpha_message + sum(
            2 * (p - 1) * alpha + 2 * (p - 1) / p * payload / bandwidth
            for p, alpha, bandwidth in self._stages(world_size)
        )

    def allgather(self, payload: float, world_size: int) -> float:
        """``payload``: the bytes every rank holds afterwards (the sum of all ranks' shares)."""
        if world_size <= 1 or payload <= 0:
            return 0.0
        return self.alpha_message + sum(
            (p - 1) * alpha + (p - 1) / p * payload / bandwidth
            for p, alpha, bandwidth in self._stages(world_size)
        )

    def broadcast(self, payload: float, world_size: int) -> float:
        if world_size <= 1 or payload <= 0:
            return 0.0
        return self.alpha_message + sum(
            (p - 1) * alpha + payload / bandwidth for p, alpha, bandwidth in self._stages(world_size)
        )

    def fused_allreduce(self, payload: float, world_size: int) -> float:
        """``payload`` bytes of many tensors, fused into ⌈payload/fusion⌉ equal messages."""
        if payload <= 0:
            return 0.0
        messages = math.ceil(payload / self.fusion_bytes)
        return messages * self.allreduce(payload / messages, world_size)


@dataclass(frozen=True)
class Gpu:
    """Compute rates. Defaults: V100 fp32 peak; the efficiencies are assumptions.

    ``factor_peak_flops``: the peak of the Kronecker factor products in the precision they run in (None:
    ``peak_flops``), e.g. a V100's fp16 tensor cores (125 TFLOP/s) when autocast hands the hooks fp16
    activations. ``memory_bandwidth``: when given, the im2col columns of the k×k convolutions
    (``factor_input_bytes`` per value, written once and read once) cost their bytes at
    ``memory_bandwidth × memory_efficiency``; None leaves that traffic out."""

    peak_flops: float = 15.7e12
    efficiency: float = 0.6  # forward/backward, factor GEMMs, preconditioning matmuls
    inverse_efficiency: float = 0.25  # Cholesky + inverse of factors (n ≤ 4,609: far from peak)
    factor_peak_flops: float | None = None
    factor_precision: str = "fp32"
    memory_bandwidth: float | None = None
    memory_efficiency: float = 0.7
    factor_input_bytes: int = 4

    @classmethod
    def of(cls, kind: str, *, factor_precision: str = "fp32", **overrides: Any) -> Gpu:
        """The datasheet rates of a device kind of :data:`kfac_hvd.analysis.devices.DEVICES`, factor products
        at ``factor_precision``'s peak (fp32: plain fp32; tf32/bf16/fp16: tensor cores)."""
        rates = DEVICES[kind]
        values: dict[str, Any] = dict(
            peak_flops=rates.fp32,
            factor_peak_flops=rates.flops(factor_precision),
            factor_precision=factor_precision,
            memory_bandwidth=rates.memory_bandwidth,
            factor_input_bytes=4 if factor_precision in ("fp32", "tf32") else 2,
        )
        values.update(overrides)
        return cls(**values)

    def seconds(self, flop: float, *, inverse: bool = False, factor: bool = False) -> float:
        peak = (self.factor_peak_flops or self.peak_flops) if factor else self.peak_flops
        return flop / (peak * (self.inverse_efficiency if inverse else self.efficiency))

    def memory_seconds(self, nbytes: float) -> float:
        if self.memory_bandwidth is None:
            return 0.0
        return nbytes / (self.memory_bandwidth * self.memory_efficiency)
