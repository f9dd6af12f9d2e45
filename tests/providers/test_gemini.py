"""OpenAI <-> Gemini: every mapping row and pitfall of docs/wire-formats.md, golden style."""

from __future__ import annotations

import base64
import itertools
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import Deployment, Provider
from proxy.core.errors import InvalidRequest, UnsupportedParameter
from proxy.core.outcome import Outcome
from proxy.providers.base import Endpoint, StreamError
from proxy.providers.gemini import (
    FOREIGN_SIGNATURE,
    MAX_REF_DEPTH,
    GeminiAdapter,
    gemini_schema,
    signature_of,
    tool_call_id,
    translate_request,
)
from tests.openapi import validate, validate_payloads

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NOW = 1_700_000_000
CLIENT_MODEL = "gemini-client"
PROVIDER = Provider(
    name="gemini",
    type="gemini",
    base_url="https://generativelanguage.googleapis.com",
    api_key_env="GEMINI_API_KEY",
    headers={"x-extra": "1"},
)
DEPLOYMENT = Deployment(model=CLIENT_MODEL, provider="gemini", upstream_model="gemini-2.5-flash")
EMBED_DEPLOYMENT = Deployment(
    model="embed", provider="gemini", upstream_model="models/text-embedding-004"
)
SIGNATURE = "CiQBcsjafG+3/uTz0Q=="
SIGNED_ID = "call_t1__sig_CiQBcsjafG-3_uTz0Q"
PNG = "data:image/png;base64,iVBORw0K"


def adapter() -> GeminiAdapter:
    counter = itertools.count(1)
    return GeminiAdapter(clock=lambda: NOW + 0.5, new_token=lambda: f"t{next(counter)}")


def user(content: Any) -> dict[str, Any]:
    return {"role": "user", "content": content}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


def call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


# --- request: messages and generation config -------------------------------


def test_system_roles_merge_media_and_generation_config() -> None:
    body = {
        "model": CLIENT_MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            user("Hi"),
            user(
                [
                    text("there"),
                    text(""),
                    {"type": "image_url", "image_url": {"url": PNG}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.png?size=2"},
                    },
                    {"type": "image_url", "image_url": {"url": "https://example.com/photo"}},
                ]
            ),
            {"role": "developer", "content": [text("Answer in French.")]},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "assistant", "content": ""},
            user("Again"),
        ],
        "max_completion_tokens": 200,
        "max_tokens": 999,
        "temperature": 1.5,
        "top_p": 0.8,
        "stop": ["END"],
        "n": 2,
        "seed": 3,
        "presence_penalty": 0.1,
        "frequency_penalty": 0.2,
        "user": "u-1",
        "parallel_tool_calls": True,
        "response_format": {"type": "json_object"},
    }
    before = orjson.dumps(body)
    assert translate_request(body) == {
        "systemInstruction": {"parts": [{"text": "You are terse."}, {"text": "Answer in French."}]},
        "contents": [
            {
                "role": "user",
                "parts": [
                    {"text": "Hi"},
                    {"text": "there"},
                    {"inlineData": {"mimeType": "image/png", "data": "iVBORw0K"}},
                    {
                        "fileData": {
                            "mimeType": "image/png",
                            "fileUri": "https://example.com/cat.png?size=2",
                        }
                    },
                    {
                        "fileData": {
                            "mimeType": "image/jpeg",
                            "fileUri": "https://example.com/photo",
                        }
                    },
                ],
            },
            {"role": "model", "parts": [{"text": "Bonjour"}]},
            {"role": "user", "parts": [{"text": "Again"}]},
        ],
        "generationConfig": {
            "maxOutputTokens": 200,
            "temperature": 1.5,
            "topP": 0.8,
            "stopSequences": ["END"],
            "candidateCount": 2,
            "seed": 3,
            "presencePenalty": 0.1,
            "frequencyPenalty": 0.2,
            "responseMimeType": "application/json",
        },
    }
    assert orjson.dumps(body) == before


def test_minimal_request_and_string_stop() -> None:
    assert translate_request({"messages": [user("x")], "stop": "END", "max_tokens": 5}) == {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}],
        "generationConfig": {"maxOutputTokens": 5, "stopSequences": ["END"]},
    }
    assert translate_request({"messages": [user("x")]}) == {
        "contents": [{"role": "user", "parts": [{"text": "x"}]}]
    }


