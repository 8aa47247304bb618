"""Step-time model of distributed K-FAC: α-β collectives plus FLOP-counted compute, per phase.

A *model*, not a measurement. Hardware: :mod:`kfac_hvd.analysis.network` (defaults: the paper's ABCI
nodes, 4 V100 per node); per layer, bytes, messages and FLOPs: :func:`kfac_hvd.cost.layer_cost`, the
rules the runtime's traffic accounting uses. Defaults: 128 images per GPU at 224 px. Every constant is a
flag of ``python -m kfac_hvd.analysis.commodel --time``.

Compute (FLOP = 2 × multiply-add), per GPU, at ``peak × efficiency``:

* forward + backward: 3 × 2 × MACs of every Conv2d/Linear at its real output size (backward = 2 ×
  forward); BatchNorm, ReLU, pooling are not counted.
* factors: A = 2·rows·dim(A)², G = 2·rows·dim(G)², rows = batch × output positions (im2col), at the
  peak of the precision the products run in (``Gpu.factor_peak_flops``: fp32 without tensor cores, or the
  tf32/bf16/fp16 tensor cores of :data:`kfac_hvd.analysis.devices.DEVICES`); with ``Gpu.memory_bandwidth``
  the im2col columns of the k×k convolutions are also written and read once at that bandwidth;
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

from ..assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM, assign_layers
from ..cost import LayerCost, layer_cost, layer_kind
from ..layers import BatchNormLayer, Conv2dLayer, KroneckerLayer, Layer, make_layer
from .network import Gpu, Network

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


@dataclass(frozen=True, eq=False)
class LayerProfile:
    """A K-FAC layer (of a shape-only model) and what one forward pass shows of it: its output positions
    per sample (conv: H·W of the output; linear: 1; BatchNorm: H·W) and the values of one sample's input."""

    layer: Layer
    positions: int = 1
    input_values: int = 0

    @property
    def name(self) -> str:
        return self.layer.name

    @property
    def kind(self) -> str:
        return layer_kind(self.layer)

    @property
    def a_width(self) -> int:
        """Width of the rows the A hook multiplies: dim(A) without the bias column, which is added
        analytically (0 for BatchNorm)."""
        return self.layer.a_dim - int(self.layer.has_bias) if isinstance(self.layer, KroneckerLayer) else 0

    @property
    def unfolds(self) -> bool:
        """Whether the A hook's rows are im2col columns (k×k convolutions)."""
        return isinstance(self.layer, Conv2dLayer) and not self.layer._pointwise

    def cost(
        self,
        *,
        element_bytes: int = 4,
        symmetric: bool = True,
        local_inverse_max_dim: int = DEFAULT_LOCAL_INVERSE_MAX_DIM,
    ) -> LayerCost:
        return layer_cost(
            self.layer,
            symmetric=symmetric,
            element_bytes=element_bytes,
            local_inverse_max_dim=local_inverse_max_dim,
        )

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
        cost = self.cost(element_bytes=element_bytes)
        rows = batch * self.positions
        values = cost.values
        flop = cost.factor_flop(rows, batch)
        if isinstance(self.layer, BatchNormLayer):
            channels = self.layer.channels
            operands = 2.0 * rows * channels * input_bytes  # activations and output gradients
            # the inverse (4 values per channel unit-wise, (2C)² full), 2C gradient values in, 2C out
            precondition_bytes = (values + 4.0 * channels) * element_bytes
        else:
            a_dim, g_dim = self.layer.a_dim, self.layer.g_dim
            operands = rows * (self.a_width + g_dim) * input_bytes
            precondition_bytes = (a_dim**2 + g_dim**2 + 4.0 * a_dim * g_dim) * element_bytes
        im2col = (
            (batch * self.input_values + self.im2col_values(batch)) * input_bytes if self.unfolds else 0.0
        )
        return {
            "im2col": (0.0, float(im2col)),
            "factor products": (flop["forward"] + flop["backward"], operands + values * element_bytes),
            "statistics": (3.0 * values, 2.0 * values * element_bytes),
            "inversion": (cost.inversion_flop, 2.0 * values * element_bytes),
            "precondition": (cost.precondition_flop, float(precondition_bytes)),
        }


