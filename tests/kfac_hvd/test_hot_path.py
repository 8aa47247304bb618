"""What one step costs: host synchronisations, memory, chunked factor maths, gradient accumulation."""

import copy

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.diagnostics import HostSyncCounter
from kfac_hvd.layers import Conv2dLayer, LinearLayer
from tests.helpers.models import stack


def syncs_per_step(model: nn.Module, steps: int, **options):
    torch.manual_seed(0)
    kfac = kfac_hvd.KFAC(model, update_threshold=1e9, **options)  # every diff below λ: intervals grow
    counts, due = [], []
    for _ in range(steps):
        model.zero_grad()
        nn.functional.cross_entropy(model(torch.randn(8, 1, 6, 6)), torch.randint(0, 3, (8,))).backward()
        with HostSyncCounter() as syncs:
            record = kfac.step(lr=0.1)
        counts.append(syncs.count)
        due.append(any(entry["due"] for entry in record["layers"].values()))
    return counts, due


@pytest.mark.parametrize("options", [{}, {"kl_clip": 1e-3}, {"factor_decay": 0.9}])
def test_host_syncs_per_step_do_not_grow_with_the_number_of_layers(options):
    """Modulo schedule with every diff below λ: due at steps 1, 2, 4, 6; steps 3 and 5 have nothing due.
    One process reads the factor statistics once and the inversion flags once on an update step
    (a second rank adds one read of rank 0's intervals, tests/kfac_hvd/test_distributed.py), nothing otherwise."""
    small, small_due = syncs_per_step(stack(5), 6, **options)
    large, large_due = syncs_per_step(stack(50), 6, **options)
    assert len(kfac_hvd.KFAC(stack(50)).layers) == 50
    assert small_due == large_due == [True, True, False, True, False, True]
    assert small == large == [2, 2, 0, 2, 0, 2]


def test_memory_bytes_matches_a_hand_count():
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    # conv: A 19×19 (2·3·3 + bias), G 3×3; BN: 3 blocks of 2×2; linear: A 49×49, G 5×5; fp32.
    factor_bytes = 4 * (19 * 19 + 3 * 3 + 3 * 4 + 49 * 49 + 5 * 5)
    x, y = torch.randn(4, 2, 6, 6), torch.randint(0, 5, (4,))
    for decay, held in ((None, factor_bytes), (0.5, 2 * factor_bytes)):  # decay: running + fresh factors
        kfac = kfac_hvd.KFAC(copy.deepcopy(model), factor_decay=decay, accumulation_steps=2)
        net = kfac.layers["0"].module
        for _ in range(2):
            kfac_model = nn.Sequential(net, kfac.layers["1"].module, nn.Flatten(), kfac.layers["3"].module)
            kfac_model.zero_grad()
            nn.functional.cross_entropy(kfac_model(x), y).backward()
            assert kfac.memory_bytes()["capture_buffers"] == factor_bytes  # one of two passes captured
            kfac_model(x).sum().backward()
            assert kfac.memory_bytes()["capture_buffers"] == 0  # handed over on the second
            kfac.step()
        memory = kfac.memory_bytes()
        assert memory["factors"] == held
        assert memory["inverses"] == factor_bytes
        assert memory["capture_buffers"] == memory["communication_buffers"] == 0
        assert memory["total"] == held + factor_bytes + memory["caches"]


@pytest.mark.parametrize(
    "module,shape",
    [
        (nn.Conv2d(3, 4, 3, stride=2, padding=1), (6, 3, 9, 9)),
        (nn.Conv2d(3, 4, 1, stride=2), (6, 3, 9, 9)),  # pointwise: no unfold
        (nn.Conv2d(3, 4, 1, bias=False), (6, 3, 5, 5)),
        (nn.Linear(7, 4), (6, 7)),
    ],
)
def test_chunked_factors_equal_one_pass_and_respect_the_cap(module, shape, monkeypatch):
    torch.manual_seed(1)
    module = module.double()
    layer = (Conv2dLayer if isinstance(module, nn.Conv2d) else LinearLayer)("m", module, torch.float64)
    x = torch.randn(*shape, dtype=torch.float64)
    grad = torch.randn_like(module(x))
    whole_a, _ = layer.a_contribution(x, chunk_bytes=1 << 30)
    whole_g, _ = layer.g_contribution(grad, chunk_bytes=1 << 30)
    unfolded = []
    original_unfold = torch.nn.functional.unfold
    monkeypatch.setattr(
        torch.nn.functional,
        "unfold",
        lambda *a, **k: unfolded.append(original_unfold(*a, **k)) or unfolded[-1],
    )
    chunk_a, samples = layer.a_contribution(x, chunk_bytes=1)  # one sample at a time
    chunk_g, _ = layer.g_contribution(grad, chunk_bytes=1)
    assert samples == shape[0]
    torch.testing.assert_close(chunk_a, whole_a)
    torch.testing.assert_close(chunk_g, whole_g)
    pointwise = isinstance(module, nn.Conv2d) and module.kernel_size == (1, 1)
    assert len(unfolded) == (0 if pointwise or isinstance(module, nn.Linear) else shape[0])
    assert all(t.shape[0] == 1 for t in unfolded)
    # Independent reference: im2col through a conv with identity kernels is what unfold computes.
    if isinstance(module, nn.Conv2d):
        patches = original_unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
        if module.bias is not None:
            rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype)], 1)
        torch.testing.assert_close(whole_a, rows.t() @ rows / (rows.shape[0] // shape[0]))


def test_gradient_accumulation_averages_factors_over_the_step():
    """Three micro-batches, each loss the mean over its samples divided by 3 (so that the accumulated
    gradient is the mean over the step's 24 samples), give the factors and the preconditioned gradient
    of one pass over all 24; the allreduces start in the hooks of the third pass."""
    torch.manual_seed(2)
    # No BatchNorm: its batch statistics differ between micro-batches and the whole batch.
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 4)).double()
    whole_model = copy.deepcopy(model)
    x, y = torch.randn(24, 1, 6, 6, dtype=torch.float64), torch.randint(0, 4, (24,))
    accumulated = kfac_hvd.KFAC(model, accumulation_steps=3)
    whole = kfac_hvd.KFAC(whole_model)
    for part in range(3):
        chunk = slice(8 * part, 8 * part + 8)
        (nn.functional.cross_entropy(model(x[chunk]), y[chunk]) / 3).backward()
    record = accumulated.step()
    nn.functional.cross_entropy(whole_model(x), y).backward()
    whole.step()
    assert record["factor_allreduces_started"] == {"hooks": 4, "step": 0}
    for name in whole.layers:
        for kind, factor in whole.factors[name].items():
            torch.testing.assert_close(accumulated.factors[name][kind], factor)
    for p, q in zip(model.parameters(), whole_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad)


def test_a_fourth_micro_batch_is_refused_and_a_short_step_is_started_by_step():
    model = nn.Linear(3, 2)
    kfac = kfac_hvd.KFAC(model, accumulation_steps=3)
    for _ in range(2):
        model(torch.randn(4, 3)).sum().backward()
    assert kfac.step()["factor_allreduces_started"] == {"hooks": 0, "step": 2}
    for _ in range(3):
        model(torch.randn(4, 3)).sum().backward()
    with pytest.raises(RuntimeError, match="accumulation_steps=3"):
        model(torch.randn(4, 3)).sum().backward()
