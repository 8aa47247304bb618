"""The configuration schema: one pydantic model per section, each key with its type, default, range and doc.

:mod:`launch.config` loads files against it and turns pydantic's errors into one-line messages;
docs/LAUNCHER.md's key reference is generated from it (``python -m launch.config``). The ``kfac``
section is generated from :class:`kfac_hvd.KFACOptions` (:mod:`launch.kfac_section`).
"""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

import annotated_types
import yaml
from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict, Field, field_validator
from pydantic.fields import FieldInfo


def _number_from_text(value: Any) -> Any:
    """A number written as a quoted string ("1e-3") is still a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _one_or_many(value: Any) -> Any:
    """A single value stands for a one-element list."""
    return [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


# Field types: every section is strict (no "3" for an int, no 1 for a bool) but for these spellings.
Number = Annotated[float, BeforeValidator(_number_from_text), AllowInfNan(False)]
TextList = Annotated[list[str], BeforeValidator(_one_or_many)]


class Section(BaseModel):
    """One section of a config: unknown keys refused, types strict, every assignment validated."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    def __getitem__(self, key: str) -> Any:  # ``section["key"]`` reads as ``section.key``
        return getattr(self, key)


class ModelSection(Section):
    name: Literal["resnet50", "small_resnet"] = Field(
        "resnet50", description="torchvision ResNet-50, or a small ResNet for 28x28 inputs"
    )
    num_classes: int = Field(1000, ge=2, description="output classes")
    width: int = Field(16, ge=1, description="small_resnet: channels of the first stage")
    blocks: Annotated[list[Annotated[int, Field(ge=1)]], BeforeValidator(_one_or_many)] = Field(
        [1, 1, 1], description="small_resnet: basic blocks per stage (stage i has width*2^i channels)"
    )
    zero_init_residual: bool = Field(False, description="zero-initialise the last BN of each block")


class DataSection(Section):
    dataset: Literal["imagenet", "fashion_mnist", "synthetic"] = Field(
        "imagenet", description="ImageFolder ImageNet, Fashion-MNIST IDX files, or random images"
    )
    train_dir: str | None = Field(None, description="ImageFolder root of the training set")
    val_dir: str | None = Field(None, description="ImageFolder root of the validation set")
    fashion_mnist_dir: str = Field(
        "/usr/share/datasets/fashion-mnist", description="folder with the four Fashion-MNIST IDX .gz files"
    )
    fashion_mnist_pool: Literal[1, 2, 4] = Field(
        1, description="average-pool Fashion-MNIST by this factor (2: 14x14 images, for long runs)"
    )
    batch_size: int = Field(32, ge=1, description="images per rank and step")
    val_batch_size: int | None = Field(
        None, ge=1, description="evaluation batch per rank (default: batch_size)"
    )
    workers: int = Field(4, ge=0, description="DataLoader worker processes per rank")
    image_size: int = Field(224, ge=8, description="training crop / evaluation centre crop")
    val_resize: int = Field(256, ge=8, description="evaluation: shorter side before the crop")
    train_subset: int | None = Field(
        None, ge=1, description="use N evenly spaced training images (tests, quick runs)"
    )
    val_subset: int | None = Field(None, ge=1, description="use N evenly spaced evaluation images")
    train_samples: int | None = Field(
        None, ge=1, description="dry run: training-set size to plan with when the data is absent"
    )
    synthetic_size: int = Field(4096, ge=1, description="synthetic: training images")
    synthetic_val_size: int = Field(512, ge=1, description="synthetic: evaluation images")
    mixup_alpha: Number = Field(0.0, ge=0, description="mixup Beta(a, a); 0 disables")
    random_erasing: Number = Field(
        0.0, ge=0, le=1, description="probability of random erasing (training); 0 disables"
    )
    pin_memory: bool = Field(True, description="pinned host memory for GPU runs")
    drop_last: bool = Field(True, description="drop each rank's last incomplete training batch")
    skip_unreadable: bool = Field(
        False,
        description="ImageFolder: an unreadable image is reported and skipped instead of stopping the run "
        "(exit code 2)",
    )


