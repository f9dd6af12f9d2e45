"""Extract the OpenAI schemas the proxy's output must match into tests/data/openai_schemas.json.

Run once, by hand, when the official spec changes:

    .venv/bin/python tests/spec_subset.py [path/to/openai-openapi.yaml]

The output holds every schema reachable from ``ROOTS`` with the spec's
``nullable: true`` (an OpenAPI 3.0 leftover inside a 3.1 document) rewritten as
``anyOf: [<schema>, {"type": "null"}]`` (and ``None`` added to its enum), so a
plain JSON Schema 2020-12 validator reads it the way the spec means it.
Descriptions and examples are dropped: they are large and never validated.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOTS = (
    "CreateChatCompletionResponse",
    "CreateChatCompletionStreamResponse",
    "ErrorResponse",
    "CreateEmbeddingResponse",
    "CreateCompletionResponse",
    "ListModelsResponse",
)
DEFAULT_SPEC = Path(__file__).resolve().parents[2] / "shared" / "specs" / "openai-openapi.yaml"
OUTPUT = Path(__file__).resolve().parent / "data" / "openai_schemas.json"
REF_PREFIX = "#/components/schemas/"
# Annotation-only keywords: no effect on validation, most of the file's size.
DROPPED_KEYS = frozenset({"description", "example", "examples", "x-oaiMeta", "title", "deprecated"})


def _refs(node: Any, found: set[str]) -> None:
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith(REF_PREFIX):
            found.add(ref[len(REF_PREFIX) :])
        for value in node.values():
            _refs(value, found)
    elif isinstance(node, list):
        for item in node:
            _refs(item, found)


def _rewrite(node: Any) -> Any:
    if isinstance(node, list):
        return [_rewrite(item) for item in node]
    if not isinstance(node, dict):
        return node
    out = {
        key: (value if key in ("properties",) else _rewrite(value))
        for key, value in node.items()
        if key not in DROPPED_KEYS and not key.startswith("x-")
    }
    if "properties" in out:
        out["properties"] = {name: _rewrite(sub) for name, sub in out["properties"].items()}
    if out.pop("nullable", False):
        if isinstance(out.get("enum"), list) and None not in out["enum"]:
            out["enum"] = [*out["enum"], None]
        return {"anyOf": [out, {"type": "null"}]}
    return out


def extract(spec: dict[str, Any]) -> dict[str, Any]:
    schemas: dict[str, Any] = spec["components"]["schemas"]
    pending = list(ROOTS)
    seen: set[str] = set()
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        found: set[str] = set()
        _refs(schemas[name], found)
        pending.extend(sorted(found - seen))
    subset = {name: _rewrite(schemas[name]) for name in sorted(seen)}
    return {"components": {"schemas": subset}}


def main(argv: list[str]) -> int:
    source = Path(argv[1]) if len(argv) > 1 else DEFAULT_SPEC
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with source.open("rb") as fh:
        spec = yaml.load(fh, Loader=loader)
    subset = extract(spec)
    OUTPUT.parent.mkdir(parents=True, exist_ok=True)
    options = orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS
    OUTPUT.write_bytes(orjson.dumps(subset, option=options) + b"\n")
    print(f"wrote {OUTPUT} ({len(subset['components']['schemas'])} schemas)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv))
