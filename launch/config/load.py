"""Experiment configuration: YAML files with ``base:`` inheritance, dotted overrides, validation.

A config is a YAML mapping of sections (``model``, ``data``, ``optim``, ``kfac``, ``train``,
``checkpoint``, ``log``, ``horovod``).  A file may say ``base: other.yaml`` (relative to the file) and
then only lists what it changes.  ``key=value`` overrides from the command line are applied last; the
value is parsed as YAML (``null``, ``0.25``, ``[30, 60]``, ``true``); a key given twice there is an
error. Files and overrides are read with the YAML 1.2 core schema (:mod:`launch.config.yaml12`: ``010`` is 10,
``1:30`` and ``yes`` are strings).

Every key is a field of one section's pydantic model in :mod:`launch.config.schema`, with its type, default and
allowed range. Any problem (unknown key, wrong type, value out of range, inconsistent combination)
raises :class:`ConfigError`, whose message is one line naming the file (or ``command line``) that set
the offending key and what the key accepts.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Mapping
from typing import Any

import yaml
from pydantic import Field, ValidationError

from kfac_hvd import KFACOptions
from launch.config.kfac_section import config_key
from launch.config.schema import (
    FASHION_FILES,
    SCHEMA,
    SECTIONS,
    Sections,
    accepts,
    keys_markdown,
)
from launch.config.yaml12 import UniqueKeyLoader, load_scalar_or_flow
from launch.errors import ConfigError

CLI_SOURCE = "command line"


class Config(Sections):
    """A resolved config: the typed sections (``cfg.optim.lr``) and where each value came from."""

    path: str = Field(exclude=True)
    sources: dict[str, str] = Field(default_factory=dict, exclude=True)  # dotted key -> file / command line
    overrides: list[str] = Field(default_factory=list, exclude=True)

    def source(self, key: str) -> str:
        return self.sources.get(key, self.path)

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source(key), key, message)

    def kfac_options(self, steps_per_epoch: int = 1) -> KFACOptions:
        """The library's options: the kfac section, with the launcher's micro-batches per step."""
        return self.kfac.options(steps_per_epoch, self.train.accumulation_steps)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        return self.model_dump()

    def dump(self) -> str:
        header = f"# resolved from {self.path}"
        if self.overrides:
            header += " with " + " ".join(self.overrides)
        return header + "\n" + yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def name(self) -> str:
        return os.path.splitext(os.path.basename(self.path))[0]

    @property
    def run_dir(self) -> str:
        """``log.dir`` once :func:`resolve_paths` has filled it in (the run folder)."""
        if self.log.dir is None:
            raise RuntimeError("log.dir is read before resolve_paths filled it in")
        return self.log.dir

    @property
    def checkpoint_dir(self) -> str:
        """``checkpoint.dir`` once :func:`resolve_paths` has filled it in."""
        if self.checkpoint.dir is None:
            raise RuntimeError("checkpoint.dir is read before resolve_paths filled it in")
        return self.checkpoint.dir


# --------------------------------------------------------------------------------------------------
# Loading
# --------------------------------------------------------------------------------------------------
def _read_yaml(path: str, origin: str, key: str | None = None) -> dict[str, Any]:
    if os.path.isdir(path):
        raise ConfigError(origin, key, f"config file is a directory: {path}")
    if not os.path.isfile(path):
        raise ConfigError(origin, key, f"config file not found: {path}")
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.load(fh, Loader=UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(path, None, f"cannot read the file ({exc.strerror or exc})") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            path, None, f"not a text (UTF-8) file: byte {exc.start} cannot be decoded"
        ) from None
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


def _flatten(path: str, data: dict[str, Any]) -> dict[str, Any]:
    """Section mapping -> {"section.key": value}; rejects unknown sections and keys."""
    flat = {}
    for section, body in data.items():
        if section == "base":
            continue
        if section not in SCHEMA:
            raise ConfigError(path, str(section), f"unknown section (known: base, {', '.join(SECTIONS)})")
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
    close = difflib.get_close_matches(key, list(SCHEMA[section]), n=1)
    hint = f"; did you mean '{section}.{close[0]}'?" if close else ""
    return f"unknown key{hint}"


def _load_chain(
    path: str, origin: str, seen: tuple[str, ...], key: str | None = None
) -> tuple[dict[str, Any], dict[str, str]]:
    real = os.path.realpath(path)
    if real in seen:
        raise ConfigError(origin, "base", f"circular 'base:' chain ({path} is already in the chain)")
    data = _read_yaml(path, origin, key)
    flat: dict[str, Any] = {}
    sources: dict[str, str] = {}
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


def parse_override(text: str, source: str = CLI_SOURCE) -> tuple[str, Any]:
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
        value = load_scalar_or_flow(raw) if raw.strip() != "" else None
    except yaml.YAMLError:
        value = raw
    return key, value


def load_config(path: str, overrides: list[str] | None = None) -> Config:
    """Read ``path`` (following ``base:``), apply ``overrides`` and validate."""
    overrides = list(overrides or [])
    flat, sources = _load_chain(path, CLI_SOURCE, ())
    cli = f"{path} ({CLI_SOURCE})"
    given: dict[str, str] = {}
    for text in overrides:
        key, value = parse_override(text, cli)
        if key in given:
            raise ConfigError(cli, key, f"given twice ({given[key]} and {text}); give it once")
        given[key] = text
        flat[key] = value
        sources[key] = cli
    sections: dict[str, dict[str, Any]] = {name: {} for name in SECTIONS}
    for dotted, value in flat.items():
        section, key = dotted.split(".")
        sections[section][key] = value
    try:
        cfg = Config.model_validate({"path": path, "sources": sources, "overrides": overrides, **sections})
    except ValidationError as exc:
        first = exc.errors()[0]
        dotted = ".".join(str(part) for part in first["loc"][:2])
        raise ConfigError(sources[dotted], dotted, _problem(dotted, first, flat[dotted])) from None
    check_consistency(cfg)
    return cfg


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------
def _problem(dotted: str, error: Mapping[str, Any], given: Any) -> str:
    """pydantic's verdict on one value, in the words of this launcher: what the key accepts."""
    section, key = dotted.split(".")
    allowed = accepts(SCHEMA[section][key])
    kind, value = error["type"], error["input"]
    if kind == "literal_error":
        return f"must be one of {', '.join(str(c) for c in allowed.choices or ())}; got {value!r}"
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        return f"must be {allowed.bounds}, got {value!r}"
    if kind == "finite_number":
        return f"must be a finite number, got {value!r}"
    if kind == "value_error":
        return str(error.get("ctx", {}).get("error", error["msg"]))
    return f"must be {allowed.type_text()}, got {given!r}"


