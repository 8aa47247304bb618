"""Experiment configuration: YAML files with ``base:`` inheritance, dotted overrides, validation.

A config is a YAML mapping of sections (``model``, ``data``, ``optim``, ``kfac``, ``train``,
``checkpoint``, ``log``, ``horovod``).  A file may say ``base: other.yaml`` (relative to the file) and
then only lists what it changes.  ``key=value`` overrides from the command line are applied last; the
value is parsed as YAML (``null``, ``0.25``, ``[30, 60]``, ``true``).

Every leaf key is declared in :data:`SCHEMA` with its type, default and allowed range.  Any problem
(unknown key, wrong type, value out of range, inconsistent combination) raises :class:`ConfigError`,
whose message is one line naming the file (or ``command line``) that set the offending key.
"""
from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

SECTIONS = ("model", "data", "optim", "kfac", "train", "checkpoint", "log", "horovod", "debug")
DEFAULTS_SOURCE = "defaults"
CLI_SOURCE = "command line"


class ConfigError(Exception):
    """A configuration problem; ``str(err)`` is a single line naming the file and the key."""

    def __init__(self, source: str, key: Optional[str], message: str):
        self.source, self.key, self.message = source, key, message
        where = f"{source}: {key}" if key else source
        super().__init__(f"config error: {where}: {message}")


# --------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------
@dataclass
class Spec:
    kind: str                      # int | float | bool | str | list_int | list_float | list_str
    default: Any
    nullable: bool = False
    choices: Optional[Tuple[str, ...]] = None
    check: Optional[Callable[[Any], Optional[str]]] = None   # returns an error text or None
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


