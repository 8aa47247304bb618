"""batchnorm_fisher="full": one 2C×2C Fisher block per BatchNorm layer over g = [g_γ; g_β], as the paper's
released code (chainerkfac) builds it, against direct computations: the block, its damped preconditioned
gradient, its Diff, its inversion next to factors of its size, its travel in the inverse allgather, a
checkpoint, and the element count behind the paper's Table 1 figure for ResNet-50 (3.00 TB).

Per-sample gradients come from torch.func (eval mode: running statistics make samples independent) or
from the formula of tests/helpers/direct_factors.py (train mode: x̂ from the batch's statistics)."""

import copy

import pytest
import torch
from torch import nn

import kfac_hvd
import kfac_hvd.factors
from kfac_hvd.analysis import commodel, traffic
from kfac_hvd.comm import every_step_cost
from kfac_hvd.cost import layer_costs
from kfac_hvd.diagnostics import HostSyncCounter
from kfac_hvd.layers import FullBatchNormLayer
from tests.helpers.direct_factors import (
    direct_factors,
    eval_batchnorm_per_sample_grads,
    forward_backward,
    make_model,
    step_inputs,
)
from tests.helpers.mirror_comm import MirrorCommunicator
from tests.helpers.models import small_cnn, stack

TIGHT = dict(rtol=1e-10, atol=1e-10)  # float64 throughout


def tri(n):
    return n * (n + 1) // 2


def per_sample_bn_gradients(model, seen):
    """(n, 2C) rows [Σ_hw δ·x̂ for each channel, then Σ_hw δ for each channel], δ = N·grad_output and x̂
    from the whole batch's statistics, as BatchNorm normalised it (tests/helpers/direct_factors.py's formula)."""
    whole = seen["bn_in"]
    mean = whole.mean(dim=(0, 2, 3), keepdim=True)
    variance = whole.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (whole - mean) / torch.sqrt(variance + model.bn.eps)
    delta = whole.shape[0] * seen["bn_grad"]
    return torch.cat([(delta * x_hat).sum(dim=(2, 3)), delta.sum(dim=(2, 3))], dim=1)


def direct_full_block(model, seen):
    rows = per_sample_bn_gradients(model, seen)
    return rows.t() @ rows / rows.shape[0]


def test_full_block_is_the_mean_outer_product_of_exact_per_sample_gradients():
    """Eval mode, where torch.func's per-sample gradients of (γ, β) are exact: the layer's block is
    mean_n g_n g_nᵀ over g_n = [∂l_n/∂γ; ∂l_n/∂β] (2C values), and its diagonal 2×2 sub-blocks are the
    unit-wise blocks."""
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.eval()
    full = kfac_hvd.KFAC(bn, batchnorm_fisher="full").layers[""]
    unit_wise = kfac_hvd.KFAC(bn).layers[""]
    assert isinstance(full, FullBatchNormLayer) and full.factor_shapes() == {"F": (6, 6)}
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    target = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    per_sample = eval_batchnorm_per_sample_grads(bn, x, target)
    g = torch.cat([per_sample["weight"], per_sample["bias"]], dim=1)  # (N, 2C): the C γ's, then the C β's
    expected = g.t() @ g / x.shape[0]

    grad_output = (2 * (bn(x) - target) / x.numel()).detach()
    contribution, samples = full.f_contribution(x, grad_output)
    torch.testing.assert_close(contribution * samples, expected, **TIGHT)  # the capture's N²·Σ/N
    blocks, _ = unit_wise.f_contribution(x, grad_output)
    for c in range(3):
        torch.testing.assert_close(contribution[[c, c + 3]][:, [c, c + 3]], blocks[c], **TIGHT)
    # Chunked over samples (the unfold_chunk_bytes cap), the same block.
    chunked, _ = full.f_contribution(x, grad_output, chunk_bytes=1)
    torch.testing.assert_close(chunked, contribution, **TIGHT)