def test_pdf_file_part_is_inline_data() -> None:
    part = {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBE"}}
    out = translate_request({"messages": [user([part])]})
    assert out["contents"][0]["parts"] == [
        {"inlineData": {"mimeType": "application/pdf", "data": "JVBE"}}
    ]


def test_tool_calls_signatures_and_function_responses() -> None:
    body = {
        "messages": [
            user("Weather and time?"),
            {
                "role": "assistant",
                "content": "Checking.",
                "tool_calls": [
                    call(SIGNED_ID, "get_weather", '{"location":"Paris"}'),
                    call("call_t2", "get_time", ""),
                ],
            },
            {"role": "tool", "tool_call_id": SIGNED_ID, "content": "18C"},
            {"role": "tool", "tool_call_id": "call_t2", "content": [text("12:00")]},
            user("Thanks"),
            {
                "role": "assistant",
                "content": None,
                "tool_calls": [call("call_foreign", "get_weather", "{bad")],
            },
            {"role": "tool", "tool_call_id": "call_foreign", "content": "20C"},
        ]
    }
    assert translate_request(body)["contents"] == [
        {"role": "user", "parts": [{"text": "Weather and time?"}]},
        {
            "role": "model",
            "parts": [
                {"text": "Checking."},
                {
                    "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                    "thoughtSignature": SIGNATURE,
                },
                {"functionCall": {"name": "get_time", "args": {}}},
            ],
        },
        {
            "role": "user",
            "parts": [
                {"functionResponse": {"name": "get_weather", "response": {"output": "18C"}}},
                {"functionResponse": {"name": "get_time", "response": {"output": "12:00"}}},
                {"text": "Thanks"},
            ],
        },
        {
            "role": "model",
            "parts": [
                {
                    "functionCall": {"name": "get_weather", "args": {}},
                    "thoughtSignature": FOREIGN_SIGNATURE,
                }
            ],
        },
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "20C"}}}],
        },
    ]


def test_tool_message_without_matching_call_is_a_400() -> None:
    body = {"messages": [user("x"), {"role": "tool", "tool_call_id": "call_zz", "content": "1"}]}
    with pytest.raises(InvalidRequest) as info:
        translate_request(body)
    assert info.value.param == "messages[1].tool_call_id"


@settings(max_examples=100, deadline=None)
@given(
    raw=st.binary(min_size=1, max_size=300),
    token=st.text(alphabet="0123456789abcdef", min_size=1, max_size=24),
)
def test_property_signature_survives_the_tool_call_id(raw: bytes, token: str) -> None:
    signature = base64.b64encode(raw).decode()
    call_id = tool_call_id(token, signature)
    assert signature_of(call_id) == signature
    assert all(c.isalnum() or c in "_-" for c in call_id)  # Anthropic's id pattern, too


def test_ids_without_a_signature() -> None:
    assert tool_call_id("t9", None) == "call_t9"
    assert signature_of("call_t9") is None
    assert signature_of("toolu_01A") is None


# --- request: tools and schemas ---------------------------------------------


def test_schema_reduced_to_gemini_subset() -> None:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "title": "Args",
        "additionalProperties": False,
        "strict": True,
        "$defs": {
            "Unit": {"type": "string", "enum": ["c", "f"], "description": "Unit"},
            "Extra": {"properties": {"b": {"type": "boolean"}}, "required": ["b"]},
        },
        "definitions": {
            "Count": {
                "type": ["integer", "null"],
                "minimum": 0,
                "exclusiveMaximum": 10,
                "format": "int32",
            }
        },
        "properties": {
            "city": {
                "type": "string",
                "format": "uri",
                "minLength": 1,
                "default": "Paris",
                "examples": ["x"],
            },
            "when": {"type": "string", "format": "date-time", "pattern": "^2"},
            "unit": {"$ref": "#/$defs/Unit", "description": "Override"},
            "count": {"$ref": "#/definitions/Count"},
            "mode": {"const": "fast"},
            "tags": {
                "type": "array",
                "items": {"type": "string"},
                "uniqueItems": True,
                "maxItems": 3,
            },
            "either": {"oneOf": [{"type": "string"}, {"type": "number", "multipleOf": 2}]},
            "level": {"enum": [1, 2, 3], "type": "integer"},
            "maybe": {"enum": ["a", None]},
            "additionalProperties": {"type": "boolean"},
            "merged": {
                "allOf": [
                    {"type": "object", "properties": {"a": {"type": "string"}}},
                    {"properties": {"u": {"$ref": "#/$defs/Unit"}}, "required": ["a"]},
                    {"$ref": "#/$defs/Extra"},
                ]
            },
            "multi": {"type": ["string", "integer"]},
            "free": {"type": "object", "properties": {}, "additionalProperties": True},
            "elsewhere": {"$ref": "https://example.com/schema.json"},
        },
        "required": ["city", "ghost", "additionalProperties"],
    }
    assert gemini_schema(schema) == {
        "type": "OBJECT",
        "properties": {
            "city": {"type": "STRING", "minLength": 1},
            "when": {"type": "STRING", "format": "date-time", "pattern": "^2"},
            "unit": {"type": "STRING", "enum": ["c", "f"], "description": "Override"},
            "count": {"type": "INTEGER", "nullable": True, "minimum": 0, "format": "int32"},
            "mode": {"type": "STRING", "enum": ["fast"]},
            "tags": {"type": "ARRAY", "items": {"type": "STRING"}, "maxItems": 3},
            "either": {"anyOf": [{"type": "STRING"}, {"type": "NUMBER"}]},
            "level": {"type": "INTEGER"},
            "maybe": {"type": "STRING", "enum": ["a"], "nullable": True},
            "additionalProperties": {"type": "BOOLEAN"},
            "merged": {
                "type": "OBJECT",
                "properties": {
                    "a": {"type": "STRING"},
                    "u": {"type": "STRING", "enum": ["c", "f"], "description": "Unit"},
                    "b": {"type": "BOOLEAN"},
                },
                "required": ["a", "b"],
            },
            "multi": {"anyOf": [{"type": "STRING"}, {"type": "INTEGER"}]},
            "free": {"type": "OBJECT"},
            "elsewhere": {"type": "OBJECT"},
        },
        "required": ["city", "additionalProperties"],
    }


