"""The traffic model (exact bytes at the paper's scale, the replay of a recorded schedule) and the
step-time model (hand-computed α-β and FLOP values, overlap, the limit of an infinitely fast network).

Expected values are computed here from torchvision's modules and from the formulas, not through
kfac_hvd's layer objects."""

import json
import math
import subprocess
import sys
from fractions import Fraction

import pytest
import torch
from torch import nn

from kfac_hvd.analysis import commodel, replay, traffic
from kfac_hvd.analysis import timemodel as tm
from kfac_hvd.comm import every_step_cost
from kfac_hvd.cost import layer_costs

P = 128
STEPS = 2814


def tri(n):
    return n * (n + 1) // 2


def resnet50_shapes():
    """(dim A, dim G) of ResNet-50's 54 Kronecker layers and its 53 BatchNorm channel counts, read from
    torchvision's modules (im2col width + 1 for a bias; output channels)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50()
    kron, bn = [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            kron.append(
                (
                    module.in_channels // module.groups * kh * kw + (module.bias is not None),
                    module.out_channels,
                )
            )
        elif isinstance(module, nn.Linear):
            kron.append((module.in_features + (module.bias is not None), module.out_features))
        elif isinstance(module, nn.BatchNorm2d):
            bn.append(module.num_features)
    return model, kron, bn


def costs_of(model, **scheme):
    """The K-FAC layers' costs, fp32."""
    return list(layer_costs(traffic.model_layers(model), element_bytes=4, **scheme).values())


def expected_traffic(kron, bn, ranks, steps, max_dim=256):
    """Exact per-rank bytes: triangles (n(n+1)/2 per matrix, 3 per BN channel), 4 bytes each; factors
    allreduced (2(P-1)/P), inverses of the layers wider than max_dim allgathered ((P-1)/P)."""
    factors = 4 * (sum(tri(a) + tri(g) for a, g in kron) + sum(3 * c for c in bn))
    inverses = 4 * sum(tri(a) + tri(g) for a, g in kron if max(a, g) > max_dim)
    wire = steps * (Fraction(2 * (ranks - 1), ranks) * factors + Fraction(ranks - 1, ranks) * inverses)
    return factors, inverses, wire


def test_resnet50_every_step_traffic_exact_at_paper_scale():
    model, kron, bn = resnet50_shapes()
    assert len(kron) == 54 and len(bn) == 53
    assert kron[0] == (147, 64) and kron[-1] == (2049, 1000)
    local_kron = [shape for shape in kron if max(shape) <= 256]
    assert len(local_kron) == 9  # conv1, layer1's 1x1 convs and downsample, layer2.0.conv1
    factors, inverses, wire = expected_traffic(kron, bn, P, STEPS)
    result = traffic.every_step_traffic(costs_of(model), P, STEPS)
    assert result["layers"] == 107
    assert result["locally_inverted_layers"] == 62 and result["travelling_layers"] == 45
    assert result["factor_values"] == 153_957_802  # METHOD.md: 153.9 M values, 615 MB in fp32
    assert result["factor_payload_bytes_per_step"] == factors
    assert result["inverse_payload_bytes_per_step"] == inverses
    assert result["payload_bytes_per_rank"] == STEPS * (factors + inverses)
    assert abs(result["wire_bytes_per_rank"] - wire) < 1  # to the byte, over the whole run
    assert (
        abs(result["factor_allreduce_wire_bytes_per_rank"] - STEPS * Fraction(2 * (P - 1), P) * factors) < 1
    )
    assert result["factor_allreduce_tensors_per_step"] == 2 * 54 + 53
    assert result["inverse_allgathers_per_step"] == 1
    dense = STEPS * Fraction(2 * (P - 1), P) * 153_957_802 * 4
    assert abs(result["allreduce_only_dense_wire_bytes_per_rank"] - dense) < 1
    # The library's own accounting (KFAC.comm_stats' every-step figures) agrees with the model.
    library = every_step_cost(costs_of(model), P)
    assert abs(STEPS * library["every_step_wire_bytes"] - wire) < 1


