"""How each module type yields its Kronecker factors and its gradient matrix.

Nothing here knows about ranks, schedules or damping: a layer turns a forward input into a factor
contribution, a backward output-gradient into another, and reads/writes its gradient as a matrix.

Conventions (per-sample quantities for a loss that is the mean over the step's N samples — one
batch, or the micro-batches of one step with gradient accumulation — so the per-sample output gradient
is δ = N · grad_output):

* Linear: A = mean_n a aᵀ (a with a trailing 1 when there is a bias), G = mean_n δ δᵀ.
* Conv2d (KFC, Grosse & Martens 2016): a = unfolded patch (im2col) at each of the S output positions,
  plus 1 for the bias. A = mean over samples *and positions* of a aᵀ; G = mean over samples of the
  *sum over positions* of δ δᵀ. Their Kronecker product equals S·mean(δδᵀ) ⊗ mean(aaᵀ), the KFC
  approximation of the Fisher. Other codes (chainerkfac) put the factor S on A instead of G; the
  product is the same and the π-corrected damping (which balances the factors' traces) makes the
  preconditioned gradient identical. A 1×1 conv on 1×1 inputs (S = 1) is exactly the Linear case.
* BatchNorm2d: from per-sample gradients g_γ = Σ_hw δ·x̂, g_β = Σ_hw δ (one value per channel each),
  either unit-wise (``batchnorm_fisher="unit_wise"``), one 2×2 block per channel over (γ_c, β_c):
  F_c = mean_n g_c g_cᵀ; or ``"full"``, one 2C×2C block over g = [g_γ; g_β] (the C γ's, then the C β's):
  F = mean_n g gᵀ, the empirical Fisher block of the paper's released code (chainerkfac's
  ``FisherBlockBatchNormalization``: ``grad.T.dot(grad) / n``). Its diagonal 2×2 sub-blocks are the
  unit-wise blocks.

A layer returns *sums* over its samples (and the count); N is known only when the step's last
micro-batch has passed, so the capture turns sums into factors: A = Σ/N, G = F = N²·Σ/N.

Sums are in ``factor_dtype``. bf16/fp16 inputs on CUDA are multiplied as they are, with an fp32 result
(``narrow_products``, see :mod:`kfac_hvd.precision`); otherwise they are cast to ``factor_dtype`` first.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

from .precision import takes_narrow_inputs

FactorKinds = tuple[str, ...]
# Cap on the temporaries of one factor contribution (unfolded patches, fp32 copies of bf16 activations,
# products), counted at their real element sizes: larger batches are processed in chunks of samples.
DEFAULT_UNFOLD_CHUNK_BYTES = 256 * 2**20
# BatchNorm's Fisher block: 2×2 per channel, or one 2C×2C block over all of (γ, β) (see the module docstring)
BATCHNORM_FISHERS = ("unit_wise", "full")


def sample_chunks(tensor: torch.Tensor, bytes_per_sample: int, chunk_bytes: int) -> Iterator[torch.Tensor]:
    """Consecutive slices of ``tensor`` along the sample dimension whose temporaries stay under
    ``chunk_bytes`` (at least one sample each)."""
    per_chunk = max(1, chunk_bytes // max(1, bytes_per_sample))
    for start in range(0, tensor.shape[0], per_chunk):
        yield tensor[start : start + per_chunk]


class KroneckerLayer(ABC):
    """A Linear or Conv2d layer: F ≈ G ⊗ A, gradient matrix of shape (out, in [+1])."""

    factor_kinds: FactorKinds = ("A", "G")

    def __init__(self, name: str, module: nn.Linear | nn.Conv2d, factor_dtype: torch.dtype) -> None:
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
    def _input_columns(self, inputs: torch.Tensor) -> torch.Tensor:
        """(samples, a_dim without bias, positions) activations, channel-major like weight.view(out, -1)."""

    @abstractmethod
    def _output_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        """(samples, g_dim, positions) output gradients, positions ordered like ``_input_columns``."""

    def _input_sample_bytes(self, inputs: torch.Tensor, narrow: bool) -> int:
        """Bytes of the temporaries one sample of ``inputs`` costs in :meth:`a_contribution`: the copy in
        ``factor_dtype`` (none when ``narrow``), its unfolded patches and their rows, or their products."""
        width = self.a_dim - int(self.has_bias)
        positions = self._positions(inputs)
        columns = _element_bytes(inputs.dtype if narrow else self.factor_dtype)
        copied = 0 if narrow else inputs[0].numel()
        return (copied + width * positions) * columns + width * max(
            positions * columns, width * _element_bytes(self.factor_dtype)
        )

    def _positions(self, inputs: torch.Tensor) -> int:
        return inputs[0].numel() // inputs.shape[-1]

    def a_contribution(
        self,
        inputs: torch.Tensor,
        *,
        chunk_bytes: int = DEFAULT_UNFOLD_CHUNK_BYTES,
        narrow_products: bool = True,
    ) -> tuple[torch.Tensor, int]:
        """Sum over this batch's samples of their A terms (mean over positions of aaᵀ), and the number
        of samples. Summed in ``factor_dtype`` chunk by chunk; the bias column of ones is added
        analytically instead of being concatenated to every row."""
        samples = inputs.shape[0]
        width = self.a_dim - int(self.has_bias)
        narrow = takes_narrow_inputs(inputs, self.factor_dtype, narrow_products)
        total = torch.zeros(self.a_dim, self.a_dim, dtype=self.factor_dtype, device=inputs.device)
        weights_block = total[:width, :width]
        positions = 1
        for chunk in sample_chunks(inputs, self._input_sample_bytes(inputs, narrow), chunk_bytes):
            columns = self._input_columns(chunk if narrow else chunk.to(self.factor_dtype))
            accumulate_gram(weights_block, columns)
            if self.has_bias:
                column = columns.sum(dim=(0, 2), dtype=self.factor_dtype)
                total[:width, width] += column
                total[width, :width] += column
            positions = columns.shape[2]
        if self.has_bias:
            total[width, width] = samples * positions
        return total.div_(positions), samples

    def g_contribution(
        self,
        grad_output: torch.Tensor,
        *,
        chunk_bytes: int = DEFAULT_UNFOLD_CHUNK_BYTES,
        narrow_products: bool = True,
    ) -> tuple[torch.Tensor, int]:
        """Sum over samples of Σ_positions ggᵀ with g = grad_output, and the number of samples. With
        δ = N·g this is Σ δδᵀ / N²: the capture multiplies by the step's N² (see module docstring)."""
        samples = grad_output.shape[0]
        narrow = takes_narrow_inputs(grad_output, self.factor_dtype, narrow_products)
        total = torch.zeros(self.g_dim, self.g_dim, dtype=self.factor_dtype, device=grad_output.device)
        # The copy in factor_dtype (none when narrow), the rows (a copy for channels_last), the products.
        copies, columns = (1, grad_output.dtype) if narrow else (2, self.factor_dtype)
        per_sample = copies * grad_output[0].numel() * _element_bytes(
            columns
        ) + self.g_dim**2 * _element_bytes(self.factor_dtype)
        for chunk in sample_chunks(grad_output, per_sample, chunk_bytes):
            accumulate_gram(total, self._output_columns(chunk if narrow else chunk.to(self.factor_dtype)))
        return total, samples

    # Gradients ----------------------------------------------------------------------------------
    def grad_matrix(self) -> torch.Tensor:
        weight = self.module.weight
        grad = _grad(weight).reshape(weight.shape[0], -1).to(self.factor_dtype)
        if self.has_bias:
            grad = torch.cat([grad, _grad(self.module.bias).to(self.factor_dtype).unsqueeze(1)], dim=1)
        return grad

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        weight = self.module.weight
        if self.has_bias:
            _grad(self.module.bias).copy_(matrix[:, -1])
            matrix = matrix[:, :-1]
        _grad(weight).copy_(matrix.reshape(weight.shape))

    def precondition(self, inverses: dict, gradient: torch.Tensor) -> torch.Tensor:
        """G⁻¹ · gradient · A⁻¹ for the gradient matrix of :meth:`grad_matrix` (``KFAC`` runs it in full fp32)."""
        return inverses["G"] @ gradient @ inverses["A"]


