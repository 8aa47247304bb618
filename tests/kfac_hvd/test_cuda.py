"""K-FAC on a GPU (marked ``cuda``: skipped, with the reason, where there is none).

Run with ``pytest -m cuda tests`` (scripts/gpu_check.sh does). Exactness against a CPU float64 reference,
autocast in bf16 and fp16, channels_last, the state round trip through the CPU, and the host
synchronisations CUDA itself reports.
"""

import copy
import warnings

import pytest
import torch
from torch import nn

import kfac_hvd

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")


@pytest.fixture(autouse=True)
def exact_matmuls():
    """TF32 would put convolutions and matrix products 1e-3 away from fp32."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def network():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 7 * 7, 10),
    )


def batch(seed=0, size=64):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(size, 3, 16, 16, generator=generator), torch.randint(
        0, 10, (size,), generator=generator
    )


def preconditioned(model, kfac, x, y, autocast_dtype=None, **step_options):
    model.zero_grad()
    with torch.autocast("cuda", dtype=autocast_dtype or torch.float32, enabled=autocast_dtype is not None):
        loss = nn.functional.cross_entropy(model(x), y)
    loss.backward()
    record = kfac.step(**step_options)
    return [p.grad.detach().double().cpu() for p in model.parameters()], record


def gap(got, expected):
    got, expected = torch.cat([g.flatten() for g in got]), torch.cat([g.flatten() for g in expected])
    return float((got - expected).norm() / expected.norm())


def reference_and_cuda(**options):
    torch.manual_seed(0)
    reference = network().double()
    model = network()
    model.load_state_dict(reference.state_dict())
    return (reference, kfac_hvd.KFAC(reference, **options)), (
        model.to(CUDA),
        kfac_hvd.KFAC(model.to(CUDA), **options),
    )


def test_cuda_matches_a_cpu_float64_reference():
    (reference, reference_kfac), (model, kfac) = reference_and_cuda(damping=1e-2)
    for seed in range(3):  # three batches at the same weights (fp32 and fp64 weights would drift apart)
        x, y = batch(seed)
        expected, _ = preconditioned(reference, reference_kfac, x.double(), y)
        got, record = preconditioned(model, kfac, x.to(CUDA), y.to(CUDA))
        assert record["numerics"] == {}
        assert gap(got, expected) < 1e-3
        for name in kfac.layers:
            for kind, factor in kfac.factors[name].items():
                assert factor.device.type == "cuda" and factor.dtype == torch.float32
                torch.testing.assert_close(
                    factor.double().cpu(), reference_kfac.factors[name][kind], rtol=1e-4, atol=1e-6
                )


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_keeps_fp32_factors_and_stays_close_to_fp32(dtype):
    _, (model, kfac) = reference_and_cuda(damping=1e-2)
    fp32_model = network().to(CUDA)
    fp32_model.load_state_dict(model.state_dict())
    fp32_kfac = kfac_hvd.KFAC(fp32_model, damping=1e-2)
    x, y = (t.to(CUDA) for t in batch(1))
    expected, _ = preconditioned(fp32_model, fp32_kfac, x, y)
    got, record = preconditioned(model, kfac, x, y, autocast_dtype=dtype)
    assert record["numerics"] == {}
    assert {t.dtype for kinds in kfac.factors.values() for t in kinds.values()} == {torch.float32}
    assert {p.grad.dtype for p in model.parameters()} == {torch.float32}
    assert gap(got, expected) < (0.1 if dtype == torch.bfloat16 else 0.05)


def test_channels_last_equals_contiguous():
    _, (model, kfac) = reference_and_cuda(damping=1e-2)
    last_model = network().to(CUDA, memory_format=torch.channels_last)
    last_model.load_state_dict(model.state_dict())
    last_kfac = kfac_hvd.KFAC(last_model, damping=1e-2)
    x, y = (t.to(CUDA) for t in batch(2))
    expected, _ = preconditioned(model, kfac, x, y)
    got, _ = preconditioned(last_model, last_kfac, x.to(memory_format=torch.channels_last), y)
    assert gap(got, expected) < 1e-4  # cuDNN picks other algorithms for NHWC


def test_state_round_trip_cuda_cpu_cuda_continues_exactly(monkeypatch):
    # Bit-equal gradients of two models need deterministic cuDNN kernels (some wgrad ones add atomically).
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    options = dict(damping=1e-2, update_threshold=0.3, factor_decay=0.5)
    _, (model, kfac) = reference_and_cuda(**options)
    for seed in range(3):
        x, y = batch(seed)
        preconditioned(model, kfac, x.to(CUDA), y.to(CUDA))
    saved = copy.deepcopy(model.state_dict()), kfac.state_dict()
    cpu_model = network()
    cpu_model.load_state_dict(saved[0])
    cpu_kfac = kfac_hvd.KFAC(cpu_model, **options)
    cpu_kfac.load_state_dict(saved[1])
    resumed_model = network().to(CUDA)
    resumed_model.load_state_dict(cpu_model.state_dict())
    resumed = kfac_hvd.KFAC(resumed_model, **options)
    resumed.load_state_dict(cpu_kfac.state_dict())
    for seed in range(3, 6):
        x, y = (t.to(CUDA) for t in batch(seed))
        expected, record = preconditioned(model, kfac, x, y)
        got, resumed_record = preconditioned(resumed_model, resumed, x, y)
        assert [e["due"] for e in record["layers"].values()] == [
            e["due"] for e in resumed_record["layers"].values()
        ]
        for a, b in zip(got, expected):
            assert torch.equal(a, b)


def test_cuda_reports_at_most_three_synchronisations_per_update_step():
    """torch.cuda.set_sync_debug_mode warns on every operation that synchronises the device (also the
    ones no Python-level read shows, such as an error check inside a kernel launch)."""
    _, (model, kfac) = reference_and_cuda(damping=1e-2, update_threshold=1e9, kl_clip=1e-3)
    counts = []
    for seed in range(4):  # due at steps 1, 2, 4; nothing due at step 3
        x, y = (t.to(CUDA) for t in batch(seed))
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                kfac.step(lr=0.1)
        finally:
            torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchroniz" in str(w.message) for w in caught))
    assert counts[2] == 0, counts
    assert max(counts) <= 3, counts


def test_a_step_needs_at_most_one_more_copy_of_the_inverses():
    """After the hooks, a step's transient memory is the new inverses (kept beside the old ones until the
    one read says they are good) and one layer's temporaries at a time (its damped copy and Cholesky
    factor); the capture keeps nothing afterwards."""
    _, (model, kfac) = reference_and_cuda(damping=1e-2)
    for seed in range(2):
        x, y = (t.to(CUDA) for t in batch(seed, size=256))
        model.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        kfac.step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - start
    held = kfac.memory_bytes()
    largest = max(
        4 * torch.Size(shape).numel()
        for layer in kfac.layers.values()
        for shape in layer.factor_shapes().values()
    )
    assert held["capture_buffers"] == held["communication_buffers"] == 0
    assert held["factors"] == held["inverses"] > 0
    assert peak <= held["inverses"] + 2 * largest, (peak, held, largest)