@pytest.mark.parametrize("max_dim, local", [(0, 53), (10**6, 107)])
def test_local_inverse_max_dim_moves_layers_out_of_the_allgather(max_dim, local):
    model, kron, bn = resnet50_shapes()
    factors, inverses, wire = expected_traffic(kron, bn, P, STEPS, max_dim)
    result = traffic.every_step_traffic(costs_of(model, local_inverse_max_dim=max_dim), P, STEPS)
    assert result["locally_inverted_layers"] == local
    assert result["inverse_payload_bytes_per_step"] == inverses
    assert abs(result["wire_bytes_per_rank"] - wire) < 1
    assert result["inverse_allgathers_per_step"] == (0 if local == 107 else 1)


def test_scheme_comparison_resnet50():
    model, kron, bn = resnet50_shapes()
    s = traffic.scheme_comparison(costs_of(model), P)
    all_inverses = 4 * (sum(tri(a) + tri(g) for a, g in kron) + sum(3 * c for c in bn))
    local_bytes = 4 * (sum(tri(a) + tri(g) for a, g in kron if max(a, g) <= 256) + sum(3 * c for c in bn))
    assert s["broadcast_scheme"]["broadcasts"] == 161 and s["broadcast_scheme"]["roots"] == 107
    assert s["broadcast_scheme"]["schedule_broadcasts"] == 1
    assert s["broadcast_scheme"]["wire_bytes"] == all_inverses  # a broadcast: n per rank
    assert s["allgather_scheme"] == {
        "allgathers": 1,
        "layers": 45,
        "matrices": 90,
        "payload_bytes": all_inverses - local_bytes,
        "wire_bytes": pytest.approx(127 / 128 * (all_inverses - local_bytes), rel=1e-15),
        "control_payload_bytes": 4 * 107,
    }
    removed = s["local_inversion_removes"]
    assert (
        removed["layers"],
        removed["batchnorm_layers"],
        removed["kronecker_layers"],
        removed["matrices"],
    ) == (62, 53, 9, 71)
    assert removed["payload_bytes"] == local_bytes


# Replay ------------------------------------------------------------------------------------------
def trace_records(layers, steps, diff):
    """A synthetic metrics.jsonl: ``layers`` kronecker layers whose diff is always ``diff``."""
    return [
        {
            "step": t,
            "layers": {
                name: {"due": True, "diff_A": None if t == 1 else diff, "diff_G": None} for name in layers
            },
        }
        for t in range(1, steps + 1)
    ]


def linear_layers(*widths):
    return costs_of(nn.Sequential(*[nn.Linear(width, 4) for width in widths]))


# Due steps counted by hand (METHOD.md): factors that never change are due at 1, 2, 4, 6, ..., 40
# under "modulo" (interval k+1 after the update at 2k), at 1, 2, 4, 7, 11, 16, 22, 29, 37 under
# "since_last"; factors that always change are due on every step.
@pytest.mark.parametrize(
    "policy, diff, due",
    [
        ("modulo", 0.0, [1] + list(range(2, 41, 2))),
        ("since_last", 0.0, [1, 2, 4, 7, 11, 16, 22, 29, 37]),
        ("modulo", 0.9, list(range(1, 41))),
    ],
)
def test_replay_due_steps_counted_by_hand(policy, diff, due):
    layers = linear_layers(4, 4, 300)  # two small layers (inverted everywhere) and one whose inverses travel
    records = trace_records([layer.name for layer in layers], 50, diff)
    replayed = replay.replay_trace(
        records, layers, 40, 4, update_threshold=0.25, interval_policy=policy, keep_schedule=True
    )
    assert [t for t, names in enumerate(replayed["schedule"], 1) if names] == due
    assert all(len(names) == 3 for names in replayed["schedule"] if names)
    assert replayed["layer_updates"] == 3 * len(due)
    assert replayed["ratio"] == pytest.approx(len(due) / 40)
    # Per update, at P = 4: Linear(4, 4): A 5x5, G 4x4 -> (15 + 10) * 4 = 100 bytes, allreduce only
    # (2 * 3/4); Linear(300, 4): A 301x301, G 4x4 -> (45451 + 10) * 4 bytes, allreduce + allgather (3/4).
    small, big = 100, (tri(301) + tri(4)) * 4
    per_step = 2 * (1.5 * small) + 1.5 * big + 0.75 * big
    assert replayed["wire_bytes_per_rank"] == pytest.approx(len(due) * per_step, rel=1e-12)
    assert replayed["inverse_allgather_wire_bytes_per_rank"] == pytest.approx(
        len(due) * 0.75 * big, rel=1e-12
    )
    assert replayed["inverse_allgathers"] == len(due)
    assert replayed["control_wire_bytes_per_rank"] == pytest.approx(len(due) * 0.75 * 4 * 3)


