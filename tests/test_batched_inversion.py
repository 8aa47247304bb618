"""Inversions batched by size give the per-layer results; a failure stays with its own layer."""

import pytest
import torch
import torchvision
from torch import nn

import kfac_hvd
from kfac_hvd.factors import invert_all, robust_damped_inverses


def spd(size, dtype, generator):
    x = torch.randn(size, 2 * size, dtype=dtype, generator=generator)
    return x @ x.T / (2 * size)


def bn_blocks(channels, dtype, generator):
    x = torch.randn(channels, 2, 5, dtype=dtype, generator=generator)
    return x @ x.mT


def jobs_with_failures(dtype, a_size, g_size):
    """Five Kronecker layers of equal sizes and three BatchNorm layers. In the middle of their batches:
    'k2', whose A is −I (Cholesky fails; the eigendecomposition clamps it to 0), 'k3', whose G holds a
    NaN (everything fails), and 'bn1', with one indefinite block among its channels."""
    generator = torch.Generator().manual_seed(0)
    jobs, shifts = {}, {}
    for index in range(5):
        jobs[f"k{index}"] = {"A": spd(a_size, dtype, generator), "G": spd(g_size, dtype, generator)}
        shifts[f"k{index}"] = {"A": 0.05 * (index + 1), "G": 0.01 / (index + 1)}  # π differs per layer
    jobs["k2"]["A"] = -torch.eye(a_size, dtype=dtype)
    jobs["k3"]["G"][1, 1] = float("nan")
    for index in range(3):
        jobs[f"bn{index}"] = {"F": bn_blocks(4 + index, dtype, generator)}
        shifts[f"bn{index}"] = {"F": 1e-3}
    jobs["bn1"]["F"][2] = torch.tensor([[-1.0, 0.0], [0.0, 1.0]], dtype=dtype)
    return jobs, shifts


@pytest.mark.parametrize(
    "method,dtype,sizes,exact",
    [
        ("cholesky", torch.float64, (6, 4), True),
        ("cholesky", torch.float32, (7, 5), False),
        ("eigen", torch.float64, (6, 4), False),
        ("eigen", torch.float32, (7, 5), False),
    ],
)
def test_batched_equals_per_layer_and_only_the_failed_layers_fall_back(method, dtype, sizes, exact):
    """A batch runs LAPACK's kernel on each member. Cholesky is bit-equal to one call where the member's
    storage is aligned as a single matrix's is (32 bytes: here n even in float64). The symmetric
    eigendecomposition is not, on every processor: on an AVX-512 Xeon, MKL's batched and single syevd
    differ in the last bit (1.2e-16 of the largest entry in float64, 6.6e-8 in float32), so it is held,
    like odd sizes and BatchNorm's closed form, to a few units of round-off of the inverse's largest
    entry (16 ε): a wrong damping or a mixed-up member is off by far more."""
    jobs, shifts = jobs_with_failures(dtype, *sizes)
    batched, failed = invert_all(jobs, shifts, method, batched=True)
    single, single_failed = invert_all(jobs, shifts, method, batched=False)
    expected_failures = ["k2", "k3", "bn1"] if method == "cholesky" else ["k3"]
    assert failed == single_failed == expected_failures
    assert set(batched) == set(single) == set(jobs) - set(expected_failures)
    for name, kinds in single.items():
        for kind, inverse in kinds.items():
            if exact and kind != "F":
                assert torch.equal(batched[name][kind], inverse), (name, kind)
            else:
                bound = 16 * torch.finfo(dtype).eps * inverse.abs().max()
                assert (batched[name][kind] - inverse).abs().max() <= bound, (name, kind)
            # Each inverse owns its storage: refreshing one layer later frees its memory.
            assert batched[name][kind].untyped_storage().nbytes() == inverse.numel() * inverse.element_size()
    for name in failed:  # the per-layer ladder, for the failed layers only
        result, event = robust_damped_inverses(jobs[name], 1e-3, pi=1.0, method=method)
        if name == "k3":
            assert (result, event) == (None, "inversion failed")
        else:
            assert result is not None and event == "inverted with eigen, damping 0.001"


def test_batches_respect_the_byte_cap(monkeypatch):
    jobs, shifts = jobs_with_failures(torch.float64, 6, 4)
    calls = []
    original = torch.linalg.cholesky_ex
    monkeypatch.setattr(
        torch.linalg, "cholesky_ex", lambda m, **k: calls.append(tuple(m.shape)) or original(m, **k)
    )
    capped, failed = invert_all(jobs, shifts, "cholesky", batch_bytes=2 * 6 * 6 * 8)  # two A's per call
    assert sorted(calls) == sorted([(2, 6, 6), (2, 6, 6), (1, 6, 6), (4, 4, 4), (1, 4, 4)])  # G: 128 bytes
    whole, _ = invert_all(jobs, shifts, "cholesky")
    assert failed == ["k2", "k3", "bn1"]
    for name, kinds in whole.items():
        for kind, inverse in kinds.items():
            assert torch.equal(capped[name][kind], inverse)


