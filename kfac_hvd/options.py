"""Every K-FAC option in one place: its type, default, bounds, allowed values and one-line doc.

``KFACOptions`` is validated once, on construction; ``KFAC(model, **values)`` builds one. A launcher
generates its typed, documented, range-checked configuration from :func:`option_fields` instead of
repeating the options.
"""

from __future__ import annotations

import functools
import operator
import re
import types
import typing
from dataclasses import dataclass, field, fields
from typing import Any

import torch

from .assignment import DEFAULT_LOCAL_INVERSE_MAX_DIM
from .factors import INVERSE_METHODS
from .layers import BATCHNORM_FISHERS, DEFAULT_UNFOLD_CHUNK_BYTES
from .precision import FACTOR_MATMUL_PRECISIONS
from .scheduler import POLICIES, ScheduleOptions

FACTOR_DTYPES = (torch.float32, torch.float64)
# The bounds an option's metadata may give: key, test, and how an error message writes it
BOUNDS = (
    ("ge", operator.ge, ">="),
    ("gt", operator.gt, ">"),
    ("le", operator.le, "<="),
    ("lt", operator.lt, "<"),
)


def _option(default: Any, doc: str, **bounds: Any) -> Any:
    """A field with its one-line doc and, where they apply, "ge", "gt", "le", "lt", "choices", "unit"."""
    return field(default=default, metadata={"doc": doc, **bounds})


@dataclass(frozen=True, kw_only=True)
class KFACOptions:
    """The options of :class:`kfac_hvd.KFAC` (all but the model and the communicator)."""

    damping: float = _option(1e-3, "Tikhonov damping gamma", gt=0)
    pi_damping: bool = _option(True, "split the damping over A and G with pi; False: pi = 1")
    inverse_method: str = _option("cholesky", "how the damped factors are inverted", choices=INVERSE_METHODS)
    batched_inversion: bool = _option(True, "one batched inversion per factor size; False: one per factor")
    update_threshold: float | None = _option(None, "lambda of the adaptive interval; None: every step", gt=0)
    update_interval: int = _option(
        1, "without lambda: a fixed interval k (every k-th step); with lambda: the starting interval", ge=1
    )
    interval_warmup_steps: int = _option(
        0,
        "without lambda: every factor on every step for this many steps, then every update_interval-th",
        ge=0,
        unit="steps",
    )
    interval_policy: str = _option(
        "modulo", "due when t % interval == 0 (the paper) or t - t_last >= interval", choices=POLICIES
    )
    max_interval: int | None = _option(None, "cap on any interval", ge=1)
    shrink_multiple: float | None = _option(
        None, "a diff >= m*lambda halves the interval (not in the paper)", gt=1
    )
    separate_intervals: bool = _option(False, "A and G keep their own intervals")
    noise_aware_diff: bool = _option(
        False, "subtract the factors' estimated sampling noise from Diff (docs/NOISE.md; not in the paper)"
    )
    factor_decay: float | None = _option(
        None, "running average of the factors; None: fresh factors", ge=0, lt=1
    )
    kl_clip: float | None = _option(
        None, "scale the update so that lr^2 * sum(g.Fg) <= kl_clip; needs step(lr=...)", gt=0
    )
    symmetric_comm: bool = _option(True, "factors and inverses travel as upper triangles")
    local_inverse_max_dim: int = _option(
        DEFAULT_LOCAL_INVERSE_MAX_DIM,
        "layers with factors at most this wide, and every unit-wise BatchNorm, are inverted on every rank",
        ge=0,
    )
    accumulation_steps: int = _option(1, "forward/backward passes per optimiser step", ge=1)
    unfold_chunk_bytes: int = _option(
        DEFAULT_UNFOLD_CHUNK_BYTES, "cap on the temporaries of one factor contribution", ge=1, unit="bytes"
    )
    narrow_factor_products: bool = _option(
        True, "on CUDA, bf16/fp16 inputs enter the factor products as they are (fp32 accumulation)"
    )
    factor_matmul_precision: str = _option(
        "highest",
        "fp32 factor products on CUDA: IEEE fp32 ('highest') or TF32 ('high')",
        choices=tuple(FACTOR_MATMUL_PRECISIONS),
    )
    skip_layers: tuple[str, ...] = _option(
        (), "regular expressions on module names; matching layers stay on the plain optimiser"
    )
    include_batchnorm: bool = _option(True, "False leaves every BatchNorm2d on the plain optimiser")
    batchnorm_fisher: str = _option(
        "unit_wise",
        "BatchNorm's Fisher: a 2x2 block per channel, or one 2Cx2C block over (gamma, beta) (the paper's code)",
        choices=BATCHNORM_FISHERS,
    )
    factor_dtype: torch.dtype | None = _option(
        None, "the factors' dtype; None: fp32, or fp64 for a fp64 model", choices=FACTOR_DTYPES
    )

    def __post_init__(self) -> None:
        if isinstance(self.skip_layers, str):
            object.__setattr__(self, "skip_layers", (self.skip_layers,))
        elif isinstance(self.skip_layers, (list, tuple)):
            object.__setattr__(self, "skip_layers", tuple(self.skip_layers))
        for option in option_fields():
            _check(option, getattr(self, option.name))
        if self.interval_warmup_steps and self.update_threshold is not None:
            raise ValueError(
                "interval_warmup_steps applies to a fixed interval only (update_threshold None); "
                "the adaptive interval starts at 1 by itself"
            )

    @property
    def schedule(self) -> ScheduleOptions:
        """Algorithm 1's part of the options, for :class:`kfac_hvd.scheduler.IntervalScheduler`."""
        return ScheduleOptions(
            update_threshold=self.update_threshold,
            interval_policy=self.interval_policy,
            max_interval=self.max_interval,
            shrink_multiple=self.shrink_multiple,
            initial_interval=self.update_interval,
            warmup_steps=self.interval_warmup_steps,
        )