def test_replay_maps_other_names_by_depth():
    layers = linear_layers(4, 4)
    records = trace_records(["a", "b", "c"], 20, 0.9)  # other names: mapped by depth
    replayed = replay.replay_trace(records, layers, 100, 8, update_threshold=0.25)
    assert replayed["ratio"] == pytest.approx(1.0)


def test_map_layers_by_type_and_depth():
    mapping = replay.map_layers(
        {"x1": "kronecker", "x2": "batchnorm", "x3": "kronecker"},
        {"a": "kronecker", "b": "batchnorm", "c": "kronecker", "d": "kronecker"},
    )
    assert mapping == {"x1": "a", "x3": "d", "x2": "b"}


def test_bad_trace_is_one_clear_error(tmp_path):
    bad = tmp_path / "metrics.jsonl"
    bad.write_text("{not json\n")
    with pytest.raises(ValueError, match="metrics.jsonl:1"):
        replay.load_trace(str(bad))


# Time model --------------------------------------------------------------------------------------
def test_alpha_beta_by_hand():
    net = tm.Network()  # 4 GPUs per node, NVLink 50 GB/s, node 25 GB/s, α 50 µs + 5 µs inter / 2 µs intra
    n = 1e8
    # flat ring over 32 nodes: 254 inter-node steps; 2*127/128 * 1e8 B at 25 GB/s = 7.9375 ms
    assert net.allreduce(n, 128) == pytest.approx(50e-6 + 254 * 5e-6 + 7.9375e-3, rel=1e-12)
    assert net.allgather(n, 128) == pytest.approx(50e-6 + 127 * 5e-6 + 3.96875e-3, rel=1e-12)
    assert net.broadcast(n, 128) == pytest.approx(50e-6 + 127 * 5e-6 + 4e-3, rel=1e-12)
    # one node: NVLink only, 6 steps of 2 µs, 1.5 * 1e8 B at 50 GB/s = 3 ms
    assert net.allreduce(n, 4) == pytest.approx(50e-6 + 6 * 2e-6 + 3e-3, rel=1e-12)
    # hierarchical: ring of 4 inside the node (3 ms + 12 µs) around a ring of 32 nodes (2*31/32 * 4 ms + 62 * 5 µs)
    hier = tm.Network(topology="hierarchical")
    assert hier.allreduce(n, 128) == pytest.approx(50e-6 + 12e-6 + 3e-3 + 310e-6 + 7.75e-3, rel=1e-12)
    # fusion: 100 MiB in 64 MiB buffers = 2 messages of 50 MiB
    mib = 2**20
    assert net.fused_allreduce(100 * mib, 128) == pytest.approx(2 * net.allreduce(50 * mib, 128), rel=1e-12)
    assert net.allreduce(n, 1) == 0.0


def tiny_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.Flatten(), nn.Linear(8 * 8 * 8, 10)
    )


def test_flop_counts_by_hand():
    """8x8 images: conv A 27 wide, G 8, 64 positions; BN 8 channels x 64 positions; linear A 513, G 10."""
    profile = tm.profile_model(tiny_model(), image_size=8)
    assert profile.forward_macs_per_sample == 64 * 8 * 27 + 512 * 10
    assert profile.parameters == 3 * 8 * 9 + 2 * 8 + 512 * 10 + 10
    one = tm.Gpu(peak_flops=1.0, efficiency=1.0, inverse_efficiency=1.0)  # seconds = FLOP
    free = tm.Network(
        alpha_message=0, alpha_intra=0, alpha_inter=0, nvlink_bandwidth=math.inf, node_bandwidth=math.inf
    )
    model = tm.StepModel(profile, free, one, tm.Setup(world_size=2, batch_per_gpu=2))
    times = model.phases(dict.fromkeys(profile.layer_names, 1.0))
    forward = 2 * 2 * (64 * 8 * 27 + 512 * 10)
    assert times["forward"] == forward and times["backward"] == 2 * forward
    factor_a = 2 * (2 * 64) * 27**2 + 2 * 2 * 513**2
    factor_backward = 2 * (2 * 64) * 8**2 + 8 * (2 * 64) * 8 + 2 * 2 * 10**2
    assert times["factor"] == factor_a + factor_backward and times["factor_backward"] == factor_backward
    # linear (513 wide) travels, owned by one rank; conv (27, 8) and BN are inverted everywhere
    assert times["inversion"] == 513**3 + 10**3 + 27**3 + 8**3 + 8 * 8
    assert times["precondition"] == 2 * (8**2 * 27 + 8 * 27**2) + 8 * 8 + 2 * (10**2 * 513 + 10 * 513**2)


