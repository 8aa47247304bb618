"""Factor products from bf16/fp16 inputs and the precision of K-FAC's own products, on the CPU.

The dispatch: on the CPU narrow inputs are cast to fp32 first, exactly as before narrow products existed
(the reference below is that formula, written out); the narrow path, run here with CUDA's promise
(exact products, fp32 sums, fp32 result) emulated, honours ``unfold_chunk_bytes`` at the real element
sizes; the TF32 setting surrounds K-FAC's factor products only. Tensor cores themselves:
tests/kfac_hvd/test_cuda_products.py.
"""

import re

import pytest
import torch
from torch import nn
from torch.nn import functional as F
from torch.overrides import TorchFunctionMode

import kfac_hvd
import kfac_hvd.precision
from kfac_hvd.layers import BatchNormLayer, Conv2dLayer, LinearLayer
from kfac_hvd.precision import fp32_matmul_precision

NARROW = [torch.bfloat16, torch.float16]
MATMUL = torch.backends.cuda.matmul


def upcast_gram(columns):
    """Σ_n X_n X_nᵀ of fp32 (n, d, s) columns as the upcast path has always formed it."""
    samples, width, positions = columns.shape
    rows = columns.transpose(1, 2)
    total = torch.zeros(width, width)
    if width > positions or rows.is_contiguous():
        flat = rows.reshape(samples * positions, width)
        total.addmm_(flat.t(), flat)
    else:
        total += torch.bmm(columns, rows).sum(dim=0)
    return total


def upcast_a(module, x):
    """Σ_n of mean_positions a aᵀ from ``x`` cast to fp32, one chunk, bias column added analytically."""
    x = x.float()
    if isinstance(module, nn.Linear):
        columns = x.reshape(x.shape[0], -1, x.shape[-1]).transpose(1, 2)
    elif module.kernel_size == (1, 1) and module.padding == (0, 0):
        columns = x[:, :, :: module.stride[0], :: module.stride[1]].reshape(x.shape[0], x.shape[1], -1)
    else:
        columns = F.unfold(
            x, module.kernel_size, dilation=module.dilation, padding=module.padding, stride=module.stride
        )
    width, positions = columns.shape[1], columns.shape[2]
    total = torch.zeros(width + 1, width + 1)
    total[:width, :width] = upcast_gram(columns)
    column = columns.sum(dim=(0, 2))
    total[:width, width] += column
    total[width, :width] += column
    total[width, width] = x.shape[0] * positions
    return total.div_(positions)


def upcast_batchnorm(bn, x, g):
    x, delta = x.float(), g.float()
    count = x.numel() // x.shape[1]
    mean = x.sum(dim=(0, 2, 3)) / count
    var = (x - mean[None, :, None, None]).square().sum(dim=(0, 2, 3)) / count
    x_hat = (x - mean[None, :, None, None]) * torch.rsqrt(var + bn.eps)[None, :, None, None]
    grads = torch.stack([(delta * x_hat).sum(dim=(2, 3)), delta.sum(dim=(2, 3))], dim=2)
    return torch.zeros(x.shape[1], 2, 2) + torch.einsum("nci,ncj->cij", grads, grads)


CASES = [
    (nn.Linear(12, 6), (10, 12)),  # rows are a view: addmm
    (nn.Conv2d(3, 5, 3, padding=1), (6, 3, 8, 8)),  # positions > width: batched
    (nn.Conv2d(16, 4, 3, stride=2), (6, 16, 5, 5)),  # width > positions: addmm of a copy
    (nn.Conv2d(8, 4, 1, stride=2), (6, 8, 6, 6)),
]  # pointwise, strided


