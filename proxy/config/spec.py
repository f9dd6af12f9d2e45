"""The vocabulary the rules model is declared in: one ``Spec`` per scalar key.

``proxy.config.model`` annotates every numeric field of the rules dataclasses
with its ``Spec`` (``Annotated[float, Num(gt=0, ...)]``); the field's name is
the YAML key and its default is the default. From that one declaration:

- ``proxy.config.check`` builds its tables (allowed keys, ranges, cross-field
  rules) and checks a file;
- ``proxy.core.breaker.CircuitBreakerConfig`` takes its defaults and its
  per-field ranges for the breaker keys, so what ``cb-proxy check`` accepts is
  exactly what the runtime accepts;
- ``docs/rules.md``'s key tables are compared with ``reference_rows`` by a test.

This module imports nothing else of the package (model and check both import
it; neither imports the other's internals in a circle).
"""

from __future__ import annotations

import dataclasses
import math
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Literal

Kind = Literal["integer", "number"]


@dataclass(frozen=True, slots=True)
class Spec:
    """Type, range, built-in default and meaning of one scalar key.

    ``default`` is only given where the dataclass field's own default is None
    meaning "not set here" (the breaker overrides): it is then the built-in
    value used when neither the rules nor the environment set one.
    ``at_least`` / ``at_most`` name another key of the same section this one
    must not be below / above (see ``proxy.config.check`` for when each is
    checked).
    """

    kind: Kind
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    default: float | None = None
    doc: str = ""
    at_least: str | None = None
    at_most: str | None = None

    @property
    def lo(self) -> float | None:
        return self.gt if self.gt is not None else self.ge

    @property
    def lo_open(self) -> bool:
        return self.gt is not None

    def range_text(self) -> str:
        parts = []
        if self.lo is not None:
            parts.append(f"{'>' if self.lo_open else '>='} {number_text(self.lo)}")
        if self.le is not None:
            parts.append(f"<= {number_text(self.le)}")
        return " and ".join(parts)

    def type_text(self) -> str:
        return "an integer" if self.kind == "integer" else "a number"

    def problem(self, value: object) -> str | None:
        """None when ``value`` is a valid value of this key, else what is wrong with it."""
        if isinstance(value, bool) or not isinstance(value, int | float):
            return f"expected {self.type_text()}, got {kind_of(value)}"
        if self.kind == "integer" and not isinstance(value, int):
            return f"expected an integer, got {kind_of(value)}"
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf if value > 0 else -math.inf
        if self.kind == "number" and not math.isfinite(number):
            return "must be a finite number"
        lo = self.lo
        below = lo is not None and (number <= lo if self.lo_open else number < lo)
        if below or (self.le is not None and number > self.le):
            return f"must be {self.range_text()}, got {value!r}"
        return None


def Num(  # a capitalised name: reads as a type in annotations
    *,
    ge: float | None = None,
    gt: float | None = None,
    le: float | None = None,
    default: float | None = None,
    doc: str = "",
    at_least: str | None = None,
    at_most: str | None = None,
) -> Spec:
    """A number (YAML integer or float, finite; booleans are not numbers)."""
    return Spec("number", ge, gt, le, default, doc, at_least, at_most)


def Int(  # a capitalised name: reads as a type in annotations
    *,
    ge: float | None = None,
    le: float | None = None,
    default: float | None = None,
    doc: str = "",
) -> Spec:
    """An integer (YAML integer; booleans and floats are not)."""
    return Spec("integer", ge=ge, le=le, default=default, doc=doc)


@dataclass(frozen=True, slots=True)
class Declared:
    """One declared scalar key of a section: its name, spec and effective default."""

    name: str
    spec: Spec
    default: float | None  # the dataclass default, or the spec's built-in default
    required: bool = False  # the key has no default: a section that is given must set it

    def as_int(self) -> int:
        value = self.default
        if not isinstance(value, int) or isinstance(value, bool):
            raise TypeError(f"{self.name}: the declared default is not an integer")
        return value

    def as_float(self) -> float:
        if self.default is None:
            raise TypeError(f"{self.name}: no declared default")
        return float(self.default)


_DECLARED: dict[type, Mapping[str, Declared]] = {}


def declared(cls: type) -> Mapping[str, Declared]:
    """The ``Spec``-annotated fields of a rules dataclass, in declaration order (cached)."""
    cached = _DECLARED.get(cls)
    if cached is None:
        cached = _DECLARED[cls] = MappingProxyType(_declare(cls))
    return cached


def _declare(cls: type) -> dict[str, Declared]:
    hints = typing.get_type_hints(cls, include_extras=True)
    result: dict[str, Declared] = {}
    for f in dataclasses.fields(cls):
        specs = [m for m in getattr(hints[f.name], "__metadata__", ()) if isinstance(m, Spec)]
        if not specs:
            continue
        spec = specs[0]
        own = f.default if f.default is not dataclasses.MISSING else None
        if own is not None and not isinstance(own, int | float):
            raise TypeError(f"{cls.__name__}.{f.name}: a Spec field needs a numeric default")
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        result[f.name] = Declared(f.name, spec, spec.default if own is None else own, required)
    return result


def keys_of(cls: type, *, exclude: tuple[str, ...] = ()) -> tuple[str, ...]:
    """The YAML keys of a section whose keys are its dataclass fields."""
    return tuple(f.name for f in dataclasses.fields(cls) if f.name not in exclude)


def number_text(value: float) -> str:
    """A bound as a reader writes it: ``3600000``, not ``3.6e+06``; ``0.5`` stays ``0.5``."""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return f"{value:g}"


def kind_of(value: object) -> str:
    """How a YAML value is named in messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


__all__ = [
    "Declared",
    "Int",
    "Kind",
    "Num",
    "Spec",
    "declared",
    "keys_of",
    "kind_of",
    "number_text",
]