SCHEMA: Dict[str, Dict[str, Spec]] = {
    "model": {
        "name": Spec("str", "resnet50", choices=("resnet50", "small_resnet"),
                     doc="torchvision ResNet-50, or a small ResNet for 28x28 inputs"),
        "num_classes": Spec("int", 1000, check=ge(2), doc="output classes"),
        "width": Spec("int", 16, check=ge(1), doc="small_resnet: channels of the first stage"),
        "blocks": Spec("list_int", [1, 1, 1], check=each(ge(1)),
                       doc="small_resnet: basic blocks per stage (stage i has width*2^i channels)"),
        "zero_init_residual": Spec("bool", False, doc="zero-initialise the last BN of each block"),
    },
    "data": {
        "dataset": Spec("str", "imagenet", choices=("imagenet", "fashion_mnist", "synthetic"),
                        doc="ImageFolder ImageNet, Fashion-MNIST IDX files, or random images"),
        "train_dir": Spec("str", None, nullable=True, doc="ImageFolder root of the training set"),
        "val_dir": Spec("str", None, nullable=True, doc="ImageFolder root of the validation set"),
        "fashion_mnist_dir": Spec("str", "/usr/share/datasets/fashion-mnist",
                                  doc="folder with the four Fashion-MNIST IDX .gz files"),
        "batch_size": Spec("int", 32, check=ge(1), doc="images per rank and step"),
        "val_batch_size": Spec("int", None, nullable=True, check=ge(1),
                               doc="evaluation batch per rank (default: batch_size)"),
        "workers": Spec("int", 4, check=ge(0), doc="DataLoader worker processes per rank"),
        "image_size": Spec("int", 224, check=ge(8), doc="training crop / evaluation centre crop"),
        "val_resize": Spec("int", 256, check=ge(8), doc="evaluation: shorter side before the crop"),
        "train_subset": Spec("int", None, nullable=True, check=ge(1),
                             doc="use N evenly spaced training images (tests, quick runs)"),
        "val_subset": Spec("int", None, nullable=True, check=ge(1),
                           doc="use N evenly spaced evaluation images"),
        "train_samples": Spec("int", None, nullable=True, check=ge(1),
                              doc="dry run: training-set size to plan with when the data is absent"),
        "synthetic_size": Spec("int", 4096, check=ge(1), doc="synthetic: training images"),
        "synthetic_val_size": Spec("int", 512, check=ge(1), doc="synthetic: evaluation images"),
        "mixup_alpha": Spec("float", 0.0, check=ge(0.0), doc="mixup Beta(a, a); 0 disables"),
        "random_erasing": Spec("float", 0.0, check=in_range(0.0, 1.0, hi_open=False),
                               doc="probability of random erasing (training); 0 disables"),
        "pin_memory": Spec("bool", True, doc="pinned host memory for GPU runs"),
        "drop_last": Spec("bool", True, doc="drop each rank's last incomplete training batch"),
        "skip_unreadable": Spec("bool", False,
                                doc="ImageFolder: an unreadable image is reported and skipped instead of "
                                    "stopping the run (exit code 2)"),
    },
    "optim": {
        "method": Spec("str", "kfac", choices=("kfac", "sgd"), doc="K-FAC or the SGD baseline"),
        "lr": Spec("float", 0.1, check=gt(0.0), doc="base learning rate (alpha_0)"),
        "schedule": Spec("str", "poly", choices=("poly", "step", "constant"),
                         doc="learning-rate schedule (see Learning rate below)"),
        "warmup_epochs": Spec("float", 0.0, check=ge(0.0), doc="linear warm-up length"),
        "warmup_init_lr": Spec("float", 0.0, check=ge(0.0), doc="learning rate at step 0 of warm-up"),
        "poly_power": Spec("float", 8.0, check=gt(0.0), doc="poly: exponent p"),
        "poly_start_epoch": Spec("float", 1.0, check=ge(0.0), doc="poly: e_start (constant before)"),
        "poly_end_epoch": Spec("float", 53.5, check=gt(0.0), doc="poly: e_end (lr reaches 0)"),
        "milestones": Spec("list_float", [30.0, 60.0, 80.0], check=each(gt(0.0)),
                           doc="step: epochs at which lr is multiplied by gamma"),
        "gamma": Spec("float", 0.1, check=in_range(0.0, 1.0, hi_open=False, lo_open=True),
                      doc="step: factor applied at each milestone"),
        "momentum": Spec("float", 0.9, check=in_range(0.0, 1.0), doc="SGD momentum"),
        "nesterov": Spec("bool", False, doc="Nesterov momentum"),
        "momentum_correction": Spec("bool", True,
                                    doc="scale the momentum by lr/lr_prev when lr changes"),
        "weight_decay": Spec("float", 0.0, check=ge(0.0), doc="L2 weight decay (every parameter)"),
        "weight_rescaling": Spec("bool", False,
                                 doc="rescale conv/FC weights to norm sqrt(2*out) when above it"),
        "label_smoothing": Spec("float", 0.0, check=in_range(0.0, 1.0), doc="cross-entropy label smoothing"),
    },
    "kfac": {
        "damping": Spec("float", 1e-3, check=gt(0.0), doc="Tikhonov damping gamma"),
        "update_threshold": Spec("float", None, nullable=True, check=gt(0.0),
                                 doc="lambda of the adaptive interval; null = every step"),
        "update_interval": Spec("int", 1, check=ge(1),
                                doc="null lambda: fixed interval k (every k-th step); with lambda: start interval"),
        "interval_policy": Spec("str", "modulo", choices=("modulo", "since_last"),
                                doc="due when t % interval == 0 (paper) or t - t_last >= interval"),
        "max_interval": Spec("int", None, nullable=True, check=ge(1), doc="cap on any interval"),
        "shrink_multiple": Spec("float", None, nullable=True, check=gt(1.0),
                                doc="a diff >= m*lambda halves the interval (not in the paper)"),
        "separate_intervals": Spec("bool", False, doc="separate intervals for A and G"),
        "factor_decay": Spec("float", None, nullable=True, check=in_range(0.0, 1.0),
                             doc="running average of factors; null = fresh factors"),
        "kl_clip": Spec("float", None, nullable=True, check=gt(0.0),
                        doc="scale preconditioned gradients so lr^2 * sum(g.Fg) <= kl_clip"),
        "pi_damping": Spec("bool", True, doc="split damping over the factors with pi"),
        "inverse_method": Spec("str", "cholesky", choices=("cholesky", "eigen"),
                               doc="how the owner inverts the damped factors"),
        "symmetric_comm": Spec("bool", True, doc="send symmetric factors as upper triangles"),
        "skip_layers": Spec("list_str", [], doc="regular expressions; matching module names are left to SGD"),
        "include_batchnorm": Spec("bool", True, doc="unit-wise Fisher blocks for BatchNorm"),
    },
    "train": {
        "epochs": Spec("int", 1, check=ge(1), doc="training epochs"),
        "max_steps": Spec("int", None, nullable=True, check=ge(1),
                          doc="stop after this many steps in total (tests, quick runs)"),
        "world_size": Spec("int", None, nullable=True, check=ge(1),
                           doc="ranks the experiment is planned for (dry run; checked at launch)"),
        "seed": Spec("int", 0, check=ge(0), doc="seed of weights, shuffling and augmentation"),
        "device": Spec("str", "auto", choices=("auto", "cpu", "cuda"),
                       doc="auto: the GPU of this rank's local rank if CUDA is available"),
        "threads": Spec("int", None, nullable=True, check=ge(1),
                        doc="torch intra-op threads per rank (default: torch's choice)"),
        "eval_every": Spec("int", 1, check=ge(0), doc="evaluate every N epochs (0: only at the end)"),
        "max_bad_steps": Spec("int", 5, check=ge(1),
                              doc="stop (exit code 4) after this many consecutive steps whose loss or "
                                  "gradient was not finite (each such step is skipped on every rank)"),
        "watchdog_s": Spec("float", 600.0, nullable=True, check=gt(0.0),
                           doc="a rank that makes no progress (step, evaluation batch, checkpoint) for this "
                               "long exits with code 3 instead of hanging; null: off"),
    },
    "checkpoint": {
        "dir": Spec("str", None, nullable=True, doc="default: <log.dir>/checkpoints"),
        "every_epochs": Spec("int", 1, check=ge(0), doc="0: no end-of-epoch checkpoints"),
        "every_steps": Spec("int", None, nullable=True, check=ge(1),
                            doc="also checkpoint every N steps (mid-epoch)"),
        "keep_last": Spec("int", 2, check=ge(1),
                          doc="step_<7-digit step>.pt files kept, newest first (last.pt is the newest)"),
        "keep_all": Spec("bool", False, doc="keep every step_<7-digit step>.pt (overrides keep_last)"),
        "resume": Spec("str", None, nullable=True,
                       doc="checkpoint file to resume from, or 'auto' (last.pt in dir if present)"),
    },
    "log": {
        "dir": Spec("str", None, nullable=True, doc="run folder; default runs/<config name>"),
        "tensorboard": Spec("bool", True, doc="TensorBoard scalars in <log.dir>/tensorboard"),
        "progress": Spec("bool", True, doc="tqdm progress bar on rank 0"),
        "every_steps": Spec("int", 1, check=ge(1), doc="metrics.jsonl / TensorBoard cadence"),
        "layer_records": Spec("bool", True, doc="per-layer K-FAC records in metrics.jsonl"),
    },
    "horovod": {
        "init": Spec("str", "auto", choices=("auto", "mpi4py", "horovod"),
                     doc="auto: mpi4py when started by mpirun/srun, plain hvd.init() otherwise"),
        "fusion_threshold_mb": Spec("float", None, nullable=True, check=ge(0.0),
                                    doc="HOROVOD_FUSION_THRESHOLD (MiB)"),
        "cycle_time_ms": Spec("float", None, nullable=True, check=gt(0.0),
                              doc="HOROVOD_CYCLE_TIME (ms)"),
        "timeline": Spec("str", None, nullable=True, doc="HOROVOD_TIMELINE file (Chrome trace)"),
        "timeline_mark_cycles": Spec("bool", False, doc="HOROVOD_TIMELINE_MARK_CYCLES"),
        "hierarchical_allreduce": Spec("bool", None, nullable=True,
                                       doc="HOROVOD_HIERARCHICAL_ALLREDUCE"),
        "autotune": Spec("bool", False, doc="HOROVOD_AUTOTUNE"),
        "fp16_allreduce": Spec("bool", False, doc="fp16 compression of gradient allreduce"),
        "stall_check_s": Spec("int", None, nullable=True, check=ge(0),
                              doc="HOROVOD_STALL_CHECK_TIME_SECONDS (Horovod: 60; 0 disables the check)"),
        "stall_shutdown_s": Spec("int", None, nullable=True, check=ge(0),
                                 doc="HOROVOD_STALL_SHUTDOWN_TIME_SECONDS (Horovod: 0 = never)"),
        "gloo_timeout_s": Spec("int", None, nullable=True, check=ge(1),
                               doc="HOROVOD_GLOO_TIMEOUT_SECONDS (Horovod: 30)"),
    },
    "debug": {
        "fault_rank": Spec("int", 0, check=ge(0), doc="the rank that the injected faults below hit"),
        "nan_step": Spec("int", None, nullable=True, check=ge(1),
                         doc="fault injection: NaN in fault_rank's input batch at this step"),
        "kill_step": Spec("int", None, nullable=True, check=ge(1),
                          doc="fault injection: SIGKILL fault_rank after this step's update"),
        "hang_step": Spec("int", None, nullable=True, check=ge(1),
                          doc="fault injection: fault_rank stops making progress at this step"),
    },
}