@pytest.mark.parametrize("narrow_products", [True, False])
@pytest.mark.parametrize("dtype", NARROW)
@pytest.mark.parametrize("module,shape", CASES)
def test_narrow_inputs_on_the_cpu_give_the_upcast_factors_bit_for_bit(module, shape, dtype, narrow_products):
    torch.manual_seed(0)
    layer = (LinearLayer if isinstance(module, nn.Linear) else Conv2dLayer)("m", module, torch.float32)
    x = torch.randn(*shape).to(dtype)
    with torch.no_grad():
        g = torch.randn_like(module(x.float())).to(dtype)
    a, _ = layer.a_contribution(x, narrow_products=narrow_products)
    got_g, _ = layer.g_contribution(g, narrow_products=narrow_products)
    assert a.dtype == got_g.dtype == torch.float32
    assert torch.equal(a, upcast_a(module, x))
    g_columns = g.float().reshape(g.shape[0], g.shape[1], -1) if g.dim() == 4 else g.float()[:, :, None]
    assert torch.equal(got_g, upcast_gram(g_columns))


@pytest.mark.parametrize("narrow_products", [True, False])
@pytest.mark.parametrize("dtype", NARROW)
def test_batchnorm_narrow_inputs_on_the_cpu_give_the_upcast_factor_bit_for_bit(dtype, narrow_products):
    torch.manual_seed(1)
    bn = nn.BatchNorm2d(3)
    layer = BatchNormLayer("bn", bn, torch.float32)
    x, g = torch.randn(5, 3, 4, 4).to(dtype), torch.randn(5, 3, 4, 4).to(dtype)
    f, _ = layer.f_contribution(x, g, narrow_products=narrow_products)
    assert torch.equal(f, upcast_batchnorm(bn, x, g))


def network():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2),
        nn.ReLU(),
        nn.Conv2d(8, 8, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 7 * 7, 10),
    )


@pytest.mark.parametrize("dtype", NARROW)
def test_both_settings_of_narrow_factor_products_give_the_same_factors_on_the_cpu(dtype):
    torch.manual_seed(2)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    weights = network().state_dict()
    factors = []
    for narrow in (True, False):
        model = network()
        model.load_state_dict(weights)
        kfac = kfac_hvd.KFAC(model, narrow_factor_products=narrow)
        with torch.autocast("cpu", dtype=dtype):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        kfac.step()
        factors.append({(name, kind): t for name, kinds in kfac.factors.items() for kind, t in kinds.items()})
    assert factors[0].keys() == factors[1].keys() and len(factors[0]) == 9
    for key, factor in factors[0].items():
        assert factor.dtype == torch.float32
        assert torch.equal(factor, factors[1][key]), key


@pytest.fixture
def narrow_products_on_the_cpu(monkeypatch):
    """The narrow path on the CPU, with what CUDA's ``out_dtype`` products promise emulated: exact
    products of the narrow inputs, summed and returned in fp32. Returns the products' (dtype, batch)."""
    monkeypatch.setattr(kfac_hvd.precision, "NARROW_PRODUCT_DEVICES", ("cuda", "cpu"))
    calls = []

    def emulate(original):
        def product(a, b, *, out_dtype=None):
            if out_dtype is None:
                return original(a, b)
            calls.append((a.dtype, a.shape[0] if a.dim() == 3 else None))
            return original(a.to(out_dtype), b.to(out_dtype))

        return product

    monkeypatch.setattr(torch, "mm", emulate(torch.mm))
    monkeypatch.setattr(torch, "bmm", emulate(torch.bmm))
    return calls


def record_unfolds(monkeypatch):
    unfolded = []
    original = F.unfold
    monkeypatch.setattr(F, "unfold", lambda *a, **k: unfolded.append(original(*a, **k)) or unfolded[-1])
    return unfolded


