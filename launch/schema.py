"""The configuration schema: every section's keys with type, default, allowed range and meaning.

:mod:`launch.config` loads and validates files against it; docs/LAUNCHER.md's key reference is
generated from it (``python -m launch.config``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import yaml

SECTIONS = ("model", "data", "optim", "kfac", "train", "checkpoint", "log", "horovod", "debug")


@dataclass
class Spec:
    kind: str  # int | float | bool | str | list_int | list_float | list_str
    default: Any
    nullable: bool = False
    choices: tuple[str, ...] | None = None
    check: Callable[[Any], str | None] | None = None  # returns an error text or None
    doc: str = ""


def gt(lo):
    return lambda v: None if v > lo else f"must be > {lo:g}, got {v!r}"


def ge(lo):
    return lambda v: None if v >= lo else f"must be >= {lo:g}, got {v!r}"


def in_range(lo, hi, hi_open=True, lo_open=False):
    def check(v):
        ok_lo = v > lo if lo_open else v >= lo
        ok_hi = v < hi if hi_open else v <= hi
        if ok_lo and ok_hi:
            return None
        lo_b, hi_b = "(" if lo_open else "[", ")" if hi_open else "]"
        return f"must be in {lo_b}{lo:g}, {hi:g}{hi_b}, got {v!r}"

    return check


def each(check):
    def run(values):
        for v in values:
            err = check(v)
            if err:
                return err
        return None

    return run


SCHEMA: dict[str, dict[str, Spec]] = {
    "model": {
        "name": Spec(
            "str",
            "resnet50",
            choices=("resnet50", "small_resnet"),
            doc="torchvision ResNet-50, or a small ResNet for 28x28 inputs",
        ),
        "num_classes": Spec("int", 1000, check=ge(2), doc="output classes"),
        "width": Spec("int", 16, check=ge(1), doc="small_resnet: channels of the first stage"),
        "blocks": Spec(
            "list_int",
            [1, 1, 1],
            check=each(ge(1)),
            doc="small_resnet: basic blocks per stage (stage i has width*2^i channels)",
        ),
        "zero_init_residual": Spec("bool", False, doc="zero-initialise the last BN of each block"),
    },
    "data": {
        "dataset": Spec(
            "str",
            "imagenet",
            choices=("imagenet", "fashion_mnist", "synthetic"),
            doc="ImageFolder ImageNet, Fashion-MNIST IDX files, or random images",
        ),
        "train_dir": Spec("str", None, nullable=True, doc="ImageFolder root of the training set"),
        "val_dir": Spec("str", None, nullable=True, doc="ImageFolder root of the validation set"),
        "fashion_mnist_dir": Spec(
            "str", "/usr/share/datasets/fashion-mnist", doc="folder with the four Fashion-MNIST IDX .gz files"
        ),
        "fashion_mnist_pool": Spec(
            "int",
            1,
            check=lambda v: None if v in (1, 2, 4) else f"must be 1, 2 or 4, got {v!r}",
            doc="average-pool Fashion-MNIST by this factor (2: 14x14 images, for long runs)",
        ),
        "batch_size": Spec("int", 32, check=ge(1), doc="images per rank and step"),
        "val_batch_size": Spec(
            "int", None, nullable=True, check=ge(1), doc="evaluation batch per rank (default: batch_size)"
        ),
        "workers": Spec("int", 4, check=ge(0), doc="DataLoader worker processes per rank"),
        "image_size": Spec("int", 224, check=ge(8), doc="training crop / evaluation centre crop"),
        "val_resize": Spec("int", 256, check=ge(8), doc="evaluation: shorter side before the crop"),
        "train_subset": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="use N evenly spaced training images (tests, quick runs)",
        ),
        "val_subset": Spec(
            "int", None, nullable=True, check=ge(1), doc="use N evenly spaced evaluation images"
        ),
        "train_samples": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="dry run: training-set size to plan with when the data is absent",
        ),
        "synthetic_size": Spec("int", 4096, check=ge(1), doc="synthetic: training images"),
        "synthetic_val_size": Spec("int", 512, check=ge(1), doc="synthetic: evaluation images"),
        "mixup_alpha": Spec("float", 0.0, check=ge(0.0), doc="mixup Beta(a, a); 0 disables"),
        "random_erasing": Spec(
            "float",
            0.0,
            check=in_range(0.0, 1.0, hi_open=False),
            doc="probability of random erasing (training); 0 disables",
        ),
        "pin_memory": Spec("bool", True, doc="pinned host memory for GPU runs"),
        "drop_last": Spec("bool", True, doc="drop each rank's last incomplete training batch"),
        "skip_unreadable": Spec(
            "bool",
            False,
            doc="ImageFolder: an unreadable image is reported and skipped instead of "
            "stopping the run (exit code 2)",
        ),
    },
    "optim": {
        "method": Spec("str", "kfac", choices=("kfac", "sgd"), doc="K-FAC or the SGD baseline"),
        "lr": Spec("float", 0.1, check=gt(0.0), doc="base learning rate (alpha_0)"),
        "schedule": Spec(
            "str",
            "poly",
            choices=("poly", "step", "constant"),
            doc="learning-rate schedule (see Learning rate below)",
        ),
        "warmup_epochs": Spec("float", 0.0, check=ge(0.0), doc="linear warm-up length"),
        "warmup_init_lr": Spec("float", 0.0, check=ge(0.0), doc="learning rate at step 0 of warm-up"),
        "poly_power": Spec("float", 8.0, check=gt(0.0), doc="poly: exponent p"),
        "poly_start_epoch": Spec("float", 1.0, check=ge(0.0), doc="poly: e_start (constant before)"),
        "poly_end_epoch": Spec("float", 53.5, check=gt(0.0), doc="poly: e_end (lr reaches 0)"),
        "milestones": Spec(
            "list_float",
            [30.0, 60.0, 80.0],
            check=each(gt(0.0)),
            doc="step: epochs at which lr is multiplied by gamma",
        ),
        "gamma": Spec(
            "float",
            0.1,
            check=in_range(0.0, 1.0, hi_open=False, lo_open=True),
            doc="step: factor applied at each milestone",
        ),
        "momentum": Spec("float", 0.9, check=in_range(0.0, 1.0), doc="SGD momentum"),
        "nesterov": Spec("bool", False, doc="Nesterov momentum"),
        "momentum_correction": Spec("bool", True, doc="scale the momentum by lr/lr_prev when lr changes"),
        "weight_decay": Spec("float", 0.0, check=ge(0.0), doc="L2 weight decay (every parameter)"),
        "weight_rescaling": Spec(
            "bool", False, doc="rescale conv/FC weights to norm sqrt(2*out) when above it"
        ),
        "label_smoothing": Spec("float", 0.0, check=in_range(0.0, 1.0), doc="cross-entropy label smoothing"),
    },
    "kfac": {
        "damping": Spec("float", 1e-3, check=gt(0.0), doc="Tikhonov damping gamma"),
        "update_threshold": Spec(
            "float",
            None,
            nullable=True,
            check=gt(0.0),
            doc="lambda of the adaptive interval; null = every step",
        ),
        "update_interval": Spec(
            "int",
            1,
            check=ge(1),
            doc="null lambda: fixed interval k (every k-th step); with lambda: start interval",
        ),
        "interval_warmup_epochs": Spec(
            "float",
            0.0,
            check=ge(0.0),
            doc="null lambda: update every factor on every step for this many epochs, "
            "then every update_interval steps",
        ),
        "interval_policy": Spec(
            "str",
            "modulo",
            choices=("modulo", "since_last"),
            doc="due when t % interval == 0 (paper) or t - t_last >= interval",
        ),
        "max_interval": Spec("int", None, nullable=True, check=ge(1), doc="cap on any interval"),
        "shrink_multiple": Spec(
            "float",
            None,
            nullable=True,
            check=gt(1.0),
            doc="a diff >= m*lambda halves the interval (not in the paper)",
        ),
        "separate_intervals": Spec("bool", False, doc="separate intervals for A and G"),
        "factor_decay": Spec(
            "float",
            None,
            nullable=True,
            check=in_range(0.0, 1.0),
            doc="running average of factors; null = fresh factors",
        ),
        "kl_clip": Spec(
            "float",
            None,
            nullable=True,
            check=gt(0.0),
            doc="scale preconditioned gradients so lr^2 * sum(g.Fg) <= kl_clip",
        ),
        "pi_damping": Spec("bool", True, doc="split damping over the factors with pi"),
        "inverse_method": Spec(
            "str", "cholesky", choices=("cholesky", "eigen"), doc="how the owner inverts the damped factors"
        ),
        "symmetric_comm": Spec("bool", True, doc="send symmetric factors as upper triangles"),
        "skip_layers": Spec("list_str", [], doc="regular expressions; matching module names are left to SGD"),
        "include_batchnorm": Spec("bool", True, doc="unit-wise Fisher blocks for BatchNorm"),
        "local_inverse_max_dim": Spec(
            "int",
            256,
            check=ge(0),
            doc="layers whose factors are at most this wide, and every BatchNorm, are "
            "inverted on every rank instead of travelling in the inverse allgather",
        ),
        "noise_aware_diff": Spec(
            "bool",
            False,
            doc="subtract the factors' estimated sampling noise from Diff (docs/NOISE.md; not in the paper)",
        ),
        "unfold_chunk_mb": Spec(
            "float",
            256.0,
            check=gt(0.0),
            doc="memory bound (MiB) of one im2col chunk when a conv layer's A factor is computed",
        ),
        "narrow_factor_products": Spec(
            "bool",
            True,
            doc="CUDA: bf16/fp16 activations and gradients enter the factor products as "
            "they are (fp32 accumulation and result); false: cast to fp32 first",
        ),
        "factor_matmul_precision": Spec(
            "str",
            "highest",
            choices=("highest", "high"),
            doc="CUDA: fp32 factor products in full fp32 or TF32 (high); K-FAC's own, "
            "whatever train.tf32 says",
        ),
        "batched_inversion": Spec(
            "bool", True, doc="invert factors of equal size in one batched call; false: one call each"
        ),
    },
    "train": {
        "epochs": Spec("int", 1, check=ge(1), doc="training epochs"),
        "max_steps": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="stop after this many steps in total (tests, quick runs)",
        ),
        "world_size": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="ranks the experiment is planned for (dry run); a launch with another number of "
            "ranks stops (exit code 2); null: any number",
        ),
        "elastic": Spec(
            "bool",
            False,
            doc="Horovod elastic training under horovodrun --gloo --min-np/--max-np "
            "--host-discovery-script: hosts may leave and join (docs/LAUNCHER.md, Elastic training)",
        ),
        "elastic_commit_steps": Spec(
            "int",
            10,
            check=ge(1),
            doc="train.elastic: commit the state in host memory every N steps (and at each epoch's "
            "end); a lost peer rolls every rank back to the last commit",
        ),
        "seed": Spec("int", 0, check=ge(0), doc="seed of weights, shuffling and augmentation"),
        "device": Spec(
            "str",
            "auto",
            choices=("auto", "cpu", "cuda"),
            doc="auto: the GPU of this rank's local rank if CUDA is available (rank 0 says what it "
            "chose and why); cuda: stop (exit code 2) when CUDA is not available",
        ),
        "precision": Spec(
            "str",
            "fp32",
            choices=("fp32", "bf16", "fp16"),
            doc="autocast dtype of forward and loss; fp16 adds a GradScaler (an overflow step is "
            "skipped on every rank); K-FAC factors stay fp32",
        ),
        "channels_last": Spec(
            "bool", False, doc="input images, and so the activations, in channels_last (NHWC) memory format"
        ),
        "tf32": Spec(
            "bool", False, doc="CUDA: TF32 for fp32 matmuls and cuDNN convolutions (false: both off)"
        ),
        "cudnn_benchmark": Spec(
            "bool", False, doc="CUDA: let cuDNN time its convolution algorithms (fixed shapes)"
        ),
        "threads": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="torch intra-op threads per rank (default: torch's choice)",
        ),
        "eval_every": Spec("int", 1, check=ge(0), doc="evaluate every N epochs (0: only at the end)"),
        "max_bad_steps": Spec(
            "int",
            5,
            check=ge(1),
            doc="stop (exit code 4) after this many consecutive steps whose loss or "
            "gradient was not finite (each such step is skipped on every rank)",
        ),
        "watchdog_s": Spec(
            "float",
            600.0,
            nullable=True,
            check=gt(0.0),
            doc="a rank that makes no progress (step, evaluation batch, checkpoint) for this "
            "long exits with code 3 instead of hanging; null: off",
        ),
    },
    "checkpoint": {
        "dir": Spec("str", None, nullable=True, doc="default: <log.dir>/checkpoints"),
        "every_epochs": Spec("int", 1, check=ge(0), doc="0: no end-of-epoch checkpoints"),
        "every_steps": Spec(
            "int", None, nullable=True, check=ge(1), doc="also checkpoint every N steps (mid-epoch)"
        ),
        "keep_last": Spec(
            "int",
            2,
            check=ge(1),
            doc="step_<7-digit step>.pt files kept, newest first (last.pt is the newest)",
        ),
        "keep_all": Spec("bool", False, doc="keep every step_<7-digit step>.pt (overrides keep_last)"),
        "resume": Spec(
            "str",
            None,
            nullable=True,
            doc="checkpoint file to resume from, or 'auto' (the newest verified one in dir, if any); "
            "its saved config must match this run's but for the keys that may change on resume",
        ),
        "trust_unlisted": Spec(
            "bool",
            False,
            doc="load a checkpoint file that no checkpoints.json beside it lists (unverified; "
            "still loaded without running code)",
        ),
        "allow_changes": Spec(
            "list_str",
            [],
            check=lambda keys: _known_keys(keys),
            doc="keys (section.key) whose change since the checkpoint a resumed run accepts "
            "knowingly, e.g. [optim.lr]",
        ),
    },
    "log": {
        "dir": Spec(
            "str",
            None,
            nullable=True,
            doc="run folder; default runs/<config name>. A fresh run into a "
            "folder holding another run's outputs stops (exit code 2)",
        ),
        "overwrite": Spec(
            "bool",
            False,
            doc="a fresh run (checkpoint.resume null) into a used log.dir first moves "
            "the old run aside to <log.dir>.old-<time>; nothing is deleted",
        ),
        "tensorboard": Spec("bool", True, doc="TensorBoard scalars in <log.dir>/tensorboard"),
        "progress": Spec(
            "bool",
            True,
            doc="progress on rank 0: a tqdm bar on a terminal; under a launcher (horovodrun, "
            "mpirun, srun) or when stderr is not a terminal, a plain line instead",
        ),
        "progress_every_s": Spec(
            "float", 30.0, check=ge(0.0), doc="seconds between plain progress lines (0: every step)"
        ),
        "every_steps": Spec("int", 1, check=ge(1), doc="metrics.jsonl / TensorBoard cadence"),
        "layer_records": Spec("bool", True, doc="per-layer K-FAC records in metrics.jsonl"),
    },
    "horovod": {
        "init": Spec(
            "str",
            "auto",
            choices=("auto", "mpi4py", "horovod"),
            doc="auto: mpi4py when started by mpirun/srun, plain hvd.init() otherwise",
        ),
        "fusion_threshold_mb": Spec(
            "float", None, nullable=True, check=ge(0.0), doc="HOROVOD_FUSION_THRESHOLD (MiB)"
        ),
        "cycle_time_ms": Spec("float", None, nullable=True, check=gt(0.0), doc="HOROVOD_CYCLE_TIME (ms)"),
        "timeline": Spec("str", None, nullable=True, doc="HOROVOD_TIMELINE file (Chrome trace)"),
        "timeline_mark_cycles": Spec("bool", False, doc="HOROVOD_TIMELINE_MARK_CYCLES"),
        "hierarchical_allreduce": Spec("bool", None, nullable=True, doc="HOROVOD_HIERARCHICAL_ALLREDUCE"),
        "autotune": Spec("bool", False, doc="HOROVOD_AUTOTUNE"),
        "fp16_allreduce": Spec("bool", False, doc="fp16 compression of gradient allreduce"),
        "stall_check_s": Spec(
            "int",
            None,
            nullable=True,
            check=ge(0),
            doc="HOROVOD_STALL_CHECK_TIME_SECONDS (Horovod: 60; 0 disables the check)",
        ),
        "stall_shutdown_s": Spec(
            "int",
            None,
            nullable=True,
            check=ge(0),
            doc="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (Horovod: 0 = never)",
        ),
        "gloo_timeout_s": Spec(
            "int", None, nullable=True, check=ge(1), doc="HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod: 30)"
        ),
        "allow_host_collectives": Spec(
            "bool",
            False,
            doc="CUDA tensors with a Horovod built without NCCL: run anyway (every "
            "collective staged through host memory) instead of stopping (exit code 2)",
        ),
    },
    "debug": {
        "fault_rank": Spec("int", 0, check=ge(0), doc="the rank that the injected faults below hit"),
        "nan_step": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="fault injection: NaN in fault_rank's input batch at this step",
        ),
        "kill_step": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="fault injection: SIGKILL fault_rank after this step's update",
        ),
        "hang_step": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="fault injection: fault_rank stops making progress at this step",
        ),
        "overflow_step": Spec(
            "int",
            None,
            nullable=True,
            check=ge(1),
            doc="fault injection: fault_rank's gradients of this step become infinite while its "
            "loss stays finite (with train.precision=fp16: a loss-scale overflow)",
        ),
    },
}

# Keys that may change when a run is resumed: they leave the computation of the steps as it was
# (length of the run, cadences, logging, tuning of the transport, fault injection). Any other key
# that differs from the checkpoint's saved config stops the resume (exit code 2) unless it is listed
# in checkpoint.allow_changes. "section.*" stands for every key of the section.
RESUME_MAY_CHANGE = (
    "train.epochs",
    "train.max_steps",
    "train.eval_every",
    "train.max_bad_steps",
    "train.watchdog_s",
    "train.elastic_commit_steps",
    "train.threads",
    "data.workers",
    "data.pin_memory",
    "data.val_batch_size",
    "data.skip_unreadable",
    "checkpoint.*",
    "log.*",
    "debug.*",
    "horovod.init",
    "horovod.fusion_threshold_mb",
    "horovod.cycle_time_ms",
    "horovod.timeline",
    "horovod.timeline_mark_cycles",
    "horovod.autotune",
    "horovod.stall_check_s",
    "horovod.stall_shutdown_s",
    "horovod.gloo_timeout_s",
    "horovod.allow_host_collectives",
)


def may_change_on_resume(key: str) -> bool:
    return key in RESUME_MAY_CHANGE or key.split(".")[0] + ".*" in RESUME_MAY_CHANGE


def _known_keys(keys) -> str | None:
    for key in keys:
        section, _, name = str(key).partition(".")
        if section not in SCHEMA or name not in SCHEMA[section]:
            return f"unknown key {key!r} (expected section.key, e.g. optim.lr)"
    return None


# Known training-set sizes used by the dry run when the data is not present.
KNOWN_TRAIN_SIZES = {"imagenet": 1281167, "fashion_mnist": 60000}
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def keys_markdown() -> str:
    """The key reference of docs/LAUNCHER.md, generated from :data:`SCHEMA`."""
    lines = []
    for section, specs in SCHEMA.items():
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, spec in specs.items():
            kind = spec.kind.replace("list_", "list of ")
            if spec.choices:
                kind = " \\| ".join(spec.choices)
            if spec.nullable:
                kind += " or null"
            default = (
                "null"
                if spec.default is None
                else yaml.safe_dump(spec.default, default_flow_style=True).strip()
            )
            default = default.replace("\n...", "")
            lines.append(f"| `{section}.{key}` | {kind} | `{default}` | {spec.doc} |")
        lines.append("")
    return "\n".join(lines)
