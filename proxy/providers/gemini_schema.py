"""JSON Schema -> the OpenAPI 3.0 subset Gemini's ``Schema`` object accepts.

Tool ``parameters`` and ``response_format`` schemas pass through
``gemini_schema``. Invariants of its output:
- local ``$ref`` (``#/$defs/...``, ``#/definitions/...``) are inlined, at most
  ``MAX_REF_DEPTH`` deep; an unresolvable or deeper one becomes an untyped
  ``OBJECT`` so the call stays usable;
- ``allOf`` parts are merged into one schema (Gemini has no ``allOf``);
- ``oneOf`` is read as ``anyOf``, ``const`` as a one-value enum, a type list
  as ``type`` (upper case) + ``nullable`` (or ``anyOf`` for several types);
- only string enums are kept (Gemini's enums are strings);
- unknown keywords and unsupported ``format`` values are dropped, and
  ``required`` lists only declared properties;
- the work is bounded: inlining ``$ref`` can multiply a small schema (a definition used several
  times by a definition used several times...), so the output may hold at most
  ``MAX_SCHEMA_NODES`` schema nodes and nest at most ``MAX_SCHEMA_DEPTH`` deep; beyond either
  the request is a 400 naming the parameter, before any more work is done.

Pure and synchronous: a dict in, a new dict out, the input never mutated.
"""

from __future__ import annotations

from typing import Any

from proxy.core.errors import InvalidRequest
from proxy.providers.base import JSONDict

# Keywords of Gemini's Schema object (an OpenAPI 3.0 subset) kept as they are;
# nested schemas ('properties', 'items', 'anyOf') are handled separately.
SCHEMA_SCALAR_KEYS = frozenset(
    {
        "description",
        "nullable",
        "minItems",
        "maxItems",
        "minLength",
        "maxLength",
        "minProperties",
        "maxProperties",
        "minimum",
        "maximum",
        "pattern",
        "propertyOrdering",
    }
)
# Gemini accepts only these 'format' values (per type); others are a 400.
SCHEMA_FORMATS = {
    "STRING": frozenset({"enum", "date-time"}),
    "INTEGER": frozenset({"int32", "int64"}),
    "NUMBER": frozenset({"float", "double"}),
}
MAX_REF_DEPTH = 8
# Real tool schemas have tens to a few hundred nodes; 5,000 is far above any of them and costs
# a few milliseconds at most. Fan-out through $ref is exponential without such a budget.
MAX_SCHEMA_NODES = 5_000
MAX_SCHEMA_DEPTH = 64  # nesting of the output (properties, items, anyOf); also bounds recursion


class _Budget:
    """Nodes left to emit for one schema; raises a 400 naming the parameter when spent."""

    __slots__ = ("left", "param")

    def __init__(self, param: str) -> None:
        self.left = MAX_SCHEMA_NODES
        self.param = param

    def spend(self, depth: int) -> None:
        self.left -= 1
        if self.left < 0:
            raise InvalidRequest(
                f"{self.param}: the schema expands to more than {MAX_SCHEMA_NODES} nodes "
                "(count every $ref use) for a Gemini upstream",
                param=self.param,
                code="schema_too_large",
            )
        if depth > MAX_SCHEMA_DEPTH:
            raise InvalidRequest(
                f"{self.param}: the schema nests deeper than {MAX_SCHEMA_DEPTH} levels",
                param=self.param,
                code="schema_too_large",
            )


def _resolve_ref(ref: str, root: JSONDict) -> Any:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            defs = root.get(prefix[2:-1])
            return defs.get(ref[len(prefix) :]) if isinstance(defs, dict) else None
    return None


def _clean(node: Any, root: JSONDict, depth: int, budget: _Budget, level: int) -> JSONDict:
    """``depth`` counts $ref hops on this path, ``level`` the nesting of the output."""
    budget.spend(level)
    if not isinstance(node, dict):
        return {}
    if "$ref" in node:
        target = _resolve_ref(str(node["$ref"]), root)
        if target is None or depth >= MAX_REF_DEPTH:
            # Unresolvable or recursive: an untyped object keeps the call usable.
            return {"type": "OBJECT"}
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _clean(merged, root, depth + 1, budget, level)
    for part in node.get("allOf") or ():
        # Best effort: Gemini has no allOf, so its parts are merged into one schema.
        if isinstance(part, dict) and "$ref" in part:
            part = _resolve_ref(str(part["$ref"]), root)
        if isinstance(part, dict):
            node = {
                **node,
                **part,
                "properties": {**(node.get("properties") or {}), **(part.get("properties") or {})},
                "required": [*(node.get("required") or ()), *(part.get("required") or ())],
            }
    out: JSONDict = {}
    kind = node.get("type")
    if isinstance(kind, list):
        types = [t for t in kind if t != "null"]
        if len(types) < len(kind):
            out["nullable"] = True
        if len(types) > 1:
            out["anyOf"] = [{"type": str(t).upper()} for t in types]
        kind = types[0] if len(types) == 1 else None
    if isinstance(kind, str):
        out["type"] = kind.upper()
    for key in SCHEMA_SCALAR_KEYS:
        if key in node:
            out[key] = node[key]
    fmt = node.get("format")
    if isinstance(fmt, str) and fmt in SCHEMA_FORMATS.get(out.get("type", ""), ()):
        out["format"] = fmt
    enum = [node["const"]] if "const" in node else node.get("enum")
    if isinstance(enum, list):
        if None in enum:
            out["nullable"] = True
        values = [v for v in enum if v is not None]
        if values and all(isinstance(v, str) for v in values):  # Gemini enums are strings
            out["enum"] = values
            out.setdefault("type", "STRING")
    variants = node.get("anyOf") or node.get("oneOf")
    if isinstance(variants, list):
        out["anyOf"] = [_clean(v, root, depth, budget, level + 1) for v in variants]
    items = node.get("items")
    if isinstance(items, dict):
        out["items"] = _clean(items, root, depth, budget, level + 1)
    props = node.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {
            name: _clean(sub, root, depth, budget, level + 1) for name, sub in props.items()
        }
        required = [r for r in node.get("required") or () if r in props]
        if required:
            out["required"] = required
    return out


def gemini_schema(schema: JSONDict, param: str = "schema") -> JSONDict:
    """A JSON Schema reduced to what Gemini's Schema object accepts (module docstring).

    ``param`` names the request parameter the schema came from, for the 400 when it is too big.
    """
    return _clean(schema, schema, 0, _Budget(param), 0)
