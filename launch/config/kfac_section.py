"""The config's ``kfac`` section, generated from :class:`kfac_hvd.KFACOptions`.

Every option of the library is a key with the library's type, default, range, choices and doc; a
launcher-only spelling is declared once here, by the kind of option it applies to (sizes in bytes are
given in MiB, counts of steps in epochs, dtypes by name). :meth:`KfacSection.options` is the way back
to the library.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import Field, create_model
from pydantic.fields import FieldInfo

from kfac_hvd import KFACOptions, option_fields
from kfac_hvd.options import OptionField
from launch.config.section import Number, Section, TextList

MIB = 2**20

# Options the launcher does not offer: its training step is one forward/backward pass.
NOT_OFFERED = ("accumulation_steps",)  # set by train.accumulation_steps


@dataclass(frozen=True)
class Key:
    """One config key standing for one library option, and how its value becomes the option's."""

    option: str
    to_option: Callable[[Any], Any]
    in_epochs: bool = False  # the option counts steps: to_option's value is multiplied by the steps per epoch


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _yaml_words(doc: str) -> str:
    """The library's docs speak Python (None, True); a config speaks YAML (null, true)."""
    return re.sub(r"\b(None|True|False)\b", lambda m: {"None": "null"}.get(m[1], m[1].lower()), doc)


def _key_of(option: OptionField) -> tuple[str, Any, FieldInfo, Key]:
    """(config key, annotation, pydantic field, Key) for one option, in the launcher's spelling."""
    doc, default = _yaml_words(option.doc), option.default
    bounds: dict[str, Any] = {}
    if option.unit == "bytes":  # the MiB spelling: any positive size is at least one byte
        name = option.name.removesuffix("_bytes") + "_mb"
        annotation: Any = Number
        default, bounds, doc = default / MIB, {"gt": 0}, f"{doc} (MiB)"
        key = Key(option.name, lambda mib: max(1, int(mib * MIB)))
    elif option.unit == "steps":  # the epochs spelling: a positive fraction of an epoch is at least one step
        name = option.name.removesuffix("_steps") + "_epochs"
        annotation, default = Number, float(default)
        bounds, doc = {"ge": 0}, doc.replace("this many steps", "this many epochs")
        key = Key(option.name, float, in_epochs=True)
    elif option.annotation is torch.dtype:  # a dtype by its name
        name, names = option.name, tuple(_dtype_name(d) for d in option.choices or ())
        annotation = Literal[names]  # built from the library's choices
        default = None if default is None else _dtype_name(default)
        key = Key(option.name, lambda text: None if text is None else getattr(torch, text))
    else:
        name, key = option.name, Key(option.name, lambda value: value)
        bounds = {b: getattr(option, b) for b in ("ge", "gt", "le", "lt") if getattr(option, b) is not None}
        if option.choices is not None:
            annotation = Literal[option.choices]
        elif option.annotation == tuple[str, ...]:
            annotation, default = TextList, list(default)
            key = Key(option.name, tuple)
        else:
            annotation = Number if option.annotation is float else option.annotation
    if option.nullable:
        annotation = annotation | None
    return name, annotation, Field(default=default, description=doc, **bounds), key


class KfacSectionBase(Section):
    """What the generated section adds to the library's options: the way back to them."""

    if TYPE_CHECKING:  # the generated keys; their types are KFACOptions' (see options())

        def __getattr__(self, name: str) -> Any: ...

    def options(self, steps_per_epoch: int = 1, accumulation_steps: int = 1) -> KFACOptions:
        """The library's options for this section (checked by the library once more), the keys in
        epochs counted in steps of ``steps_per_epoch`` (left at 1 to check a config before its data is
        read); ``accumulation_steps`` is the launcher's train.accumulation_steps (micro-batches a step)."""
        values = {key.option: key.to_option(getattr(self, name)) for name, key in KEYS.items()}
        values["accumulation_steps"] = accumulation_steps
        for key in KEYS.values():
            if key.in_epochs:
                epochs = values[key.option]
                values[key.option] = max(1, round(epochs * steps_per_epoch)) if epochs > 0 else 0
        return KFACOptions(**values)


def _generate() -> tuple[type[KfacSectionBase], dict[str, Key]]:
    fields: dict[str, Any] = {}
    keys: dict[str, Key] = {}
    for option in option_fields():
        if option.name in NOT_OFFERED:
            continue
        name, annotation, field, key = _key_of(option)
        fields[name], keys[name] = (annotation, field), key
    return create_model("KfacSection", __base__=KfacSectionBase, **fields), keys


if TYPE_CHECKING:
    KfacSection = KfacSectionBase
    KEYS: dict[str, Key]
else:
    KfacSection, KEYS = _generate()


def config_key(option: str) -> str:
    """The ``kfac.`` key that sets a library option."""
    return "kfac." + next((name for name, key in KEYS.items() if key.option == option), option)
