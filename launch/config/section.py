"""What one config key accepts: the base of every section model, the launcher's spellings of numbers
and lists, and the words (errors, the key reference) for a field's type and range."""

from __future__ import annotations

import types
import typing
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, BeforeValidator, ConfigDict
from pydantic.fields import FieldInfo


def _number_from_text(value: Any) -> Any:
    """A number written as a quoted string ("1e-3") is still a number."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def one_or_many(value: Any) -> Any:
    """A single value stands for a one-element list."""
    return [value] if isinstance(value, (int, float, str)) and not isinstance(value, bool) else value


# Field types: every section is strict (no "3" for an int, no 1 for a bool) but for these spellings.
Number = Annotated[float, BeforeValidator(_number_from_text), AllowInfNan(False)]
TextList = Annotated[list[str], BeforeValidator(one_or_many)]


class Section(BaseModel):
    """One section of a config: unknown keys refused, types strict, every assignment validated."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_assignment=True)

    def __getitem__(self, key: str) -> Any:  # ``section["key"]`` reads as ``section.key``
        return getattr(self, key)


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
    """The range that pydantic's constraints (``Gt(gt=0)``, ``Ge(ge=1)``, ...) in ``metadata`` allow."""
    found = {
        sign: getattr(item, sign)
        for item in metadata
        for sign in _SIGNS
        if getattr(item, sign, None) is not None
    }
    lower = next(((sign, found[sign]) for sign in ("gt", "ge") if sign in found), None)
    upper = next(((sign, found[sign]) for sign in ("lt", "le") if sign in found), None)
    if lower and upper:
        opening, closing = "(" if lower[0] == "gt" else "[", ")" if upper[0] == "lt" else "]"
        return f"in {opening}{lower[1]:g}, {upper[1]:g}{closing}"
    bound = lower or upper
    return f"{_SIGNS[bound[0]]} {bound[1]:g}" if bound else ""


_SIGNS = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
