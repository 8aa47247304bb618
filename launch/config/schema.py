"""The configuration schema: one pydantic model per section, each key with its type, default, range and doc.

:mod:`launch.config.load` loads files against it; docs/LAUNCHER.md's key reference is generated from it
(``python -m launch.config``). The ``kfac`` section is generated from :class:`kfac_hvd.KFACOptions`
(:mod:`launch.config.kfac_section`).
"""

from __future__ import annotations

import typing
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, Field, field_validator
from pydantic.fields import FieldInfo

from launch.config.kfac_section import KfacSection
from launch.config.section import Number, Section, TextList, accepts, one_or_many


class ModelSection(Section):
    name: Literal["resnet50", "small_resnet"] = Field(
        default="resnet50", description="torchvision ResNet-50, or a small ResNet for 28x28 inputs"
    )
    num_classes: int = Field(default=1000, ge=2, description="output classes")
    width: int = Field(default=16, ge=1, description="small_resnet: channels of the first stage")
    blocks: Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(one_or_many)] = Field(
        default=[1, 1, 1], description="small_resnet: basic blocks per stage (stage i has width*2^i channels)"
    )
    zero_init_residual: bool = Field(default=False, description="zero-initialise the last BN of each block")
    batchnorm: bool = Field(
        default=True,
        description="small_resnet: false leaves BatchNorm out (a step's gradients then do not depend on "
        "its micro-batches: train.accumulation_steps)",
    )


class DataSection(Section):
    dataset: Literal["imagenet", "fashion_mnist", "synthetic"] = Field(
        default="imagenet", description="ImageFolder ImageNet, Fashion-MNIST IDX files, or random images"
    )
    train_dir: str | None = Field(default=None, description="ImageFolder root of the training set")
    val_dir: str | None = Field(default=None, description="ImageFolder root of the validation set")
    fashion_mnist_dir: str = Field(
        default="/usr/share/datasets/fashion-mnist",
        description="folder with the four Fashion-MNIST IDX .gz files",
    )
    fashion_mnist_pool: Literal[1, 2, 4] = Field(
        default=1, description="average-pool Fashion-MNIST by this factor (2: 14x14 images, for long runs)"
    )
    batch_size: int = Field(default=32, ge=1, description="images per rank and step")
    val_batch_size: int | None = Field(
        default=None, ge=1, description="evaluation batch per rank (default: batch_size)"
    )
    workers: int = Field(default=4, ge=0, description="DataLoader worker processes per rank")
    image_size: int = Field(default=224, ge=8, description="training crop / evaluation centre crop")
    val_resize: int = Field(default=256, ge=8, description="evaluation: shorter side before the crop")
    train_subset: int | None = Field(
        default=None, ge=1, description="use N evenly spaced training images (tests, quick runs)"
    )
    val_subset: int | None = Field(default=None, ge=1, description="use N evenly spaced evaluation images")
    train_samples: int | None = Field(
        default=None, ge=1, description="dry run: training-set size to plan with when the data is absent"
    )
    synthetic_size: int = Field(default=4096, ge=1, description="synthetic: training images")
    synthetic_val_size: int = Field(default=512, ge=1, description="synthetic: evaluation images")
    mixup_alpha: Number = Field(default=0.0, ge=0, description="mixup Beta(a, a); 0 disables")
    mixup_mode: Literal["batch", "running"] = Field(
        default="batch",
        description="batch: one lambda a (micro-)batch, partner a permutation of it; running: the released "
        "recipe's running mixup, a lambda per sample, max(lambda, 1 - lambda), partner the previous mixed "
        "micro-batch (not checkpointed: a resumed run starts without one)",
    )
    random_erasing: Number = Field(
        default=0.0, ge=0, le=1, description="probability of random erasing (training); 0 disables"
    )
    random_erasing_area: Annotated[
        list[Annotated[float, Field(gt=0, le=1)]], BeforeValidator(one_or_many)
    ] = Field(default=[0.02, 0.33], description="random erasing: [lowest, highest] share of the image erased")
    random_erasing_order: Literal["before_mixup", "after_mixup"] = Field(
        default="before_mixup",
        description="before_mixup: each image as it is loaded (torchvision's RandomErasing); after_mixup: "
        "on the mixed batch on the device, aspect 0.3-1, as the released recipe does",
    )
    train_crop: Literal["random_resized", "random"] = Field(
        default="random_resized",
        description="ImageNet training crop: random_resized: RandomResizedCrop(0.08-1) + flip; random: the "
        "released recipe's random image_size crop of the stored image (enlarged only where a side is "
        "shorter) + flip",
    )
    pin_memory: bool = Field(default=True, description="pinned host memory for GPU runs")
    drop_last: bool = Field(default=True, description="drop each rank's last incomplete training batch")
    skip_unreadable: bool = Field(
        default=False,
        description="ImageFolder: an unreadable image is reported and skipped instead of stopping the run "
        "(exit code 2)",
    )