def test_recursive_ref_is_cut_off() -> None:
    schema = {
        "type": "object",
        "$defs": {"Node": {"type": "object", "properties": {"child": {"$ref": "#/$defs/Node"}}}},
        "properties": {"root": {"$ref": "#/$defs/Node"}},
    }
    node = gemini_schema(schema)["properties"]["root"]
    for _ in range(MAX_REF_DEPTH):  # the ref is followed MAX_REF_DEPTH times
        assert set(node) == {"type", "properties"}
        node = node["properties"]["child"]
    assert node == {"type": "OBJECT"}


def test_tools_and_tool_choice() -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "get_weather",
                "description": "Weather",
                "strict": True,
                "parameters": {
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                    "additionalProperties": False,
                },
            },
        },
        {
            "type": "function",
            "function": {"name": "get_time", "parameters": {"type": "object", "properties": {}}},
        },
        {"type": "function", "function": {"name": "ping"}},
    ]
    out = translate_request({"messages": [user("x")], "tools": tools, "tool_choice": "auto"})
    assert out["tools"] == [
        {
            "functionDeclarations": [
                {
                    "name": "get_weather",
                    "description": "Weather",
                    "parameters": {
                        "type": "OBJECT",
                        "properties": {"location": {"type": "STRING"}},
                        "required": ["location"],
                    },
                },
                {"name": "get_time"},
                {"name": "ping"},
            ]
        }
    ]
    assert out["toolConfig"] == {"functionCallingConfig": {"mode": "AUTO"}}


@pytest.mark.parametrize(
    ("choice", "config"),
    [
        ("none", {"mode": "NONE"}),
        ("auto", {"mode": "AUTO"}),
        ("required", {"mode": "ANY"}),
        (
            {"type": "function", "function": {"name": "ping"}},
            {"mode": "ANY", "allowedFunctionNames": ["ping"]},
        ),
    ],
)
def test_tool_choice_modes(choice: Any, config: dict[str, Any]) -> None:
    tools = [{"type": "function", "function": {"name": "ping"}}]
    out = translate_request({"messages": [user("x")], "tools": tools, "tool_choice": choice})
    assert out["toolConfig"] == {"functionCallingConfig": config}


def test_tool_choice_without_tools_is_dropped() -> None:
    assert "toolConfig" not in translate_request(
        {"messages": [user("x")], "tool_choice": "required"}
    )


def test_json_schema_response_format() -> None:
    schema = {
        "type": "object",
        "properties": {"a": {"type": "integer"}},
        "additionalProperties": False,
    }
    body = {
        "messages": [user("x")],
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "r", "strict": True, "schema": schema},
        },
    }
    assert translate_request(body)["generationConfig"] == {
        "responseMimeType": "application/json",
        "responseSchema": {"type": "OBJECT", "properties": {"a": {"type": "INTEGER"}}},
    }
    text_format = {"messages": [user("x")], "response_format": {"type": "text"}}
    assert "generationConfig" not in translate_request(text_format)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("logprobs", True),
        ("top_logprobs", 2),
        ("logit_bias", {"1": 5}),
        ("modalities", ["text", "audio"]),
        ("functions", [{"name": "f"}]),
    ],
)
def test_unsupported_fields_are_a_400_naming_them(field: str, value: Any) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        translate_request({"messages": [user("x")], field: value})
    assert info.value.param == field
    validate("ErrorResponse", info.value.to_dict())


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": None}, "messages"),
        ({"messages": [{"role": "narrator", "content": "x"}]}, "messages[0].role"),
        ({"messages": [user([{"type": "input_audio"}])]}, "messages[0].content[0].type"),
        (
            {"messages": [user([{"type": "image_url", "image_url": {"url": "file:///x"}}])]},
            "messages[0].content[0]",
        ),
        ({"messages": [user([{"type": "image_url", "image_url": {}}])]}, "messages[0].content[0]"),
        ({"messages": [user("x")], "tools": [{"type": "custom"}]}, "tools[0].type"),
        (
            {
                "messages": [user("x")],
                "tools": [{"type": "function", "function": {"name": "f"}}],
                "tool_choice": 3,
            },
            "tool_choice",
        ),
    ],
)
def test_malformed_requests_are_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate_request(body)
    assert info.value.param == param
    validate("ErrorResponse", info.value.to_dict())


# --- adapter: requests ------------------------------------------------------


@pytest.mark.parametrize(
    ("stream", "url"),
    [
        (
            False,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:generateContent",
        ),
        (
            True,
            "https://generativelanguage.googleapis.com/v1beta/models/gemini-2.5-flash:streamGenerateContent?alt=sse",
        ),
    ],
)
def test_build_chat_request(stream: bool, url: str) -> None:
    request = adapter().build_request(
        Endpoint.CHAT, {"messages": [user("hi")]}, PROVIDER, DEPLOYMENT, "AIza-1", stream
    )
    assert (request.method, request.url) == ("POST", url)
    assert dict(request.headers) == {
        "content-type": "application/json",
        "x-extra": "1",
        "x-goog-api-key": "AIza-1",
    }
    assert request.body is not None
    assert orjson.loads(request.body) == {"contents": [{"role": "user", "parts": [{"text": "hi"}]}]}


