"""Numerical faults never reach the weights: non-finite factors, failed inversions."""

import math

import pytest
import torch
from torch import nn

import kfac_hvd
from tests.helpers.models import batches, small_cnn


def step_once(model, kfac, data):
    model.zero_grad()
    nn.functional.cross_entropy(model(data[0]), data[1]).backward()
    return kfac.step()


def inject(layer, kind, make):
    """Replace a layer's next contribution of ``kind`` by make(true contribution)."""
    attribute = {"A": "a_contribution", "G": "g_contribution"}[kind]
    original = getattr(layer, attribute)

    def faulty(tensor, **kwargs):
        total, samples = original(tensor, **kwargs)
        setattr(layer, attribute, original)
        return make(total), samples

    setattr(layer, attribute, faulty)


def test_non_finite_factor_is_dropped_and_the_grown_interval_reset():
    """λ huge, modulo: due at steps 1, 2, 4, 6 with the interval growing to 3 after step 4. A NaN factor
    at step 6 is dropped (factors, previous factors and inverses kept) and the interval goes back to 1,
    so the layer is refreshed at step 7 (docs/RELIABILITY.md)."""
    torch.manual_seed(0)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model, update_threshold=1e9)
    data = batches(8)
    for batch in data[:5]:
        record = step_once(model, kfac, batch)
    assert record["step"] == 5 and record["layers"]["6"]["interval"] == 3
    held = {kind: t.clone() for kind, t in kfac.inverses["6"].items()}
    previous = {kind: t.clone() for kind, t in kfac.previous["6"].items()}
    inject(kfac.layers["6"], "A", lambda total: total * float("nan"))
    record = step_once(model, kfac, data[5])
    assert record["layers"]["6"]["due"] and "non-finite" in record["numerics"]["6"]
    assert record["layers"]["6"]["interval"] == 1
    assert record["layers"]["3"]["interval"] == 4  # the other layers grew as usual
    for kind in ("A", "G"):
        assert torch.equal(kfac.inverses["6"][kind], held[kind])
        assert torch.equal(kfac.previous["6"][kind], previous[kind])
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    record = step_once(model, kfac, data[6])  # step 7: refreshed, and fine again
    assert record["layers"]["6"]["due"] and not record["layers"]["3"]["due"]
    assert "6" not in record["numerics"]


def test_failed_cholesky_retries_with_more_damping_then_falls_back_to_eigendecomposition(monkeypatch):
    """A = −10·I: Cholesky fails at damping γ, 10γ, 100γ and 1000γ (in that order), then the
    eigendecomposition at γ clamps every eigenvalue at 0, so A's inverse is the damped identity
    I/(π√γ), π computed from the factors' diagonal means (π = 1 when tr A is negative)."""
    torch.manual_seed(1)
    model = small_cnn()
    damping = 1e-3
    kfac = kfac_hvd.KFAC(model, damping=damping)
    shifts = []
    original = torch.linalg.cholesky_ex

    def spy(matrix, *args, **kwargs):
        for block in matrix.reshape(-1, *matrix.shape[-2:]):  # one factor, or a batch of them
            if block.shape == (37, 37) and block[0, 0] < 0:  # layer 6's A (4·3·3 + bias)
                shifts.append(float(block[0, 0] + 10.0))
        return original(matrix, *args, **kwargs)

    monkeypatch.setattr(torch.linalg, "cholesky_ex", spy)
    # The injected sum is over the batch's 16 samples: A = −10·I.
    inject(kfac.layers["6"], "A", lambda total: -10 * 16 * torch.eye(total.shape[0], dtype=total.dtype))
    record = step_once(model, kfac, batches(1)[0])
    root = math.sqrt(damping)
    assert shifts == pytest.approx([root, 10**0.5 * root, 10 * root, 10**1.5 * root], rel=1e-4)  # π = 1
    assert record["numerics"]["6"] == "inverted with eigen, damping 0.001"
    torch.testing.assert_close(kfac.inverses["6"]["A"], torch.eye(37) / root)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_inversion_that_fails_every_way_keeps_the_previous_inverse(monkeypatch):
    torch.manual_seed(2)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model)
    data = batches(2)
    step_once(model, kfac, data[0])
    held = kfac.inverses["6"]["A"].clone()

    def broken(*args, **kwargs):
        raise torch.linalg.LinAlgError("injected")

    monkeypatch.setattr(torch.linalg, "cholesky_ex", broken)
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    record = step_once(model, kfac, data[1])
    assert record["numerics"]["6"] == "inversion failed, previous inverse kept"
    assert torch.equal(kfac.inverses["6"]["A"], held)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())


def test_first_step_failure_leaves_the_layer_on_its_plain_gradient(monkeypatch):
    torch.manual_seed(3)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model)
    inject(kfac.layers["6"], "G", lambda total: total * float("inf"))
    x, y = batches(1)[0]
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    plain = model[6].weight.grad.clone()
    record = kfac.step()
    assert "non-finite" in record["numerics"]["6"]
    torch.testing.assert_close(model[6].weight.grad, plain)
