"""Kronecker factors and Diffs computed directly from a layer's inputs and autograd's output gradients,
following the README's conventions, with no kfac_hvd code: the reference the Diff tests compare with.

The model keeps every K-FAC layer's input and output (``retain_grad``), so after ``backward`` the test
holds, per layer, the input and the gradient of the mean loss with respect to the output; the
per-sample output gradient is δ = N · grad_output with N the batch size.
"""

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import grad, vmap

Key = tuple[str, str]  # (layer name as KFAC names it, factor kind)


class ThreeLayerNet(nn.Module):
    """A 3×3 convolution with bias, BatchNorm2d and a Linear layer, on (N, 2, 4, 4) inputs."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.fc = nn.Linear(3 * 4 * 4, 4)
        self.seen: dict[str, torch.Tensor] = {}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv_out = self.conv(x)
        bn_out = self.bn(conv_out)
        hidden = torch.tanh(bn_out).flatten(1)
        fc_out = self.fc(hidden)
        for tensor in (conv_out, bn_out, fc_out):
            tensor.retain_grad()
        self.seen = {
            "conv_in": x,
            "conv_out": conv_out,
            "bn_in": conv_out,
            "bn_out": bn_out,
            "fc_in": hidden,
            "fc_out": fc_out,
        }
        return fc_out


def make_model(seed: int = 0) -> ThreeLayerNet:
    torch.manual_seed(seed)
    model = ThreeLayerNet().double()
    with torch.no_grad():  # γ, β away from their initial 1, 0, so that x̂ really matters
        model.bn.weight.uniform_(0.5, 1.5)
        model.bn.bias.uniform_(-0.5, 0.5)
    return model


def step_inputs(step: int, batch: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Step 2's inputs carry a fixed spatial pattern (which BatchNorm's per-channel normalisation does
    not remove) and all have class 0: every factor drifts by more than its sampling noise, so the
    noise-aware Diff is not clamped at 0."""
    generator = torch.Generator().manual_seed(1000 * seed + step)
    x = torch.randn(batch, 2, 4, 4, generator=generator, dtype=torch.float64)
    y = torch.randint(0, 4, (batch,), generator=generator)
    if step == 2:
        pattern = torch.randn(2, 4, 4, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
        x, y = x + 2 * pattern, torch.zeros_like(y)
    return x, y


def forward_backward(model: ThreeLayerNet, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
    """One training pass with a mean loss; returns the layers' inputs and output gradients."""
    model.zero_grad()
    nn.functional.cross_entropy(model(x), y).backward()
    seen = model.seen
    return {
        "conv_in": seen["conv_in"].detach(),
        "conv_grad": seen["conv_out"].grad,
        "bn_in": seen["bn_in"].detach(),
        "bn_grad": seen["bn_out"].grad,
        "fc_in": seen["fc_in"].detach(),
        "fc_grad": seen["fc_out"].grad,
    }


def direct_factors(
    model: ThreeLayerNet, seen: dict[str, torch.Tensor], samples: slice = slice(None)
) -> dict[Key, torch.Tensor]:
    """Every factor as the mean over ``samples`` (default: the whole batch) of its per-sample term.
    δ = N·grad_output with N the whole batch, and BatchNorm's x̂ uses the whole batch's statistics,
    as the layers did, whichever samples are averaged."""
    batch = seen["fc_in"].shape[0]
    picked = {key: value[samples] for key, value in seen.items()}
    count = picked["fc_in"].shape[0]

    # Linear: a = [x, 1]; A = mean aaᵀ, G = mean δδᵀ.
    a = torch.cat([picked["fc_in"], torch.ones(count, 1, dtype=torch.float64)], dim=1)
    delta = batch * picked["fc_grad"]
    factors = {("fc", "A"): a.t() @ a / count, ("fc", "G"): delta.t() @ delta / count}

    # Conv2d (KFC): a = im2col patch + 1 at each of the S positions; A = mean over samples and positions
    # of aaᵀ, G = mean over samples of the sum over positions of δδᵀ.
    conv = model.conv
    patches = F.unfold(
        picked["conv_in"], conv.kernel_size, dilation=conv.dilation, padding=conv.padding, stride=conv.stride
    )  # (n, C·3·3, S)
    positions = patches.shape[2]
    patches = torch.cat([patches, torch.ones(count, 1, positions, dtype=torch.float64)], dim=1)
    delta = (batch * picked["conv_grad"]).flatten(2)  # (n, out, S)
    factors[("conv", "A")] = torch.einsum("nis,njs->ij", patches, patches) / (count * positions)
    factors[("conv", "G")] = torch.einsum("nis,njs->ij", delta, delta) / count

    # BatchNorm2d: per channel, g = (Σ_hw δ·x̂, Σ_hw δ); F_c = mean ggᵀ.
    whole = seen["bn_in"]
    mean = whole.mean(dim=(0, 2, 3), keepdim=True)
    variance = whole.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
    x_hat = (picked["bn_in"] - mean) / torch.sqrt(variance + model.bn.eps)
    delta = batch * picked["bn_grad"]
    per_sample = torch.stack([(delta * x_hat).sum(dim=(2, 3)), delta.sum(dim=(2, 3))], dim=2)  # (n, C, 2)
    factors[("bn", "F")] = torch.einsum("nci,ncj->cij", per_sample, per_sample) / count
    return factors


def halves(batch: int) -> tuple[slice, slice]:
    """The two parts the noise estimate compares: the first ⌊n/2⌋ samples and the rest."""
    return slice(0, batch // 2), slice(batch // 2, batch)


def split_half_noise(model: ThreeLayerNet, seen: dict[str, torch.Tensor]) -> dict[Key, float]:
    """v = ‖X₁ − X₂‖²_F · n₁n₂/n² (docs/NOISE.md) from the halves' factors computed directly."""
    batch = seen["fc_in"].shape[0]
    first_part, second_part = halves(batch)
    first, second = direct_factors(model, seen, first_part), direct_factors(model, seen, second_part)
    n1, n2 = batch // 2, batch - batch // 2
    return {key: float((first[key] - second[key]).square().sum()) * n1 * n2 / batch**2 for key in first}


def diff(current: torch.Tensor, previous: torch.Tensor) -> float:
    """Eq. (6): ‖X − X_pre‖_F / ‖X_pre‖_F."""
    return float(torch.linalg.norm((current - previous).flatten()) / torch.linalg.norm(previous.flatten()))


def noise_aware_diff(
    current: torch.Tensor, previous: torch.Tensor, noise: float, previous_noise: float
) -> float:
    """docs/NOISE.md: sqrt(max(0, ‖X − X_pre‖² − V − V_pre)) / ‖X_pre‖."""
    change_sq = float((current - previous).square().sum())
    return math.sqrt(max(0.0, change_sq - noise - previous_noise)) / float(
        torch.linalg.norm(previous.flatten())
    )


def eval_batchnorm_per_sample_grads(bn: nn.BatchNorm2d, x, target) -> dict:
    """Exact per-sample gradients of γ ('weight') and β ('bias') of an eval-mode BatchNorm under a mean
    squared error: running statistics make the samples independent, so torch.func's are exact."""
    params = {k: v.detach() for k, v in bn.named_parameters()}

    def sample_loss(p, xs, ts):
        out = torch.nn.functional.batch_norm(
            xs[None], bn.running_mean, bn.running_var, p["weight"], p["bias"], training=False, eps=bn.eps
        )
        return ((out - ts[None]) ** 2).mean()

    return vmap(grad(sample_loss), in_dims=(None, 0, 0))(params, x, target)