def test_full_block_and_preconditioned_gradient_in_a_train_mode_step():
    """A KFAC step on a conv → BatchNorm → linear net in training mode: the stored block is the direct
    per-sample outer product / n, and BatchNorm's new (γ, β) gradient is (F + γI)⁻¹ g, with F, g and the
    solve computed here; the other layers' factors are as without the option."""
    damping = 1e-2
    model = make_model()
    kfac = kfac_hvd.KFAC(model, damping=damping, batchnorm_fisher="full")
    seen = forward_backward(model, *step_inputs(1, 8, seed=0))
    gradient = torch.cat([model.bn.weight.grad, model.bn.bias.grad]).clone()
    kfac.step()

    F = direct_full_block(model, seen)
    torch.testing.assert_close(kfac.factors["bn"]["F"], F, **TIGHT)
    rows = per_sample_bn_gradients(model, seen)
    torch.testing.assert_close(rows.mean(0), gradient, **TIGHT)  # the per-sample gradients are BN's own
    expected = torch.linalg.solve(F + damping * torch.eye(6, dtype=torch.float64), gradient)
    torch.testing.assert_close(torch.cat([model.bn.weight.grad, model.bn.bias.grad]), expected, **TIGHT)
    assert (expected - gradient).abs().max() > 1e-3  # preconditioning really changed it

    others = direct_factors(model, seen)
    for name, kind in (("conv", "A"), ("conv", "G"), ("fc", "A"), ("fc", "G")):
        torch.testing.assert_close(kfac.factors[name][kind], others[(name, kind)], **TIGHT)


def test_diff_and_interval_of_the_full_block_follow_algorithm_1():
    """Two steps on different inputs: the record's diff_F is Eq. (6) on the directly computed 2C×2C
    blocks, and Algorithm 1 doubles BatchNorm's interval when that Diff is below λ."""
    model = make_model()
    kfac = kfac_hvd.KFAC(model, batchnorm_fisher="full", update_threshold=1e3)
    blocks, records = [], []
    for step in (1, 2):
        seen = forward_backward(model, *step_inputs(step, 8, seed=0))
        blocks.append(direct_full_block(model, seen))
        records.append(kfac.step())
    expected = float(torch.linalg.norm(blocks[1] - blocks[0]) / torch.linalg.norm(blocks[0]))
    assert expected > 0.05
    assert records[0]["layers"]["bn"]["diff_F"] is None
    assert records[1]["layers"]["bn"]["diff_F"] == pytest.approx(expected, rel=1e-9)
    assert records[1]["layers"]["bn"]["interval"] == 2


def syncs_per_pass_and_step(model, steps, **options):
    """Host reads during each forward/backward pass (the capture hooks) and each ``kfac.step``."""
    torch.manual_seed(0)
    kfac = kfac_hvd.KFAC(model, update_threshold=1e9, **options)  # every diff below λ: intervals grow
    passes, counts = [], []
    for _ in range(steps):
        model.zero_grad()
        with HostSyncCounter() as syncs:
            nn.functional.cross_entropy(model(torch.randn(8, 1, 6, 6)), torch.randint(0, 3, (8,))).backward()
        passes.append(syncs.count)
        with HostSyncCounter() as syncs:
            kfac.step(lr=0.1)
        counts.append(syncs.count)
    return passes, counts


@pytest.mark.parametrize("max_dim", [256, 4])
def test_host_syncs_do_not_grow_with_the_number_of_full_blocks(max_dim):
    """As tests/kfac_hvd/test_hot_path.py with unit-wise blocks: with 10 BatchNorm layers, no host read in the
    hooks, two on an update step and none otherwise (due at steps 1, 2, 4, 6), whether the 8×8 blocks
    are inverted everywhere or by an owner."""
    options = dict(batchnorm_fisher="full", local_inverse_max_dim=max_dim)
    passes, counts = syncs_per_pass_and_step(stack(21), 6, **options)
    assert passes == [0] * 6
    assert counts == [2, 2, 0, 2, 0, 2]


def lone_bn_net():
    """BatchNorm2d(5) → pooled → Linear(5, 3): the 10×10 full block is the widest factor (A 6, G 3)."""
    return nn.Sequential(
        nn.Conv2d(2, 5, 1, bias=False),
        nn.BatchNorm2d(5),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(5, 3),
    ).double()