def test_build_embedding_requests() -> None:
    gemini = adapter()
    base = "https://generativelanguage.googleapis.com/v1beta/models/text-embedding-004"
    one = gemini.build_request(
        Endpoint.EMBEDDINGS, {"input": "hello"}, PROVIDER, EMBED_DEPLOYMENT, "k", False
    )
    assert one.url == f"{base}:embedContent"
    assert one.body is not None
    assert orjson.loads(one.body) == {"content": {"parts": [{"text": "hello"}]}}
    body = {"input": ["a", "b"], "dimensions": 256, "encoding_format": "base64"}
    many = gemini.build_request(Endpoint.EMBEDDINGS, body, PROVIDER, EMBED_DEPLOYMENT, "k", False)
    assert many.url == f"{base}:batchEmbedContents"
    assert many.body is not None
    assert orjson.loads(many.body) == {
        "requests": [
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "a"}]},
                "outputDimensionality": 256,
            },
            {
                "model": "models/text-embedding-004",
                "content": {"parts": [{"text": "b"}]},
                "outputDimensionality": 256,
            },
        ]
    }


@pytest.mark.parametrize("tokens", [[1, 2, 3], [[1, 2], [3]], [], None, ["a", 1]])
def test_token_array_embedding_inputs_are_a_400(tokens: Any) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        adapter().build_request(
            Endpoint.EMBEDDINGS, {"input": tokens}, PROVIDER, EMBED_DEPLOYMENT, "k", False
        )
    assert info.value.param == "input"


def test_legacy_completions_are_a_400() -> None:
    with pytest.raises(InvalidRequest) as info:
        adapter().build_request(
            Endpoint.COMPLETIONS, {"prompt": "x"}, PROVIDER, DEPLOYMENT, "k", False
        )
    assert "OpenAI-compatible" in info.value.message


def test_health_request() -> None:
    request = adapter().health_request(PROVIDER, "AIza-1")
    assert (request.method, request.url, request.body) == (
        "GET",
        "https://generativelanguage.googleapis.com/v1beta/models",
        None,
    )
    assert request.headers["x-goog-api-key"] == "AIza-1"
    assert "x-goog-api-key" not in adapter().health_request(PROVIDER, None).headers


# --- responses --------------------------------------------------------------

TOOL_RESPONSE = {
    "candidates": [
        {
            "content": {
                "parts": [
                    {"text": "weighing options", "thought": True},
                    {"text": "Checking."},
                    {
                        "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
                        "thoughtSignature": SIGNATURE,
                    },
                    {"functionCall": {"name": "get_time", "args": {}}},
                ],
                "role": "model",
            },
            "finishReason": "STOP",
            "index": 0,
            "safetyRatings": [],
        }
    ],
    "usageMetadata": {
        "promptTokenCount": 50,
        "candidatesTokenCount": 10,
        "thoughtsTokenCount": 5,
        "cachedContentTokenCount": 20,
        "totalTokenCount": 65,
    },
    "modelVersion": "gemini-2.5-flash",
    "responseId": "resp-1",
}


def parse(obj: Any, gemini: GeminiAdapter | None = None) -> dict[str, Any]:
    out = (gemini or adapter()).parse_response(
        Endpoint.CHAT, orjson.dumps(obj), DEPLOYMENT, CLIENT_MODEL
    )
    validate("CreateChatCompletionResponse", out)
    return out


def test_parse_text_function_calls_signature_and_usage() -> None:
    assert parse(TOOL_RESPONSE) == {
        "id": "chatcmpl-resp-1",
        "object": "chat.completion",
        "created": NOW,
        "model": CLIENT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": SIGNED_ID,
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location":"Paris"}',
                            },
                        },
                        {
                            "id": "call_t2",
                            "type": "function",
                            "function": {"name": "get_time", "arguments": "{}"},
                        },
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 50,
            "completion_tokens": 15,
            "total_tokens": 65,
            "prompt_tokens_details": {"cached_tokens": 20},
            "completion_tokens_details": {"reasoning_tokens": 5},
        },
    }


def test_signature_round_trip_through_the_client() -> None:
    message = parse(TOOL_RESPONSE)["choices"][0]["message"]
    results = [
        {"role": "tool", "tool_call_id": c["id"], "content": "ok"} for c in message["tool_calls"]
    ]
    body = {"messages": [user("go"), message, *results]}
    model_turn = translate_request(body)["contents"][1]
    assert model_turn["parts"][1] == {
        "functionCall": {"name": "get_weather", "args": {"location": "Paris"}},
        "thoughtSignature": SIGNATURE,
    }
    assert model_turn["parts"][2] == {"functionCall": {"name": "get_time", "args": {}}}


def candidate_response(reason: str | None, parts: list[dict[str, Any]]) -> dict[str, Any]:
    cand: dict[str, Any] = {"content": {"parts": parts, "role": "model"}}
    if reason is not None:
        cand["finishReason"] = reason
    return {
        "candidates": [cand],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 1},
    }