class OptimSection(Section):
    method: Literal["kfac", "sgd"] = Field(default="kfac", description="K-FAC or the SGD baseline")
    lr: Number = Field(default=0.1, gt=0, description="base learning rate (alpha_0)")
    schedule: Literal["poly", "step", "constant"] = Field(
        default="poly", description="learning-rate schedule (see Learning rate below)"
    )
    warmup_epochs: Number = Field(default=0.0, ge=0, description="linear warm-up length")
    warmup_init_lr: Number = Field(default=0.0, ge=0, description="learning rate at step 0 of warm-up")
    poly_power: Number = Field(default=8.0, gt=0, description="poly: exponent p")
    poly_start_epoch: Number = Field(default=1.0, ge=0, description="poly: e_start (constant before)")
    poly_end_epoch: Number = Field(default=53.5, gt=0, description="poly: e_end (lr reaches 0)")
    milestones: Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(one_or_many)] = Field(
        default=[30.0, 60.0, 80.0], description="step: epochs at which lr is multiplied by gamma"
    )
    gamma: Number = Field(default=0.1, gt=0, le=1, description="step: factor applied at each milestone")
    momentum: Number = Field(default=0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(default=False, description="Nesterov momentum")
    momentum_correction: bool = Field(
        default=True, description="scale the momentum by lr/lr_prev when lr changes"
    )
    weight_decay: Number = Field(default=0.0, ge=0, description="L2 weight decay (every parameter)")
    weight_rescaling: bool = Field(
        default=False, description="rescale conv/FC weights to norm sqrt(2*out) when above it"
    )
    label_smoothing: Number = Field(default=0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class TrainSection(Section):
    epochs: int = Field(default=1, ge=1, description="training epochs")
    max_steps: int | None = Field(
        default=None, ge=1, description="stop after this many steps in total (tests, quick runs)"
    )
    accumulation_steps: int = Field(
        default=1,
        ge=1,
        description="micro-batches per step: each rank's data.batch_size images go through forward and "
        "backward in this many equal parts (BatchNorm sees one part), gradients and K-FAC factors are "
        "averaged over the step and allreduced once; must divide data.batch_size",
    )
    world_size: int | None = Field(
        default=None,
        ge=1,
        description="ranks the experiment is planned for (dry run); a launch with another number of ranks "
        "stops (exit code 2); null: any number",
    )
    engine: Literal["horovod", "torch"] = Field(
        default="horovod",
        description="horovod: Horovod (horovodrun, mpirun); torch: torch.distributed (torchrun, mpirun, "
        "srun; Gloo on CPUs, NCCL on GPUs), no Horovod needed; the horovod section is then unused",
    )
    elastic: bool = Field(
        default=False,
        description="Horovod elastic training under horovodrun --gloo --min-np/--max-np "
        "--host-discovery-script: hosts may leave and join (docs/LAUNCHER.md, Elastic training)",
    )
    elastic_commit_steps: int = Field(
        default=10,
        ge=1,
        description="train.elastic: commit the state in host memory every N steps (and at each epoch's "
        "end); a lost peer rolls every rank back to the last commit",
    )
    seed: int = Field(default=0, ge=0, description="seed of weights, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field(
        default="auto",
        description="auto: the GPU of this rank's local rank if CUDA is available (rank 0 says what it "
        "chose and why); cuda: stop (exit code 2) when CUDA is not available",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        default="fp32",
        description="autocast dtype of forward and loss; fp16 adds a GradScaler (an overflow step is "
        "skipped on every rank); K-FAC factors stay fp32",
    )
    channels_last: bool = Field(
        default=False,
        description="input images, and so the activations, in channels_last (NHWC) memory format",
    )
    tf32: bool = Field(
        default=False, description="CUDA: TF32 for fp32 matmuls and cuDNN convolutions (false: both off)"
    )
    cudnn_benchmark: bool = Field(
        default=False, description="CUDA: let cuDNN time its convolution algorithms (fixed shapes)"
    )
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads per rank (default: torch's choice)"
    )
    eval_every: int = Field(default=1, ge=0, description="evaluate every N epochs (0: only at the end)")
    max_bad_steps: int = Field(
        default=5,
        ge=1,
        description="stop (exit code 4) after this many consecutive steps whose loss or gradient was not "
        "finite (each such step is skipped on every rank)",
    )
    watchdog_s: Number | None = Field(
        default=600.0,
        gt=0,
        description="a rank that makes no progress (step, evaluation batch, checkpoint) for this long exits "
        "with code 3 instead of hanging; null: off",
    )


class CheckpointSection(Section):
    dir: str | None = Field(default=None, description="default: <log.dir>/checkpoints")
    every_epochs: int = Field(default=1, ge=0, description="0: no end-of-epoch checkpoints")
    every_steps: int | None = Field(
        default=None, ge=1, description="also checkpoint every N steps (mid-epoch)"
    )
    keep_last: int = Field(
        default=2, ge=1, description="step_<7-digit step>.pt files kept, newest first (last.pt is the newest)"
    )
    keep_all: bool = Field(
        default=False, description="keep every step_<7-digit step>.pt (overrides keep_last)"
    )
    resume: str | None = Field(
        default=None,
        description="checkpoint file to resume from, or 'auto' (the newest verified one in dir, if any; "
        "none: an earlier attempt's outputs with the same config are moved to <log.dir>.old-<time> "
        "and the run starts anew); its saved config must match this run's but for the keys that may "
        "change on resume",
    )
    trust_unlisted: bool = Field(
        default=False,
        description="load a checkpoint file that no checkpoints.json beside it lists (unverified; still "
        "loaded without running code)",
    )
    allow_changes: TextList = Field(
        default=[],
        description="keys (section.key) whose change since the checkpoint a resumed run accepts knowingly, "
        "e.g. [optim.lr]",
    )

    @field_validator("allow_changes")
    @classmethod
    def _known_keys(cls, keys: list[str]) -> list[str]:
        for key in keys:
            section, _, name = key.partition(".")
            if name not in SCHEMA.get(section, {}):
                raise ValueError(f"unknown key {key!r} (expected section.key, e.g. optim.lr)")
        return keys


class LogSection(Section):
    dir: str | None = Field(
        default=None,
        description="run folder; default runs/<config name>. A fresh run into a folder holding another "
        "run's outputs stops (exit code 2)",
    )
    overwrite: bool = Field(
        default=False,
        description="a fresh run (checkpoint.resume null) into a used log.dir first moves the old run aside "
        "to <log.dir>.old-<time>; nothing is deleted",
    )
    tensorboard: bool = Field(default=True, description="TensorBoard scalars in <log.dir>/tensorboard")
    progress: bool = Field(
        default=True,
        description="progress on rank 0: a tqdm bar on a terminal; under a launcher (horovodrun, mpirun, "
        "srun) or when stderr is not a terminal, a plain line instead",
    )
    progress_every_s: Number = Field(
        default=30.0, ge=0, description="seconds between plain progress lines (0: every step)"
    )
    every_steps: int = Field(default=1, ge=1, description="metrics.jsonl / TensorBoard cadence")
    layer_records: bool = Field(default=True, description="per-layer K-FAC records in metrics.jsonl")


class HorovodSection(Section):
    init: Literal["auto", "mpi4py", "horovod"] = Field(
        default="auto", description="auto: mpi4py when started by mpirun/srun, plain hvd.init() otherwise"
    )
    fusion_threshold_mb: Number | None = Field(
        default=None, ge=0, description="HOROVOD_FUSION_THRESHOLD (MiB)"
    )
    fixed_fusion: bool = Field(
        default=True,
        description="tensor fusion in fixed groups (HOROVOD_DISABLE_GROUP_FUSION=1, the gradients in groups "
        "of at most fusion_threshold_mb in backward order, each K-FAC factor alone), so two "
        "identical launches give bit-identical weights; false: Horovod fuses whatever is ready in a cycle, "
        "which at 3+ ranks changes the order of the sums from run to run",
    )
    cycle_time_ms: Number | None = Field(default=None, gt=0, description="HOROVOD_CYCLE_TIME (ms)")
    timeline: str | None = Field(default=None, description="HOROVOD_TIMELINE file (Chrome trace)")
    timeline_mark_cycles: bool = Field(default=False, description="HOROVOD_TIMELINE_MARK_CYCLES")
    hierarchical_allreduce: bool | None = Field(default=None, description="HOROVOD_HIERARCHICAL_ALLREDUCE")
    autotune: bool = Field(default=False, description="HOROVOD_AUTOTUNE")
    fp16_allreduce: bool = Field(default=False, description="fp16 compression of gradient allreduce")
    stall_check_s: int | None = Field(
        default=None, ge=0, description="HOROVOD_STALL_CHECK_TIME_SECONDS (Horovod: 60; 0 disables the check)"
    )
    stall_shutdown_s: int | None = Field(
        default=None, ge=0, description="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (Horovod: 0 = never)"
    )
    gloo_timeout_s: int | None = Field(
        default=None, ge=1, description="HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod: 30)"
    )
    allow_host_collectives: bool = Field(
        default=False,
        description="CUDA tensors with a Horovod built without NCCL: run anyway (every collective staged "
        "through host memory) instead of stopping (exit code 2)",
    )


class DebugSection(Section):
    fault_rank: int = Field(default=0, ge=0, description="the rank that the injected faults below hit")
    nan_step: int | None = Field(
        default=None, ge=1, description="fault injection: NaN in fault_rank's input batch at this step"
    )
    kill_step: int | None = Field(
        default=None, ge=1, description="fault injection: SIGKILL fault_rank after this step's update"
    )
    hang_step: int | None = Field(
        default=None, ge=1, description="fault injection: fault_rank stops making progress at this step"
    )
    overflow_step: int | None = Field(
        default=None,
        ge=1,
        description="fault injection: fault_rank's gradients of this step become infinite while its loss "
        "stays finite (with train.precision=fp16: a loss-scale overflow)",
    )


class Sections(BaseModel):
    """Every section of a config, in the order of the key reference and of a resolved config."""

    model: ModelSection = ModelSection()
    data: DataSection = DataSection()
    optim: OptimSection = OptimSection()
    kfac: KfacSection = KfacSection()
    train: TrainSection = TrainSection()
    checkpoint: CheckpointSection = CheckpointSection()
    log: LogSection = LogSection()
    horovod: HorovodSection = HorovodSection()
    debug: DebugSection = DebugSection()


SECTION_MODELS: dict[str, type[Section]] = {
    name: typing.cast(type[Section], field.annotation) for name, field in Sections.model_fields.items()
}
SECTIONS = tuple(SECTION_MODELS)
# section -> key -> its pydantic field (``.default``, ``.description``, the constraints in ``.metadata``)
SCHEMA: dict[str, dict[str, FieldInfo]] = {name: dict(m.model_fields) for name, m in SECTION_MODELS.items()}

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
    "horovod.fixed_fusion",
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


# Known training-set sizes used by the dry run when the data is not present.
KNOWN_TRAIN_SIZES = {"imagenet": 1281167, "fashion_mnist": 60000}
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


def keys_markdown() -> str:
    """The key reference of docs/LAUNCHER.md, generated from the section models."""
    lines = []
    for section, fields in SCHEMA.items():
        lines += [f"### `{section}`", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        for key, field in fields.items():
            default = yaml.safe_dump(field.default, default_flow_style=True).strip().replace("\n...", "")
            lines.append(
                f"| `{section}.{key}` | {accepts(field).doc_text()} | `{default}` | {field.description} |"
            )
        lines.append("")
    return "\n".join(lines)