def check_consistency(cfg: Config) -> None:
    """Checks spanning several keys (each error still names one key)."""
    m, d, o = cfg.model, cfg.data, cfg.optim
    # Before the library's check of the same combination: the launcher's words for it.
    if cfg.kfac.interval_warmup_epochs > 0 and cfg.kfac.update_threshold is not None:
        raise cfg.error(
            "kfac.interval_warmup_epochs",
            "applies to a fixed interval only (kfac.update_threshold: "
            "null); the adaptive interval starts at 1 by itself",
        )
    low, high = (d.random_erasing_area + [0.0, 0.0])[:2]
    if len(d.random_erasing_area) != 2 or low > high:
        raise cfg.error(
            "data.random_erasing_area",
            f"must be [lowest, highest] with lowest <= highest, got {d.random_erasing_area}",
        )
    if d.batch_size % cfg.train.accumulation_steps:
        raise cfg.error(
            "train.accumulation_steps",
            f"must divide data.batch_size ({d.batch_size} images per rank and step), "
            f"got {cfg.train.accumulation_steps}",
        )
    try:
        cfg.kfac_options()  # the library judges its options once more (combinations included)
    except (TypeError, ValueError) as exc:
        option, _, problem = str(exc).partition(" ")
        raise cfg.error(config_key(option.rstrip(":")), problem) from None
    if o.schedule == "poly" and o.poly_end_epoch <= o.poly_start_epoch:
        raise cfg.error(
            "optim.poly_end_epoch",
            f"must be > optim.poly_start_epoch ({o.poly_start_epoch}), got {o.poly_end_epoch}",
        )
    if o.schedule == "step" and list(o.milestones) != sorted(o.milestones):
        raise cfg.error("optim.milestones", f"must be increasing, got {o.milestones}")
    if o.nesterov and o.momentum == 0:
        raise cfg.error("optim.nesterov", "needs optim.momentum > 0")
    if o.weight_rescaling and o.weight_decay > 0:
        raise cfg.error(
            "optim.weight_rescaling",
            "choose weight decay or weight rescaling, not both (set optim.weight_decay=0)",
        )
    if d.dataset == "fashion_mnist":
        if m.name == "resnet50":
            raise cfg.error(
                "model.name",
                "resnet50 expects 3x224x224 images; use small_resnet for fashion_mnist (1x28x28)",
            )
        if m.num_classes != 10:
            raise cfg.error("model.num_classes", f"fashion_mnist has 10 classes, got {m.num_classes}")
    if d.dataset == "imagenet":
        for key in ("train_dir", "val_dir"):
            if not getattr(d, key):
                raise cfg.error(f"data.{key}", "required for dataset imagenet (an ImageFolder root)")
    if cfg.log.overwrite and cfg.checkpoint.resume:
        raise cfg.error(
            "log.overwrite",
            f"starts the run anew, so it cannot go with checkpoint.resume="
            f"{cfg.checkpoint.resume}; set checkpoint.resume=null",
        )
    if d.val_resize < d.image_size:
        raise cfg.error("data.val_resize", f"must be >= data.image_size ({d.image_size})")