@pytest.mark.parametrize(
    ("reason", "with_call", "finish"),
    [
        ("STOP", False, "stop"),
        ("STOP", True, "tool_calls"),
        ("MAX_TOKENS", False, "length"),
        ("SAFETY", False, "content_filter"),
        ("RECITATION", False, "content_filter"),
        ("BLOCKLIST", False, "content_filter"),
        ("PROHIBITED_CONTENT", False, "content_filter"),
        ("SPII", False, "content_filter"),
        ("OTHER", False, "content_filter"),
        ("MALFORMED_FUNCTION_CALL", False, "stop"),
        (None, False, "stop"),
        # A reply with function calls finishes with tool_calls whatever the reason, except
        # a cut (length) or a block (content_filter).
        (None, True, "tool_calls"),
        ("FINISH_REASON_UNSPECIFIED", True, "tool_calls"),
        ("UNEXPECTED_TOOL_CALL", True, "tool_calls"),
        ("MALFORMED_FUNCTION_CALL", True, "tool_calls"),
        ("MAX_TOKENS", True, "length"),
        ("SAFETY", True, "content_filter"),
        ("OTHER", True, "content_filter"),
    ],
)
def test_finish_reasons_never_leak(reason: str | None, with_call: bool, finish: str) -> None:
    parts: list[dict[str, Any]] = [{"text": "x"}]
    if with_call:
        parts.append({"functionCall": {"name": "f", "args": {}}})
    out = parse(candidate_response(reason, parts))
    assert out["choices"][0]["finish_reason"] == finish
    assert out["id"] == ("chatcmpl-t2" if with_call else "chatcmpl-t1")


def test_safety_stop_without_content_has_empty_text() -> None:
    out = parse(candidate_response("SAFETY", []))
    assert out["choices"][0]["message"] == {"role": "assistant", "content": "", "refusal": None}


def test_two_candidates_are_two_choices() -> None:
    obj = {
        "candidates": [
            {"content": {"parts": [{"text": "A"}], "role": "model"}, "finishReason": "STOP"},
            {
                "content": {"parts": [{"text": "B"}], "role": "model"},
                "finishReason": "MAX_TOKENS",
                "index": 1,
            },
        ],
        "usageMetadata": {"promptTokenCount": 3, "candidatesTokenCount": 2, "totalTokenCount": 5},
    }
    choices = parse(obj)["choices"]
    assert [(c["index"], c["message"]["content"], c["finish_reason"]) for c in choices] == [
        (0, "A", "stop"),
        (1, "B", "length"),
    ]


def test_blocked_prompt_is_a_400_content_filter() -> None:
    obj = {
        "promptFeedback": {"blockReason": "SAFETY", "safetyRatings": []},
        "usageMetadata": {"promptTokenCount": 8, "totalTokenCount": 8},
    }
    with pytest.raises(StreamError) as info:
        parse(obj)
    assert (info.value.info.outcome, info.value.info.status) == (Outcome.IGNORED, 400)
    assert info.value.info.body["error"]["code"] == "content_filter"
    validate("ErrorResponse", info.value.info.body)


@pytest.mark.parametrize("obj", [{"candidates": []}, [1], "x"])
def test_malformed_responses_are_failures(obj: Any) -> None:
    with pytest.raises(StreamError) as info:
        parse(obj)
    assert info.value.info.outcome is Outcome.FAILURE
    validate("ErrorResponse", info.value.info.body)


def parse_embeddings(obj: Any, request_body: dict[str, Any]) -> dict[str, Any]:
    return adapter().parse_response(
        Endpoint.EMBEDDINGS, orjson.dumps(obj), EMBED_DEPLOYMENT, "embed", request_body=request_body
    )


def test_single_embedding_as_floats() -> None:
    out = parse_embeddings({"embedding": {"values": [0.5, -0.25, 1]}}, {"input": "x"})
    assert out == {
        "object": "list",
        "data": [{"object": "embedding", "index": 0, "embedding": [0.5, -0.25, 1.0]}],
        "model": "embed",
        "usage": {"prompt_tokens": 0, "total_tokens": 0},
    }
    validate("CreateEmbeddingResponse", out)


def test_batch_embeddings_as_base64_little_endian_float32() -> None:
    obj = {"embeddings": [{"values": [0.5, -0.25, 1.0]}, {"values": [2.0, 0.125]}]}
    out = parse_embeddings(obj, {"input": ["a", "b"], "encoding_format": "base64"})
    assert out["data"] == [
        {"object": "embedding", "index": 0, "embedding": "AAAAPwAAgL4AAIA/"},
        {"object": "embedding", "index": 1, "embedding": "AAAAQAAAAD4="},
    ]
    floats = parse_embeddings(obj, {"input": ["a", "b"], "encoding_format": "float"})
    assert [d["embedding"] for d in floats["data"]] == [[0.5, -0.25, 1.0], [2.0, 0.125]]
    validate("CreateEmbeddingResponse", floats)


def test_malformed_embeddings_are_failures() -> None:
    with pytest.raises(StreamError) as info:
        parse_embeddings({"nothing": 1}, {})
    assert info.value.info.outcome is Outcome.FAILURE


# --- errors -----------------------------------------------------------------