def run_lone_bn(comm=None, **options):
    torch.manual_seed(0)
    model = lone_bn_net()
    kfac = kfac_hvd.KFAC(model, comm=comm, batchnorm_fisher="full", damping=1e-2, **options)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(6, 2, 3, 3, generator=generator, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1, 2, 0, 1, 2])).backward()
    record = kfac.step()
    return model, kfac, record


def test_a_wide_full_block_travels_in_the_inverse_allgather_and_is_counted():
    """With local_inverse_max_dim = 8 the 10×10 block is the one layer an owner inverts: on two
    (mirrored) ranks its factor is allreduced and its inverse allgathered as triangles, the counters
    and the step record say so, and the update equals the one-process update."""
    reference, _, _ = run_lone_bn(local_inverse_max_dim=8)
    model, kfac, record = run_lone_bn(MirrorCommunicator(), local_inverse_max_dim=8)
    assert kfac.local_layers == ["0", "4"] and kfac.assignment.owner == {"1": 0}
    for p, q in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-12, atol=1e-14)
    stats = kfac.comm_stats()
    assert stats["per_layer"]["1"]["F"]["payload_bytes"] == 8 * tri(10)  # fp64
    assert stats["per_layer"]["1"]["F_inv"]["payload_bytes"] == 8 * tri(10)
    assert "F_inv" not in stats["per_layer"]["4"]
    assert record["layers"]["1"]["payload_bytes"] == 2 * 8 * tri(10)
    cost = kfac.layer_costs["1"]
    assert (cost.kind, cost.travels, cost.values, cost.inversion_flop) == ("batchnorm", True, 100, 1000.0)
    # Wider than the limit no more: every rank inverts it, nothing but the factor travels.
    _, local, record = run_lone_bn(MirrorCommunicator())
    assert "1" in local.local_layers and record["layers"]["1"]["payload_bytes"] == 8 * tri(10)


@pytest.mark.parametrize("method", ["cholesky", "eigen"])
def test_full_block_is_inverted_in_one_batch_with_factors_of_its_size(method, monkeypatch):
    """BatchNorm2d(3)'s 6×6 block and a Linear(5, 6)'s A and G (6 × 6 each) are one batch: the same
    inverses as one call per factor, and each the damped inverse computed here."""
    batches = []
    invert_batch = kfac_hvd.factors._invert_batch

    def spy(batch, *args):
        batches.append(sorted(key for key, _, _ in batch))
        return invert_batch(batch, *args)

    monkeypatch.setattr(kfac_hvd.factors, "_invert_batch", spy)
    torch.manual_seed(2)
    model = nn.Sequential(nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(12, 5), nn.Tanh(), nn.Linear(5, 6))
    model = model.double()
    x = torch.randn(10, 3, 2, 2, dtype=torch.float64)
    results = []
    for batched in (True, False):
        torch.manual_seed(2)
        copy_ = copy.deepcopy(model)
        kfac = kfac_hvd.KFAC(
            copy_, batchnorm_fisher="full", damping=1e-2, inverse_method=method, batched_inversion=batched
        )
        copy_(x).square().sum().backward()
        kfac.step()
        results.append(kfac)
    batched, single = results
    assert [("0", "F"), ("4", "A"), ("4", "G")] in batches  # one call for the three 6×6 matrices
    assert batched.factors["0"]["F"].shape == batched.factors["4"]["A"].shape == (6, 6)
    for name, kind in (("0", "F"), ("4", "A"), ("4", "G"), ("2", "A")):
        torch.testing.assert_close(batched.inverses[name][kind], single.inverses[name][kind], **TIGHT)
    F = batched.factors["0"]["F"]
    torch.testing.assert_close(
        batched.inverses["0"]["F"], torch.linalg.inv(F + 1e-2 * torch.eye(6, dtype=torch.float64)), **TIGHT
    )


def train_small(model, kfac, data, optimizer=None):
    optimizer = optimizer or torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    records = []
    for x, y in data:
        optimizer.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        records.append(kfac.step(lr=0.05))
        optimizer.step()
    return records, optimizer