class LinearLayer(KroneckerLayer):
    def _input_columns(self, inputs: torch.Tensor) -> torch.Tensor:
        return inputs.reshape(inputs.shape[0], -1, inputs.shape[-1]).transpose(1, 2)

    def _output_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.reshape(grad_output.shape[0], -1, grad_output.shape[-1]).transpose(1, 2)


class Conv2dLayer(KroneckerLayer):
    module: nn.Conv2d

    @property
    def _padding(self) -> tuple[int, ...]:
        padding = self.module.padding
        assert not isinstance(padding, str)  # make_layer leaves "same"/"valid" to the plain optimiser
        return padding

    @property
    def _pointwise(self) -> bool:
        """A 1×1 convolution without padding reads one pixel per output position: no unfold needed."""
        return tuple(self.module.kernel_size) == (1, 1) and tuple(self._padding) == (0, 0)

    def _positions(self, inputs: torch.Tensor) -> int:
        conv, padding = self.module, self._padding
        kernel, dilation, stride = conv.kernel_size, conv.dilation, conv.stride
        height, width = inputs.shape[-2:]
        out_h = (height + 2 * padding[0] - dilation[0] * (kernel[0] - 1) - 1) // stride[0] + 1
        out_w = (width + 2 * padding[1] - dilation[1] * (kernel[1] - 1) - 1) // stride[1] + 1
        return out_h * out_w

    def _input_columns(self, inputs: torch.Tensor) -> torch.Tensor:
        conv = self.module
        if self._pointwise:
            picked = inputs[:, :, :: conv.stride[0], :: conv.stride[1]]
            return picked.reshape(inputs.shape[0], inputs.shape[1], -1)
        # (N, C·kh·kw, S), channel-major like weight.view(out, -1)
        return F.unfold(
            inputs, conv.kernel_size, dilation=conv.dilation, padding=self._padding, stride=conv.stride
        )

    def _output_columns(self, grad_output: torch.Tensor) -> torch.Tensor:
        return grad_output.flatten(2)  # a view for NCHW; a copy for channels_last (see accumulate_gram)


