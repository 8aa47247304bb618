"""How each module type yields its Kronecker factors and its gradient matrix.

Nothing here knows about ranks, schedules or damping: a layer turns a forward input into a factor
contribution, a backward output-gradient into another, and reads/writes its gradient as a matrix.

Conventions (per-sample quantities for a loss that is the mean over the local batch of size N, so the
per-sample output gradient is δ = N · grad_output):

* Linear: A = mean_n a aᵀ (a with a trailing 1 when there is a bias), G = mean_n δ δᵀ.
* Conv2d (KFC, Grosse & Martens 2016): a = unfolded patch (im2col) at each of the S output positions,
  plus 1 for the bias. A = mean over samples *and positions* of a aᵀ; G = mean over samples of the
  *sum over positions* of δ δᵀ. Their Kronecker product equals S·mean(δδᵀ) ⊗ mean(aaᵀ), the KFC
  approximation of the Fisher. Other codes (chainerkfac) put the factor S on A instead of G; the
  product is the same and the π-corrected damping (which balances the factors' traces) makes the
  preconditioned gradient identical. A 1×1 conv on 1×1 inputs (S = 1) is exactly the Linear case.
* BatchNorm2d: unit-wise Fisher, one 2×2 block per channel over (γ, β) built from per-sample gradients
  g_γ = Σ_hw δ·x̂, g_β = Σ_hw δ: F_c = mean_n g gᵀ.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

FactorKinds = Tuple[str, ...]
# Cap on the temporaries of one factor contribution (unfolded patches, fp32 copies of bf16 activations):
# larger batches are processed in chunks of samples.
DEFAULT_UNFOLD_CHUNK_BYTES = 256 * 2 ** 20


class KroneckerLayer(ABC):
    """A Linear or Conv2d layer: F ≈ G ⊗ A, gradient matrix of shape (out, in [+1])."""

    factor_kinds: FactorKinds = ("A", "G")

    def __init__(self, name: str, module: nn.Module, factor_dtype: torch.dtype) -> None:
        self.name = name
        self.module = module
        self.factor_dtype = factor_dtype
        self.has_bias = module.bias is not None

    # Sizes --------------------------------------------------------------------------------------
    @property
    def a_dim(self) -> int:
        weight = self.module.weight
        return weight[0].numel() + int(self.has_bias)

    @property
    def g_dim(self) -> int:
        return self.module.weight.shape[0]

    def factor_shapes(self) -> dict:
        return {"A": (self.a_dim, self.a_dim), "G": (self.g_dim, self.g_dim)}

    def inversion_cost(self) -> float:
        return float(self.a_dim) ** 3 + float(self.g_dim) ** 3

    # Factors ------------------------------------------------------------------------------------
    @abstractmethod
    def _input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        """(rows, a_dim) activations; rows = samples × positions."""

    @abstractmethod
    def _output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        """(rows, g_dim) output gradients, rows ordered like ``_input_rows``."""

    def a_contribution(self, inputs: torch.Tensor) -> Tuple[torch.Tensor, int]:
        """Sum over this batch's samples of their A terms, and the number of samples."""
        rows = self._input_rows(inputs.detach().to(self.factor_dtype))
        if self.has_bias:
            rows = torch.cat([rows, rows.new_ones(rows.shape[0], 1)], dim=1)
        samples = inputs.shape[0]
        positions = rows.shape[0] // samples
        # mean over positions of aaᵀ, summed over samples
        return rows.t() @ rows / positions, samples

    def g_contribution(self, grad_output: torch.Tensor) -> Tuple[torch.Tensor, int]:
        samples = grad_output.shape[0]
        rows = self._output_rows(grad_output.detach().to(self.factor_dtype)) * samples
        # sum over positions of δδᵀ, summed over samples
        return rows.t() @ rows, samples

    # Gradients ----------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor:
        weight = self.module.weight
        grad = weight.grad.reshape(weight.shape[0], -1).to(self.factor_dtype)
        if self.has_bias:
            grad = torch.cat([grad, self.module.bias.grad.to(self.factor_dtype).unsqueeze(1)], dim=1)
        return grad

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        if self.has_bias:
            self.module.bias.grad.copy_(matrix[:, -1])
            matrix = matrix[:, :-1]
        weight.grad.copy_(matrix.reshape(weight.shape))

    def precondition(self, inverses: dict) -> torch.Tensor:
        return inverses["G"] @ self.grad_matrix() @ inverses["A"]