class OptimSection(Section):
    method: Literal["kfac", "sgd"] = Field("kfac", description="K-FAC or the SGD baseline")
    lr: Number = Field(0.1, gt=0, description="base learning rate (alpha_0)")
    schedule: Literal["poly", "step", "constant"] = Field(
        "poly", description="learning-rate schedule (see Learning rate below)"
    )
    warmup_epochs: Number = Field(0.0, ge=0, description="linear warm-up length")
    warmup_init_lr: Number = Field(0.0, ge=0, description="learning rate at step 0 of warm-up")
    poly_power: Number = Field(8.0, gt=0, description="poly: exponent p")
    poly_start_epoch: Number = Field(1.0, ge=0, description="poly: e_start (constant before)")
    poly_end_epoch: Number = Field(53.5, gt=0, description="poly: e_end (lr reaches 0)")
    milestones: Annotated[list[Annotated[float, Field(gt=0)]], BeforeValidator(_one_or_many)] = Field(
        [30.0, 60.0, 80.0], description="step: epochs at which lr is multiplied by gamma"
    )
    gamma: Number = Field(0.1, gt=0, le=1, description="step: factor applied at each milestone")
    momentum: Number = Field(0.9, ge=0, lt=1, description="SGD momentum")
    nesterov: bool = Field(False, description="Nesterov momentum")
    momentum_correction: bool = Field(True, description="scale the momentum by lr/lr_prev when lr changes")
    weight_decay: Number = Field(0.0, ge=0, description="L2 weight decay (every parameter)")
    weight_rescaling: bool = Field(
        False, description="rescale conv/FC weights to norm sqrt(2*out) when above it"
    )
    label_smoothing: Number = Field(0.0, ge=0, lt=1, description="cross-entropy label smoothing")


class KfacSection(Section):  # TEMPORARY: to be generated from KFACOptions
    damping: Number = Field(1e-3, gt=0, description="Tikhonov damping gamma")
    update_threshold: Number | None = Field(
        None, gt=0, description="lambda of the adaptive interval; null = every step"
    )
    update_interval: int = Field(
        1, ge=1, description="null lambda: fixed interval k (every k-th step); with lambda: start interval"
    )
    interval_warmup_epochs: Number = Field(
        0.0,
        ge=0,
        description="null lambda: update every factor on every step for this many epochs, then every update_interval steps",
    )
    interval_policy: Literal["modulo", "since_last"] = Field(
        "modulo", description="due when t % interval == 0 (paper) or t - t_last >= interval"
    )
    max_interval: int | None = Field(None, ge=1, description="cap on any interval")
    shrink_multiple: Number | None = Field(
        None, gt=1, description="a diff >= m*lambda halves the interval (not in the paper)"
    )
    separate_intervals: bool = Field(False, description="separate intervals for A and G")
    factor_decay: Number | None = Field(
        None, ge=0, lt=1, description="running average of factors; null = fresh factors"
    )
    kl_clip: Number | None = Field(
        None, gt=0, description="scale preconditioned gradients so lr^2 * sum(g.Fg) <= kl_clip"
    )
    pi_damping: bool = Field(True, description="split damping over the factors with pi")
    inverse_method: Literal["cholesky", "eigen"] = Field(
        "cholesky", description="how the owner inverts the damped factors"
    )
    symmetric_comm: bool = Field(True, description="send symmetric factors as upper triangles")
    skip_layers: TextList = Field(
        [], description="regular expressions; matching module names are left to SGD"
    )
    include_batchnorm: bool = Field(True, description="unit-wise Fisher blocks for BatchNorm")
    local_inverse_max_dim: int = Field(
        256,
        ge=0,
        description="layers whose factors are at most this wide, and every BatchNorm, are inverted on every rank instead of travelling in the inverse allgather",
    )
    noise_aware_diff: bool = Field(
        False,
        description="subtract the factors' estimated sampling noise from Diff (docs/NOISE.md; not in the paper)",
    )
    unfold_chunk_mb: Number = Field(
        256.0,
        gt=0,
        description="memory bound (MiB) of one im2col chunk when a conv layer's A factor is computed",
    )
    narrow_factor_products: bool = Field(
        True,
        description="CUDA: bf16/fp16 activations and gradients enter the factor products as they are (fp32 accumulation and result); false: cast to fp32 first",
    )
    factor_matmul_precision: Literal["highest", "high"] = Field(
        "highest",
        description="CUDA: fp32 factor products in full fp32 or TF32 (high); K-FAC's own, whatever train.tf32 says",
    )
    batched_inversion: bool = Field(
        True, description="invert factors of equal size in one batched call; false: one call each"
    )


