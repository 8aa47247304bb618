"""Factor products on a GPU (marked ``cuda``: skipped, with the reason, where there is none).

bf16/fp16 inputs multiplied on the tensor cores with fp32 accumulation against the same inputs cast to
fp32 first; factors stored in fp32 under autocast; TF32 factor products (``factor_matmul_precision=
"high"``) within the bound the README derives. Run with ``pytest -m cuda tests`` (scripts/gpu_check.sh).

The cast-then-fp32 reference is an fp32 sum itself: cuBLAS's fp32 kernels add one product at a time per
output, whose relative error grows like 2e-8·√K for K terms (sequential fp32 sums of squares, measured
on the CPU: 6.0e-7 at K = 1,568, 2.4e-6 at K = 12,544). The shapes below keep K ≤ 800, so the 1e-6
leaves room for both sums; the narrow factors are also held to 1e-6 against the exact (float64) Gram.
"""

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.layers import Conv2dLayer, LinearLayer
from kfac_hvd.precision import fp32_matmul_precision

pytestmark = pytest.mark.cuda
CUDA = torch.device("cuda")
NARROW = [torch.bfloat16, torch.float16]

# name: (module, input shape); K = samples × positions summed into one product (A | G)
MODULES = {
    "linear": (lambda: nn.Linear(256, 128), (512, 256)),  # K = 512
    "conv 3x3": (lambda: nn.Conv2d(32, 64, 3, padding=1), (4, 32, 14, 14)),  # 784 | 196 per sample
    "conv 1x1": (lambda: nn.Conv2d(64, 128, 1), (4, 64, 14, 14)),  # 196 per sample
    "conv 3x3 strided": (lambda: nn.Conv2d(32, 64, 3, stride=2, padding=1), (16, 32, 14, 14)),  # 784 | 49
    "conv 1x1 strided": (lambda: nn.Conv2d(64, 128, 1, stride=2), (16, 64, 14, 14)),  # 784 | 49
}


def relative(got, expected):
    return float((got.double() - expected.double()).norm() / expected.double().norm())


def exact_a(module, x):
    """Σ_n mean_positions a aᵀ in float64 from the (narrow) inputs: the value both paths approximate."""
    x = x.double()
    if isinstance(module, nn.Linear):
        rows = x
    else:
        patches = nn.functional.unfold(x, module.kernel_size, padding=module.padding, stride=module.stride)
        rows = patches.transpose(1, 2).reshape(-1, patches.shape[1])
    rows = torch.cat([rows, torch.ones(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)], 1)
    return rows.t() @ rows / (rows.shape[0] // x.shape[0])


def exact_g(g):
    rows = g.double().transpose(0, 1).reshape(g.shape[1], -1) if g.dim() == 4 else g.double().t()
    return rows @ rows.t()


def narrow_product_calls(monkeypatch):
    """(input dtype, out_dtype) of every torch.mm / torch.bmm call."""
    calls = []
    for name in ("mm", "bmm"):
        original = getattr(torch, name)

        def product(a, b, *, out_dtype=None, _original=original):
            calls.append((a.dtype, out_dtype))
            return _original(a, b) if out_dtype is None else _original(a, b, out_dtype=out_dtype)

        monkeypatch.setattr(torch, name, product)
    return calls


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("name", MODULES)
def test_tensor_core_factors_equal_the_cast_then_fp32_factors(name, dtype, channels_last, monkeypatch):
    torch.manual_seed(0)
    make, shape = MODULES[name]
    module = make().to(CUDA)
    if channels_last and len(shape) != 4:
        pytest.skip("channels_last is a convolution layout")
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    layer = (LinearLayer if isinstance(module, nn.Linear) else Conv2dLayer)("m", module, torch.float32)
    # What autocast hands the hooks of every layer after the first: bf16/fp16 inputs and gradients.
    x = torch.randn(*shape, device=CUDA).to(dtype)
    with torch.no_grad():
        out = module(x.float())
    g = torch.randn_like(out).to(dtype)
    if channels_last:
        module = module.to(memory_format=memory_format)
        x, g = x.contiguous(memory_format=memory_format), g.contiguous(memory_format=memory_format)
    calls = narrow_product_calls(monkeypatch)
    narrow_a, _ = layer.a_contribution(x)
    narrow_g, _ = layer.g_contribution(g)
    assert calls and set(calls) == {(dtype, torch.float32)}  # the tensor-core products were used
    with fp32_matmul_precision(CUDA, "highest"):
        upcast_a, _ = layer.a_contribution(x, narrow_products=False)
        upcast_g, _ = layer.g_contribution(g, narrow_products=False)
    assert narrow_a.dtype == narrow_g.dtype == torch.float32
    assert relative(narrow_a, upcast_a) <= 1e-6
    assert relative(narrow_g, upcast_g) <= 1e-6
    assert relative(narrow_a, exact_a(module, x)) <= 1e-6
    assert relative(narrow_g, exact_g(g)) <= 1e-6


def network():
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.BatchNorm2d(16),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, stride=2, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1),
        nn.ReLU(),
        nn.Conv2d(32, 32, 1, stride=2),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 10),
    )


