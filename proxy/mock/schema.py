"""A minimal instance of a JSON Schema, for the mock's structured output and tool arguments.

``instance_of(schema)`` returns a value that validates against ``schema`` (JSON Schema
2020-12 as OpenAI's ``response_format`` and tool ``parameters`` use it, and Gemini's
upper-case OpenAPI subset), or raises ``UnsupportedSchema`` saying which keyword at which
path it cannot satisfy. It never guesses: a keyword it does not know is an error, so a mock
reply is valid or the request is a 400.

Invariants:
- objects carry their required properties (and, at the top level only, optional ones up to
  ``top_level_optional`` in total, for tool arguments that look filled in); arrays carry
  ``minItems`` items; strings are ``word`` fitted to ``minLength``/``maxLength``/``format``
  (a ``pattern`` is tried against a few candidates and refused if none matches);
- ``$ref`` is a local JSON pointer (``#/$defs/X``, ``#/definitions/X``, ``#``); ``anyOf``
  takes the first branch that can be built; ``oneOf`` only when its branches' types cannot
  overlap; ``allOf`` merges its parts when they do not disagree on a keyword;
- the work is bounded: at most ``MAX_NODES`` schema nodes visited and ``MAX_DEPTH`` levels
  deep, so a recursive or exploding schema is refused quickly.

Pure and synchronous; the input is never mutated.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any

MAX_NODES = 5_000
MAX_DEPTH = 32
MAX_ITEMS = 64  # a larger minItems/minProperties/minLength is refused (bounded output)
MAX_LENGTH = 4_096

# Keywords that never constrain an instance.
ANNOTATIONS = frozenset(
    {
        "title",
        "description",
        "default",
        "examples",
        "example",
        "$schema",
        "$id",
        "$anchor",
        "$comment",
        "deprecated",
        "readOnly",
        "writeOnly",
        "discriminator",
        "propertyOrdering",
        "strict",
        "contentEncoding",
        "contentMediaType",
    }
)
DEFINITIONS = frozenset({"$defs", "definitions"})
FORMAT_VALUES = {
    "date-time": "2024-01-01T00:00:00Z",
    "date": "2024-01-01",
    "time": "00:00:00Z",
    "duration": "P1D",
    "email": "mock@example.com",
    "idn-email": "mock@example.com",
    "hostname": "example.com",
    "idn-hostname": "example.com",
    "ipv4": "127.0.0.1",
    "ipv6": "::1",
    "uri": "https://example.com/mock",
    "iri": "https://example.com/mock",
    "uri-reference": "https://example.com/mock",
    "iri-reference": "https://example.com/mock",
    "url": "https://example.com/mock",
    "uuid": "00000000-0000-4000-8000-000000000000",
    "regex": "mock",
    "json-pointer": "/mock",
    "relative-json-pointer": "0",
    "uri-template": "https://example.com/{mock}",
    "enum": None,  # Gemini's marker for a string enum: the enum decides
}
TYPES = ("object", "array", "string", "number", "integer", "boolean", "null")


class UnsupportedSchema(ValueError):
    """The schema asks for something the mock cannot produce; the message says what and where."""


def instance_of(schema: Any, *, word: str = "mock", top_level_optional: int = 0) -> Any:
    return _Builder(schema, word or "mock", top_level_optional).build(schema, "#", 0)


class _Builder:
    def __init__(self, root: Any, word: str, top_level_optional: int) -> None:
        self.root = root
        self.word = word
        self.top_level_optional = top_level_optional
        self.nodes = 0

    # -- dispatch --------------------------------------------------------------

    def build(self, schema: Any, path: str, depth: int) -> Any:
        self.nodes += 1
        if self.nodes > MAX_NODES:
            raise UnsupportedSchema(f"schema too large: more than {MAX_NODES} nodes")
        if depth > MAX_DEPTH:
            raise UnsupportedSchema(
                f"schema nested (or recursive) deeper than {MAX_DEPTH} at {path}"
            )
        if schema is True:
            return self.word
        if schema is False:
            raise UnsupportedSchema(f"schema 'false' admits no value at {path}")
        if not isinstance(schema, dict):
            raise UnsupportedSchema(f"a schema must be an object or a boolean at {path}")
        schema = self._resolved(schema, path, depth)
        for key in schema:
            if key not in _HANDLED and key not in ANNOTATIONS and not key.startswith("x-"):
                raise UnsupportedSchema(f"unsupported schema keyword {key!r} at {path}")
        if "const" in schema:
            return schema["const"]
        if "anyOf" in schema or "oneOf" in schema:
            return self._union(schema, path, depth)
        kinds = self._types(schema, path)
        if "enum" in schema:
            return self._enum(schema, kinds, path)
        problems: list[str] = []
        for kind in kinds:
            try:
                return self._typed(kind, schema, path, depth)
            except UnsupportedSchema as exc:
                if self.nodes > MAX_NODES or "nested" in str(exc):
                    raise
                problems.append(str(exc))
        raise UnsupportedSchema(problems[0] if problems else f"no type can be built at {path}")

    def _typed(self, kind: str, schema: dict[str, Any], path: str, depth: int) -> Any:
        if kind == "object":
            return self._object(schema, path, depth)
        if kind == "array":
            return self._array(schema, path, depth)
        if kind == "string":
            return self._string(schema, path)
        if kind in ("number", "integer"):
            return self._number(schema, path, integer=kind == "integer")
        if kind == "boolean":
            return True
        return None

    # -- references and combinators --------------------------------------------

    def _resolved(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        """``schema`` with its ``$ref`` and ``allOf`` folded in."""
        hops = 0
        while "$ref" in schema:
            hops += 1
            if hops > MAX_DEPTH:
                raise UnsupportedSchema(f"$ref cycle at {path}")
            target = self._pointer(schema["$ref"], path)
            rest = {k: v for k, v in schema.items() if k != "$ref" and k not in ANNOTATIONS}
            if not isinstance(target, dict):
                if target is True and not rest:
                    return {}
                raise UnsupportedSchema(f"$ref to a non-object schema at {path}")
            schema = _merge(target, rest, path) if rest else target
        if "allOf" in schema:
            parts = schema["allOf"]
            if not isinstance(parts, list) or not parts:
                raise UnsupportedSchema(f"allOf must be a non-empty array at {path}")
            merged = {k: v for k, v in schema.items() if k != "allOf"}
            for i, part in enumerate(parts):
                if part is True:
                    continue
                if not isinstance(part, dict):
                    raise UnsupportedSchema(f"allOf[{i}] admits no value at {path}")
                self.nodes += 1
                merged = _merge(merged, self._resolved(part, f"{path}/allOf/{i}", depth), path)
            return self._resolved(merged, path, depth)
        return schema

    def _pointer(self, ref: Any, path: str) -> Any:
        if not isinstance(ref, str) or not (ref == "#" or ref.startswith("#/")):
            raise UnsupportedSchema(
                f"only local $ref ('#/...') is supported, got {ref!r} at {path}"
            )
        node = self.root
        for raw in ref[2:].split("/") if ref != "#" else ():
            part = raw.replace("~1", "/").replace("~0", "~")
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise UnsupportedSchema(f"unresolvable $ref {ref!r} at {path}")
        return node

    def _union(self, schema: dict[str, Any], path: str, depth: int) -> Any:
        key = "anyOf" if "anyOf" in schema else "oneOf"
        if "anyOf" in schema and "oneOf" in schema:
            raise UnsupportedSchema(f"anyOf together with oneOf at {path}")
        branches = schema[key]
        if not isinstance(branches, list) or not branches:
            raise UnsupportedSchema(f"{key} must be a non-empty array at {path}")
        rest = {k: v for k, v in schema.items() if k != key}
        if key == "oneOf":
            self._check_disjoint(branches, path)
        problems: list[str] = []
        for i, branch in enumerate(branches):
            try:
                merged = branch
                if any(k not in ANNOTATIONS for k in rest):
                    if not isinstance(branch, dict):
                        raise UnsupportedSchema(f"{key}[{i}] is not an object at {path}")
                    merged = _merge(rest, branch, path)
                return self.build(merged, f"{path}/{key}/{i}", depth + 1)
            except UnsupportedSchema as exc:
                if self.nodes > MAX_NODES:
                    raise
                problems.append(str(exc))
        raise UnsupportedSchema(f"no branch of {key} can be built at {path}: {problems[0]}")

    def _check_disjoint(self, branches: list[Any], path: str) -> None:
        seen: set[str] = set()
        for i, branch in enumerate(branches):
            if isinstance(branch, dict) and "$ref" in branch:
                branch = self._resolved(branch, path, 0)
            kinds = branch.get("type") if isinstance(branch, dict) else None
            names = [kinds] if isinstance(kinds, str) else kinds
            if not isinstance(names, list) or not names:
                raise UnsupportedSchema(
                    f"oneOf is supported only when each branch declares its type; "
                    f"oneOf[{i}] does not at {path}"
                )
            mine = {str(n).lower() for n in names}
            if "integer" in mine:
                mine.add("number")
            if "number" in mine:
                mine.add("integer")
            if mine & seen:
                raise UnsupportedSchema(f"oneOf branches overlap in type at {path}")
            seen |= mine

    # -- types -------------------------------------------------------------------

    def _types(self, schema: dict[str, Any], path: str) -> list[str]:
        raw = schema.get("type")
        if raw is None:
            return [_inferred(schema)]
        names = [raw] if isinstance(raw, str) else raw
        if not isinstance(names, list) or not names:
            raise UnsupportedSchema(f"invalid 'type' at {path}")
        kinds = []
        for name in names:
            kind = str(name).lower()
            if kind not in TYPES:
                raise UnsupportedSchema(f"unknown type {name!r} at {path}")
            kinds.append(kind)
        return kinds

    def _enum(self, schema: dict[str, Any], kinds: list[str], path: str) -> Any:
        values = schema["enum"]
        if not isinstance(values, list) or not values:
            raise UnsupportedSchema(f"'enum' must be a non-empty array at {path}")
        if "type" not in schema:
            return values[0]
        for value in values:
            if any(_is_type(value, kind) for kind in kinds):
                return value
        raise UnsupportedSchema(f"no enum value has the declared type at {path}")

    def _object(self, schema: dict[str, Any], path: str, depth: int) -> dict[str, Any]:
        for key in ("patternProperties", "propertyNames", "dependentSchemas"):
            if schema.get(key):
                raise UnsupportedSchema(f"unsupported schema keyword {key!r} at {path}")
        props = schema.get("properties") or {}
        required = schema.get("required") or []
        if not isinstance(props, dict) or not isinstance(required, list):
            raise UnsupportedSchema(f"invalid 'properties' or 'required' at {path}")
        extra = schema.get("additionalProperties", True)
        out: dict[str, Any] = {}
        for name in required:
            if not isinstance(name, str):
                raise UnsupportedSchema(f"'required' must list strings at {path}")
            sub = props.get(name, extra)
            if name not in props and extra is False:
                raise UnsupportedSchema(
                    f"required property {name!r} is not allowed by additionalProperties at {path}"
                )
            out[name] = self.build(sub, f"{path}/properties/{name}", depth + 1)
        wanted = max(self.top_level_optional if depth == 0 else 0, _count(schema, "minProperties"))
        for name, sub in props.items():
            if len(out) >= wanted:
                break
            if name in out:
                continue
            try:
                out[name] = self.build(sub, f"{path}/properties/{name}", depth + 1)
            except UnsupportedSchema:
                if self.nodes > MAX_NODES:
                    raise
        serial = 0
        while len(out) < _count(schema, "minProperties"):
            if extra is False or schema.get("unevaluatedProperties") is False:
                raise UnsupportedSchema(f"minProperties cannot be met at {path}")
            serial += 1
            out[f"extra{serial}"] = self.build(extra, f"{path}/additionalProperties", depth + 1)
        limit = schema.get("maxProperties")
        if isinstance(limit, int) and len(out) > limit:
            raise UnsupportedSchema(f"maxProperties is below the required properties at {path}")
        for name, needs in (schema.get("dependentRequired") or {}).items():
            if name in out and any(n not in out for n in needs):
                raise UnsupportedSchema(f"unsupported schema keyword 'dependentRequired' at {path}")
        return out

    def _array(self, schema: dict[str, Any], path: str, depth: int) -> list[Any]:
        if "contains" in schema:
            raise UnsupportedSchema(f"unsupported schema keyword 'contains' at {path}")
        wanted = _count(schema, "minItems")
        limit = schema.get("maxItems")
        if isinstance(limit, int) and limit < wanted:
            raise UnsupportedSchema(f"maxItems is below minItems at {path}")
        prefix = schema.get("prefixItems") or []
        if not isinstance(prefix, list):
            raise UnsupportedSchema(f"'prefixItems' must be an array at {path}")
        items = schema.get("items", True)
        out: list[Any] = []
        for i in range(wanted):
            sub = prefix[i] if i < len(prefix) else items
            out.append(self.build(sub, f"{path}/items/{i}", depth + 1))
        if schema.get("uniqueItems") is True and len({_key(v) for v in out}) < len(out):
            raise UnsupportedSchema(f"uniqueItems with minItems > 1 cannot be met at {path}")
        return out

    def _string(self, schema: dict[str, Any], path: str) -> str:
        low = _count(schema, "minLength")
        high = schema.get("maxLength")
        if high is not None and (not isinstance(high, int) or high < low):
            raise UnsupportedSchema(f"maxLength is below minLength at {path}")
        fmt = schema.get("format")
        base = FORMAT_VALUES.get(fmt) if isinstance(fmt, str) else None
        candidates = [base] if base else [self.word, "mock", "a", "0", "A", "mock-0", ""]
        pattern = schema.get("pattern")
        regex = None
        if pattern is not None:
            try:
                regex = re.compile(str(pattern))
            except re.error as exc:
                raise UnsupportedSchema(f"invalid pattern at {path}: {exc}") from None
        if base and _fit(base, low, high) != base:
            raise UnsupportedSchema(f"format {fmt!r} conflicts with the length bounds at {path}")
        for candidate in candidates:
            text = _fit(candidate, low, high)
            if regex is None or regex.search(text):
                return text
        raise UnsupportedSchema(f"cannot produce a string matching pattern {pattern!r} at {path}")

    def _number(self, schema: dict[str, Any], path: str, *, integer: bool) -> int | float:
        low, high = _bound(schema, "minimum", path), _bound(schema, "maximum", path)
        x_low = _bound(schema, "exclusiveMinimum", path)
        x_high = _bound(schema, "exclusiveMaximum", path)
        step = schema.get("multipleOf")
        if step is not None and (
            not isinstance(step, int | float) or isinstance(step, bool) or step <= 0
        ):
            raise UnsupportedSchema(f"'multipleOf' must be a positive number at {path}")

        def fits(v: float) -> bool:
            return (
                (low is None or v >= low)
                and (high is None or v <= high)
                and (x_low is None or v > x_low)
                and (x_high is None or v < x_high)
            )

        candidates: list[float] = [1 if integer else 1.5, 0, 1]
        floor = max((b for b in (low, x_low) if b is not None), default=None)
        ceiling = min((b for b in (high, x_high) if b is not None), default=None)
        if floor is not None:
            candidates += [math.floor(floor) + 1, math.ceil(floor)]
            if not integer:
                candidates.append(floor)
        if ceiling is not None:
            candidates += [math.ceil(ceiling) - 1, math.floor(ceiling)]
            if not integer:
                candidates.append(ceiling)
        if floor is not None and ceiling is not None and not integer:
            candidates.append((floor + ceiling) / 2)
        if step is not None:
            if not float(step).is_integer():
                candidates = [0]  # 0 is the one multiple of any step that floats get exactly
            else:
                unit = int(step)
                candidates = [unit * math.ceil(c / unit) for c in candidates if math.isfinite(c)]
                candidates.append(0)
        for value in candidates:
            if not math.isfinite(value) or (integer and not float(value).is_integer()):
                continue
            if fits(value):
                return int(value) if integer else value
        raise UnsupportedSchema(
            f"no {'integer' if integer else 'number'} fits the bounds at {path}"
        )


_HANDLED = frozenset(
    {
        "type",
        "enum",
        "const",
        "properties",
        "required",
        "additionalProperties",
        "unevaluatedProperties",
        "patternProperties",
        "propertyNames",
        "dependentSchemas",
        "dependentRequired",
        "minProperties",
        "maxProperties",
        "items",
        "prefixItems",
        "minItems",
        "maxItems",
        "uniqueItems",
        "contains",
        "minLength",
        "maxLength",
        "pattern",
        "format",
        "minimum",
        "maximum",
        "exclusiveMinimum",
        "exclusiveMaximum",
        "multipleOf",
        "anyOf",
        "oneOf",
        "allOf",
        "$ref",
        "nullable",
        *DEFINITIONS,
    }
)


def _merge(a: dict[str, Any], b: dict[str, Any], path: str) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if key in ANNOTATIONS or key in DEFINITIONS:
            out.setdefault(key, value)
        elif key == "required" and key in out:
            out[key] = [*out[key], *(n for n in value if n not in out[key])]
        elif key == "properties" and key in out:
            clash = set(out[key]) & set(value)
            if any(out[key][n] != value[n] for n in clash):
                raise UnsupportedSchema(f"allOf parts disagree on properties at {path}")
            out[key] = {**out[key], **value}
        elif key in out and out[key] != value:
            raise UnsupportedSchema(f"allOf parts disagree on {key!r} at {path}")
        else:
            out[key] = value
    return out


def _inferred(schema: dict[str, Any]) -> str:
    if any(k in schema for k in ("properties", "required", "additionalProperties")):
        return "object"
    if any(k in schema for k in ("items", "prefixItems", "minItems", "maxItems")):
        return "array"
    if any(k in schema for k in ("minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum")):
        return "number"
    return "string"


def _is_type(value: Any, kind: str) -> bool:
    if kind == "null":
        return value is None
    if kind == "boolean":
        return isinstance(value, bool)
    if kind == "integer":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, int | float) and not isinstance(value, bool)
    if kind == "string":
        return isinstance(value, str)
    if kind == "array":
        return isinstance(value, list)
    return isinstance(value, dict)


def _count(schema: dict[str, Any], key: str) -> int:
    value = schema.get(key, 0)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise UnsupportedSchema(f"{key!r} must be a non-negative integer")
    if value > (MAX_LENGTH if key == "minLength" else MAX_ITEMS):
        raise UnsupportedSchema(f"{key!r} of {value} is larger than the mock produces")
    return value


def _bound(schema: dict[str, Any], key: str, path: str) -> float | None:
    value = schema.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise UnsupportedSchema(f"{key!r} must be a number at {path}")
    return value


def _fit(text: str, low: int, high: int | None) -> str:
    if len(text) < low:
        text += "x" * (low - len(text))
    return text if high is None else text[:high]


def _key(value: Any) -> str:
    return json.dumps(value, sort_keys=True)