def gemini_error(code: int, status: str, message: str, details: list[Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message, "status": status}
    if details is not None:
        err["details"] = details
    return orjson.dumps({"error": err})


RETRY_INFO = {"@type": "type.googleapis.com/google.rpc.RetryInfo", "retryDelay": "37s"}


def quota(quota_id: str) -> dict[str, Any]:
    return {
        "@type": "type.googleapis.com/google.rpc.QuotaFailure",
        "violations": [
            {
                "quotaMetric": "generativelanguage.googleapis.com/generate_content_requests",
                "quotaId": quota_id,
            }
        ],
    }


KEY_INVALID = {
    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
    "reason": "API_KEY_INVALID",
    "domain": "googleapis.com",
}
EXCEEDED = "You exceeded your current quota, please check your plan and billing details."
TOO_LONG = "The input token count (1196265) exceeds the maximum number of tokens allowed (1048575)."


@pytest.mark.parametrize(
    (
        "status",
        "headers",
        "body",
        "outcome",
        "client_status",
        "code",
        "transient",
        "context",
        "retry",
    ),
    [
        (
            429,
            {},
            gemini_error(
                429,
                "RESOURCE_EXHAUSTED",
                EXCEEDED,
                [quota("GenerateRequestsPerMinutePerProjectPerModel-FreeTier"), RETRY_INFO],
            ),
            Outcome.RATE_LIMITED,
            429,
            "rate_limit_exceeded",
            False,
            False,
            37.0,
        ),
        (
            429,
            {"retry-after": "5"},
            gemini_error(429, "RESOURCE_EXHAUSTED", EXCEEDED, [RETRY_INFO]),
            Outcome.RATE_LIMITED,
            429,
            "rate_limit_exceeded",
            False,
            False,
            5.0,
        ),
        (
            429,
            {},
            gemini_error(
                429,
                "RESOURCE_EXHAUSTED",
                EXCEEDED,
                [quota("GenerateRequestsPerDayPerProjectPerModel-FreeTier"), RETRY_INFO],
            ),
            Outcome.FAILURE,
            429,
            "insufficient_quota",
            False,
            False,
            37.0,
        ),
        (
            503,
            {},
            gemini_error(503, "UNAVAILABLE", "The model is overloaded. Please try again later."),
            Outcome.FAILURE,
            503,
            "UNAVAILABLE",
            True,
            False,
            None,
        ),
        (
            500,
            {},
            gemini_error(500, "INTERNAL", "An internal error has occurred."),
            Outcome.FAILURE,
            500,
            "INTERNAL",
            True,
            False,
            None,
        ),
        (
            504,
            {},
            gemini_error(504, "DEADLINE_EXCEEDED", "Deadline expired"),
            Outcome.FAILURE,
            504,
            "DEADLINE_EXCEEDED",
            False,
            False,
            None,
        ),
        (
            400,
            {},
            gemini_error(400, "INVALID_ARGUMENT", "Invalid JSON payload received."),
            Outcome.IGNORED,
            400,
            "INVALID_ARGUMENT",
            False,
            False,
            None,
        ),
        (
            400,
            {},
            gemini_error(400, "INVALID_ARGUMENT", TOO_LONG),
            Outcome.IGNORED,
            400,
            "context_length_exceeded",
            False,
            True,
            None,
        ),
        (
            400,
            {},
            gemini_error(
                400,
                "INVALID_ARGUMENT",
                "API key not valid. Please pass a valid API key.",
                [KEY_INVALID],
            ),
            Outcome.FAILURE,
            401,
            "invalid_api_key",
            False,
            False,
            None,
        ),
        (
            400,
            {},
            gemini_error(
                400, "FAILED_PRECONDITION", "User location is not supported for the API use."
            ),
            Outcome.FAILURE,
            400,
            "FAILED_PRECONDITION",
            False,
            False,
            None,
        ),
        (
            401,
            {},
            gemini_error(401, "UNAUTHENTICATED", "Request had invalid authentication credentials."),
            Outcome.FAILURE,
            401,
            "UNAUTHENTICATED",
            False,
            False,
            None,
        ),
        (
            403,
            {},
            gemini_error(403, "PERMISSION_DENIED", "Permission denied on resource project."),
            Outcome.FAILURE,
            403,
            "PERMISSION_DENIED",
            False,
            False,
            None,
        ),
        (
            404,
            {},
            gemini_error(404, "NOT_FOUND", "models/gemini-9 is not found for API version v1beta"),
            Outcome.IGNORED,
            404,
            "model_not_found",
            False,
            False,
            None,
        ),
        (
            503,
            {},
            b"[" + gemini_error(503, "UNAVAILABLE", "overloaded") + b"]",
            Outcome.FAILURE,
            503,
            "UNAVAILABLE",
            True,
            False,
            None,
        ),
        (502, {}, b"<html>Bad Gateway</html>", Outcome.FAILURE, 502, None, True, False, None),
    ],
)
def test_classify_error(
    status: int,
    headers: dict[str, str],
    body: bytes,
    outcome: Outcome,
    client_status: int,
    code: str | None,
    transient: bool,
    context: bool,
    retry: float | None,
) -> None:
    info = adapter().classify_error(status, headers, body)
    assert (info.outcome, info.status, info.transient, info.context_window, info.retry_after) == (
        outcome,
        client_status,
        transient,
        context,
        retry,
    )
    assert info.body["error"]["code"] == code
    assert info.body["error"]["message"].startswith("Gemini API error")
    validate("ErrorResponse", info.body)


# --- streams ----------------------------------------------------------------


def gemini_sse(lines: list[bytes], separators: list[str]) -> bytes:
    return b"".join(
        b"data: " + line + separators[k % len(separators)].encode() for k, line in enumerate(lines)
    )


TEXT_LINES = (GOLDEN / "gemini_text.jsonl").read_bytes().splitlines()
TOOL_LINES = (GOLDEN / "gemini_tools.jsonl").read_bytes().splitlines()


def chunk(
    delta: dict[str, Any],
    finish: str | None = None,
    *,
    chat_id: str,
    index: int = 0,
    usage: bool = True,
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": CLIENT_MODEL,
        "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        out["usage"] = None
    return out


def usage_chunk(chat_id: str, usage: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": chat_id,
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": CLIENT_MODEL,
        "choices": [],
        "usage": usage,
    }


def run_stream(pieces: list[bytes], include_usage: bool) -> list[Any]:
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, include_usage)
    payloads: list[str] = []
    for piece in pieces:
        payloads.extend(translator.feed(piece))
    payloads.extend(translator.finish())
    validate_payloads(payloads)
    return [p if p == "[DONE]" else orjson.loads(p) for p in payloads]


def text_expected(include_usage: bool) -> list[Any]:
    cid = "chatcmpl-resp-7Gq"
    out: list[Any] = [
        chunk({"role": "assistant", "content": ""}, chat_id=cid, usage=include_usage),
        chunk({"content": "Hello"}, chat_id=cid, usage=include_usage),
        chunk({"content": ", wörld ✓"}, chat_id=cid, usage=include_usage),
        chunk({}, "stop", chat_id=cid, usage=include_usage),
    ]
    if include_usage:
        out.append(
            usage_chunk(
                cid,
                {
                    "prompt_tokens": 9,
                    "completion_tokens": 24,
                    "total_tokens": 33,
                    "prompt_tokens_details": {"cached_tokens": 4},
                    "completion_tokens_details": {"reasoning_tokens": 20},
                },
            )
        )
    return [*out, "[DONE]"]


def tools_expected() -> list[Any]:
    cid = "chatcmpl-resp-tools"
    weather = {
        "index": 0,
        "id": SIGNED_ID,
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
    }
    time_call = {
        "index": 1,
        "id": "call_t2",
        "type": "function",
        "function": {"name": "get_time", "arguments": '{"tz":"CET"}'},
    }
    return [
        chunk({"role": "assistant", "content": ""}, chat_id=cid),
        chunk({"content": "Checking both."}, chat_id=cid),
        chunk({"tool_calls": [weather]}, chat_id=cid),
        chunk({"tool_calls": [time_call]}, chat_id=cid),
        chunk({}, "tool_calls", chat_id=cid),
        usage_chunk(
            cid,
            {
                "prompt_tokens": 120,
                "completion_tokens": 55,
                "total_tokens": 175,
                "prompt_tokens_details": {"cached_tokens": 0},
                "completion_tokens_details": {"reasoning_tokens": 30},
            },
        ),
        "[DONE]",
    ]


@pytest.mark.parametrize("include_usage", [True, False])
def test_text_stream_with_crlf_separators(include_usage: bool) -> None:
    stream = gemini_sse(TEXT_LINES, ["\r\n\r\n"])
    assert run_stream([stream], include_usage) == text_expected(include_usage)


def test_text_stream_state_usage_is_the_last_not_the_sum() -> None:
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    first = translator.feed(gemini_sse(TEXT_LINES[:1], ["\n\n"]))
    assert len(first) == 2
    assert translator.has_content
    assert not translator.finished
    translator.feed(gemini_sse(TEXT_LINES[1:], ["\n\n"]))
    assert translator.finished
    assert translator.usage is not None
    assert (translator.usage.prompt_tokens, translator.usage.completion_tokens) == (9, 24)


def test_function_calls_whole_with_own_index_and_signature() -> None:
    stream = gemini_sse(TOOL_LINES, ["\r\n\r\n"])
    assert run_stream([stream], True) == tools_expected()


def test_thought_only_chunk_is_held() -> None:
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    assert translator.feed(gemini_sse(TOOL_LINES[:1], ["\n\n"])) == []
    assert not translator.has_content


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.integers(min_value=0, max_value=2000), max_size=12),
    separators=st.lists(st.sampled_from(["\n\n", "\r\n\r\n"]), min_size=1, max_size=3),
)
def test_property_any_split_and_separator_gives_the_same_payloads(
    points: list[int], separators: list[str]
) -> None:
    stream = gemini_sse(TOOL_LINES, separators)
    cuts = sorted({p % (len(stream) + 1) for p in points})
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert run_stream(pieces, True) == tools_expected()


