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
  ``required`` lists only declared properties.

Pure and synchronous: a dict in, a new dict out, the input never mutated.
"""

from __future__ import annotations

from typing import Any

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


def _resolve_ref(ref: str, root: JSONDict) -> Any:
    for prefix in ("#/$defs/", "#/definitions/"):
        if ref.startswith(prefix):
            defs = root.get(prefix[2:-1])
            return defs.get(ref[len(prefix) :]) if isinstance(defs, dict) else None
    return None


def _clean(node: Any, root: JSONDict, depth: int) -> JSONDict:
    if not isinstance(node, dict):
        return {}
    if "$ref" in node:
        target = _resolve_ref(str(node["$ref"]), root)
        if target is None or depth >= MAX_REF_DEPTH:
            # Unresolvable or recursive: an untyped object keeps the call usable.
            return {"type": "OBJECT"}
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _clean(merged, root, depth + 1)
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
        out["anyOf"] = [_clean(v, root, depth) for v in variants]
    items = node.get("items")
    if isinstance(items, dict):
        out["items"] = _clean(items, root, depth)
    props = node.get("properties")
    if isinstance(props, dict) and props:
        out["properties"] = {name: _clean(sub, root, depth) for name, sub in props.items()}
        required = [r for r in node.get("required") or () if r in props]
        if required:
            out["required"] = required
    return out


def gemini_schema(schema: JSONDict) -> JSONDict:
    """A JSON Schema reduced to what Gemini's Schema object accepts (module docstring)."""
    return _clean(schema, schema, 0)