# Known training-set sizes used by the dry run when the data is not present.
KNOWN_TRAIN_SIZES = {"imagenet": 1281167, "fashion_mnist": 60000}
FASHION_FILES = ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")


# --------------------------------------------------------------------------------------------------
# Config object
# --------------------------------------------------------------------------------------------------
class Section(dict):
    """A dict whose keys also read as attributes (``cfg.kfac.damping``)."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError as exc:
            raise AttributeError(name) from exc


@dataclass
class Config:
    path: str
    values: Dict[str, Section]
    sources: Dict[str, str] = field(default_factory=dict)   # dotted key -> file / command line
    overrides: List[str] = field(default_factory=list)

    def __getattr__(self, name):
        values = self.__dict__.get("values", {})
        if name in values:
            return values[name]
        raise AttributeError(name)

    def source(self, key: str) -> str:
        return self.sources.get(key, self.path)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source(key), key, message)

    def to_dict(self) -> Dict[str, Dict[str, Any]]:
        return {s: dict(v) for s, v in self.values.items()}

    def dump(self) -> str:
        header = f"# resolved from {self.path}"
        if self.overrides:
            header += " with " + " ".join(self.overrides)
        return header + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key '{key}'", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: str, origin: str, key: Optional[str] = None) -> Dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError(origin, key, f"config file is a directory: {path}")
    if not os.path.isfile(path):
        raise ConfigError(origin, key, f"config file not found: {path}")
    try:
        with open(path, "r", encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not a text (UTF-8) file: byte {exc.start} cannot be decoded") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(path, None, f"invalid YAML{where}: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(path, None, "the file must hold a mapping of sections")
    return data


def _flatten(path: str, data: Dict[str, Any]) -> Dict[str, Any]:
    """Section mapping -> {"section.key": value}; rejects unknown sections and keys."""
    flat = {}
    for section, body in data.items():
        if section == "base":
            continue
        if section not in SCHEMA:
            raise ConfigError(path, str(section),
                              f"unknown section (known: base, {', '.join(SECTIONS)})")
        if body is None:
            continue
        if not isinstance(body, dict):
            raise ConfigError(path, str(section), "a section must be a mapping of keys")
        for key, value in body.items():
            dotted = f"{section}.{key}"
            if key not in SCHEMA[section]:
                raise ConfigError(path, dotted, _unknown_key_text(section, str(key)))
            flat[dotted] = value
    return flat


def _unknown_key_text(section: str, key: str) -> str:
    import difflib
    close = difflib.get_close_matches(key, list(SCHEMA[section]), n=1)
    hint = f"; did you mean '{section}.{close[0]}'?" if close else ""
    return f"unknown key{hint}"


def _load_chain(path: str, origin: str, seen: Tuple[str, ...],
                key: Optional[str] = None) -> Tuple[Dict[str, Any], Dict[str, str]]:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(origin, "base", f"circular 'base:' chain ({path} is already in the chain)")
    data = _read_yaml(path, origin, key)
    flat: Dict[str, Any] = {}
    sources: Dict[str, str] = {}
    base = data.get("base")
    if base is not None:
        if not isinstance(base, str) or not base:
            raise ConfigError(path, "base", "must be a file name (relative to this file)")
        base_path = base if os.path.isabs(base) else os.path.join(os.path.dirname(path), base)
        flat, sources = _load_chain(os.path.normpath(base_path), path, seen + (real,), "base")
    own = _flatten(path, data)
    flat.update(own)
    sources.update({k: path for k in own})
    return flat, sources


def parse_override(text: str, source: str = CLI_SOURCE) -> Tuple[str, Any]:
    if "=" not in text:
        raise ConfigError(source, None, f"override '{text}' is not of the form section.key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if key.count(".") != 1:
        raise ConfigError(source, key or text, "override keys look like section.key")
    section, name = key.split(".")
    if section not in SCHEMA:
        raise ConfigError(source, key, f"unknown section (known: {', '.join(SECTIONS)})")
    if name not in SCHEMA[section]:
        raise ConfigError(source, key, _unknown_key_text(section, name))
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str, overrides: Optional[List[str]] = None) -> Config:
    """Read ``path`` (following ``base:``), apply ``overrides`` and validate."""
    overrides = list(overrides or [])
    flat, sources = _load_chain(path, CLI_SOURCE, ())
    cli = f"{path} ({CLI_SOURCE})"
    for text in overrides:
        key, value = parse_override(text, cli)
        flat[key] = value
        sources[key] = cli
    values: Dict[str, Section] = {}
    for section, specs in SCHEMA.items():
        sec = Section()
        for key, spec in specs.items():
            dotted = f"{section}.{key}"
            if dotted in flat:
                sec[key] = _coerce(flat[dotted], spec, sources[dotted], dotted)
            else:
                sec[key] = copy.deepcopy(spec.default)
        values[section] = sec
    cfg = Config(path=path, values=values, sources=sources, overrides=overrides)
    check_consistency(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _type_name(spec: Spec) -> str:
    names = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
             "list_int": "a list of integers", "list_float": "a list of numbers",
             "list_str": "a list of strings"}
    text = names[spec.kind]
    return text + " or null" if spec.nullable else text


def _coerce(value: Any, spec: Spec, source: str, key: str) -> Any:
    def bad(msg=None):
        return ConfigError(source, key, msg or f"must be {_type_name(spec)}, got {value!r}")

    if value is None:
        if spec.nullable:
            return None
        raise bad()
    kind = spec.kind
    if kind == "bool":
        if not isinstance(value, bool):
            raise bad()
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise bad()
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            # YAML 1.1 reads "1e-3" (no dot) as a string; accept it as a number.
            if isinstance(value, str):
                try:
                    value = float(value)
                except ValueError:
                    raise bad() from None
            else:
                raise bad()
        value = float(value)
        if not math.isfinite(value):
            raise bad(f"must be a finite number, got {value!r}")
    elif kind == "str":
        if not isinstance(value, str):
            raise bad()
    elif kind.startswith("list_"):
        item = kind[5:]
        if isinstance(value, (int, float, str)) and not isinstance(value, bool):
            value = [value]   # a single value stands for a one-element list
        if not isinstance(value, list):
            raise bad()
        out = []
        for v in value:
            if item == "int" and (isinstance(v, bool) or not isinstance(v, int)):
                raise bad()
            if item == "float":
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise bad()
                v = float(v)
            if item == "str" and not isinstance(v, str):
                raise bad()
            out.append(v)
        value = out
    if spec.choices is not None and value not in spec.choices:
        raise bad(f"must be one of {', '.join(spec.choices)}; got {value!r}")
    if spec.check is not None:
        err = spec.check(value)
        if err:
            raise bad(err)
    return value


def check_consistency(cfg: Config) -> None:
    """Checks spanning several keys (each error still names one key)."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    if o.schedule == "poly" and o.poly_end_epoch <= o.poly_start_epoch:
        raise cfg.error("optim.poly_end_epoch",
                        f"must be > optim.poly_start_epoch ({o.poly_start_epoch}), got {o.poly_end_epoch}")
    if o.schedule == "step" and list(o.milestones) != sorted(o.milestones):
        raise cfg.error("optim.milestones", f"must be increasing, got {o.milestones}")
    if o.nesterov and o.momentum == 0:
        raise cfg.error("optim.nesterov", "needs optim.momentum > 0")
    if o.weight_rescaling and o.weight_decay > 0:
        raise cfg.error("optim.weight_rescaling",
                        "choose weight decay or weight rescaling, not both (set optim.weight_decay=0)")
    if d.dataset == "fashion_mnist":
        if m.name == "resnet50":
            raise cfg.error("model.name", "resnet50 expects 3x224x224 images; use small_resnet "
                                          "for fashion_mnist (1x28x28)")
        if m.num_classes != 10:
            raise cfg.error("model.num_classes", f"fashion_mnist has 10 classes, got {m.num_classes}")
    if d.dataset == "imagenet":
        for key in ("train_dir", "val_dir"):
            if not d[key]:
                raise cfg.error(f"data.{key}", "required for dataset imagenet (an ImageFolder root)")
    for pattern in cfg.kfac.skip_layers:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise cfg.error("kfac.skip_layers", f"not a regular expression: {pattern!r} ({exc})") from None
    if d.val_resize < d.image_size:
        raise cfg.error("data.val_resize", f"must be >= data.image_size ({d.image_size})")