def test_state_dict_round_trip_with_full_blocks_continues_exactly():
    """Save after 5 steps, load into a fresh model and KFAC, run 5 more: the schedule and the weights are
    those of an uninterrupted run. A unit-wise KFAC refuses the checkpoint."""
    torch.manual_seed(1)
    generator = torch.Generator().manual_seed(3)
    data = [(torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator))]
    data = data + [
        (torch.randn(16, 1, 8, 8, generator=generator), torch.randint(0, 5, (16,), generator=generator))
        for _ in range(9)
    ]
    options = dict(
        batchnorm_fisher="full",
        update_threshold=1.0,
        interval_policy="since_last",
        damping=0.03,
        kl_clip=1e-3,
    )
    model = small_cnn()
    reference_model = copy.deepcopy(model)
    reference_records, _ = train_small(reference_model, kfac_hvd.KFAC(reference_model, **options), data)

    kfac = kfac_hvd.KFAC(model, **options)
    head, optimizer = train_small(model, kfac, data[:5])
    state = kfac.state_dict()
    assert state["inverses"]["1"]["F"].shape == (8, 8)
    saved = copy.deepcopy({"model": model.state_dict(), "opt": optimizer.state_dict(), "kfac": state})

    resumed_model = small_cnn()
    resumed_model.load_state_dict(saved["model"])
    resumed = kfac_hvd.KFAC(resumed_model, **options)
    resumed.load_state_dict(saved["kfac"])
    for group in ("factors", "inverses"):
        for name, kinds in getattr(kfac, group).items():
            for kind, tensor in kinds.items():
                assert torch.equal(getattr(resumed, group)[name][kind], tensor)
    resumed_optimizer = torch.optim.SGD(resumed_model.parameters(), lr=0.05, momentum=0.9)
    resumed_optimizer.load_state_dict(saved["opt"])
    tail, _ = train_small(resumed_model, resumed, data[5:], resumed_optimizer)

    def schedule(records):
        return [(r["step"], {n: (e["due"], e["interval"]) for n, e in r["layers"].items()}) for r in records]

    assert schedule(head + tail) == schedule(reference_records)
    assert not reference_records[4]["layers"]["1"]["due"]  # saved inside a grown interval of BatchNorm's
    for p, q in zip(resumed_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q)

    with pytest.raises(ValueError, match=r"1/F has shape \(8, 8\), the model needs \(4, 2, 2\)"):
        kfac_hvd.KFAC(small_cnn(), update_threshold=1.0).load_state_dict(saved["kfac"])


def test_an_unknown_batchnorm_fisher_is_refused():
    with pytest.raises(
        ValueError, match=r"^batchnorm_fisher must be one of \('unit_wise', 'full'\), got 'diag'"
    ):
        kfac_hvd.KFAC(nn.BatchNorm2d(2), batchnorm_fisher="diag")
    described = {option.name: option for option in kfac_hvd.option_fields()}
    assert described["batchnorm_fisher"].choices == ("unit_wise", "full")
    assert described["batchnorm_fisher"].default == "unit_wise"


# ResNet-50 at the paper's scale: Table 1's "λ = –" figure --------------------------------------------
STEPS = 2814


def resnet50_widths():
    """(dim A, dim G) of ResNet-50's Kronecker layers and its BatchNorm channel counts, from torchvision's
    modules (im2col width + 1 for a bias)."""
    from torchvision.models import resnet50

    with torch.device("meta"):
        model = resnet50()
    kron, channels = [], []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            kh, kw = module.kernel_size
            kron.append((module.in_channels * kh * kw + (module.bias is not None), module.out_channels))
        elif isinstance(module, nn.Linear):
            kron.append((module.in_features + 1, module.out_features))
        elif isinstance(module, nn.BatchNorm2d):
            channels.append(module.num_features)
    return model, kron, channels


