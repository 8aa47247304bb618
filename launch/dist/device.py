"""Which device a rank computes on, why, and whether the rest of the set-up fits it.

:func:`check_device` runs before Horovod starts (from ``launch.train``'s pre-checks): every problem is
a :class:`~launch.errors.ConfigError` (one line, exit code 2) that names the fix. :func:`pick_device`
binds the rank to its GPU once Horovod runs, and :func:`describe_device` is what rank 0 prints about
the choice.
"""

from __future__ import annotations

import os
import warnings
from typing import TYPE_CHECKING

import torch

from launch.dist.horovod_setup import env_local_rank
from launch.dist.mixed_precision import AUTOCAST_DTYPES

if TYPE_CHECKING:
    from launch.config.load import Config

NCCL_BUILD = "HOROVOD_GPU_OPERATIONS=NCCL make setup"


def cuda_unavailable_reason() -> tuple[str, str]:
    """(why ``torch.cuda.is_available()`` is False, what to do about it), in words a user can act on."""
    build = f"torch {torch.__version__}"
    if torch.version.cuda is None:
        return f"{build} is a CPU-only build", "install a CUDA build of torch"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is not None and visible.strip() in ("", "-1"):
        return (
            f"CUDA_VISIBLE_DEVICES={visible!r} hides every GPU from {build}",
            "unset CUDA_VISIBLE_DEVICES or list this rank's GPUs in it",
        )
    detail = ""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.cuda.init()
        except Exception as exc:
            detail = (
                str(exc).strip().split(". ")[0].splitlines()[0] if str(exc).strip() else type(exc).__name__
            )
    if not detail and caught:
        detail = str(caught[0].message).strip().splitlines()[0]
    detail = f": {detail.rstrip('.')}" if detail else ""
    return (
        f"{build} built for CUDA {torch.version.cuda}{detail}",
        f"check the NVIDIA driver (it must support CUDA {torch.version.cuda}) and that this node has a GPU",
    )


def wants_cuda(device_key: str) -> bool:
    """Whether ``train.device`` resolves to CUDA on this machine."""
    return device_key == "cuda" or (device_key == "auto" and torch.cuda.is_available())


def local_gpu_index(local_rank: int, device_count: int) -> int:
    """The GPU of a rank: its LOCAL rank (its place on its node) round robin over the node's visible GPUs.
    The global rank would be wrong on every node but the first."""
    return local_rank % max(device_count, 1)


def _planned_local_gpu() -> int:
    """The GPU this rank will use, from the local rank its launcher announced (before Horovod starts)."""
    return local_gpu_index(env_local_rank() or 0, torch.cuda.device_count())


def check_device(cfg: Config) -> None:
    """The device, the precision and Horovod's GPU support fit together (raises ConfigError)."""
    t = cfg.train
    if t.device == "cuda" and not torch.cuda.is_available():
        why, fix = cuda_unavailable_reason()
        raise cfg.error(
            "train.device",
            f"cuda, but CUDA is not available in this process ({why}); {fix}, or set train.device=cpu",
        )
    if wants_cuda(t.device):
        _check_gpu(cfg)
        if cfg.train.engine == "horovod":
            _check_horovod_gpu_support(cfg)
    else:
        _check_cpu_precision(cfg)


def runs_on(capability: tuple[int, int], arch_list: list[str]) -> bool:
    """Whether a torch built for ``arch_list`` (``torch.cuda.get_arch_list()``) has kernels for a GPU of
    ``capability``: a cubin sm_XY runs on X.Y and later minor versions of X, PTX compute_XY on X.Y and later."""
    for arch in arch_list:
        kind, _, digits = arch.partition("_")
        digits = digits.rstrip("abcdefghijklmnopqrstuvwxyz")  # sm_90a: arch-specific features
        if len(digits) < 2 or not digits.isdigit():
            continue
        built = (int(digits[:-1]), int(digits[-1]))
        if kind == "sm" and built[0] == capability[0] and built[1] <= capability[1]:
            return True
        if kind == "compute" and built <= capability:
            return True
    return False


def _check_gpu(cfg: Config) -> None:
    """This torch has kernels for the rank's GPU, and the GPU can do the precision asked for."""
    index = _planned_local_gpu()
    major, minor = torch.cuda.get_device_capability(index)
    name = torch.cuda.get_device_name(index)
    arch_list = torch.cuda.get_arch_list()
    if arch_list and not runs_on((major, minor), arch_list):
        raise cfg.error(
            "train.device",
            f"cuda:{index} is {name} (compute capability {major}.{minor}), but torch "
            f"{torch.__version__} has kernels only for {' '.join(arch_list)}; install a "
            f"torch build for this GPU (V100, 7.0: a CUDA 12.x build)",
        )
    if cfg.train.precision == "bf16" and major < 8:
        raise cfg.error(
            "train.precision",
            f"bf16 needs a GPU of compute capability 8.0 or newer (A100, H100); "
            f"cuda:{index} is {name} ({major}.{minor}): use train.precision=fp16 "
            f"(loss scaling) or fp32",
        )