def resnet_model(network=None, gpu=None, ranks=128):
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50()
    return tm.StepModel(
        tm.profile_model(model), network or tm.Network(), gpu or tm.Gpu(), tm.Setup(world_size=ranks)
    )


def test_resnet50_profile():
    model = resnet_model()
    assert len(model.profile.layers) == 107 and len(model.travelling) == 45
    assert model.profile.parameters == 25_557_032
    assert 4.08e9 < model.profile.forward_macs_per_sample < 4.12e9  # the usual "4.1 GFLOPs" (MACs)
    # Every-step inversion at 128 ranks: the most loaded rank owns one of layer4's 3x3 convs (A 4608, G 512),
    # and every rank inverts the 62 local layers (9 Kronecker, 53 BatchNorm at 8 FLOP per channel).
    _, kron, bn = resnet50_shapes()
    local = sum(a**3 + g**3 for a, g in kron if max(a, g) <= 256) + 8 * sum(bn)
    times = model.phases(dict.fromkeys(model.profile.layer_names, 1.0))
    assert times["inversion"] == pytest.approx((4608**3 + 512**3 + local) / (15.7e12 * 0.25), rel=1e-12)


def test_infinitely_fast_network_leaves_compute_only():
    free = tm.Network(
        alpha_message=0, alpha_intra=0, alpha_inter=0, nvlink_bandwidth=math.inf, node_bandwidth=math.inf
    )
    rows = {row["method"]: row for row in tm.time_rows(resnet_model(free))}
    sgd, kfac = rows["SGD"], rows["K-FAC, every step"]
    compute = kfac["phases"]["factor"] + kfac["phases"]["inversion"] + kfac["phases"]["precondition"]
    assert compute > 0
    for key in ("no_overlap", "overlap"):
        assert kfac[key] == pytest.approx(sgd[key] + compute, rel=1e-12)
    assert sgd["overlap"] == sgd["no_overlap"]


@pytest.mark.parametrize("node_gbs", [0.5, 5, 25, 250])
@pytest.mark.parametrize("ranks", [4, 128, 1024])
def test_overlap_never_slower_and_slower_network_never_faster(node_gbs, ranks):
    net = tm.Network(node_bandwidth=node_gbs * 1e9)
    slower = tm.Network(node_bandwidth=node_gbs * 1e9 / 2)
    schedule = [["conv1", "fc"], [], ["layer4.2.conv2"]]
    rows = tm.time_rows(resnet_model(net, ranks=ranks), fractions=[("f", 0.3)], schedules=[("s", schedule)])
    slow_rows = tm.time_rows(
        resnet_model(slower, ranks=ranks), fractions=[("f", 0.3)], schedules=[("s", schedule)]
    )
    for row, slow in zip(rows, slow_rows):
        assert row["overlap"] <= row["no_overlap"]
        assert row["overlap"] >= row["no_overlap"] - row["allreduce"] - 1e-15  # hides at most the allreduces
        assert slow["overlap"] >= row["overlap"] and slow["no_overlap"] >= row["no_overlap"]


def test_overlap_hides_allreduces_only_up_to_the_backward_window():
    times = dict.fromkeys(tm.PHASES + ("factor_backward",), 0.0)
    times.update(
        forward=1.0,
        backward=2.0,
        factor=0.5,
        factor_backward=0.25,
        gradient_allreduce=1.5,
        factor_allreduce=1.25,
        inversion=0.1,
        inverse_allgather=0.2,
        precondition=0.3,
    )
    steps = tm.step_seconds(times)
    assert steps["no_overlap"] == pytest.approx(1 + 2 + 0.5 + 2.75 + 0.6)
    assert steps["exposed_allreduce"] == pytest.approx(2.75 - 2.25)
    assert steps["overlap"] == pytest.approx(1 + 2 + 0.5 + 0.5 + 0.6)
    assert steps["bottleneck"] == "forward + backward"


