"""The precision of K-FAC's own matrix products (factors and preconditioning), never the model's.

Narrow factor products: a product of two bf16 (or two fp16) numbers is exact in fp32 (8+8 or 11+11
significand bits < 24), so multiplying the captured bf16/fp16 activations or output gradients as they
are, with fp32 accumulation and an fp32 result, gives the factor that casting them to fp32 first gives,
up to the order of summation, without the fp32 copy and on the tensor cores. PyTorch has such products
(``torch.mm/bmm(..., out_dtype=torch.float32)``) on CUDA only; elsewhere the inputs are cast first.

TF32: fp32 products on CUDA may use TF32 tensor cores ("high"); K-FAC sets the cuBLAS fp32 precision
around its factor products and restores it afterwards (also on an exception). The preconditioning
products always run in full fp32 ("highest"): see the README.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch

NARROW_DTYPES = (torch.bfloat16, torch.float16)
# Device types whose matrix products take bf16/fp16 inputs with an fp32 result (``out_dtype``).
NARROW_PRODUCT_DEVICES = ("cuda",)
# Device types whose fp32 matrix products K-FAC sets to the precision of ``factor_matmul_precision``.
TF32_DEVICES = ("cuda",)
# factor_matmul_precision → torch.backends.cuda.matmul.fp32_precision
FACTOR_MATMUL_PRECISIONS = {"highest": "ieee", "high": "tf32"}


def takes_narrow_inputs(tensor: torch.Tensor, factor_dtype: torch.dtype, enabled: bool) -> bool:
    """Whether the factor products multiply ``tensor`` in its own bf16/fp16 dtype (fp32 result)."""
    return (enabled and factor_dtype == torch.float32 and tensor.dtype in NARROW_DTYPES
            and tensor.device.type in NARROW_PRODUCT_DEVICES)


@contextmanager
def fp32_matmul_precision(device: torch.device, precision: str) -> Iterator[None]:
    """fp32 matrix products on ``device`` at ``precision`` ("highest" or "high") inside the block.

    The cuBLAS setting is process-global: it is read and restored through
    ``torch.backends.cuda.matmul.fp32_precision``, which reports any state the legacy switches
    (``allow_tf32``, ``torch.set_float32_matmul_precision``) left and restores it as it was."""
    if device.type not in TF32_DEVICES:
        yield
        return
    matmul = torch.backends.cuda.matmul
    saved = matmul.fp32_precision
    matmul.fp32_precision = FACTOR_MATMUL_PRECISIONS[precision]
    try:
        yield
    finally:
        matmul.fp32_precision = saved