def accumulate_gram(total: torch.Tensor, columns: torch.Tensor) -> None:
    """total += Σ_n X_n X_nᵀ for columns X of shape (n, d, s), choosing the cheaper way: one matrix
    product of the (n·s, d) rows when they are a view (channels_last gradients, linear layers) or when
    d > s, else a batched product (n, d, d) summed over n, which avoids copying n·s·d values when the
    positions outnumber the channels (early convolutions). Columns narrower than ``total`` (bf16/fp16
    for an fp32 total, on CUDA) are multiplied as they are, with ``total``'s dtype as the result."""
    samples, width, positions = columns.shape
    rows = columns.transpose(1, 2)
    narrow = columns.dtype != total.dtype
    if width > positions or rows.is_contiguous():
        flat = rows.reshape(samples * positions, width)
        if narrow:
            total += torch.mm(flat.t(), flat, out_dtype=total.dtype)
        else:
            total.addmm_(flat.t(), flat)
    elif narrow:
        total += torch.bmm(columns, rows, out_dtype=total.dtype).sum(dim=0)
    else:
        total += torch.bmm(columns, rows).sum(dim=0)


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

    def statistics(
        self,
        inputs: torch.Tensor,
        chunk_bytes: int = DEFAULT_UNFOLD_CHUNK_BYTES,
        *,
        narrow_products: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and biased variance per channel: the batch's in training mode (two passes, chunked,
        summed in ``factor_dtype``), else the running statistics."""
        bn = self.module
        if not bn.training and bn.running_mean is not None and bn.running_var is not None:
            return bn.running_mean.to(self.factor_dtype), bn.running_var.to(self.factor_dtype)
        cast = self._caster(inputs, narrow_products)
        per_sample = inputs[0].numel() * _element_bytes(self.factor_dtype)
        count = inputs.numel() // inputs.shape[1]
        mean = (
            sum(
                cast(chunk).sum(dim=(0, 2, 3), dtype=self.factor_dtype)
                for chunk in sample_chunks(inputs, per_sample, chunk_bytes)
            )
            / count
        )
        centred = mean[None, :, None, None]
        var = (
            sum(
                (cast(chunk) - centred).square().sum(dim=(0, 2, 3))
                for chunk in sample_chunks(inputs, per_sample, chunk_bytes)
            )
            / count
        )
        return mean, var

    def f_contribution(
        self,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        *,
        chunk_bytes: int = DEFAULT_UNFOLD_CHUNK_BYTES,
        narrow_products: bool = True,
        statistics: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, int]:
        """Σ_n g_n g_nᵀ per channel with g_n = (Σ_hw g·x̂, Σ_hw g) from g = grad_output (the capture
        multiplies by the step's N², as for G), and the number of samples; of a full block, over all 2C
        values of g_n at once. ``statistics``: the mean and variance x̂ uses, when ``inputs`` is part of
        the batch that BatchNorm normalised."""
        total = torch.zeros(self.factor_shapes()["F"], dtype=self.factor_dtype, device=grad_output.device)
        for per_sample_grads in self._per_sample_gradients(
            inputs, grad_output, chunk_bytes, narrow_products, statistics
        ):
            self._add_products(total, per_sample_grads)
        return total, grad_output.shape[0]

    def _per_sample_gradients(
        self,
        inputs: torch.Tensor,
        grad_output: torch.Tensor,
        chunk_bytes: int,
        narrow_products: bool,
        statistics: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> Iterator[torch.Tensor]:
        """(samples, C, 2) per-sample (γ, β) gradients (Σ_hw g·x̂, Σ_hw g) in ``factor_dtype``, a chunk of
        samples at a time."""
        if statistics is None:
            statistics = self.statistics(inputs, chunk_bytes, narrow_products=narrow_products)
        mean, var = statistics
        mean, rstd = mean[None, :, None, None], torch.rsqrt(var + self.module.eps)[None, :, None, None]
        cast_x, cast_g = self._caster(inputs, narrow_products), self._caster(grad_output, narrow_products)
        per_sample = 3 * inputs[0].numel() * _element_bytes(self.factor_dtype)
        for x, g in zip(
            sample_chunks(inputs, per_sample, chunk_bytes),
            sample_chunks(grad_output, per_sample, chunk_bytes),
        ):
            delta = cast_g(g)
            x_hat = (cast_x(x) - mean) * rstd  # fp32 from bf16/fp16 x without a copy of x
            yield torch.stack(
                [(delta * x_hat).sum(dim=(2, 3)), delta.sum(dim=(2, 3), dtype=self.factor_dtype)], dim=2
            )

    def _add_products(self, total: torch.Tensor, per_sample_grads: torch.Tensor) -> None:
        """total += Σ_n g_n g_nᵀ, one 2×2 product per channel."""
        total += torch.einsum("nci,ncj->cij", per_sample_grads, per_sample_grads)

    def grad_matrix(self) -> torch.Tensor:
        bn = self.module
        return torch.stack([_grad(bn.weight), _grad(bn.bias)], dim=1).to(self.factor_dtype)  # (C, 2)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        _grad(self.module.weight).copy_(matrix[:, 0])
        _grad(self.module.bias).copy_(matrix[:, 1])

    def precondition(self, inverses: dict, gradient: torch.Tensor) -> torch.Tensor:
        """(F_c + γI)⁻¹ g_c per channel, for the (C, 2) gradient of :meth:`grad_matrix` (full fp32 in ``KFAC``)."""
        return torch.einsum("cij,cj->ci", inverses["F"], gradient)

    def _caster(self, tensor: torch.Tensor, narrow_products: bool):
        """Elementwise maths promotes bf16/fp16 to fp32 inside the kernel, so narrow inputs need no cast
        (the sums of a narrow tensor name their dtype); otherwise chunks are cast to ``factor_dtype``."""
        if takes_narrow_inputs(tensor, self.factor_dtype, narrow_products):
            return lambda chunk: chunk
        return lambda chunk: chunk.to(self.factor_dtype)


class FullBatchNormLayer(BatchNormLayer):
    """BatchNorm2d with one 2C×2C Fisher block over g = [g_γ; g_β] (``batchnorm_fisher="full"``), as the
    paper's released code builds it: the per-sample (γ, β) gradients of :class:`BatchNormLayer`, their
    outer products summed over samples. Inverted like a Kronecker factor (by its owner when it is wider
    than ``local_inverse_max_dim``, batched with the factors of its size) and damped F + γ I."""

    def factor_shapes(self) -> dict:
        width = 2 * self.channels
        return {"F": (width, width)}

    def inversion_cost(self) -> float:
        return float(2 * self.channels) ** 3

    def _add_products(self, total: torch.Tensor, per_sample_grads: torch.Tensor) -> None:
        """total += Σ_n g_n g_nᵀ with g_n = [the C γ gradients; the C β gradients] of sample n."""
        rows = per_sample_grads.transpose(1, 2).reshape(per_sample_grads.shape[0], -1)  # (n, 2C)
        total.addmm_(rows.t(), rows)

    def grad_matrix(self) -> torch.Tensor:
        bn = self.module
        return torch.cat([_grad(bn.weight), _grad(bn.bias)]).to(self.factor_dtype)  # (2C,)

    def set_grad_matrix(self, matrix: torch.Tensor) -> None:
        _grad(self.module.weight).copy_(matrix[: self.channels])
        _grad(self.module.bias).copy_(matrix[self.channels :])

    def precondition(self, inverses: dict, gradient: torch.Tensor) -> torch.Tensor:
        """(F + γI)⁻¹ g for the (2C,) gradient of :meth:`grad_matrix` (full fp32 in ``KFAC``)."""
        return inverses["F"] @ gradient


def _grad(param: torch.Tensor | None) -> torch.Tensor:
    """The gradient backward left on a registered layer's parameter (K-FAC runs after backward)."""
    assert param is not None and param.grad is not None
    return param.grad


def _element_bytes(dtype: torch.dtype) -> int:
    return torch.finfo(dtype).bits // 8


Layer = KroneckerLayer | BatchNormLayer


def make_layer(
    name: str,
    module: nn.Module,
    *,
    include_batchnorm: bool,
    factor_dtype: torch.dtype | None = None,
    batchnorm_fisher: str = "unit_wise",
) -> Layer | None:
    """The K-FAC view of ``module``, or ``None`` when K-FAC leaves it to the plain optimiser.
    ``batchnorm_fisher``: one of :data:`BATCHNORM_FISHERS`."""
    if batchnorm_fisher not in BATCHNORM_FISHERS:
        raise ValueError(f"batchnorm_fisher must be one of {BATCHNORM_FISHERS}, got {batchnorm_fisher!r}")

    def dtype_for(param: torch.Tensor) -> torch.dtype:
        # Factors are at least fp32, even for fp16/bf16 models; a float64 model keeps float64.
        return factor_dtype or torch.promote_types(param.dtype, torch.float32)

    if isinstance(module, nn.Linear) and module.weight.requires_grad:
        return LinearLayer(name, module, dtype_for(module.weight))
    if (
        isinstance(module, nn.Conv2d)
        and module.weight.requires_grad
        and module.groups == 1
        and not isinstance(module.padding, str)
    ):
        return Conv2dLayer(name, module, dtype_for(module.weight))
    if (
        include_batchnorm
        and isinstance(module, nn.BatchNorm2d)
        and module.affine
        and module.weight.requires_grad
    ):
        kind = FullBatchNormLayer if batchnorm_fisher == "full" else BatchNormLayer
        return kind(name, module, dtype_for(module.weight))
    return None
