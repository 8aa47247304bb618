"""Numerical faults never reach the weights: non-finite factors, failed inversions, non-finite grads."""
import pytest
import torch
from torch import nn

import kfac_hvd
from test_preconditioner import batches, small_cnn


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


def test_non_finite_factor_is_dropped_and_previous_inverse_kept():
    torch.manual_seed(0)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model, update_threshold=0.25)
    data = batches(3)
    step_once(model, kfac, data[0])
    held = {kind: t.clone() for kind, t in kfac.inverses["6"].items()}
    previous = kfac.previous["6"]["A"].clone()
    inject(kfac.layers["6"], "A", lambda total: total * float("nan"))
    record = step_once(model, kfac, data[1])
    assert "non-finite" in record["numerics"]["6"]
    assert torch.equal(kfac.inverses["6"]["A"], held["A"]) and torch.equal(kfac.inverses["6"]["G"], held["G"])
    assert torch.equal(kfac.previous["6"]["A"], previous)
    assert record["layers"]["6"]["interval"] == 1
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    assert "6" not in step_once(model, kfac, data[2])["numerics"]  # recovers on the next due step


def test_failed_cholesky_falls_back_to_eigendecomposition():
    torch.manual_seed(1)
    model = small_cnn()
    kfac = kfac_hvd.KFAC(model)
    # A strongly indefinite A factor: Cholesky fails even with damping ×1000.
    inject(kfac.layers["6"], "A", lambda total: -1e3 * torch.eye(total.shape[0], dtype=total.dtype) * 64)
    record = step_once(model, kfac, batches(1)[0])
    assert "eigen" in record["numerics"]["6"]
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