def test_due_fraction_and_schedule_rows():
    model = resnet_model()
    names = model.profile.layer_names
    every = model.phases(dict.fromkeys(names, 1.0))
    rows = tm.time_rows(model, fractions=[("f", 0.25)], schedules=[("s", [names, [], [], []])])
    fraction, replay = rows[2], rows[3]
    assert fraction["phases"]["factor"] == pytest.approx(0.25 * every["factor"], rel=1e-12)
    assert fraction["phases"]["inversion"] == pytest.approx(0.25 * every["inversion"], rel=1e-12)
    assert replay["due_fraction"] == 0.25
    # one step in four pays everything, the others only SGD + preconditioning (the mean of the steps)
    sgd = model.phases({}, kfac=False)
    for phase in ("factor", "inversion", "factor_allreduce"):
        assert replay["phases"][phase] == pytest.approx(every[phase] / 4, rel=1e-12)
    assert replay["no_overlap"] > tm.step_seconds(sgd)["no_overlap"]


# CLI ---------------------------------------------------------------------------------------------
def run_cli(*args, module="kfac_hvd.analysis.commodel"):
    return subprocess.run(
        [sys.executable, "-m", module, *args], capture_output=True, text=True, check=True
    ).stdout


def test_cli_traffic_time_and_trace(tmp_path):
    trace = tmp_path / "metrics.jsonl"
    _, kron, bn = resnet50_shapes()
    with torch.device("meta"):
        layers = traffic.model_layers(__import__("torchvision").models.resnet50())
    with trace.open("w") as handle:
        for record in trace_records(
            [layer.name for layer in layers if "F" not in layer.factor_shapes()], 30, 0.0
        ):
            handle.write(json.dumps({"kfac": record}) + "\n")
    markdown = tmp_path / "time.md"
    result = json.loads(run_cli("--trace", str(trace), "--time", "--json", "--markdown", str(markdown)))
    assert result["layers"] == 107 and result["steps"] == 2815
    assert abs(result["wire_bytes_per_rank"] - expected_traffic(kron, bn, P, 2815)[2]) < 1
    assert 0 < result["replay"]["ratio"] < 0.6
    methods = [row["method"] for row in result["time"]["rows"]]
    assert (
        methods[:2] == ["SGD", "K-FAC, every step"] and len(methods) == 4 and "replayed trace" in methods[3]
    )
    assert result["time"]["assumptions"]["network"]["node_bandwidth"] == 25e9
    text = markdown.read_text()
    assert "A model, not a measurement" in text and "--time" in text and "| SGD |" in text
    plain = run_cli("--local-inverse-max-dim", "0")
    assert "3.0 TB" in plain and "the other 54 layers" in plain and "(53 layers)" in plain
    # λ is checked as a training run checks it: one line naming the option, exit 2
    bad = subprocess.run(
        [
            sys.executable,
            "-m",
            "kfac_hvd.analysis.commodel",
            "--trace",
            str(trace),
            "--update-threshold",
            "0",
        ],
        capture_output=True,
        text=True,
    )
    assert bad.returncode == 2 and "update_threshold" in bad.stderr and "Traceback" not in bad.stderr


# Device rates and the precision of the factor products ---------------------------------------------
def test_device_kinds_from_torch_names():
    from kfac_hvd.analysis.devices import device_kind

    assert device_kind("NVIDIA H200") == "H200" and device_kind("NVIDIA H100 80GB HBM3") == "H100"
    assert device_kind("NVIDIA A100-SXM4-80GB") == "A100" and device_kind("Tesla V100-SXM2-16GB") == "V100"
    assert device_kind("cpu") is None