def test_two_candidates_finish_separately() -> None:
    lines = [
        b'{"candidates":[{"content":{"parts":[{"text":"A"}],"role":"model"}},{"content":{"parts":[{"text":"B"}],"role":"model"},"index":1}],"responseId":"r2"}',
        b'{"candidates":[{"content":{"parts":[{"text":"!"}],"role":"model"},"finishReason":"STOP"}]}',
        b'{"candidates":[{"content":{"parts":[],"role":"model"},"finishReason":"MAX_TOKENS","index":1}],"usageMetadata":{"promptTokenCount":2,"candidatesTokenCount":6}}',
    ]
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    payloads = translator.feed(gemini_sse(lines[:2], ["\n\n"]))
    assert not translator.finished  # choice 1 is still open
    payloads += translator.feed(gemini_sse(lines[2:], ["\n\n"]))
    assert translator.finished
    payloads += translator.finish()
    validate_payloads(payloads)
    cid = "chatcmpl-r2"
    assert [p if p == "[DONE]" else orjson.loads(p) for p in payloads] == [
        chunk({"role": "assistant", "content": ""}, chat_id=cid, usage=False),
        chunk({"content": "A"}, chat_id=cid, usage=False),
        chunk({"role": "assistant", "content": ""}, chat_id=cid, index=1, usage=False),
        chunk({"content": "B"}, chat_id=cid, index=1, usage=False),
        chunk({"content": "!"}, chat_id=cid, usage=False),
        chunk({}, "stop", chat_id=cid, usage=False),
        chunk({}, "length", chat_id=cid, index=1, usage=False),
        "[DONE]",
    ]