def test_resnet50_full_blocks_give_the_papers_three_terabytes():
    """fp32 values of every factor, every step, 2,814 steps: 266.7 M values = 1,066.8 MB a step = 3.00 TB
    with 2C×2C BatchNorm blocks (the paper's Table 1, λ = –); 154.0 M = 615.8 MB = 1.73 TB unit-wise."""
    model, kron, channels = resnet50_widths()
    assert len(kron) == 54 and len(channels) == 53
    kronecker = sum(a * a + g * g for a, g in kron)
    expected = {
        "unit_wise": kronecker + sum(4 * c for c in channels),
        "full": kronecker + sum(4 * c * c for c in channels),
    }
    assert expected["unit_wise"] == 153_957_802
    for fisher, values in expected.items():
        costs = list(
            layer_costs(traffic.model_layers(model, batchnorm_fisher=fisher), element_bytes=4).values()
        )
        result = traffic.every_step_traffic(costs, 128, STEPS)
        assert result["layers"] == 107
        assert result["factor_values"] == every_step_cost(costs, 128)["every_step_elements"] == values
        assert result["dense_factor_bytes_per_rank"] == STEPS * 4 * values
    assert round(expected["full"] / 1e6, 1) == 266.7 and round(4 * expected["full"] / 1e6, 1) == 1066.8
    assert round(STEPS * 4 * expected["full"] / 1e12, 2) == 3.00
    assert round(STEPS * 4 * expected["unit_wise"] / 1e12, 2) == 1.73
    # Travel: the full blocks at most 256 wide (C <= 128) are inverted everywhere, the rest by an owner.
    full = {cost.name: cost for cost in costs if cost.kind == "batchnorm"}
    assert sum(not cost.travels for cost in full.values()) == sum(2 * c <= 256 for c in channels) == 15
    assert all(cost.inversion_flop == float(cost.factor_shapes["F"][0]) ** 3 for cost in full.values())


def test_commodel_prints_three_terabytes_for_full_blocks(capsys):
    assert commodel.main(["--model", "resnet50", "--steps", str(STEPS), "--batchnorm-fisher", "full"]) == 0
    text = capsys.readouterr().out
    assert "266.7 M values" in text
    assert "(the paper's Table 1 accounting): 1066.8 MB per step × 2814 steps = 3.00 TB" in text
    assert commodel.main(["--model", "resnet50", "--steps", str(STEPS)]) == 0
    assert "615.8 MB per step × 2814 steps = 1.73 TB" in capsys.readouterr().out


def test_full_block_memory_is_one_factor_and_one_inverse_per_layer():
    """What a rank holds after a step: each factor once (it is X_pre too without factor_decay) and its
    inverse, fp64 here: the conv's A (2×2) and G (5×5), the 10×10 BatchNorm block, the linear A (6×6)
    and G (3×3)."""
    _, kfac, _ = run_lone_bn()
    held = 8 * (4 + 25 + 100 + 36 + 9)
    memory = kfac.memory_bytes()
    assert (memory["factors"], memory["inverses"]) == (held, held)


def test_flop_of_a_full_block_count_its_outer_products_per_sample():
    """BatchNorm2d(3) on 4×4 maps, batch 2 (rows = 2 · 16): the per-activation sums as unit-wise (8 per
    activation) plus 2 · samples · (2C)² for the outer products; preconditioning a 6×6 matrix-vector
    product; the time model reads the same and moves the 36 inverse values and 2 × 6 gradient values."""
    from kfac_hvd.analysis import timemodel as tm

    bn = nn.BatchNorm2d(3)
    full = layer_costs(traffic.model_layers(bn, batchnorm_fisher="full"), element_bytes=4)[""]
    unit_wise = layer_costs(traffic.model_layers(bn), element_bytes=4)[""]
    rows, samples = 2 * 16, 2
    assert unit_wise.factor_flop(rows) == {"forward": 0.0, "backward": 8.0 * rows * 3}
    assert full.factor_flop(rows, samples) == {
        "forward": 0.0,
        "backward": 8.0 * rows * 3 + 2.0 * samples * 36,
    }
    assert (full.precondition_flop, unit_wise.precondition_flop) == (2.0 * 36, 8.0 * 3)
    profile = tm.profile_model(nn.Sequential(bn), image_size=4, batchnorm_fisher="full")
    costs = profile.layers[0].phase_costs(samples)
    assert costs["factor products"][0] == 8.0 * rows * 3 + 2.0 * samples * 36
    assert costs["precondition"] == (2.0 * 36, 4.0 * (36 + 12))