def data_problems(cfg: Config) -> List[ConfigError]:
    """Missing / empty data directories (a warning in a dry run, an error in a real run)."""
    d = cfg.data
    problems = []
    if d.dataset == "imagenet":
        for key in ("train_dir", "val_dir"):
            err = _imagefolder_problem(d[key])
            if err:
                problems.append(cfg.error(f"data.{key}", err))
    elif d.dataset == "fashion_mnist":
        root = d.fashion_mnist_dir
        if not os.path.isdir(root):
            problems.append(cfg.error("data.fashion_mnist_dir", f"directory not found: {root}"))
        else:
            missing = [f for f in FASHION_FILES if not os.path.isfile(os.path.join(root, f))]
            if missing:
                problems.append(cfg.error("data.fashion_mnist_dir",
                                          f"{root} lacks {', '.join(missing)}"))
    return problems


def _imagefolder_problem(root: str) -> Optional[str]:
    if not os.path.isdir(root):
        return f"directory not found: {root}"
    try:
        classes = [e for e in os.scandir(root) if e.is_dir()]
    except OSError as exc:
        return f"cannot read {root}: {exc.strerror}"
    if not classes:
        return f"{root} is empty (expected one sub-folder per class)"
    for entry in classes:
        with os.scandir(entry.path) as it:
            if any(f.is_file() for f in it):
                return None
    return f"{root} has class folders but no image files"