def test_safety_finish_in_stream_is_content_filter() -> None:
    lines = [
        b'{"candidates":[{"content":{"parts":[{"text":"Sure"}],"role":"model"}}]}',
        b'{"candidates":[{"finishReason":"SAFETY"}]}',
    ]
    payloads = run_stream([gemini_sse(lines, ["\n\n"])], False)
    assert payloads[-2]["choices"][0]["finish_reason"] == "content_filter"
    assert payloads[-2]["id"] == "chatcmpl-t1"  # no responseId: a generated one, constant


@pytest.mark.parametrize(
    ("reason", "finish"),
    [
        ("STOP", "tool_calls"),
        ("FINISH_REASON_UNSPECIFIED", "tool_calls"),
        ("UNEXPECTED_TOOL_CALL", "tool_calls"),
        ("MAX_TOKENS", "length"),
        ("SAFETY", "content_filter"),
    ],
)
def test_a_streamed_reply_with_calls_finishes_with_tool_calls(reason: str, finish: str) -> None:
    lines = [
        b'{"candidates":[{"content":{"parts":[{"functionCall":{"name":"f","args":{}}}],'
        b'"role":"model"}}]}',
        b'{"candidates":[{"content":{"parts":[],"role":"model"},"finishReason":"'
        + reason.encode()
        + b'"}]}',
    ]
    payloads = run_stream([gemini_sse(lines, ["\n\n"])], False)
    finishes = [
        p["choices"][0]["finish_reason"] for p in payloads if isinstance(p, dict) and p["choices"]
    ]
    assert finishes[-1] == finish
    assert finishes[:-1] == [None] * (len(finishes) - 1)


def test_blocked_prompt_in_stream_is_a_400_before_content() -> None:
    line = (
        b'{"promptFeedback":{"blockReason":"PROHIBITED_CONTENT"},'
        b'"usageMetadata":{"promptTokenCount":8}}'
    )
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    with pytest.raises(StreamError) as info:
        translator.feed(gemini_sse([line], ["\r\n\r\n"]))
    assert not translator.has_content
    assert (info.value.info.outcome, info.value.info.status) == (Outcome.IGNORED, 400)
    assert info.value.info.body["error"]["code"] == "content_filter"


def test_error_event_after_content_keeps_the_content_then_raises() -> None:
    error = b'{"error":{"code":503,"message":"The model is overloaded.","status":"UNAVAILABLE"}}'
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    payloads = translator.feed(gemini_sse([TEXT_LINES[0], error], ["\n\n"]))
    assert [orjson.loads(p)["choices"][0]["delta"] for p in payloads] == [
        {"role": "assistant", "content": ""},
        {"content": "Hello"},
    ]
    with pytest.raises(StreamError) as info:
        translator.finish()
    assert (info.value.info.outcome, info.value.info.transient) == (Outcome.FAILURE, True)
    validate("ErrorResponse", info.value.info.body)


def test_error_event_before_content_raises_at_once() -> None:
    error = b'{"error":{"code":429,"message":"Resource exhausted","status":"RESOURCE_EXHAUSTED"}}'
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    with pytest.raises(StreamError) as info:
        translator.feed(gemini_sse([error], ["\n\n"]))
    assert info.value.info.outcome is Outcome.RATE_LIMITED


def test_missing_finish_reason_is_a_failure() -> None:
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    payloads = translator.feed(gemini_sse(TEXT_LINES[:2], ["\r\n\r\n"]))
    assert len(payloads) == 3
    with pytest.raises(StreamError) as info:
        translator.finish()
    assert info.value.info.outcome is Outcome.FAILURE
    assert info.value.info.body["error"]["code"] == "upstream_stream_truncated"


def test_malformed_stream_event_is_a_failure() -> None:
    translator = adapter().stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    with pytest.raises(StreamError) as info:
        translator.feed(b"data: {oops\n\n")
    assert info.value.info.outcome is Outcome.FAILURE


def test_last_event_without_blank_line_still_counts() -> None:
    stream = gemini_sse(TEXT_LINES, ["\n\n"]).rstrip(b"\n")
    assert run_stream([stream], False) == text_expected(False)