class TrainSection(Section):
    epochs: int = Field(1, ge=1, description="training epochs")
    max_steps: int | None = Field(
        None, ge=1, description="stop after this many steps in total (tests, quick runs)"
    )
    world_size: int | None = Field(
        None,
        ge=1,
        description="ranks the experiment is planned for (dry run); a launch with another number of ranks "
        "stops (exit code 2); null: any number",
    )
    seed: int = Field(0, ge=0, description="seed of weights, shuffling and augmentation")
    device: Literal["auto", "cpu", "cuda"] = Field(
        "auto",
        description="auto: the GPU of this rank's local rank if CUDA is available (rank 0 says what it "
        "chose and why); cuda: stop (exit code 2) when CUDA is not available",
    )
    precision: Literal["fp32", "bf16", "fp16"] = Field(
        "fp32",
        description="autocast dtype of forward and loss; fp16 adds a GradScaler (an overflow step is "
        "skipped on every rank); K-FAC factors stay fp32",
    )
    channels_last: bool = Field(
        False, description="input images, and so the activations, in channels_last (NHWC) memory format"
    )
    tf32: bool = Field(
        False, description="CUDA: TF32 for fp32 matmuls and cuDNN convolutions (false: both off)"
    )
    cudnn_benchmark: bool = Field(
        False, description="CUDA: let cuDNN time its convolution algorithms (fixed shapes)"
    )
    threads: int | None = Field(
        None, ge=1, description="torch intra-op threads per rank (default: torch's choice)"
    )
    eval_every: int = Field(1, ge=0, description="evaluate every N epochs (0: only at the end)")
    max_bad_steps: int = Field(
        5,
        ge=1,
        description="stop (exit code 4) after this many consecutive steps whose loss or gradient was not "
        "finite (each such step is skipped on every rank)",
    )
    watchdog_s: Number | None = Field(
        600.0,
        gt=0,
        description="a rank that makes no progress (step, evaluation batch, checkpoint) for this long exits "
        "with code 3 instead of hanging; null: off",
    )


class CheckpointSection(Section):
    dir: str | None = Field(None, description="default: <log.dir>/checkpoints")
    every_epochs: int = Field(1, ge=0, description="0: no end-of-epoch checkpoints")
    every_steps: int | None = Field(None, ge=1, description="also checkpoint every N steps (mid-epoch)")
    keep_last: int = Field(
        2, ge=1, description="step_<7-digit step>.pt files kept, newest first (last.pt is the newest)"
    )
    keep_all: bool = Field(False, description="keep every step_<7-digit step>.pt (overrides keep_last)")
    resume: str | None = Field(
        None,
        description="checkpoint file to resume from, or 'auto' (the newest verified one in dir, if any); "
        "its saved config must match this run's but for the keys that may change on resume",
    )
    trust_unlisted: bool = Field(
        False,
        description="load a checkpoint file that no checkpoints.json beside it lists (unverified; still "
        "loaded without running code)",
    )
    allow_changes: TextList = Field(
        [],
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
        None,
        description="run folder; default runs/<config name>. A fresh run into a folder holding another "
        "run's outputs stops (exit code 2)",
    )
    overwrite: bool = Field(
        False,
        description="a fresh run (checkpoint.resume null) into a used log.dir first moves the old run aside "
        "to <log.dir>.old-<time>; nothing is deleted",
    )
    tensorboard: bool = Field(True, description="TensorBoard scalars in <log.dir>/tensorboard")
    progress: bool = Field(
        True,
        description="progress on rank 0: a tqdm bar on a terminal; under a launcher (horovodrun, mpirun, "
        "srun) or when stderr is not a terminal, a plain line instead",
    )
    progress_every_s: Number = Field(
        30.0, ge=0, description="seconds between plain progress lines (0: every step)"
    )
    every_steps: int = Field(1, ge=1, description="metrics.jsonl / TensorBoard cadence")
    layer_records: bool = Field(True, description="per-layer K-FAC records in metrics.jsonl")


class HorovodSection(Section):
    init: Literal["auto", "mpi4py", "horovod"] = Field(
        "auto", description="auto: mpi4py when started by mpirun/srun, plain hvd.init() otherwise"
    )
    fusion_threshold_mb: Number | None = Field(None, ge=0, description="HOROVOD_FUSION_THRESHOLD (MiB)")
    cycle_time_ms: Number | None = Field(None, gt=0, description="HOROVOD_CYCLE_TIME (ms)")
    timeline: str | None = Field(None, description="HOROVOD_TIMELINE file (Chrome trace)")
    timeline_mark_cycles: bool = Field(False, description="HOROVOD_TIMELINE_MARK_CYCLES")
    hierarchical_allreduce: bool | None = Field(None, description="HOROVOD_HIERARCHICAL_ALLREDUCE")
    autotune: bool = Field(False, description="HOROVOD_AUTOTUNE")
    fp16_allreduce: bool = Field(False, description="fp16 compression of gradient allreduce")
    stall_check_s: int | None = Field(
        None, ge=0, description="HOROVOD_STALL_CHECK_TIME_SECONDS (Horovod: 60; 0 disables the check)"
    )
    stall_shutdown_s: int | None = Field(
        None, ge=0, description="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (Horovod: 0 = never)"
    )
    gloo_timeout_s: int | None = Field(None, ge=1, description="HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod: 30)")
    allow_host_collectives: bool = Field(
        False,
        description="CUDA tensors with a Horovod built without NCCL: run anyway (every collective staged "
        "through host memory) instead of stopping (exit code 2)",
    )


