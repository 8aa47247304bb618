"""K-FAC under autocast on the CPU: factors stay fp32, a GradScaler's scale is taken out of G, a step the
scaler skips is a K-FAC step skipped, and the preconditioned gradients stay close to an fp32 run's."""

import pytest
import torch
from torch import nn

import kfac_hvd

STEPS = 5


def network():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    )


def model_and_data():
    torch.manual_seed(0)
    model = network()
    generator = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(32, 3, 16, 16, generator=generator), torch.randint(0, 10, (32,), generator=generator))
        for _ in range(STEPS)
    ]
    return model, data


def fp32_reference(model, x, y):
    """The preconditioned gradients of an fp32 K-FAC step at ``model``'s current weights (every-step
    K-FAC without a running average depends only on the current batch and weights)."""
    reference = network()  # not a deepcopy: that would copy the K-FAC hooks of ``model``
    reference.load_state_dict(model.state_dict())
    kfac = kfac_hvd.KFAC(reference, damping=1e-2)
    nn.functional.cross_entropy(reference(x), y).backward()
    kfac.step(lr=0.1)
    kfac.remove_hooks()
    return [p.grad for p in reference.parameters()]


def relative_gap(model, reference_grads):
    """‖g − g_fp32‖ / ‖g_fp32‖ over all parameters together (bf16 activations alone put the plain
    gradients of the convolutions ~5% away from fp32's)."""
    got = torch.cat([p.grad.flatten() for p in model.parameters()])
    expected = torch.cat([g.flatten() for g in reference_grads])
    return float((got - expected).norm() / expected.norm())


def test_bf16_autocast_keeps_fp32_factors_and_matches_fp32():
    model, data = model_and_data()
    kfac = kfac_hvd.KFAC(model, damping=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    worst = 0.0
    for x, y in data:
        reference = fp32_reference(model, x, y)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            output = model(x)
            assert output.dtype == torch.bfloat16
            loss = nn.functional.cross_entropy(output, y)
        loss.backward()
        record = kfac.step(lr=0.1)
        assert record["numerics"] == {}
        assert all(t.dtype == torch.float32 for kinds in kfac.factors.values() for t in kinds.values())
        assert all(t.dtype == torch.float32 for kinds in kfac.inverses.values() for t in kinds.values())
        worst = max(worst, relative_gap(model, reference))
        optimizer.step()
    assert worst < 0.1, worst  # measured here: 0.055 at most over the 5 steps


def test_fp16_autocast_with_grad_scaler_matches_fp32_and_skips_overflow_steps():
    model, data = model_and_data()
    kfac = kfac_hvd.KFAC(model, damping=1e-2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    # The first scale overflows fp16; one back-off brings it to 2¹⁶.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, backoff_factor=2.0**-24)
    skipped, worst = [], 0.0
    for x, y in data:
        reference = fp32_reference(model, x, y)
        optimizer.zero_grad()
        with torch.autocast("cpu", dtype=torch.float16):
            loss = nn.functional.cross_entropy(model(x), y)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        finite = all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
        if not finite:
            computed = kfac.comm_stats()["computed_elements"]
            record = kfac.skip_step()
            assert record["skipped"]
            assert kfac.comm_stats()["computed_elements"] == computed  # nothing recorded as computed
            skipped.append(record["step"])
        else:
            record = kfac.step(lr=0.1, loss_scale=scaler._scale)
            assert record["numerics"] == {}
            worst = max(worst, relative_gap(model, reference))
            optimizer.step()
        scaler.update()
    assert skipped == [1]  # K-FAC's step 1 was skipped, then taken again
    assert kfac.steps == STEPS - 1
    assert all(t.dtype == torch.float32 for kinds in kfac.factors.values() for t in kinds.values())
    assert worst < 0.05, worst  # measured here: 0.023 at most


def test_without_the_loss_scale_g_is_off_by_its_square():
    """The scale must be divided out: without it, G carries scale² (and its noise estimate scale⁴)."""
    model, data = model_and_data()
    x, y = data[0]
    kfacs = {}
    for name, scale in (("told", 1024.0), ("not told", None)):
        copy_ = network()
        copy_.load_state_dict(model.state_dict())
        kfacs[name] = kfac_hvd.KFAC(copy_, damping=1e-2, noise_aware_diff=True)
        (nn.functional.cross_entropy(copy_(x), y) * 1024.0).backward()
        for p in copy_.parameters():
            p.grad /= 1024.0  # what unscale_ does
        kfacs[name].step(loss_scale=scale)
    told, not_told = kfacs["told"].factors["6"]["G"], kfacs["not told"].factors["6"]["G"]
    torch.testing.assert_close(not_told, told * 1024.0**2)
    # The split-half noise estimate of G is a squared norm of G-sized differences: scale⁴.
    assert kfacs["not told"].layer_state["6"].noise["G"] == pytest.approx(
        kfacs["told"].layer_state["6"].noise["G"] * 1024.0**4, rel=1e-4
    )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_capture_computes_factors_in_fp32_under_autocast(dtype):
    model, data = model_and_data()
    kfac = kfac_hvd.KFAC(model)
    with torch.autocast("cpu", dtype=dtype):
        model(data[0][0]).float().sum().backward()
    kfac.step()
    assert {t.dtype for kinds in kfac.factors.values() for t in kinds.values()} == {torch.float32}
