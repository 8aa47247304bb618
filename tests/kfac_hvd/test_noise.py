"""The noise-aware Diff: an unbiased split-half noise estimate, and Diffs near 0 when nothing drifts."""

import copy
import functools
import os
import statistics

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.factors import split_half_noise
from tests.helpers.common import FASHION

TRIALS = 3000


def wishart_variance(covariance: torch.Tensor) -> float:
    """σ² = E‖aaᵀ − Σ‖²_F for a ~ N(0, Σ): Σ_jk (Σ_jj Σ_kk + Σ_jk²) = tr(Σ)² + ‖Σ‖²_F."""
    return float(covariance.trace() ** 2 + covariance.square().sum())


def test_split_half_estimate_is_unbiased_on_gaussian_data():
    """X = mean of n terms aaᵀ (a ~ N(0, Σ)): Var(X) = σ²/n; the estimate's mean over many batches
    matches it (unequal halves too), and so does the empirical variance of X itself."""
    generator = torch.Generator().manual_seed(0)
    root = torch.randn(4, 4, generator=generator, dtype=torch.float64)
    covariance = root @ root.t() / 4 + torch.eye(4, dtype=torch.float64)
    truth = wishart_variance(covariance)
    for first, second in ((8, 8), (5, 11)):
        n = first + second
        a = torch.randn(TRIALS, n, 4, generator=generator, dtype=torch.float64) @ root.t() / 2
        a = a + torch.randn(TRIALS, n, 4, generator=generator, dtype=torch.float64)  # a ~ N(0, Σ)
        terms = a[..., :, None] * a[..., None, :]  # (trials, n, 4, 4)
        estimates = torch.stack(
            [split_half_noise(t[:first].mean(0), first, t[first:].mean(0), second) for t in terms]
        )
        means = terms.mean(1)
        empirical = (means - covariance).square().sum((1, 2)).mean()
        # Monte-Carlo error of a mean over 3000 trials: a few per cent.
        assert float(estimates.mean()) == pytest.approx(truth / n, rel=0.06)
        assert float(empirical) == pytest.approx(truth / n, rel=0.06)


def test_kfac_reports_the_noise_of_the_averaged_factor():
    """Through the hooks: a bias-free linear layer fed N(0, Σ) inputs; the noise K-FAC keeps for A
    averages to tr(Σ)² + ‖Σ‖² over the batch size."""
    torch.manual_seed(1)
    covariance = torch.diag(torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64))
    model = nn.Linear(3, 2, bias=False).double()
    kfac = kfac_hvd.KFAC(model, update_threshold=1e-9, noise_aware_diff=True)  # due every step
    batch, kept = 32, []
    for _ in range(400):
        x = torch.randn(batch, 3, dtype=torch.float64) * covariance.diagonal().sqrt()
        model.zero_grad()
        model(x).square().sum().backward()
        kfac.step()
        kept.append(kfac.layer_state[""].noise["A"])
    assert statistics.mean(kept) == pytest.approx(wishart_variance(covariance) / batch, rel=0.1)


@functools.lru_cache(maxsize=1)
def fashion_training_set():
    from launch.training.data import FashionMNIST

    return FashionMNIST(FASHION, train=True, augment=False)


def fashion_batches(size: int, pairs: int):
    data = fashion_training_set()
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(size))
    for index in range(2 * pairs):
        picked = order[index * size : (index + 1) * size]
        yield data.images[picked], data.targets[picked]


def fixed_weight_diffs(batch: int, pairs: int = 2):
    """Median over layers of max(Diff_A, Diff_G) (BatchNorm: Diff_F) between factors of disjoint batches
    at fixed weights, raw and noise-aware, averaged over ``pairs`` pairs of batches."""
    from launch.training.models import SmallResNet

    torch.manual_seed(0)
    model = SmallResNet(1, 10, width=4, blocks=(1, 1, 1))
    kfac = kfac_hvd.KFAC(model, update_threshold=1e-9, noise_aware_diff=True)  # due every step
    raw, aware = [], []
    for step, (x, y) in enumerate(fashion_batches(batch, pairs)):
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        record = kfac.step()  # no optimiser step: the weights stay where they are
        if step % 2 == 1:
            entries = record["layers"].values()
            raw.append(
                statistics.median(max(v for k, v in e.items() if k.startswith("raw_diff_")) for e in entries)
            )
            aware.append(
                statistics.median(max(v for k, v in e.items() if k.startswith("diff_")) for e in entries)
            )
    return statistics.mean(raw), statistics.mean(aware)


@pytest.mark.skipif(not os.path.isdir(FASHION), reason="Fashion-MNIST not installed")
def test_at_fixed_weights_the_noise_aware_diff_is_near_zero():
    """The truth is 0 (same weights, same distribution). Raw Diffs are sampling noise, large at small
    batches; the noise-aware Diff removes it."""
    raw_64, aware_64 = fixed_weight_diffs(64)
    raw_512, aware_512 = fixed_weight_diffs(512)
    raw_4096, aware_4096 = fixed_weight_diffs(4096, pairs=1)
    assert raw_64 > raw_512 > raw_4096 > 0
    assert aware_64 <= 0.5 * raw_64, (raw_64, aware_64)
    assert aware_512 <= 0.05, (raw_512, aware_512)
    assert aware_4096 <= 0.05, (raw_4096, aware_4096)


def test_noise_aware_state_round_trip_continues_exactly():
    from tests.kfac_hvd.test_preconditioner import batches, small_cnn

    torch.manual_seed(2)
    options = dict(update_threshold=0.3, noise_aware_diff=True)
    data = batches(10, seed=4)
    model = small_cnn()
    reference_model = copy.deepcopy(model)
    reference = kfac_hvd.KFAC(reference_model, **options)
    kfac = kfac_hvd.KFAC(model, **options)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.05) for m in (reference_model, model)]
    records = {"reference": [], "resumed": []}
    for index, (x, y) in enumerate(data):
        if index == 5:  # save, and continue with fresh objects built from the saved state
            saved = copy.deepcopy({"model": model.state_dict(), "kfac": kfac.state_dict()})
            model = small_cnn()
            model.load_state_dict(saved["model"])
            kfac = kfac_hvd.KFAC(model, **options)
            kfac.load_state_dict(saved["kfac"])
            optimizers[1] = torch.optim.SGD(model.parameters(), lr=0.05)
        for name, (m, k, optimizer) in {
            "reference": (reference_model, reference, optimizers[0]),
            "resumed": (model, kfac, optimizers[1]),
        }.items():
            optimizer.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            records[name].append(k.step())
            optimizer.step()
    assert saved["kfac"]["noise"]["0"]["A"] > 0
    for got, expected in zip(records["resumed"], records["reference"]):
        assert got["layers"] == expected["layers"]
    for p, q in zip(model.parameters(), reference_model.parameters()):
        assert torch.equal(p, q)