@dataclass(frozen=True)
class OptionField:
    """What a launcher needs to declare one option: ``annotation`` is the type without ``None``."""

    name: str
    annotation: Any
    default: Any
    doc: str
    nullable: bool
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None
    choices: tuple[Any, ...] | None = None
    unit: str | None = None


@functools.cache
def option_fields() -> tuple[OptionField, ...]:
    """Every option of :class:`KFACOptions`, in declaration order."""
    hints = typing.get_type_hints(KFACOptions)
    result = []
    for spec in fields(KFACOptions):
        members = typing.get_args(hints[spec.name]) if _is_union(hints[spec.name]) else ()
        nullable = type(None) in members
        others = [member for member in members if member is not type(None)]
        annotation = others[0] if nullable and len(others) == 1 else hints[spec.name]
        meta = dict(spec.metadata)
        result.append(
            OptionField(
                name=spec.name, annotation=annotation, default=spec.default, nullable=nullable, **meta
            )
        )
    return tuple(result)


def _is_union(annotation: Any) -> bool:
    return typing.get_origin(annotation) in (typing.Union, types.UnionType)


def _check(option: OptionField, value: Any) -> None:
    """ValueError naming the option when ``value`` is not of its type, in its bounds or choices."""
    if value is None and option.nullable:
        return
    or_none = " or None" if option.nullable else ""
    if option.choices is not None:
        if value not in option.choices:
            raise ValueError(f"{option.name} must be one of {option.choices}{or_none}, got {value!r}")
        return
    kind = option.annotation
    if kind is bool:
        if not isinstance(value, bool):
            raise ValueError(f"{option.name} must be True or False{or_none}, got {value!r}")
        return
    if kind == tuple[str, ...]:
        if not (isinstance(value, tuple) and all(isinstance(item, str) for item in value)):
            raise ValueError(f"{option.name} must be a sequence of regular expressions, got {value!r}")
        for pattern in value:
            try:
                re.compile(pattern)
            except re.error as err:
                raise ValueError(f"{option.name}: {pattern!r} is not a regular expression ({err})") from None
        return
    numeric = (int,) if kind is int else (int, float)
    limits = [(holds, getattr(option, key)) for key, holds, _ in BOUNDS if getattr(option, key) is not None]
    within = isinstance(value, numeric) and not isinstance(value, bool)
    if not (within and all(holds(value, bound) for holds, bound in limits)):  # NaN fails every bound
        what = "an int " if kind is int else ""
        raise ValueError(f"{option.name} must be {what}{_bounds_text(option)}{or_none}, got {value!r}")


def _bounds_text(option: OptionField) -> str:
    if option.ge is not None and option.lt is not None:
        return f"in [{option.ge:g}, {option.lt:g})"
    bounds = [(sign, getattr(option, key)) for key, _, sign in BOUNDS]
    return " and ".join(f"{sign} {bound:g}" for sign, bound in bounds if bound is not None)