class DebugSection(Section):
    fault_rank: int = Field(0, ge=0, description="the rank that the injected faults below hit")
    nan_step: int | None = Field(
        None, ge=1, description="fault injection: NaN in fault_rank's input batch at this step"
    )
    kill_step: int | None = Field(
        None, ge=1, description="fault injection: SIGKILL fault_rank after this step's update"
    )
    hang_step: int | None = Field(
        None, ge=1, description="fault injection: fault_rank stops making progress at this step"
    )
    overflow_step: int | None = Field(
        None,
        ge=1,
        description="fault injection: fault_rank's gradients of this step become infinite while its loss "
        "stays finite (with train.precision=fp16: a loss-scale overflow)",
    )


class Sections(BaseModel):
    """Every section of a config, in the order of the key reference and of a resolved config."""

    model: ModelSection = Field(default_factory=ModelSection)
    data: DataSection = Field(default_factory=DataSection)
    optim: OptimSection = Field(default_factory=OptimSection)
    kfac: KfacSection = Field(default_factory=KfacSection)
    train: TrainSection = Field(default_factory=TrainSection)
    checkpoint: CheckpointSection = Field(default_factory=CheckpointSection)
    log: LogSection = Field(default_factory=LogSection)
    horovod: HorovodSection = Field(default_factory=HorovodSection)
    debug: DebugSection = Field(default_factory=DebugSection)


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


# Known training-set sizes used by the dry run when the data is not present.
KNOWN_TRAIN_SIZES = {"imagenet": 1281167, "fashion_mnist": 60000}
FASHION_FILES = (
    "train-images-idx3-ubyte.gz",
    "train-labels-idx1-ubyte.gz",
    "t10k-images-idx3-ubyte.gz",
    "t10k-labels-idx1-ubyte.gz",
)


# --------------------------------------------------------------------------------------------------
# What a field accepts, read from its annotation (for error messages and the key reference)
# --------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Accepts:
    kind: str  # int | float | bool | str
    is_list: bool
    nullable: bool
    choices: tuple[Any, ...] | None
    bounds: str  # "> 0", ">= 1", "in [0, 1)"; "" when unbounded (of the items, for a list)

    def type_text(self) -> str:
        """The error message's words: "an integer", "a list of numbers or null"."""
        one, many = _KIND_WORDS[self.kind]
        text = f"a list of {many}" if self.is_list else one
        return text + " or null" if self.nullable else text

    def doc_text(self) -> str:
        """The key reference's type column: "float > 0", "list of int >= 1", "a \\| b or null"."""
        if self.choices is not None:
            text = " \\| ".join(str(c) for c in self.choices)
        else:
            text = (
                ("list of " if self.is_list else "") + self.kind + (f" {self.bounds}" if self.bounds else "")
            )
        return text + " or null" if self.nullable else text


_KIND_WORDS = {
    "int": ("an integer", "integers"),
    "float": ("a number", "numbers"),
    "bool": ("true or false", "booleans"),
    "str": ("a string", "strings"),
}
_BOUND_SIGNS = {
    annotated_types.Gt: ">",
    annotated_types.Ge: ">=",
    annotated_types.Lt: "<",
    annotated_types.Le: "<=",
}


def accepts(field: FieldInfo) -> Accepts:
    annotation, metadata = _strip(field.annotation, list(field.metadata))
    nullable = False
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        nullable = True
        annotation, metadata = _strip(args[0], metadata)
    is_list = typing.get_origin(annotation) is list
    if is_list:
        annotation, metadata = _strip(typing.get_args(annotation)[0], metadata)
    choices = None
    if typing.get_origin(annotation) is Literal:
        choices = typing.get_args(annotation)
        annotation = type(choices[0])
    return Accepts(annotation.__name__, is_list, nullable, choices, _bounds(metadata))


def _strip(annotation: Any, metadata: list[Any]) -> tuple[Any, list[Any]]:
    """``Annotated[T, ...]`` -> T, with the constraints found in its metadata appended to ``metadata``."""
    while typing.get_origin(annotation) is Annotated:
        annotation, *extra = typing.get_args(annotation)
        for item in extra:
            metadata = metadata + (list(item.metadata) if isinstance(item, FieldInfo) else [item])
    return annotation, metadata


def _bounds(metadata: list[Any]) -> str:
    signs = {}
    for item in metadata:
        for kind, sign in _BOUND_SIGNS.items():
            if isinstance(item, kind):
                signs[sign] = getattr(item, kind.__name__.lower())
    lower = next(((s, v) for s, v in signs.items() if s in (">", ">=")), None)
    upper = next(((s, v) for s, v in signs.items() if s in ("<", "<=")), None)
    if lower and upper:
        return (
            f"in {'(' if lower[0] == '>' else '['}{lower[1]:g}, {upper[1]:g}{')' if upper[0] == '<' else ']'}"
        )
    bound = lower or upper
    return f"{bound[0]} {bound[1]:g}" if bound else ""


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