@pytest.mark.parametrize("dtype", NARROW)
def test_autocast_factors_from_narrow_products_equal_the_fp32_copy_path_and_stay_fp32(dtype, monkeypatch):
    """Two copies of one model, one step each on the same batch (deterministic cuDNN, so both see the
    same activations and gradients): every factor, BatchNorm's included, within 1e-6 of the
    cast-then-fp32 path (K ≤ 1,024 products per sum here), stored and inverted in fp32."""
    monkeypatch.setattr(torch.backends.cudnn, "deterministic", True)
    monkeypatch.setattr(torch.backends.cudnn, "benchmark", False)
    torch.manual_seed(1)
    weights = network().state_dict()
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(4, 3, 16, 16, generator=generator).to(CUDA)
    y = torch.randint(0, 10, (4,), generator=generator).to(CUDA)
    kfacs = {}
    for narrow in (True, False):
        model = network().to(CUDA)
        model.load_state_dict(weights)
        kfacs[narrow] = kfac_hvd.KFAC(model, damping=1e-2, narrow_factor_products=narrow)
        with torch.autocast("cuda", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        assert kfacs[narrow].step()["numerics"] == {}
    for name, kinds in kfacs[False].factors.items():
        for kind, expected in kinds.items():
            got = kfacs[True].factors[name][kind]
            assert got.dtype == torch.float32 and kfacs[True].inverses[name][kind].dtype == torch.float32
            assert relative(got, expected) <= 1e-6, (name, kind)


def tf32_bound(terms: int) -> float:
    """c in ‖A_high − A‖_F ≤ c · tr A (README): inputs cut to TF32's 10 fraction bits (truncation, the
    worse of the two roundings: 2·2⁻¹⁰ + 2⁻²⁰ per product), ``terms`` products summed in fp32 in any
    order (γ_K ≤ 1.01·K·2⁻²⁴), and two scalings of the sums (2·2⁻²⁴)."""
    return 2 * 2.0**-10 + 2.0**-20 + 1.01 * terms * 2.0**-24 + 2 * 2.0**-24


@pytest.mark.parametrize("precision", ["high", "highest"])
def test_fp32_factors_are_within_the_documented_bound_of_float64(precision, monkeypatch):
    torch.manual_seed(3)
    conv, linear = nn.Conv2d(16, 32, 3, padding=1), nn.Linear(32 * 8 * 8, 10)
    model = nn.Sequential(conv, nn.ReLU(), nn.Flatten(), linear).to(CUDA)
    kfac = kfac_hvd.KFAC(model, factor_matmul_precision=precision)
    seen = {}
    for name, module in (("conv", conv), ("linear", linear)):

        def keep(module, inputs, output, name=name):
            seen[name] = inputs[0].detach()
            output.register_hook(lambda grad: seen.__setitem__(name + " grad", grad.detach()))

        module.register_forward_hook(keep)
    states = []
    gram = kfac_hvd.layers.accumulate_gram
    monkeypatch.setattr(
        kfac_hvd.layers,
        "accumulate_gram",
        lambda total, columns: (
            states.append(torch.backends.cuda.matmul.fp32_precision) or gram(total, columns)
        ),
    )
    x = torch.randn(8, 16, 8, 8, device=CUDA)
    nn.functional.cross_entropy(model(x), torch.randint(0, 10, (8,), device=CUDA)).backward()
    kfac.step()
    assert set(states) == {"tf32" if precision == "high" else "ieee"}
    samples = x.shape[0]
    expected = {
        ("0", "A"): (exact_a(conv, seen["conv"]) / samples, samples * 64),
        ("0", "G"): (exact_g(seen["conv grad"]) * samples, samples * 64),
        ("3", "A"): (exact_a(linear, seen["linear"]) / samples, samples),
        ("3", "G"): (exact_g(seen["linear grad"]) * samples, samples),
    }
    for (name, kind), (exact, terms) in expected.items():
        got = kfac.factors[name][kind]
        assert got.dtype == torch.float32
        error = float((got.double() - exact).norm())
        bound = tf32_bound(terms) if precision == "high" else tf32_bound(terms) - 2 * 2.0**-10 - 2.0**-20
        assert error <= bound * float(exact.trace()), (name, kind, error / float(exact.trace()))