@dataclass
class ModelProfile:
    layers: list[LayerProfile]
    forward_macs_per_sample: int  # every Conv2d and Linear, K-FAC layer or not
    parameters: int  # trainable parameters (the gradient allreduce)
    image_size: int
    layer_names: list[str] = field(default_factory=list)


def _io_shapes(probe: nn.Module, image_size: int, in_channels: int) -> dict[str, tuple[tuple, tuple]]:
    """Input and output shape of every Conv2d, Linear and BatchNorm2d for one image (meta device)."""
    shapes: dict[str, tuple[tuple, tuple]] = {}

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
    return shapes


def profile_model(
    model: nn.Module,
    *,
    image_size: int = 224,
    in_channels: int = 3,
    include_batchnorm: bool = True,
    batchnorm_fisher: str = "unit_wise",
) -> ModelProfile:
    """Run one ``image_size`` image through a shape-only copy of ``model`` (meta device) and read every
    layer's input and output size. The caller's model is left untouched."""
    probe = copy.deepcopy(model).to("meta")
    shapes = _io_shapes(probe, image_size, in_channels)
    macs = 0
    layers: list[LayerProfile] = []
    for name, module in probe.named_modules():
        if name not in shapes:
            continue
        inputs, out = shapes[name]
        # (N, C, H, W) for Conv2d/BatchNorm2d; (N, ..., features) for Linear
        positions = math.prod(out[1:-1]) if isinstance(module, nn.Linear) else math.prod(out[2:])
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            macs += positions * module.weight.numel()  # per position: out × (in/groups · kh · kw) MACs
        layer = make_layer(
            name,
            module,
            include_batchnorm=include_batchnorm,
            factor_dtype=torch.float32,
            batchnorm_fisher=batchnorm_fisher,
        )
        if layer is not None:
            layers.append(LayerProfile(layer, positions, math.prod(inputs[1:])))
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


class StepModel:
    """Seconds per phase of one step, given which layers are due (weights in [0, 1])."""

    def __init__(self, profile: ModelProfile, network: Network, gpu: Gpu, setup: Setup) -> None:
        self.profile, self.network, self.gpu, self.setup = profile, network, gpu, setup
        self.costs = {
            layer.name: layer.cost(
                element_bytes=setup.element_bytes,
                symmetric=setup.symmetric,
                local_inverse_max_dim=setup.local_inverse_max_dim,
            )
            for layer in profile.layers
        }
        self.travelling = [name for name, cost in self.costs.items() if cost.travels]
        self.owner = assign_layers(
            {name: self.costs[name].inversion_flop for name in self.travelling}, setup.world_size
        ).owner
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
            cost = self.costs[layer.name]
            precondition += cost.precondition_flop
            weight = due.get(layer.name, 0.0)
            if not weight:
                continue
            for hook, flop in cost.factor_flop(s.batch_per_gpu * layer.positions, s.batch_per_gpu).items():
                # BatchNorm's sums are no GEMM: the fp32 rate
                factor[hook] += weight * gpu.seconds(flop, factor=cost.kind == "kronecker")
            im2col = layer.im2col_values(s.batch_per_gpu) * gpu.factor_input_bytes
            factor["forward"] += weight * gpu.memory_seconds(2 * im2col)  # written, then read by the product
            factor_bytes += weight * cost.payload_bytes()
            control += weight * s.control_bytes_per_layer if adaptive else 0.0
            if cost.travels:
                inverse_bytes += weight * cost.payload_bytes()
                load[self.owner[layer.name]] += weight * cost.inversion_flop
            else:
                local_load += weight * cost.inversion_flop
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
            cost = self.costs[name]
            for kind in cost.factor_shapes:
                seconds += self.network.broadcast(cost.payload_bytes([kind]), s.world_size)
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
        "bottleneck": max(path, key=lambda phase: path[phase]),
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
