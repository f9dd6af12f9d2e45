"""Gemini schema cleaning is bounded: $ref fan-out and deep nesting end in a 400, not a freeze."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.errors import InvalidRequest
from proxy.providers.gemini import translate_request
from proxy.providers.gemini_schema import MAX_SCHEMA_DEPTH, gemini_schema


def fan_out(width: int, levels: int) -> dict[str, Any]:
    """A schema of a few hundred bytes whose inlined form has width**levels nodes."""
    defs: dict[str, Any] = {f"d{levels}": {"type": "string"}}
    for level in range(levels - 1, -1, -1):
        defs[f"d{level}"] = {
            "type": "object",
            "properties": {f"p{k}": {"$ref": f"#/$defs/d{level + 1}"} for k in range(width)},
        }
    return {"$defs": defs, "$ref": "#/$defs/d0"}


def nested(levels: int) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        node = {"type": "object", "properties": {"x": node}}
    return node


def test_a_small_schema_that_fans_out_past_the_budget_is_a_400_naming_the_parameter() -> None:
    schema = fan_out(width=8, levels=8)  # 8**8 = 16.7 million nodes once inlined
    assert len(str(schema)) < 3_000
    with pytest.raises(InvalidRequest) as caught:
        gemini_schema(schema, "tools[0].function.parameters")
    assert caught.value.status == 400
    assert caught.value.param == "tools[0].function.parameters"
    assert "nodes" in str(caught.value)


def test_fan_out_within_the_budget_is_inlined_whole() -> None:
    out = gemini_schema(fan_out(width=3, levels=3))
    leaf = out["properties"]["p2"]["properties"]["p0"]["properties"]["p1"]
    assert leaf == {"type": "STRING"}


def test_nesting_deeper_than_the_limit_is_a_400() -> None:
    gemini_schema(nested(MAX_SCHEMA_DEPTH - 1))
    with pytest.raises(InvalidRequest, match="deeper"):
        gemini_schema(nested(MAX_SCHEMA_DEPTH + 1))


def test_the_chat_translation_names_the_tool_and_the_response_format() -> None:
    body: dict[str, Any] = {
        "model": "gemini-x",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [
            {"type": "function", "function": {"name": "ok", "parameters": nested(2)}},
            {"type": "function", "function": {"name": "big", "parameters": fan_out(8, 8)}},
        ],
    }
    with pytest.raises(InvalidRequest) as caught:
        translate_request(body)
    assert caught.value.param == "tools[1].function.parameters"
    body = {
        "model": "gemini-x",
        "messages": [{"role": "user", "content": "hi"}],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "s", "schema": fan_out(8, 8)},
        },
    }
    with pytest.raises(InvalidRequest) as caught:
        translate_request(body)
    assert caught.value.param == "response_format.json_schema.schema"