def test_factor_products_at_the_rate_of_their_precision_by_hand():
    """tiny_model at 8x8, batch 2, on a V100 with fp16 products: the Kronecker products at 125 TFLOP/s,
    BatchNorm's sums at the fp32 15.7, the 3x3 conv's im2col columns (2 x 64 rows x 27, 2 bytes each)
    written and read at 900 GB/s x 0.7."""
    profile = tm.profile_model(tiny_model(), image_size=8)
    free = tm.Network(
        alpha_message=0, alpha_intra=0, alpha_inter=0, nvlink_bandwidth=math.inf, node_bandwidth=math.inf
    )
    gpu = tm.Gpu.of("V100", factor_precision="fp16")
    assert (gpu.peak_flops, gpu.factor_peak_flops, gpu.factor_input_bytes) == (15.7e12, 125e12, 2)
    times = tm.StepModel(profile, free, gpu, tm.Setup(world_size=2, batch_per_gpu=2)).phases(
        dict.fromkeys(profile.layer_names, 1.0)
    )
    kronecker = 2 * 128 * 27**2 + 2 * 2 * 513**2 + 2 * 128 * 8**2 + 2 * 2 * 10**2
    batchnorm = 8 * 128 * 8
    im2col = 2 * (2 * 64 * 27) * 2
    expected = kronecker / (125e12 * 0.6) + batchnorm / (15.7e12 * 0.6) + im2col / (900e9 * 0.7)
    assert times["factor"] == pytest.approx(expected, rel=1e-12)
    assert times["precondition"] == pytest.approx(
        (2 * (8**2 * 27 + 8 * 27**2) + 8 * 8 + 2 * (10**2 * 513 + 10 * 513**2)) / (15.7e12 * 0.6), rel=1e-12
    )
    with pytest.raises(ValueError, match="V100 has no bf16"):
        tm.Gpu.of("V100", factor_precision="bf16")


def test_phase_costs_of_a_3x3_conv_by_hand():
    """Conv2d(3, 8, 3, padding=1, no bias) on 8x8: 64 positions, im2col rows of 27; batch 2, fp32."""
    conv = tm.profile_model(tiny_model(), image_size=8).layers[0]
    assert (conv.a_width, conv.unfolds, conv.input_values) == (27, True, 3 * 64)
    costs = conv.phase_costs(2)
    rows = 2 * 64
    assert costs["im2col"] == (0.0, (2 * 3 * 64 + rows * 27) * 4)
    assert costs["factor products"] == (2 * rows * (27**2 + 8**2), (rows * (27 + 8) + 27**2 + 8**2) * 4)
    assert costs["inversion"] == (27**3 + 8**3, 2 * (27**2 + 8**2) * 4)
    assert costs["precondition"][1] == (27**2 + 8**2 + 4 * 27 * 8) * 4


def test_resnet50_factor_cost_at_224_px_and_128_images():
    """The FLOPs of the factor products and the im2col values, from ResNet-50's output sizes by hand:
    conv1 (7x7, 147 wide) at 112x112, the 3x3 convs of the four stages (64, 128, 256, 512 channels:
    576, 1152, 2304, 4608 wide) at 56, 28, 14, 7 (each stage's first 3x3 conv has stride 2 but for the first)."""
    profile = resnet_model().profile
    columns = 112**2 * 147 + 3 * 56**2 * 576 + 4 * 28**2 * 1152 + 6 * 14**2 * 2304 + 3 * 7**2 * 4608
    assert sum(layer.im2col_values(128) for layer in profile.layers) == 128 * columns  # 1.83 G values
    products = sum(
        layer.phase_costs(128)["factor products"][0] for layer in profile.layers if layer.kind == "kronecker"
    )
    assert products == pytest.approx(6.42e12, rel=2e-3)


def test_time_to_accuracy_by_hand():
    rows = [{"method": "SGD", "overlap": 0.3}, {"method": "K-FAC", "overlap": 0.5}]
    sgd, kfac = tm.time_to_accuracy(rows, kfac_steps=2814, sgd_steps=7037)
    assert sgd["hours"] == pytest.approx(7037 * 0.3 / 3600) and sgd["x_sgd"] == 1.0
    assert kfac["steps"] == 2814 and kfac["x_sgd"] == pytest.approx(2814 * 0.5 / (7037 * 0.3))


def test_cli_models_each_factor_precision(capsys):
    assert commodel.main(["--time", "--json", "--steps", "2814", "--factor-precision", "fp32,fp16"]) == 0
    result = json.loads(capsys.readouterr().out)
    rows = {row["method"]: row for row in result["time"]["rows"]}
    assert len(rows) == 5 and list(rows)[0] == "SGD"
    fp32, fp16 = (
        rows["K-FAC, every step [fp32 factor products]"],
        rows["K-FAC, every step [fp16 factor products]"],
    )
    assert fp16["phases"]["factor"] < fp32["phases"]["factor"] / 5
    assert fp16["phases"]["inversion"] == fp32["phases"]["inversion"]
    accuracy = result["time"]["time_to_accuracy"]
    assert [entry["steps"] for entry in accuracy] == [90 * 1_281_167 // 16384] + [2814] * 4
    with pytest.raises(SystemExit, match="V100 has no bf16"):
        commodel.main(["--time", "--factor-precision", "bf16"])
