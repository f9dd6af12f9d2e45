"""Validate proxy output against the official OpenAI schemas (tests/data/openai_schemas.json).

The JSON file is a trimmed copy of the spec made by ``tests/spec_subset.py``,
so tests do not need the shared spec at run time. Validators are built once
per schema name and cached.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

import orjson
from jsonschema import Draft202012Validator

SCHEMAS_PATH = Path(__file__).resolve().parent / "data" / "openai_schemas.json"


@cache
def _document() -> dict[str, Any]:
    doc: dict[str, Any] = orjson.loads(SCHEMAS_PATH.read_bytes())
    return doc


@cache
def _validator(schema_name: str) -> Any:
    doc = _document()
    if schema_name not in doc["components"]["schemas"]:
        raise KeyError(f"no schema {schema_name!r} in {SCHEMAS_PATH.name}")
    # The components live in the same document as the entry $ref, so the
    # spec's '#/components/schemas/...' pointers resolve without a registry.
    schema = {**doc, "$ref": f"#/components/schemas/{schema_name}"}
    Draft202012Validator.check_schema(schema)
    return Draft202012Validator(schema)


def validate(schema_name: str, instance: Any) -> None:
    """Raise jsonschema.ValidationError when ``instance`` does not match the named schema."""
    _validator(schema_name).validate(instance)


def validate_payloads(payloads: list[str]) -> None:
    """Each stream payload is a chunk, an in-band error or the final ``[DONE]``."""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        obj = orjson.loads(payload)
        validate("ErrorResponse" if "error" in obj else "CreateChatCompletionStreamResponse", obj)