def test_unfold_chunk_bytes_counts_narrow_elements_at_their_size(narrow_products_on_the_cpu, monkeypatch):
    """Conv2d(4, 8, 3, padding=1) on 10×10: 36 patch values at 100 positions. One bf16 sample costs its
    patches (36·100·2 bytes) and their rows (36·100·2 ≥ the 36·36·4 of its fp32 products): 14,400 bytes,
    so a 43,200-byte cap takes 3 samples a chunk. Cast to fp32 first, one sample costs its copy and
    patches ((400 + 3600)·4) and rows (3600·4): 30,400 bytes, one sample a chunk."""
    torch.manual_seed(3)
    conv = nn.Conv2d(4, 8, 3, padding=1)
    layer = Conv2dLayer("c", conv, torch.float32)
    x = torch.randn(7, 4, 10, 10).to(torch.bfloat16)
    unfolded = record_unfolds(monkeypatch)
    narrow, _ = layer.a_contribution(x, chunk_bytes=43_200)
    assert [t.shape[0] for t in unfolded] == [3, 3, 1]
    assert {t.dtype for t in unfolded} == {torch.bfloat16}
    assert all(t.numel() * t.element_size() <= 43_200 for t in unfolded)
    assert [batch for _, batch in narrow_products_on_the_cpu] == [3, 3, 1]  # batched: positions > width
    assert {dtype for dtype, _ in narrow_products_on_the_cpu} == {torch.bfloat16}
    unfolded.clear()
    upcast, _ = layer.a_contribution(x, chunk_bytes=43_200, narrow_products=False)
    assert [t.shape[0] for t in unfolded] == [1] * 7
    assert {t.dtype for t in unfolded} == {torch.float32}
    torch.testing.assert_close(narrow, upcast, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "module,shape,cap,chunks",
    [
        # 8 channels at 100 positions, NCHW: 800 bf16 values and an 8×8 fp32 product per sample = 1,856 bytes
        # (cast first: two fp32 copies, 6,656 bytes); batched products, since the rows are not a view.
        (nn.Conv2d(4, 8, 3, padding=1), (7, 8, 10, 10), 3 * 1856, [3, 3, 1]),
        # Linear(5 → 6): 6 bf16 values and a 6×6 fp32 product per sample = 156 bytes: one product per chunk.
        (nn.Linear(5, 6), (7, 6), 2 * 156, [None] * 4),
    ],
)
def test_gradient_chunks_count_narrow_elements_at_their_size(
    narrow_products_on_the_cpu, module, shape, cap, chunks
):
    torch.manual_seed(4)
    layer = (LinearLayer if isinstance(module, nn.Linear) else Conv2dLayer)("m", module, torch.float32)
    g = torch.randn(*shape).to(torch.float16)
    narrow, _ = layer.g_contribution(g, chunk_bytes=cap)
    assert [batch for _, batch in narrow_products_on_the_cpu] == chunks
    assert {dtype for dtype, _ in narrow_products_on_the_cpu} == {torch.float16}
    columns = g.float().reshape(shape[0], shape[1], -1)
    torch.testing.assert_close(narrow, upcast_gram(columns), rtol=1e-6, atol=1e-6)


def test_narrow_batchnorm_on_the_emulated_path_matches_the_upcast_factor(narrow_products_on_the_cpu):
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(3)
    x, g = torch.randn(6, 3, 5, 5).to(torch.bfloat16), torch.randn(6, 3, 5, 5).to(torch.bfloat16)
    f, _ = BatchNormLayer("bn", bn, torch.float32).f_contribution(x, g, chunk_bytes=1)
    assert f.dtype == torch.float32
    torch.testing.assert_close(f, upcast_batchnorm(bn, x, g), rtol=1e-5, atol=1e-6)


def precision_state():
    """(legacy face, cuBLAS per-backend value, oneDNN per-backend value); the legacy getter refuses
    to answer when the two APIs were mixed."""
    try:
        legacy = torch.get_float32_matmul_precision()
    except RuntimeError:
        legacy = "mixed"
    return legacy, MATMUL.fp32_precision, torch.backends.mkldnn.matmul.fp32_precision


@pytest.fixture
def restore_matmul_precision():
    assert precision_state() == ("highest", "none", "none")  # PyTorch's defaults
    yield
    torch.set_float32_matmul_precision("highest")
    MATMUL.fp32_precision = torch.backends.mkldnn.matmul.fp32_precision = "none"


SETUPS = {
    "default": lambda: None,
    "legacy allow_tf32": lambda: setattr(MATMUL, "allow_tf32", True),
    "new API only": lambda: setattr(MATMUL, "fp32_precision", "tf32"),
    "global medium": lambda: torch.set_float32_matmul_precision("medium"),
}