def data_problems(cfg: Config) -> list[ConfigError]:
    """Missing / empty data directories (a warning in a dry run, an error in a real run)."""
    d = cfg.data
    problems = []
    if d.dataset == "imagenet":
        for key in ("train_dir", "val_dir"):
            err = _imagefolder_problem(getattr(d, key))
            if err:
                problems.append(cfg.error(f"data.{key}", err))
    elif d.dataset == "fashion_mnist":
        root = d.fashion_mnist_dir
        if not os.path.isdir(root):
            problems.append(cfg.error("data.fashion_mnist_dir", f"directory not found: {root}"))
        else:
            missing = [f for f in FASHION_FILES if not os.path.isfile(os.path.join(root, f))]
            if missing:
                problems.append(cfg.error("data.fashion_mnist_dir", f"{root} lacks {', '.join(missing)}"))
    return problems


def _imagefolder_problem(root: str) -> str | None:
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
        cfg.log.dir = os.path.join("runs", cfg.name)
    if not cfg.checkpoint.dir:
        cfg.checkpoint.dir = os.path.join(cfg.log.dir, "checkpoints")
    if cfg.data.val_batch_size is None:
        cfg.data.val_batch_size = cfg.data.batch_size


KEY_REFERENCE_START = "<!-- key reference: generated by python -m launch.config --update docs/LAUNCHER.md -->"
KEY_REFERENCE_END = "<!-- end of the generated key reference -->"


def update_key_reference(path: str) -> None:
    """Rewrite the generated part of ``path`` (between the two markers) from the schema."""
    with open(path, encoding="utf-8") as fh:
        text = fh.read()
    head, start, rest = text.partition(KEY_REFERENCE_START)
    _, end, tail = rest.partition(KEY_REFERENCE_END)
    if not (start and end):
        raise SystemExit(f"{path}: the key reference's markers are missing")
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(f"{head}{start}\n\n{keys_markdown()}\n{end}{tail}")