def test_batchnorm_closed_form_against_linalg_inv():
    """All channels of all BatchNorm layers in one pass, float64: random PSD blocks, a singular block
    (rank one, and zero) that the damping makes regular; a block still singular after damping, a
    negative definite one (its determinant is positive) and one holding a NaN fail their layer alone."""
    generator = torch.Generator().manual_seed(1)
    damping = 1e-3
    regular = bn_blocks(6, torch.float64, generator)
    regular[1] = torch.tensor([[2.0, 2.0], [2.0, 2.0]], dtype=torch.float64)  # det 0: rank one
    regular[4] = 0.0
    jobs = {
        "bn0": {"F": regular},
        "bn1": {"F": bn_blocks(3, torch.float64, generator)},
        "bn2": {"F": bn_blocks(2, torch.float64, generator)},
        "bn3": {"F": bn_blocks(2, torch.float64, generator)},
        "bn4": {"F": bn_blocks(3, torch.float64, generator)},
        "bn5": {"F": bn_blocks(2, torch.float64, generator)},
    }
    jobs["bn2"]["F"][1] = torch.tensor([[-damping, 0.0], [0.0, 1.0]], dtype=torch.float64)  # a + γ = 0
    jobs["bn3"]["F"][0, 0, 0] = float("nan")
    jobs["bn4"]["F"][2] = -torch.eye(2, dtype=torch.float64)
    shifts = {name: {"F": damping} for name in jobs}
    inverses, failed = invert_all(jobs, shifts, "cholesky")
    assert failed == ["bn2", "bn3", "bn4"]
    eye = torch.eye(2, dtype=torch.float64)
    for name in ("bn0", "bn1", "bn5"):
        expected = torch.linalg.inv(jobs[name]["F"] + damping * eye)
        torch.testing.assert_close(inverses[name]["F"], expected, rtol=1e-10, atol=0)
    torch.testing.assert_close(inverses["bn0"]["F"][4], eye / damping, rtol=1e-12, atol=0)


def test_a_failed_batchnorm_block_takes_the_ladder_in_kfac():
    """Through KFAC: one BatchNorm layer's F with an indefinite block is retried per layer (damping ×10,
    then eigen) while the other BatchNorm layer keeps its closed-form inverse."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(1, 3, 3),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Conv2d(3, 3, 3),
        nn.BatchNorm2d(3),
        nn.Flatten(),
        nn.Linear(3 * 2 * 2, 2),
    ).double()
    kfac = kfac_hvd.KFAC(model)
    layer = kfac.layers["4"]
    original = layer.f_contribution

    def indefinite(*args, **kwargs):
        total, samples = original(*args, **kwargs)
        total[1] = torch.tensor([[-1e6, 0.0], [0.0, 1.0]], dtype=total.dtype)
        return total, samples

    layer.f_contribution = indefinite
    x = torch.randn(4, 1, 6, 6, dtype=torch.float64)
    nn.functional.cross_entropy(model(x), torch.randint(0, 2, (4,))).backward()
    record = kfac.step()
    assert record["numerics"] == {"4": "inverted with eigen, damping 0.001"}
    expected = torch.linalg.inv(kfac.factors["1"]["F"] + 1e-3 * torch.eye(2, dtype=torch.float64))
    torch.testing.assert_close(kfac.inverses["1"]["F"], expected, rtol=1e-9, atol=0)


def test_resnet50_update_step_calls_cholesky_once_per_distinct_size(monkeypatch):
    """torchvision's ResNet-50, one process, one update step (32 px, batch 2): its 108 Kronecker factors
    come in 13 sizes, inverted in 13 Cholesky calls; its 53 BatchNorm layers in none (closed form).
    The calls are counted, not computed (an identity Cholesky factor): the maths is the other tests'
    business. (``batched_inversion=False`` makes 161 calls: bench/inversion.py counts them.)"""
    calls = []

    def counting_cholesky(matrix, **kwargs):
        calls.append(tuple(matrix.shape))
        return torch.eye(matrix.shape[-1]).expand_as(matrix).clone(), torch.zeros(
            matrix.shape[:-2], dtype=torch.int32
        )

    monkeypatch.setattr(torch.linalg, "cholesky_ex", counting_cholesky)
    monkeypatch.setattr(torch, "cholesky_inverse", lambda lower: lower.clone())
    torch.manual_seed(0)
    # zero_init_residual: at the default initialisation the deep output gradients reach 1e17 and some
    # BatchNorm blocks are not positive definite after damping in fp32 (the fallback would call Cholesky).
    model = torchvision.models.resnet50(weights=None, num_classes=10, zero_init_residual=True)
    kfac = kfac_hvd.KFAC(model)
    nn.functional.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.randint(0, 10, (2,))).backward()
    record = kfac.step()
    assert record["numerics"] == {} and all(entry["due"] for entry in record["layers"].values())
    kronecker = [
        factor.shape[-1] for kinds in kfac.factors.values() for factor in kinds.values() if factor.dim() == 2
    ]
    assert len(kronecker) == 108 and len(kfac.layers) == 107
    sizes = [shape[-1] for shape in calls]
    assert sorted(sizes) == sorted(set(kronecker)) and len(sizes) == 13
    assert sum(shape[0] for shape in calls) == 108


def test_kfac_steps_agree_batched_and_per_layer():
    """Three steps of training in float64 with either path give the same weights."""
    weights = {}
    for batched in (True, False):
        torch.manual_seed(0)
        model = nn.Sequential(
            nn.Conv2d(1, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(4 * 6 * 6, 4),
        ).double()
        kfac = kfac_hvd.KFAC(model, batched_inversion=batched)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        for step in range(3):
            generator = torch.Generator().manual_seed(step)
            x = torch.randn(8, 1, 6, 6, dtype=torch.float64, generator=generator)
            model.zero_grad()
            nn.functional.cross_entropy(model(x), torch.randint(0, 4, (8,), generator=generator)).backward()
            assert kfac.step()["numerics"] == {}
            optimizer.step()
        weights[batched] = [p.detach().clone() for p in model.parameters()]
    for batched_weight, single_weight in zip(weights[True], weights[False]):
        torch.testing.assert_close(batched_weight, single_weight, rtol=1e-9, atol=1e-12)


def test_batched_inversion_must_be_a_bool():
    with pytest.raises(ValueError, match="batched_inversion"):
        kfac_hvd.KFAC(nn.Linear(2, 2), batched_inversion="yes")