def resolve_paths(cfg: Config) -> None:
    """Fill in derived defaults: log.dir, checkpoint.dir, val_batch_size."""
    if not cfg.log.dir:
        cfg.log["dir"] = os.path.join("runs", cfg.name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint["dir"] = os.path.join(cfg.log.dir, "checkpoints")
    if cfg.data.val_batch_size is None:
        cfg.data["val_batch_size"] = cfg.data.batch_size


def kfac_kwargs(cfg: Config) -> Dict[str, Any]:
    """Keyword arguments for ``kfac_hvd.KFAC`` from the ``kfac`` section."""
    k = cfg.kfac
    return {
        "damping": k.damping,
        "update_threshold": k.update_threshold,
        "update_interval": k.update_interval,
        "interval_policy": k.interval_policy,
        "max_interval": k.max_interval,
        "shrink_multiple": k.shrink_multiple,
        "separate_intervals": k.separate_intervals,
        "factor_decay": k.factor_decay,
        "kl_clip": k.kl_clip,
        "pi_damping": k.pi_damping,
        "inverse_method": k.inverse_method,
        "symmetric_comm": k.symmetric_comm,
        "skip_layers": tuple(k.skip_layers),
        "include_batchnorm": k.include_batchnorm,
    }


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
            default = "null" if spec.default is None else yaml.safe_dump(spec.default,
                                                                        default_flow_style=True).strip()
            default = default.replace("\n...", "")
            lines.append(f"| `{section}.{key}` | {kind} | `{default}` | {spec.doc} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    print(keys_markdown())
