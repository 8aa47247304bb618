"""Peak rates of the GPU kinds K-FAC is run on, from their vendors' datasheets.

Dense rates (the datasheets' tensor-core figures marked "with sparsity" are twice these). ``fp32`` is
the plain fp32 rate, without tensor cores (what a matrix product gets when TF32 is off, PyTorch's
default for ``torch.matmul``); ``tf32``, ``bf16`` and ``fp16`` are tensor-core rates with fp32
accumulation. ``link_bandwidth`` is NVLink per direction (the datasheets give both directions
together). Used by the step-time model (:mod:`kfac_hvd.analysis.timemodel`) and by the step-cost benchmark,
which compares each measured phase with these limits.
"""

from __future__ import annotations

from dataclasses import dataclass

PRECISIONS = ("fp32", "tf32", "bf16", "fp16")


@dataclass(frozen=True)
class DeviceRates:
    name: str
    fp32: float  # FLOP/s
    tf32: float | None  # FLOP/s on tensor cores; None: the device has none for this type
    bf16: float | None
    fp16: float | None
    memory_bandwidth: float  # B/s
    link_bandwidth: float  # B/s per direction
    source: str

    def flops(self, precision: str) -> float:
        """Peak FLOP/s of a matrix product whose inputs are ``precision``."""
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        rate = getattr(self, precision)
        if rate is None:
            raise ValueError(f"{self.name} has no {precision} tensor cores (datasheet: {self.source})")
        return rate


DEVICES: dict[str, DeviceRates] = {
    "H200": DeviceRates(
        "H200",
        fp32=67e12,
        tf32=494.5e12,
        bf16=989e12,
        fp16=989e12,
        memory_bandwidth=4.8e12,
        link_bandwidth=450e9,
        source="NVIDIA H200 Tensor Core GPU datasheet, H200 SXM: FP32 67 TFLOPS; TF32 / BF16 / FP16 "
        "Tensor Core 989 / 1,979 / 1,979 TFLOPS with sparsity; 4.8 TB/s HBM3e; NVLink 900 GB/s",
    ),
    "H100": DeviceRates(
        "H100",
        fp32=67e12,
        tf32=494.5e12,
        bf16=989e12,
        fp16=989e12,
        memory_bandwidth=3.35e12,
        link_bandwidth=450e9,
        source="NVIDIA H100 Tensor Core GPU datasheet, H100 SXM: FP32 67 TFLOPS; TF32 / BF16 / FP16 "
        "Tensor Core 989 / 1,979 / 1,979 TFLOPS with sparsity; 3.35 TB/s HBM3; NVLink 900 GB/s",
    ),
    "A100": DeviceRates(
        "A100",
        fp32=19.5e12,
        tf32=156e12,
        bf16=312e12,
        fp16=312e12,
        memory_bandwidth=2.039e12,
        link_bandwidth=300e9,
        source="NVIDIA A100 Tensor Core GPU datasheet, A100 80GB SXM: FP32 19.5 TFLOPS; TF32 / BF16 / "
        "FP16 Tensor Core 156 / 312 / 312 TFLOPS (dense); 2,039 GB/s HBM2e; NVLink 600 GB/s",
    ),
    "V100": DeviceRates(
        "V100",
        fp32=15.7e12,
        tf32=None,
        bf16=None,
        fp16=125e12,
        memory_bandwidth=900e9,
        link_bandwidth=150e9,
        source="NVIDIA Tesla V100 datasheet, V100 SXM2: single precision 15.7 TFLOPS; Tensor "
        "Performance (fp16 inputs) 125 TFLOPS; 900 GB/s HBM2; NVLink 300 GB/s",
    ),
}


def device_kind(name: str) -> str | None:
    """The table's key for a device name as ``torch.cuda.get_device_name`` gives it, or None."""
    upper = name.upper()
    return next((kind for kind in DEVICES if kind in upper), None)
