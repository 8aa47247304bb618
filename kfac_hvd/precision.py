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

from contextlib import AbstractContextManager, nullcontext

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
    return (
        enabled
        and factor_dtype == torch.float32
        and tensor.dtype in NARROW_DTYPES
        and tensor.device.type in NARROW_PRODUCT_DEVICES
    )


def fp32_matmul_precision(device: torch.device, precision: str) -> AbstractContextManager[None]:
    """Context: fp32 matrix products on ``device`` at ``precision`` ("highest" or "high") inside; a
    device without TF32 is left alone."""
    if device.type not in TF32_DEVICES:
        return _UNCHANGED
    return _CuBLASPrecision(FACTOR_MATMUL_PRECISIONS[precision] == "tf32")


_UNCHANGED = nullcontext()


class _CuBLASPrecision:
    """The cuBLAS setting is process-global and has two faces that PyTorch checks against each other:
    the legacy one (``torch.set_float32_matmul_precision``, ``allow_tf32``) and the per-backend one
    (``torch.backends.cuda.matmul.fp32_precision``, which the kernels read). Inside the block both say
    the same; afterwards each is put back as it was, also on an exception. A legacy value that the
    per-backend API left unreadable (set through the new API only) is put back at its default,
    "highest". The calls are ``torch._C``'s own: the ``torch.backends`` properties wrap them at four
    times the cost, and this runs once per layer in the hooks and once per step in the preconditioning."""

    __slots__ = ("_tf32", "_saved")

    def __init__(self, tf32: bool) -> None:
        self._tf32 = tf32

    def __enter__(self) -> None:
        try:
            legacy = torch._C._get_float32_matmul_precision()
        except RuntimeError:  # "a mix of the legacy and new APIs"
            legacy = "highest"
        self._saved = (
            legacy,
            torch._C._get_fp32_precision_getter("cuda", "matmul"),
            torch._C._get_fp32_precision_getter("mkldnn", "matmul"),
        )
        torch._C._set_cublas_allow_tf32(self._tf32)  # both faces at once, nothing else

    def __exit__(self, *exception: object) -> None:
        legacy, cuda, mkldnn = self._saved
        torch._C._set_float32_matmul_precision(legacy)  # also sets the two per-backend values:
        torch._C._set_fp32_precision_setter("cuda", "matmul", cuda)
        torch._C._set_fp32_precision_setter("mkldnn", "matmul", mkldnn)