@pytest.mark.parametrize("setup", SETUPS)
def test_matmul_precision_is_set_inside_and_restored_after_even_on_an_exception(
    restore_matmul_precision, setup
):
    SETUPS[setup]()
    before = precision_state()
    for precision, inside in (("high", "tf32"), ("highest", "ieee")):
        with fp32_matmul_precision(torch.device("cuda"), precision):
            # Both faces agree inside, so the legacy getter (which TunableOp's GEMMs call) answers.
            assert (MATMUL.fp32_precision, MATMUL.allow_tf32) == (inside, inside == "tf32")
        assert precision_state() == before
        with pytest.raises(ZeroDivisionError):
            with fp32_matmul_precision(torch.device("cuda"), precision):
                1 / 0
        assert precision_state() == before
    with fp32_matmul_precision(torch.device("cpu"), "high"):
        assert precision_state() == before  # CPU products have no TF32: nothing is touched


class PrecisionSeen(TorchFunctionMode):
    """The cuBLAS fp32 precision in force at each call of the model's layers and of ``@`` (autograd's
    backward pass runs without Python modes: the factor products are watched by ``watch`` instead)."""

    NAMES = {"linear", "conv2d", "matmul", "__matmul__"}

    def __init__(self):
        super().__init__()
        self.seen = {}

    def note(self, name):
        self.seen.setdefault(name, []).append(MATMUL.fp32_precision)

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") in self.NAMES:
            self.note(func.__name__.strip("_"))
        return func(*args, **(kwargs or {}))

    def watch(self, monkeypatch):
        gram, einsum = kfac_hvd.layers.accumulate_gram, torch.einsum
        monkeypatch.setattr(
            kfac_hvd.layers,
            "accumulate_gram",
            lambda total, columns: self.note("gram") or gram(total, columns),
        )
        monkeypatch.setattr(
            torch, "einsum", lambda equation, *operands: self.note(equation) or einsum(equation, *operands)
        )


@pytest.mark.parametrize(
    "model_precision,factor_precision,inside", [("tf32", "highest", "ieee"), ("ieee", "high", "tf32")]
)
def test_factor_matmul_precision_applies_to_the_factor_products_only(
    monkeypatch, restore_matmul_precision, model_precision, factor_precision, inside
):
    """With the setting applied to CPU products (as on CUDA): the factor products (the Gram products of
    A and G, BatchNorm's einsum for F) run at ``factor_matmul_precision``, the model's layers at the
    caller's setting, the preconditioning products (@, BatchNorm's einsum) in full fp32."""
    monkeypatch.setattr(kfac_hvd.precision, "TF32_DEVICES", ("cuda", "cpu"))
    torch.manual_seed(6)
    model = network()
    kfac = kfac_hvd.KFAC(model, factor_matmul_precision=factor_precision)
    MATMUL.allow_tf32 = model_precision == "tf32"
    mode = PrecisionSeen()
    mode.watch(monkeypatch)
    with mode:
        nn.functional.cross_entropy(model(torch.randn(4, 3, 16, 16)), torch.randint(0, 10, (4,))).backward()
        kfac.step()
    seen = {name: set(states) for name, states in mode.seen.items()}
    assert seen["linear"] == seen["conv2d"] == {model_precision}
    assert len(mode.seen["gram"]) == 8  # A and G of three convolutions and the linear layer
    assert seen["gram"] == seen["nci,ncj->cij"] == {inside}
    assert seen["matmul"] == seen["cij,cj->ci"] == {"ieee"}
    assert MATMUL.fp32_precision == model_precision


@pytest.mark.parametrize(
    "bad",
    [
        {"narrow_factor_products": 1},
        {"narrow_factor_products": "yes"},
        {"factor_matmul_precision": "medium"},
        {"factor_matmul_precision": "HIGH"},
        {"factor_matmul_precision": None},
        {"factor_matmul_precision": ["high"]},
    ],
)
def test_precision_options_are_validated(bad):
    ((option, value),) = bad.items()
    with pytest.raises(ValueError, match=f"{option} must be .*got {re.escape(repr(value))}"):
        kfac_hvd.KFAC(network(), **bad)