class LinearLayer(KroneckerLayer):
    def _input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(-1, inputs.shape[-1])

    def _output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(-1, grad_output.shape[-1])


class Conv2dLayer(KroneckerLayer):
    def _input_rows(self, inputs: torch.Tensor) -> torch.Tensor:
        conv = self.module
        patches = F.unfold(inputs, conv.kernel_size, dilation=conv.dilation, padding=conv.padding,
                           stride=conv.stride)  # (N, C·kh·kw, S), channel-major like weight.view(out, -1)
        return patches.transpose(1, 2).reshape(-1, patches.shape[1])

    def _output_rows(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.permute(0, 2, 3, 1).reshape(-1, grad_output.shape[1])


class BatchNormLayer:
    """BatchNorm2d with a unit-wise Fisher: one 2×2 block per channel over (γ, β)."""

    factor_kinds: FactorKinds = ("F",)

    def __init__(self, name: str, module: nn.BatchNorm2d, factor_dtype: torch.dtype) -> None:
        self.name = name
        self.module = module
        self.factor_dtype = factor_dtype

    @property
    def channels(self) -> int:
        return self.module.num_features

    def factor_shapes(self) -> dict:
        return {"F": (self.channels, 2, 2)}

    def inversion_cost(self) -> float:
        return 8.0 * self.channels

    def normalised_input(self, inputs: torch.Tensor) -> torch.Tensor:
        bn = self.module
        x = inputs.detach().to(self.factor_dtype)
        if bn.training or bn.running_mean is None:
            mean = x.mean(dim=(0, 2, 3))
            var = x.var(dim=(0, 2, 3), unbiased=False)
        else:
            mean, var = bn.running_mean.to(x.dtype), bn.running_var.to(x.dtype)
        return (x - mean[None, :, None, None]) * torch.rsqrt(var + bn.eps)[None, :, None, None]

    def f_contribution(self, inputs: torch.Tensor, grad_output: torch.Tensor) -> Tuple[torch.Tensor, int]:
        samples = grad_output.shape[0]
        delta = grad_output.detach().to(self.factor_dtype) * samples
        x_hat = self.normalised_input(inputs)
        per_sample = torch.stack([(delta * x_hat).sum(dim=(2, 3)), delta.sum(dim=(2, 3))], dim=2)  # (N, C, 2)
        return torch.einsum("nci,ncj->cij", per_sample, per_sample), samples

    def grad_matrix(self) -> torch.Tensor:
        bn = self.module
        return torch.stack([bn.weight.grad, bn.bias.grad], dim=1).to(self.factor_dtype)  # (C, 2)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        self.module.weight.grad.copy_(matrix[:, 0])
        self.module.bias.grad.copy_(matrix[:, 1])

    def precondition(self, inverses: dict) -> torch.Tensor:
        return torch.einsum("cij,cj->ci", inverses["F"], self.grad_matrix())


Layer = KroneckerLayer | BatchNormLayer


def make_layer(name: str, module: nn.Module, *, include_batchnorm: bool,
               factor_dtype: Optional[torch.dtype] = None) -> Optional[Layer]:
    """The K-FAC view of ``module``, or ``None`` when K-FAC leaves it to the plain optimiser."""
    def dtype_for(param: torch.Tensor) -> torch.dtype:
        # Factors are at least fp32, even for fp16/bf16 models; a float64 model keeps float64.
        return factor_dtype or torch.promote_types(param.dtype, torch.float32)

    if isinstance(module, nn.Linear) and module.weight.requires_grad:
        return LinearLayer(name, module, dtype_for(module.weight))
    if (isinstance(module, nn.Conv2d) and module.weight.requires_grad and module.groups == 1
            and not isinstance(module.padding, str)):
        return Conv2dLayer(name, module, dtype_for(module.weight))
    if (include_batchnorm and isinstance(module, nn.BatchNorm2d) and module.affine
            and module.weight.requires_grad):
        return BatchNormLayer(name, module, dtype_for(module.weight))
    return None
