"""Step-time model of distributed K-FAC: α-β collectives plus FLOP-counted compute, per phase.

A *model*, not a measurement. Defaults describe the paper's ABCI nodes (Osawa et al., Table 1): 4 V100
(SXM2, fp32 peak 15.7 TFLOP/s) per node on NVLink, 2 × InfiniBand EDR (2 × 100 Gb/s) per node, 128 images
per GPU at 224 px. Every constant is an argument of :class:`Network` / :class:`Gpu` and a flag of
``python -m kfac_hvd.commodel --time``.

Collectives (P ranks, n bytes; the same ring wire bytes as :mod:`kfac_hvd.comm`):

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

Compute (FLOP = 2 × multiply-add), per GPU, at ``peak × efficiency``:

* forward + backward: 3 × 2 × MACs of every Conv2d/Linear at its real output size (backward = 2 ×
  forward); BatchNorm, ReLU, pooling are not counted.
* factors: A = 2·rows·dim(A)², G = 2·rows·dim(G)², rows = batch × output positions (im2col), at the
  peak of the precision the products run in (``Gpu.factor_peak_flops``: fp32 without tensor cores, or the
  tf32/bf16/fp16 tensor cores of :data:`kfac_hvd.devices.DEVICES`); with ``Gpu.memory_bandwidth`` the
  im2col columns of the k×k convolutions are also written and read once at that bandwidth;
  BatchNorm F ≈ 8 FLOP per activation (normalise, two products, two sums), at the fp32 peak.
* inversion (Cholesky, then the inverse from the factor): ≈ n³ FLOP per n×n factor, i.e. the library's
  cost dim(A)³ + dim(G)³ (BatchNorm: 8 per channel), at ``peak × inverse_efficiency``. Per rank: the
  owned layers (greedy partition of the layers whose inverses travel) plus every locally inverted
  layer; the step waits for the most loaded rank.
* preconditioning, every layer every step: G⁻¹·∇W·A⁻¹ = 2(dim G²·dim A + dim G·dim A²); BN: 8 per channel.

Step time. Without overlap: the sum of all phases. With overlap: the factor and gradient allreduces
run under the backward pass (and the factor work in its hooks) as far as that lasts; what is left over
is exposed; inversion, the inverse allgather and preconditioning follow on the critical path:

    no overlap: fwd + bwd + factor + AR_grad + AR_factor + inversion + allgather + precondition
    overlap:    fwd + bwd + factor + max(0, AR_grad + AR_factor − (bwd + factor_backward))
                + inversion + allgather + precondition

``factor_backward`` is the G/F factor work done in the backward hooks. Not modelled: the tail of the
last bucket's allreduce after the backward pass ends, contention between compute and communication,
stragglers, the optimiser's own update, data loading, packing/unpacking triangles.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, assign_layers, inverted_everywhere
from .devices import DEVICES
from .factors import packed_numel
from .layers import Conv2dLayer, make_layer

TOPOLOGIES = ("flat", "hierarchical")
PHASES = (
    "forward",
    "backward",
    "factor",
    "gradient_allreduce",
    "factor_allreduce",
    "inversion",
    "inverse_allgather",
    "precondition",
)


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
        """The datasheet rates of a device kind of :data:`kfac_hvd.devices.DEVICES`, factor products
        at ``factor_precision``'s peak (fp32: plain fp32; tf32/bf16/fp16: tensor cores)."""
        rates = DEVICES[kind]
        values = dict(
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


@dataclass(frozen=True)
class LayerProfile:
    """A K-FAC layer's sizes: Kronecker (a_dim, g_dim) or BatchNorm (channels), its output positions
    per sample (conv: H·W of the output; linear: 1; BatchNorm: H·W), the width of the rows its A hook
    multiplies (``a_width``: a_dim without the bias column, which is added analytically), whether those
    rows are im2col columns (k×k convolutions) and the values of one sample's input."""

    name: str
    kind: str  # "kronecker" | "batchnorm"
    a_dim: int = 0
    g_dim: int = 0
    channels: int = 0
    positions: int = 1
    a_width: int = 0
    unfolds: bool = False
    input_values: int = 0

    def factor_shapes(self) -> dict[str, tuple]:
        if self.kind == "batchnorm":
            return {"F": (self.channels, 2, 2)}
        return {"A": (self.a_dim, self.a_dim), "G": (self.g_dim, self.g_dim)}

    def inversion_flop(self) -> float:
        return (
            8.0 * self.channels
            if self.kind == "batchnorm"
            else float(self.a_dim) ** 3 + float(self.g_dim) ** 3
        )

    def factor_flop(self, batch: int) -> dict[str, float]:
        """FLOP of this layer's factors for ``batch`` samples, split by the hook that computes them."""
        rows = batch * self.positions
        if self.kind == "batchnorm":
            return {"forward": 0.0, "backward": 8.0 * rows * self.channels}
        return {"forward": 2.0 * rows * self.a_dim**2, "backward": 2.0 * rows * self.g_dim**2}

    def precondition_flop(self) -> float:
        if self.kind == "batchnorm":
            return 8.0 * self.channels
        return 2.0 * (self.g_dim**2 * self.a_dim + self.g_dim * self.a_dim**2)

    def triangle_bytes(self, element_bytes: int = 4, symmetric: bool = True) -> int:
        return sum(packed_numel(shape, symmetric) for shape in self.factor_shapes().values()) * element_bytes

    def im2col_values(self, batch: int) -> int:
        """Values of the im2col columns of ``batch`` samples (0 unless the hook unfolds)."""
        return batch * self.positions * self.a_width if self.unfolds else 0

    def phase_costs(
        self, batch: int, *, input_bytes: int = 4, element_bytes: int = 4
    ) -> dict[str, tuple[float, float]]:
        """(FLOP, bytes) of one update of this layer per phase, the bytes the least any implementation
        moves through memory: im2col writes its columns after reading the input; the factor products
        read their operands (the columns, else the activations, and the output gradients, at
        ``input_bytes`` per value) and write the factors; the statistics read each factor and its
        predecessor; an inversion reads a factor and writes its inverse; preconditioning reads both
        inverses and the gradient, writes and reads the intermediate product and writes the result.
        Factors, inverses and gradients are ``element_bytes`` per value."""
        rows = batch * self.positions
        values = sum(math.prod(shape) for shape in self.factor_shapes().values())
        flop = self.factor_flop(batch)
        if self.kind == "batchnorm":
            operands = 2.0 * rows * self.channels * input_bytes  # activations and output gradients
            precondition_bytes = 8.0 * self.channels * element_bytes  # 4 inverse values, 2 gradient in, 2 out
        else:
            operands = rows * ((self.a_width or self.a_dim) + self.g_dim) * input_bytes
            precondition_bytes = (
                self.a_dim**2 + self.g_dim**2 + 4.0 * self.a_dim * self.g_dim
            ) * element_bytes
        im2col = (
            (batch * self.input_values + self.im2col_values(batch)) * input_bytes if self.unfolds else 0.0
        )
        return {
            "im2col": (0.0, float(im2col)),
            "factor products": (flop["forward"] + flop["backward"], operands + values * element_bytes),
            "statistics": (3.0 * values, 2.0 * values * element_bytes),
            "inversion": (self.inversion_flop(), 2.0 * values * element_bytes),
            "precondition": (self.precondition_flop(), float(precondition_bytes)),
        }


@dataclass
class ModelProfile:
    layers: list[LayerProfile]
    forward_macs_per_sample: int  # every Conv2d and Linear, K-FAC layer or not
    parameters: int  # trainable parameters (the gradient allreduce)
    image_size: int
    layer_names: list[str] = field(default_factory=list)


def profile_model(
    model: nn.Module, *, image_size: int = 224, in_channels: int = 3, include_batchnorm: bool = True
) -> ModelProfile:
    """Run one ``image_size`` image through a shape-only copy of ``model`` (meta device) and read every
    layer's input and output size. The caller's model is left untouched."""
    probe = copy.deepcopy(model).to("meta")
    shapes: dict[str, tuple] = {}

    def record(name: str, inputs: tuple, out: torch.Tensor) -> None:
        shapes[name] = (tuple(inputs[0].shape), tuple(out.shape))

    handles = [
        module.register_forward_hook(lambda _m, inputs, out, name=name: record(name, inputs, out))
        for name, module in probe.named_modules()
        if isinstance(module, (nn.Conv2d, nn.Linear, nn.BatchNorm2d))
    ]
    with torch.no_grad():
        probe(torch.empty(1, in_channels, image_size, image_size, device="meta"))
    for handle in handles:
        handle.remove()
    macs = 0
    layers: list[LayerProfile] = []
    for name, module in probe.named_modules():
        if name not in shapes:
            continue
        inputs, out = shapes[name]
        # (N, C, H, W) for Conv2d/BatchNorm2d; (N, ..., features) for Linear
        positions = math.prod(out[1:-1]) if isinstance(module, nn.Linear) else math.prod(out[2:])
        if isinstance(module, nn.Conv2d):
            macs += positions * module.out_channels * module.weight[0].numel()
        elif isinstance(module, nn.Linear):
            macs += positions * module.in_features * module.out_features
        layer = make_layer(name, module, include_batchnorm=include_batchnorm, factor_dtype=torch.float32)
        if layer is None:
            continue
        if isinstance(module, nn.BatchNorm2d):
            layers.append(
                LayerProfile(
                    name,
                    "batchnorm",
                    channels=module.num_features,
                    positions=positions,
                    input_values=math.prod(inputs[1:]),
                )
            )
        else:
            layers.append(
                LayerProfile(
                    name,
                    "kronecker",
                    a_dim=layer.a_dim,
                    g_dim=layer.g_dim,
                    positions=positions,
                    a_width=layer.a_dim - int(layer.has_bias),
                    unfolds=isinstance(layer, Conv2dLayer) and not layer._pointwise,
                    input_values=math.prod(inputs[1:]),
                )
            )
    parameters = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return ModelProfile(layers, macs, parameters, image_size, [layer.name for layer in layers])


@dataclass(frozen=True)
class Setup:
    """What a step is made of, besides the hardware."""

    world_size: int = 128
    batch_per_gpu: int = 128
    element_bytes: int = 4  # fp32 factors, inverses and gradients
    symmetric: bool = True  # triangles on the wire
    local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM
    control_bytes_per_layer: int = 4  # new interval of a due layer, in rank 0's part of the allgather


def travels(layer: LayerProfile, local_inverse_max_dim: int) -> bool:
    return not inverted_everywhere(layer.factor_shapes(), local_inverse_max_dim)


class StepModel:
    """Seconds per phase of one step, given which layers are due (weights in [0, 1])."""

    def __init__(self, profile: ModelProfile, network: Network, gpu: Gpu, setup: Setup) -> None:
        self.profile, self.network, self.gpu, self.setup = profile, network, gpu, setup
        self.travelling = [
            layer.name for layer in profile.layers if travels(layer, setup.local_inverse_max_dim)
        ]
        owners = assign_layers(
            {
                layer.name: layer.inversion_flop()
                for layer in profile.layers
                if layer.name in set(self.travelling)
            },
            setup.world_size,
        ).owner
        self.owner = owners
        self.by_name = {layer.name: layer for layer in profile.layers}

    def compute_seconds(self) -> dict[str, float]:
        flop = 2.0 * self.profile.forward_macs_per_sample * self.setup.batch_per_gpu
        return {"forward": self.gpu.seconds(flop), "backward": self.gpu.seconds(2 * flop)}

    def phases(
        self, due: Mapping[str, float], *, kfac: bool = True, adaptive: bool = False
    ) -> dict[str, float]:
        """``due``: layer → weight (1: due on this step; a fraction: the average step). Layers absent: 0."""
        s, net, gpu = self.setup, self.network, self.gpu
        times = dict.fromkeys(PHASES, 0.0)
        times.update(self.compute_seconds())
        times["gradient_allreduce"] = net.fused_allreduce(
            self.profile.parameters * s.element_bytes, s.world_size
        )
        times["factor_backward"] = 0.0
        if not kfac:
            return times
        factor = {"forward": 0.0, "backward": 0.0}  # seconds, by the hook that does the work
        factor_bytes = inverse_bytes = control = 0.0
        load = [0.0] * s.world_size
        local_load = precondition = 0.0
        for layer in self.profile.layers:
            precondition += layer.precondition_flop()
            weight = due.get(layer.name, 0.0)
            if not weight:
                continue
            for hook, flop in layer.factor_flop(s.batch_per_gpu).items():  # BatchNorm's sums: no GEMM
                factor[hook] += weight * gpu.seconds(flop, factor=layer.kind == "kronecker")
            im2col = layer.im2col_values(s.batch_per_gpu) * gpu.factor_input_bytes
            factor["forward"] += weight * gpu.memory_seconds(2 * im2col)  # written, then read by the product
            triangles = layer.triangle_bytes(s.element_bytes, s.symmetric)
            factor_bytes += weight * triangles
            control += weight * s.control_bytes_per_layer if adaptive else 0.0
            if layer.name in self.owner:
                inverse_bytes += weight * triangles
                load[self.owner[layer.name]] += weight * layer.inversion_flop()
            else:
                local_load += weight * layer.inversion_flop()
        times["factor"] = factor["forward"] + factor["backward"]
        times["factor_backward"] = factor["backward"]
        times["factor_allreduce"] = net.fused_allreduce(factor_bytes, s.world_size)
        times["inversion"] = gpu.seconds(local_load + max(load), inverse=True)
        times["inverse_allgather"] = net.allgather(inverse_bytes + control, s.world_size)
        times["precondition"] = gpu.seconds(precondition)
        return times

    def broadcast_scheme_seconds(self, due: Iterable[str], *, adaptive: bool) -> float:
        """The scheme before the allgather: one broadcast per inverse of every due layer (local inversion
        off), plus rank 0's schedule broadcast."""
        s, seconds, names = self.setup, 0.0, list(due)
        for name in names:
            for shape in self.by_name[name].factor_shapes().values():
                seconds += self.network.broadcast(
                    packed_numel(shape, s.symmetric) * s.element_bytes, s.world_size
                )
        if adaptive and names:
            seconds += self.network.broadcast(s.control_bytes_per_layer * len(names), s.world_size)
        return seconds


def step_seconds(times: Mapping[str, float]) -> dict[str, Any]:
    """Step time without and with overlap, and the critical path of the overlapped step."""
    allreduce = times["gradient_allreduce"] + times["factor_allreduce"]
    window = times["backward"] + times["factor_backward"]
    exposed = max(0.0, allreduce - window)
    compute = times["forward"] + times["backward"] + times["factor"]
    after = times["inversion"] + times["inverse_allgather"] + times["precondition"]
    path = {
        "forward + backward": times["forward"] + times["backward"],
        "factor computation": times["factor"],
        "exposed allreduce": exposed,
        "inversion": times["inversion"],
        "inverse allgather": times["inverse_allgather"],
        "precondition": times["precondition"],
    }
    return {
        "no_overlap": compute + allreduce + after,
        "overlap": compute + exposed + after,
        "allreduce": allreduce,
        "overlap_window": window,
        "exposed_allreduce": exposed,
        "allreduce_hidden": exposed == 0.0,
        "critical_path": {k: v for k, v in path.items() if v > 0},
        "bottleneck": max(path, key=path.get),
    }


def average_row(model: StepModel, schedule: Sequence[Iterable[str]], *, adaptive: bool) -> dict[str, Any]:
    """Phase times and step times averaged over the steps of a replayed schedule (the due layers of each
    step). Step times are averaged step by step, so a step that pays a big inversion is not smoothed."""
    cache: dict[frozenset, tuple] = {}
    totals = dict.fromkeys(PHASES + ("factor_backward",), 0.0)
    no_overlap = overlap = 0.0
    due_updates = 0
    for due in schedule:
        key = frozenset(due)
        if key not in cache:
            times = model.phases(dict.fromkeys(key, 1.0), adaptive=adaptive)
            cache[key] = (times, step_seconds(times))
        times, steps = cache[key]
        for phase in totals:
            totals[phase] += times[phase]
        no_overlap += steps["no_overlap"]
        overlap += steps["overlap"]
        due_updates += len(key)
    count = max(1, len(schedule))
    phases = {phase: value / count for phase, value in totals.items()}
    row = step_seconds(phases)
    row.update(no_overlap=no_overlap / count, overlap=overlap / count)
    return {
        "phases": phases,
        **row,
        "due_fraction": due_updates / (count * max(1, len(model.profile.layers))),
    }


def time_rows(
    model: StepModel, *, fractions: Sequence[tuple] = (), schedules: Sequence[tuple] = ()
) -> list[dict[str, Any]]:
    """Rows of the time table: SGD, K-FAC every step, then K-FAC with λ, once per (label, due fraction)
    (every layer due on that share of the steps: the average step's costs) and once per (label, schedule)
    (a replayed trace's due layers, step by step)."""
    every = dict.fromkeys(model.by_name, 1.0)
    rows = []
    for method, times in (("SGD", model.phases({}, kfac=False)), ("K-FAC, every step", model.phases(every))):
        rows.append(
            {
                "method": method,
                "due_fraction": 0.0 if method == "SGD" else 1.0,
                "phases": times,
                **step_seconds(times),
            }
        )
    for label, fraction in fractions:
        times = model.phases(dict.fromkeys(model.by_name, fraction), adaptive=True)
        rows.append(
            {"method": f"K-FAC, {label}", "due_fraction": fraction, "phases": times, **step_seconds(times)}
        )
    for label, schedule in schedules:
        rows.append({"method": f"K-FAC, {label}", **average_row(model, schedule, adaptive=True)})
    return rows


def time_to_accuracy(
    rows: Sequence[dict[str, Any]], *, kfac_steps: int, sgd_steps: int
) -> list[dict[str, Any]]:
    """Hours of each row's run (its steps × its overlapped step time) and the ratio to SGD's (rows[0])."""
    out = []
    for row in rows:
        steps = sgd_steps if row["method"] == "SGD" else kfac_steps
        out.append(
            {
                "method": row["method"],
                "steps": steps,
                "step_seconds": row["overlap"],
                "hours": steps * row["overlap"] / 3600,
            }
        )
    for entry in out:
        entry["x_sgd"] = entry["hours"] / out[0]["hours"]
    return out


def assumptions(model: StepModel) -> dict[str, Any]:
    net, gpu, s = model.network, model.gpu, model.setup
    return {
        "network": asdict(net),
        "gpu": asdict(gpu),
        "setup": asdict(s),
        "forward_gflop_per_image": 2 * model.profile.forward_macs_per_sample / 1e9,
        "parameters": model.profile.parameters,
        "image_size": model.profile.image_size,
        "layers": len(model.profile.layers),
        "locally_inverted_layers": len(model.profile.layers) - len(model.travelling),
        "travelling_layers": len(model.travelling),
    }