def _check_cpu_precision(cfg: Config) -> None:
    """bf16 and fp16 autocast on CPU are allowed (tests, debugging) when this torch supports them."""
    dtype = AUTOCAST_DTYPES.get(cfg.train.precision)
    if dtype is None:
        return
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with torch.autocast("cpu", dtype=dtype):
            active = (
                torch.is_autocast_enabled("cpu")
                if _autocast_takes_device()
                else torch.is_autocast_cpu_enabled()
            )
    if not active or caught:
        raise cfg.error(
            "train.precision",
            f"{cfg.train.precision} autocast is not supported on the CPU by torch "
            f"{torch.__version__}; use train.precision=fp32 on the CPU",
        )
    if cfg.train.precision == "fp16":
        try:
            torch.amp.GradScaler("cpu")
        except Exception as exc:
            raise cfg.error(
                "train.precision",
                f"fp16 on the CPU needs torch.amp.GradScaler('cpu'), which torch "
                f"{torch.__version__} lacks ({exc}); use bf16 or fp32",
            ) from None


def _autocast_takes_device() -> bool:
    try:
        torch.is_autocast_enabled("cpu")
        return True
    except TypeError:
        return False


def _check_horovod_gpu_support(cfg: Config) -> None:
    """CUDA tensors need a Horovod built with CUDA; without NCCL it stages every collective through host
    memory, which is correct but slow: an error unless ``horovod.allow_host_collectives`` says it is meant."""
    try:
        import horovod.torch as hvd
    except ImportError:
        return  # reported by the pre-check that imports Horovod
    chose = "cuda" if cfg.train.device == "cuda" else "auto chose cuda"
    or_cpu = "" if cfg.train.device == "cuda" else "; or set train.device=cpu"
    if not hvd.cuda_built():
        raise cfg.error(
            "train.device",
            f"{chose}, but this Horovod was built without CUDA support and cannot take "
            f"CUDA tensors; rebuild it with the CUDA toolkit loaded: {NCCL_BUILD}{or_cpu}",
        )
    if not hvd.nccl_built() and not cfg.horovod.allow_host_collectives:
        raise cfg.error(
            "train.device",
            f"{chose}, but this Horovod was built without NCCL (horovod.torch.nccl_built() "
            f"is 0): every collective would be copied through host memory; rebuild it "
            f"with {NCCL_BUILD}, or set horovod.allow_host_collectives=true to run "
            f"anyway{or_cpu}",
        )


def host_collectives_warning(device: torch.device, engine: str) -> str | None:
    """The start-up warning of a Horovod run that chose to stage collectives through host memory."""
    if device.type != "cuda" or engine != "horovod":
        return None
    import horovod.torch as hvd

    if hvd.nccl_built():
        return None
    return (
        f"warning: Horovod was built without NCCL: every collective of CUDA tensors is copied through host "
        f"memory (horovod.allow_host_collectives=true); for speed rebuild with {NCCL_BUILD}"
    )


def pick_device(device_key: str, local_rank: int) -> torch.device:
    """This rank's device: the GPU of its local rank (round robin over the visible GPUs), or the CPU."""
    if not wants_cuda(device_key):
        return torch.device("cpu")
    torch.cuda.set_device(local_gpu_index(local_rank, torch.cuda.device_count()))
    return torch.device("cuda", torch.cuda.current_device())


def describe_device(device_key: str, device: torch.device) -> str:
    """One line for rank 0: what was chosen and why."""
    if device.type == "cuda":
        how = "auto: CUDA is available" if device_key == "auto" else "train.device"
        major, minor = torch.cuda.get_device_capability(device)
        return (
            f"device: cuda ({how}; {torch.cuda.device_count()} GPU(s) visible to each rank, "
            f"{torch.cuda.get_device_name(device)}, compute capability {major}.{minor}; each rank uses the "
            f"GPU of its local rank; torch {torch.__version__}, CUDA {torch.version.cuda})"
        )
    if device_key == "auto":
        why, fix = cuda_unavailable_reason()
        return f"device: cpu (auto: torch.cuda.is_available() is False: {why}; {fix})"
    return "device: cpu (train.device)"


def apply_backend_flags(tf32: bool, cudnn_benchmark: bool) -> tuple[str, str]:
    """Set TF32 (fp32 matmuls and cuDNN convolutions) and cuDNN autotuning for this process.

    ``tf32: false`` switches both off, so fp32 means fp32 (PyTorch's own default leaves cuDNN
    convolutions on TF32). Returns the words rank 0 prints.
    """
    # The allow_tf32 flags, not the newer fp32_precision properties: once the latter are set, reading the
    # former (as other code may) raises in current torch, while setting the flags keeps both readable.
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    torch.backends.cudnn.benchmark = cudnn_benchmark
    return ("TF32 on" if tf32 else "TF32 off"), (
        "cuDNN benchmark on" if cudnn_benchmark else "cuDNN benchmark off"
    )
