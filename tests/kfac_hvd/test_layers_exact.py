"""K-FAC maths against direct computations: Linear, Conv2d (KFC), BatchNorm2d (unit-wise)."""

import math

import pytest
import torch
from torch import nn

import kfac_hvd
from kfac_hvd.factors import damping_shifts, inverse_attempt, pack, pi_from_diagonal_means, unpack
from tests.helpers.direct_factors import eval_batchnorm_per_sample_grads

TINY_DAMPING = 1e-20


def one_step(model, kfac, inputs, targets, loss_fn=nn.MSELoss()):
    model.zero_grad()
    loss_fn(model(inputs), targets).backward()
    return kfac.step()


def test_linear_matches_exact_natural_gradient():
    torch.manual_seed(0)
    n, d_in, d_hidden, d_out = 64, 5, 4, 3
    model = nn.Sequential(nn.Linear(d_in, d_hidden), nn.Tanh(), nn.Linear(d_hidden, d_out)).double()
    kfac = kfac_hvd.KFAC(model, damping=TINY_DAMPING)
    x, t = torch.randn(n, d_in, dtype=torch.float64), torch.randn(n, d_out, dtype=torch.float64)
    one_step(model, kfac, x, t)

    # Direct: per-sample loss l_n = mean_d (y_nd - t_nd)^2, delta = dl_n/dy_n.
    lin1, lin2 = model[0], model[2]
    with torch.no_grad():
        h = torch.tanh(lin1(x))
        y = lin2(h)
        delta2 = 2 * (y - t) / d_out
        delta1 = (delta2 @ lin2.weight) * (1 - h**2)
    ones = torch.ones(n, 1, dtype=torch.float64)
    for layer, a, delta in ((lin1, torch.cat([x, ones], 1), delta1), (lin2, torch.cat([h, ones], 1), delta2)):
        A = a.t() @ a / n
        G = delta.t() @ delta / n
        grad_matrix = delta.t() @ a / n  # mean-loss gradient of [W | b]
        expected = torch.linalg.solve(G, grad_matrix) @ torch.linalg.inv(A)
        got = torch.cat([layer.weight.grad, layer.bias.grad[:, None]], 1)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"pi_damping": False},
        {"inverse_method": "eigen"},
        {"inverse_method": "eigen", "pi_damping": False},
    ],
)
def test_linear_damped_update_matches_direct_inverses(options):
    """At γ = 1e-2 the damping matters: ΔW = (G + √γ/π I)⁻¹ ∇W (A + π√γ I)⁻¹ with
    π = sqrt((tr A/dim A)/(tr G/dim G)), or π = 1 without pi_damping; A, G and ∇W computed here."""
    torch.manual_seed(1)
    damping, n = 1e-2, 40
    model = nn.Linear(4, 3).double()
    kfac = kfac_hvd.KFAC(model, damping=damping, **options)
    x, t = torch.randn(n, 4, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    with torch.no_grad():
        y = model(x)
    one_step(model, kfac, x, t)
    a = torch.cat([x, torch.ones(n, 1, dtype=torch.float64)], 1)
    delta = 2 * (y - t) / 3  # per-sample gradient of mean_d (y - t)²
    A, G = a.t() @ a / n, delta.t() @ delta / n
    grad_matrix = delta.t() @ a / n
    pi = math.sqrt((A.trace() / 5) / (G.trace() / 3))
    assert pi != pytest.approx(1.0, abs=0.1)  # with and without π really differ here
    pi = pi if options.get("pi_damping", True) else 1.0
    root = math.sqrt(damping)
    expected = (
        torch.linalg.inv(G + root / pi * torch.eye(3, dtype=torch.float64))
        @ grad_matrix
        @ torch.linalg.inv(A + pi * root * torch.eye(5, dtype=torch.float64))
    )
    got = torch.cat([model.weight.grad, model.bias.grad[:, None]], 1)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_eigen_inverse_clamps_negative_eigenvalues_at_zero():
    """Eigenvalues −1 and 3 of M: (M + s I)⁻¹ by eigen uses max(λ, 0) + s, i.e. 1/s and 1/(3 + s)."""
    from kfac_hvd.factors import inverse_attempt

    rotation = torch.tensor([[0.6, -0.8], [0.8, 0.6]], dtype=torch.float64)
    matrix = rotation @ torch.diag(torch.tensor([-1.0, 3.0], dtype=torch.float64)) @ rotation.t()
    inverse, ok = inverse_attempt(matrix, 0.5, "eigen")
    assert bool(ok)
    expected = rotation @ torch.diag(torch.tensor([1 / 0.5, 1 / 3.5], dtype=torch.float64)) @ rotation.t()
    torch.testing.assert_close(inverse, expected)
    _, cholesky_ok = inverse_attempt(matrix, 0.5, "cholesky")
    assert not bool(cholesky_ok)  # indefinite even after the shift


def test_conv_1x1_on_1x1_inputs_equals_linear():
    torch.manual_seed(2)
    linear = nn.Linear(6, 4).double()
    conv = nn.Conv2d(6, 4, kernel_size=1).double()
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    x, t = torch.randn(32, 6, dtype=torch.float64), torch.randn(32, 4, dtype=torch.float64)
    kfac_linear = kfac_hvd.KFAC(linear, damping=1e-3)
    kfac_conv = kfac_hvd.KFAC(conv, damping=1e-3)
    one_step(linear, kfac_linear, x, t)
    conv.zero_grad()
    nn.MSELoss()(conv(x[:, :, None, None]).flatten(1), t).backward()
    kfac_conv.step()
    torch.testing.assert_close(conv.weight.grad[:, :, 0, 0], linear.weight.grad)
    torch.testing.assert_close(conv.bias.grad, linear.bias.grad)
    torch.testing.assert_close(kfac_conv.factors[""]["A"], kfac_linear.factors[""]["A"])
    torch.testing.assert_close(kfac_conv.factors[""]["G"], kfac_linear.factors[""]["G"])


def test_conv_factors_match_explicit_patches():
    """A = mean over samples and positions of a aᵀ; G = mean over samples of Σ_positions δ δᵀ."""
    torch.manual_seed(3)
    conv = nn.Conv2d(2, 3, kernel_size=3, stride=2, padding=1).double()
    kfac = kfac_hvd.KFAC(conv, damping=1e-3)
    x = torch.randn(5, 2, 7, 7, dtype=torch.float64)
    out = conv(x)
    target = torch.randn_like(out)
    nn.MSELoss()(out, target).backward()
    grad_out = (2 * (out - target) / out.numel()).detach()  # d(mean loss)/d output
    kfac.step()

    n, _, oh, ow = out.shape
    padded = nn.functional.pad(x, (1, 1, 1, 1))
    A = torch.zeros(19, 19, dtype=torch.float64)
    G = torch.zeros(3, 3, dtype=torch.float64)
    for sample in range(n):
        for i in range(oh):
            for j in range(ow):
                patch = padded[sample, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].reshape(-1)  # channel-major
                a = torch.cat([patch, torch.ones(1, dtype=torch.float64)])
                A += torch.outer(a, a)
                delta = grad_out[sample, :, i, j] * n
                G += torch.outer(delta, delta)
    A /= n * oh * ow
    G /= n
    torch.testing.assert_close(kfac.factors[""]["A"], A)
    torch.testing.assert_close(kfac.factors[""]["G"], G)


def test_batchnorm_unitwise_fisher_matches_per_sample_gradients():
    torch.manual_seed(4)
    bn = nn.BatchNorm2d(3).double()
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    bn.eval()  # running statistics make samples independent, so torch.func's per-sample gradients are exact
    damping = 1e-2
    layer = kfac_hvd.KFAC(bn, damping=damping).layers[""]
    x = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    target = torch.randn(8, 3, 4, 4, dtype=torch.float64)
    per_sample = eval_batchnorm_per_sample_grads(bn, x, target)
    g = torch.stack([per_sample["weight"], per_sample["bias"]], dim=2)  # (N, C, 2)
    F = torch.einsum("nci,ncj->cij", g, g) / x.shape[0]

    out = bn(x)
    grad_output = (2 * (out - target) / out.numel()).detach()  # d(mean loss)/d output
    contribution, samples = layer.f_contribution(x, grad_output)
    # The layer returns Σ_n over grad_output-based gradients; the factor is N²·Σ/N (δ = N·grad_output).
    torch.testing.assert_close(contribution * samples, F)

    mean_grad = g.mean(0)
    bn.weight.grad, bn.bias.grad = mean_grad[:, 0].clone(), mean_grad[:, 1].clone()
    eye = torch.eye(2, dtype=torch.float64)
    update = layer.precondition({"F": torch.linalg.inv(F + damping * eye)}, layer.grad_matrix())
    expected = torch.linalg.solve(F + damping * eye, mean_grad.unsqueeze(-1))[..., 0]
    torch.testing.assert_close(update, expected)


def test_batchnorm_train_mode_per_sample_gradients_sum_to_gradient():
    torch.manual_seed(5)
    bn = nn.BatchNorm2d(4).double()
    kfac = kfac_hvd.KFAC(bn, damping=1e-3)
    x = torch.randn(6, 4, 3, 3, dtype=torch.float64)
    out = bn(x)
    target = torch.randn_like(out)
    out.retain_grad()
    nn.MSELoss()(out, target).backward()
    # Per-sample (γ, β) gradients from the batch statistics, computed here independently.
    x_hat = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(
        x.var((0, 2, 3), unbiased=False, keepdim=True) + bn.eps
    )
    delta = out.grad * x.shape[0]
    g = torch.stack([(delta * x_hat).sum((2, 3)), delta.sum((2, 3))], 2)
    torch.testing.assert_close(g.mean(0)[:, 0], bn.weight.grad)
    torch.testing.assert_close(g.mean(0)[:, 1], bn.bias.grad)
    kfac.step()
    torch.testing.assert_close(kfac.factors[""]["F"], torch.einsum("nci,ncj->cij", g, g) / 6)


@pytest.mark.parametrize("shape", [(5, 5), (3, 2, 2), (1, 1)])
def test_triangle_packing_round_trips_exactly(shape):
    m = torch.randn(*shape)
    m = m + m.transpose(-1, -2)
    packed = pack(m, True)
    assert packed.numel() == math.prod(shape[:-2]) * shape[-1] * (shape[-1] + 1) // 2
    assert torch.equal(unpack(packed, shape, True), m)
    assert torch.equal(unpack(pack(m, False), shape, False), m)


def test_pi_damping_matches_formula():
    A = torch.diag(torch.tensor([4.0, 2.0, 6.0]))
    G = torch.diag(torch.tensor([1.0, 0.5]))
    pi = pi_from_diagonal_means(torch.diagonal(A).mean().item(), torch.diagonal(G).mean().item())
    assert pi == pytest.approx(math.sqrt((12 / 3) / (1.5 / 2)))
    shifts = damping_shifts(["A", "G"], 0.01, pi)
    inv = {
        kind: inverse_attempt(factor, shifts[kind], "cholesky")[0] for kind, factor in (("A", A), ("G", G))
    }
    torch.testing.assert_close(inv["A"], torch.diag(1 / (torch.tensor([4.0, 2.0, 6.0]) + pi * 0.1)))
    torch.testing.assert_close(inv["G"], torch.diag(1 / (torch.tensor([1.0, 0.5]) + 0.1 / pi)))
