"""OpenAI <-> Anthropic Messages: every mapping row and pitfall of docs/wire-formats.md."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.model import Deployment, HealthCheck, Provider
from proxy.core.errors import InvalidRequest, UnsupportedParameter
from proxy.core.outcome import Outcome
from proxy.providers.anthropic import AnthropicAdapter, anthropic_tool_id, translate_request
from proxy.providers.base import Endpoint, StreamError
from tests.openapi import validate, validate_payloads

GOLDEN = Path(__file__).resolve().parents[1] / "golden"
NOW = 1_700_000_000
CLIENT_MODEL = "claude-client"
PROVIDER = Provider(
    name="anthropic",
    type="anthropic",
    base_url="https://api.anthropic.com",
    api_key_env="ANTHROPIC_API_KEY",
    headers={"anthropic-beta": "prompt-caching-2024-07-31"},
)
DEPLOYMENT = Deployment(
    model=CLIENT_MODEL, provider="anthropic", upstream_model="claude-sonnet-4-5"
)
ADAPTER = AnthropicAdapter(clock=lambda: NOW + 0.75)
WEIRD_ID = "call.weird/id="
WEIRD_ID_SANITIZED = "call_weird_id__1c57f2fa"


def translate(body: dict[str, Any], stream: bool = False) -> dict[str, Any]:
    return translate_request(body, "claude-sonnet-4-5", stream)


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


def text(value: str) -> dict[str, Any]:
    return {"type": "text", "text": value}


# --- request: messages ------------------------------------------------------


def test_system_lifted_roles_merged_empty_dropped_and_scalars_mapped() -> None:
    body = {
        "model": CLIENT_MODEL,
        "messages": [
            {"role": "system", "content": "You are terse."},
            user("Hi"),
            {"role": "user", "content": [text("there"), text("")]},
            {"role": "developer", "content": [text("Answer in French.")]},
            {"role": "assistant", "content": "Bonjour"},
            {"role": "assistant", "content": ""},
            {"role": "system", "content": ""},
            user("Again"),
        ],
        "max_tokens": 100,
        "temperature": 1.7,
        "top_p": 0.9,
        "stop": "END",
        "user": "u-42",
        "seed": 7,
        "n": 1,
        "presence_penalty": 0,
        "frequency_penalty": 0.0,
        "logprobs": False,
        "stream_options": {"include_usage": True},
    }
    before = orjson.dumps(body)
    assert translate(body) == {
        "model": "claude-sonnet-4-5",
        "system": "You are terse.\nAnswer in French.",
        "messages": [
            {"role": "user", "content": [text("Hi"), text("there")]},
            {"role": "assistant", "content": [text("Bonjour")]},
            {"role": "user", "content": [text("Again")]},
        ],
        "max_tokens": 100,
        "temperature": 1.0,
        "top_p": 0.9,
        "stop_sequences": ["END"],
        "metadata": {"user_id": "u-42"},
    }
    assert orjson.dumps(body) == before  # the client's body is never mutated


def test_message_left_empty_lets_its_neighbours_merge() -> None:
    body = {"messages": [user("a"), {"role": "assistant", "content": [text("")]}, user("b")]}
    assert translate(body)["messages"] == [{"role": "user", "content": [text("a"), text("b")]}]


def test_images_data_and_https_urls() -> None:
    body = {
        "messages": [
            {
                "role": "user",
                "content": [
                    text("What is this?"),
                    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0K"}},
                    {
                        "type": "image_url",
                        "image_url": {"url": "https://example.com/cat.jpg", "detail": "high"},
                    },
                ],
            }
        ]
    }
    assert translate(body)["messages"] == [
        {
            "role": "user",
            "content": [
                text("What is this?"),
                {
                    "type": "image",
                    "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0K"},
                },
                {"type": "image", "source": {"type": "url", "url": "https://example.com/cat.jpg"}},
            ],
        }
    ]


def test_pdf_file_part_becomes_a_document_block() -> None:
    part = {
        "type": "file",
        "file": {"filename": "a.pdf", "file_data": "data:application/pdf;base64,JVBE"},
    }
    body = {"messages": [{"role": "user", "content": [part]}]}
    assert translate(body)["messages"][0]["content"] == [
        {
            "type": "document",
            "source": {"type": "base64", "media_type": "application/pdf", "data": "JVBE"},
        }
    ]


@pytest.mark.parametrize(
    ("content", "param"),
    [
        ([{"type": "image_url", "image_url": {"url": "ftp://x/y.png"}}], "messages[0].content[0]"),
        (
            [{"type": "image_url", "image_url": {"url": "data:image/png,raw"}}],
            "messages[0].content[0]",
        ),
        ([{"type": "input_audio", "input_audio": {}}], "messages[0].content[0].type"),
        ([{"type": "file", "file": {"file_id": "file-1"}}], "messages[0].content[0]"),
        (42, "messages[0].content"),
    ],
)
def test_untranslatable_content_is_a_400_naming_it(content: Any, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate({"messages": [{"role": "user", "content": content}]})
    assert info.value.param == param
    assert info.value.status == 400


def test_tool_calls_results_first_and_ids_rewritten_consistently() -> None:
    calls = [
        {
            "id": "call_abc123",
            "type": "function",
            "function": {"name": "get_weather", "arguments": '{"location":"Paris"}'},
        },
        {"id": WEIRD_ID, "type": "function", "function": {"name": "get_time", "arguments": ""}},
        {
            "id": "call_3",
            "type": "function",
            "function": {"name": "broken", "arguments": "{not json"},
        },
        {"id": "call_4", "type": "function", "function": {"name": "listy", "arguments": "[1, 2]"}},
    ]
    body = {
        "messages": [
            user("Weather in Paris and time?"),
            {"role": "assistant", "content": None, "tool_calls": calls},
            {"role": "tool", "tool_call_id": "call_abc123", "content": "18C"},
            {"role": "tool", "tool_call_id": WEIRD_ID, "content": [text("12:"), text("00")]},
            {"role": "tool", "tool_call_id": "call_3", "content": ""},
            {"role": "tool", "tool_call_id": "call_4", "content": "ok"},
            user("Thanks"),
        ],
        "tools": [
            {
                "type": "function",
                "function": {
                    "name": "get_weather",
                    "description": "Weather",
                    "parameters": {
                        "type": "object",
                        "properties": {"location": {"type": "string"}},
                        "required": ["location"],
                    },
                    "strict": True,
                },
            },
            {"type": "function", "function": {"name": "get_time"}},
        ],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }
    assert translate(body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [
            {"role": "user", "content": [text("Weather in Paris and time?")]},
            {
                "role": "assistant",
                "content": [
                    {
                        "type": "tool_use",
                        "id": "call_abc123",
                        "name": "get_weather",
                        "input": {"location": "Paris"},
                    },
                    {"type": "tool_use", "id": WEIRD_ID_SANITIZED, "name": "get_time", "input": {}},
                    {"type": "tool_use", "id": "call_3", "name": "broken", "input": {}},
                    {"type": "tool_use", "id": "call_4", "name": "listy", "input": {}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_abc123",
                        "content": "18C",
                        "is_error": False,
                    },
                    {
                        "type": "tool_result",
                        "tool_use_id": WEIRD_ID_SANITIZED,
                        "content": "12:00",
                        "is_error": False,
                    },
                    {"type": "tool_result", "tool_use_id": "call_3", "is_error": False},
                    {
                        "type": "tool_result",
                        "tool_use_id": "call_4",
                        "content": "ok",
                        "is_error": False,
                    },
                    text("Thanks"),
                ],
            },
        ],
        "tools": [
            {
                "name": "get_weather",
                "description": "Weather",
                "input_schema": {
                    "type": "object",
                    "properties": {"location": {"type": "string"}},
                    "required": ["location"],
                },
            },
            {"name": "get_time", "input_schema": {"type": "object", "properties": {}}},
        ],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
    }


def test_tool_results_go_ahead_of_text_already_in_the_turn() -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    body = {
        "messages": [
            {"role": "assistant", "tool_calls": [call]},
            user("by the way"),
            {"role": "tool", "tool_call_id": "c1", "content": "done"},
        ]
    }
    assert translate(body)["messages"][1] == {
        "role": "user",
        "content": [
            {"type": "tool_result", "tool_use_id": "c1", "content": "done", "is_error": False},
            text("by the way"),
        ],
    }


def test_tool_id_rewrite_is_stable_and_collision_free() -> None:
    assert anthropic_tool_id("toolu_01A-b") == "toolu_01A-b"
    assert anthropic_tool_id(WEIRD_ID) == WEIRD_ID_SANITIZED
    assert anthropic_tool_id("call.weird/id?") != WEIRD_ID_SANITIZED
    for odd in ("a b", "é", "x" * 3 + "/" + "y", ""):
        assert re.fullmatch(r"[a-zA-Z0-9_-]+", anthropic_tool_id(odd))


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}
]


@pytest.mark.parametrize(
    ("choice", "parallel", "expected"),
    [
        ("auto", None, {"type": "auto"}),
        ("required", None, {"type": "any"}),
        ("none", None, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            None,
            {"type": "tool", "name": "get_weather"},
        ),
        (None, None, None),
        ("auto", False, {"type": "auto", "disable_parallel_tool_use": True}),
        (None, False, {"type": "auto", "disable_parallel_tool_use": True}),
        ("none", False, {"type": "none"}),
        (
            {"type": "function", "function": {"name": "get_weather"}},
            False,
            {"type": "tool", "name": "get_weather", "disable_parallel_tool_use": True},
        ),
        ("auto", True, {"type": "auto"}),
    ],
)
def test_tool_choice_and_parallel_tool_calls(choice: Any, parallel: Any, expected: Any) -> None:
    body: dict[str, Any] = {"messages": [user("x")], "tools": TOOLS}
    if choice is not None:
        body["tool_choice"] = choice
    if parallel is not None:
        body["parallel_tool_calls"] = parallel
    assert translate(body).get("tool_choice") == expected


def test_tool_choice_without_tools_is_dropped() -> None:
    out = translate({"messages": [user("x")], "tool_choice": "none", "parallel_tool_calls": False})
    assert "tool_choice" not in out
    assert "tools" not in out


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        ({}, 4096),
        ({"max_tokens": 100}, 100),
        ({"max_completion_tokens": 50, "max_tokens": 100}, 50),
        ({"max_completion_tokens": 0}, 0),
    ],
)
def test_max_tokens_default_and_precedence(fields: dict[str, Any], expected: int) -> None:
    assert translate({"messages": [user("x")], **fields})["max_tokens"] == expected


@pytest.mark.parametrize(("given", "sent"), [(0, 0.0), (0.3, 0.3), (1, 1.0), (2, 1.0), (-1, 0.0)])
def test_temperature_clamped_to_0_1(given: float, sent: float) -> None:
    assert translate({"messages": [user("x")], "temperature": given})["temperature"] == sent


@pytest.mark.parametrize(
    ("stop", "expected"), [("END", ["END"]), (["a", "b"], ["a", "b"]), ([], None), (None, None)]
)
def test_stop_sequences(stop: Any, expected: Any) -> None:
    assert translate({"messages": [user("x")], "stop": stop}).get("stop_sequences") == expected


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 3),
        ("presence_penalty", 0.5),
        ("frequency_penalty", -0.5),
        ("logit_bias", {"50256": -100}),
        ("functions", [{"name": "f"}]),
        ("function_call", "auto"),
    ],
)
def test_unsupported_fields_are_a_400_naming_them(field: str, value: Any) -> None:
    with pytest.raises(UnsupportedParameter) as info:
        translate({"messages": [user("x")], field: value})
    assert info.value.param == field
    assert info.value.to_dict()["error"]["code"] == "unsupported_parameter"
    validate("ErrorResponse", info.value.to_dict())


def test_audio_output_is_a_400() -> None:
    with pytest.raises(UnsupportedParameter) as info:
        translate({"messages": [user("x")], "modalities": ["text", "audio"]})
    assert info.value.param == "modalities"


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": "hi"}, "messages"),
        ({"messages": [{"role": "critic", "content": "x"}]}, "messages[0].role"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
        (
            {"messages": [{"role": "assistant", "tool_calls": [{"function": {}}]}]},
            "messages[0].tool_calls[0]",
        ),
        ({"messages": [user("x")], "tools": [{"type": "custom", "custom": {}}]}, "tools[0].type"),
        ({"messages": [user("x")], "tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"messages": [user("x")], "temperature": "hot"}, "temperature"),
    ],
)
def test_malformed_requests_are_a_400_naming_the_field(body: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        translate(body)
    assert info.value.param == param
    validate("ErrorResponse", info.value.to_dict())


def test_response_format_is_a_system_instruction() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    body = {
        "messages": [{"role": "system", "content": "Be precise."}, user("x")],
        "response_format": {"type": "json_schema", "json_schema": {"name": "r", "schema": schema}},
    }
    assert translate(body)["system"] == (
        "Be precise.\nRespond with a single valid JSON object and nothing else. "
        'It must match this JSON Schema: {"type":"object","properties":{"a":{"type":"integer"}}}'
    )
    plain = translate({"messages": [user("x")], "response_format": {"type": "json_object"}})
    assert plain["system"] == "Respond with a single valid JSON object and nothing else."
    assert "system" not in translate({"messages": [user("x")], "response_format": {"type": "text"}})


def test_prefill_loses_trailing_whitespace() -> None:
    body = {"messages": [user("Q"), {"role": "assistant", "content": "The answer is "}]}
    assert translate(body)["messages"][-1] == {
        "role": "assistant",
        "content": [text("The answer is")],
    }
    blank = {"messages": [user("Q"), {"role": "assistant", "content": [text(" ")]}]}
    assert translate(blank)["messages"] == [{"role": "user", "content": [text("Q")]}]


def test_stream_flag() -> None:
    assert translate({"messages": [user("x")]}, stream=True)["stream"] is True
    assert "stream" not in translate({"messages": [user("x")], "stream": True})


# --- adapter: requests ------------------------------------------------------


def test_build_request_url_headers_and_body() -> None:
    body = {"model": CLIENT_MODEL, "messages": [user("hi")], "stream": True}
    request = ADAPTER.build_request(Endpoint.CHAT, body, PROVIDER, DEPLOYMENT, "sk-ant-1", True)
    assert request.method == "POST"
    assert request.url == "https://api.anthropic.com/v1/messages"
    assert dict(request.headers) == {
        "content-type": "application/json",
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "prompt-caching-2024-07-31",
        "x-api-key": "sk-ant-1",
    }
    assert request.body is not None
    assert orjson.loads(request.body) == {
        "model": "claude-sonnet-4-5",
        "max_tokens": 4096,
        "messages": [{"role": "user", "content": [text("hi")]}],
        "stream": True,
    }
    keyless = ADAPTER.build_request(Endpoint.CHAT, body, PROVIDER, DEPLOYMENT, None, False)
    assert "x-api-key" not in keyless.headers


@pytest.mark.parametrize("endpoint", [Endpoint.COMPLETIONS, Endpoint.EMBEDDINGS])
def test_other_endpoints_are_a_400(endpoint: Endpoint) -> None:
    with pytest.raises(InvalidRequest) as info:
        ADAPTER.build_request(endpoint, {"prompt": "x"}, PROVIDER, DEPLOYMENT, "k", False)
    assert "Anthropic" in info.value.message
    assert info.value.status == 400


def test_health_request() -> None:
    request = ADAPTER.health_request(PROVIDER, "sk-ant-1")
    assert (request.method, request.url, request.body) == (
        "GET",
        "https://api.anthropic.com/v1/models",
        None,
    )
    assert request.headers["x-api-key"] == "sk-ant-1"
    assert request.headers["anthropic-version"] == "2023-06-01"
    custom = Provider(
        name="a",
        type="anthropic",
        base_url="http://h",
        api_key_env=None,
        health_check=HealthCheck(path="/up"),
    )
    assert ADAPTER.health_request(custom, None).url == "http://h/up"


# --- responses --------------------------------------------------------------


def message(content: list[dict[str, Any]], stop_reason: str | None = "end_turn") -> bytes:
    return orjson.dumps(
        {
            "id": "msg_01",
            "type": "message",
            "role": "assistant",
            "model": "claude-sonnet-4-5",
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 10,
                "cache_creation_input_tokens": 5,
                "cache_read_input_tokens": 20,
                "output_tokens": 7,
            },
        }
    )


def parse(body: bytes) -> dict[str, Any]:
    out = ADAPTER.parse_response(Endpoint.CHAT, body, DEPLOYMENT, CLIENT_MODEL)
    validate("CreateChatCompletionResponse", out)
    return out


def test_parse_text_and_tool_use_with_cache_usage() -> None:
    content = [
        {"type": "thinking", "thinking": "hmm", "signature": "sig"},
        text("Let me check."),
        {
            "type": "tool_use",
            "id": "toolu_01",
            "name": "get_weather",
            "input": {"location": "Paris"},
        },
    ]
    assert parse(message(content, "tool_use")) == {
        "id": "chatcmpl-msg_01",
        "object": "chat.completion",
        "created": NOW,
        "model": CLIENT_MODEL,
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me check.",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "toolu_01",
                            "type": "function",
                            "function": {
                                "name": "get_weather",
                                "arguments": '{"location":"Paris"}',
                            },
                        }
                    ],
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 35,
            "completion_tokens": 7,
            "total_tokens": 42,
            "prompt_tokens_details": {"cached_tokens": 20},
        },
    }


def test_parse_only_tool_calls_has_null_content() -> None:
    content = [{"type": "tool_use", "id": "toolu_02", "name": "f", "input": {}}]
    msg = parse(message(content, "tool_use"))["choices"][0]["message"]
    assert msg["content"] is None
    assert msg["tool_calls"][0]["function"]["arguments"] == "{}"


def test_parse_text_blocks_are_concatenated() -> None:
    msg = parse(message([text("a"), text("b")]))["choices"][0]["message"]
    assert msg == {"role": "assistant", "content": "ab", "refusal": None}


@pytest.mark.parametrize(
    ("stop_reason", "finish"),
    [
        ("end_turn", "stop"),
        ("stop_sequence", "stop"),
        ("max_tokens", "length"),
        ("tool_use", "tool_calls"),
        ("refusal", "content_filter"),
        ("pause_turn", "stop"),
        (None, "stop"),
        ("a_reason_from_the_future", "stop"),
    ],
)
def test_stop_reasons_never_leak(stop_reason: str | None, finish: str) -> None:
    assert parse(message([text("x")], stop_reason))["choices"][0]["finish_reason"] == finish


@pytest.mark.parametrize("body", [b"<html>", b"[1]", b""])
def test_malformed_response_is_a_failure(body: bytes) -> None:
    with pytest.raises(StreamError) as info:
        ADAPTER.parse_response(Endpoint.CHAT, body, DEPLOYMENT, CLIENT_MODEL)
    assert info.value.info.outcome is Outcome.FAILURE
    validate("ErrorResponse", info.value.info.body)


# --- errors -----------------------------------------------------------------


def anthropic_error(kind: str, msg: str) -> bytes:
    return orjson.dumps({"type": "error", "error": {"type": kind, "message": msg}})


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
            529,
            {},
            anthropic_error("overloaded_error", "Overloaded"),
            Outcome.FAILURE,
            503,
            "overloaded_error",
            True,
            False,
            None,
        ),
        (
            429,
            {"retry-after": "7"},
            anthropic_error("rate_limit_error", "Slow down"),
            Outcome.RATE_LIMITED,
            429,
            "rate_limit_exceeded",
            False,
            False,
            7.0,
        ),
        (
            429,
            {"Retry-After-Ms": "1500"},
            anthropic_error("rate_limit_error", "x"),
            Outcome.RATE_LIMITED,
            429,
            "rate_limit_exceeded",
            False,
            False,
            1.5,
        ),
        (
            400,
            {},
            anthropic_error("invalid_request_error", "messages: field required"),
            Outcome.IGNORED,
            400,
            "invalid_request_error",
            False,
            False,
            None,
        ),
        (
            400,
            {},
            anthropic_error(
                "invalid_request_error", "prompt is too long: 215000 tokens > 200000 maximum"
            ),
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
            anthropic_error(
                "invalid_request_error",
                "Your credit balance is too low to access the Anthropic API.",
            ),
            Outcome.FAILURE,
            429,
            "insufficient_quota",
            False,
            False,
            None,
        ),
        (
            401,
            {},
            anthropic_error("authentication_error", "invalid x-api-key"),
            Outcome.FAILURE,
            401,
            "authentication_error",
            False,
            False,
            None,
        ),
        (
            403,
            {},
            anthropic_error("permission_error", "no access"),
            Outcome.FAILURE,
            403,
            "permission_error",
            False,
            False,
            None,
        ),
        (
            404,
            {},
            anthropic_error("not_found_error", "model: claude-9"),
            Outcome.IGNORED,
            404,
            "model_not_found",
            False,
            False,
            None,
        ),
        (
            413,
            {},
            anthropic_error("request_too_large", "too big"),
            Outcome.IGNORED,
            413,
            "request_too_large",
            False,
            False,
            None,
        ),
        (
            500,
            {},
            anthropic_error("api_error", "Internal server error"),
            Outcome.FAILURE,
            500,
            "api_error",
            True,
            False,
            None,
        ),
        (
            503,
            {"retry-after": "120"},
            b"<html>bad gateway</html>",
            Outcome.FAILURE,
            503,
            None,
            True,
            False,
            120.0,
        ),
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
    info = ADAPTER.classify_error(status, headers, body)
    assert (info.outcome, info.status, info.transient, info.context_window, info.retry_after) == (
        outcome,
        client_status,
        transient,
        context,
        retry,
    )
    assert info.body["error"]["code"] == code
    assert info.body["error"]["message"].startswith("Anthropic API error")
    validate("ErrorResponse", info.body)


def test_classify_overloaded_error_body_is_a_server_error() -> None:
    info = ADAPTER.classify_error(529, {}, anthropic_error("overloaded_error", "Overloaded"))
    assert info.body == {
        "error": {
            "message": "Anthropic API error (overloaded_error): Overloaded",
            "type": "server_error",
            "param": None,
            "code": "overloaded_error",
        }
    }


# --- streams ----------------------------------------------------------------


def chunk(
    delta: dict[str, Any], finish: str | None = None, *, msg_id: str, usage: bool
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": f"chatcmpl-{msg_id}",
        "object": "chat.completion.chunk",
        "created": NOW,
        "model": CLIENT_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    if usage:
        out["usage"] = None
    return out


def run_stream(pieces: list[bytes], include_usage: bool) -> list[str]:
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, include_usage)
    payloads: list[str] = []
    for piece in pieces:
        payloads.extend(translator.feed(piece))
    payloads.extend(translator.finish())
    return payloads


def decoded(payloads: list[str]) -> list[Any]:
    validate_payloads(payloads)
    assert all("\n" not in p for p in payloads)
    return [p if p == "[DONE]" else orjson.loads(p) for p in payloads]


TEXT_STREAM = (GOLDEN / "anthropic_text.sse").read_bytes()
TOOLS_STREAM = (GOLDEN / "anthropic_tools.sse").read_bytes()
TEXT_ID = "msg_01XFDUDYJgAACzvnptvVoYEL"
TOOLS_ID = "msg_014p7gG3wDgGV9EUtLvnow3U"


def text_expected(include_usage: bool) -> list[Any]:
    def c(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return chunk(delta, finish, msg_id=TEXT_ID, usage=include_usage)

    out: list[Any] = [
        c({"role": "assistant", "content": ""}),
        c({"content": "Hello"}),
        c({"content": ", wörld ✓"}),
        c({}, "stop"),
    ]
    if include_usage:
        out.append(
            {
                "id": f"chatcmpl-{TEXT_ID}",
                "object": "chat.completion.chunk",
                "created": NOW,
                "model": CLIENT_MODEL,
                "choices": [],
                "usage": {
                    "prompt_tokens": 135,
                    "completion_tokens": 15,
                    "total_tokens": 150,
                    "prompt_tokens_details": {"cached_tokens": 100},
                },
            }
        )
    return [*out, "[DONE]"]


def tools_expected() -> list[Any]:
    def c(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        return chunk(delta, finish, msg_id=TOOLS_ID, usage=True)

    weather = {
        "index": 0,
        "id": "toolu_01T1x1fJ34qAmk2tNTrN7Up6",
        "type": "function",
        "function": {"name": "get_weather", "arguments": ""},
    }
    time_call = {
        "index": 1,
        "id": "toolu_01VHqcTBnMqJ4cU8gaT53wHY",
        "type": "function",
        "function": {"name": "get_time", "arguments": ""},
    }
    return [
        c({"role": "assistant", "content": ""}),
        c({"content": "Let me check."}),
        c({"tool_calls": [weather]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": '{"location": "Par'}}]}),
        c({"tool_calls": [{"index": 0, "function": {"arguments": 'is"}'}}]}),
        c({"tool_calls": [time_call]}),
        c({"tool_calls": [{"index": 1, "function": {"arguments": '{"tz":"CET"}'}}]}),
        c({}, "tool_calls"),
        {
            "id": f"chatcmpl-{TOOLS_ID}",
            "object": "chat.completion.chunk",
            "created": NOW,
            "model": CLIENT_MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": 2520,
                "completion_tokens": 89,
                "total_tokens": 2609,
                "prompt_tokens_details": {"cached_tokens": 2048},
            },
        },
        "[DONE]",
    ]


@pytest.mark.parametrize("include_usage", [True, False])
def test_text_stream(include_usage: bool) -> None:
    assert decoded(run_stream([TEXT_STREAM], include_usage)) == text_expected(include_usage)


def test_text_stream_state_and_usage() -> None:
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    head, _, rest = TEXT_STREAM.partition(b"event: content_block_delta")
    assert translator.feed(head) == []  # message_start, block start, ping: held
    assert not translator.has_content
    assert translator.usage is not None
    assert translator.usage.prompt_tokens == 135
    payloads = translator.feed(b"event: content_block_delta" + rest)
    assert translator.has_content
    assert translator.finished
    assert payloads[-1] == "[DONE]"
    assert translator.finish() == []  # everything was sent at message_stop
    assert translator.usage is not None
    assert (translator.usage.prompt_tokens, translator.usage.completion_tokens) == (135, 15)


def test_parallel_tool_calls_thinking_and_cache_usage() -> None:
    assert decoded(run_stream([TOOLS_STREAM], True)) == tools_expected()


@settings(max_examples=60, deadline=None)
@given(
    points=st.lists(st.integers(min_value=0, max_value=len(TOOLS_STREAM)), max_size=12),
    crlf=st.booleans(),
)
def test_property_any_split_gives_the_same_payloads(points: list[int], crlf: bool) -> None:
    stream = TOOLS_STREAM.replace(b"\n", b"\r\n") if crlf else TOOLS_STREAM
    cuts = sorted(set(points))
    pieces = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]
    assert decoded(run_stream(pieces, True)) == tools_expected()


ERROR_EVENT = (
    b"event: error\n"
    b'data: {"type":"error","error":{"type":"overloaded_error","message":"Overloaded"}}\n\n'
)
START = TEXT_STREAM.split(b"event: content_block_start")[0]


def test_error_before_content_fails_over_cleanly() -> None:
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    assert translator.feed(START + b'event: ping\ndata: {"type": "ping"}\n\n') == []
    with pytest.raises(StreamError) as info:
        translator.feed(ERROR_EVENT)
    assert not translator.has_content
    assert info.value.info.outcome is Outcome.FAILURE
    assert info.value.info.transient
    assert info.value.info.status == 503
    validate("ErrorResponse", info.value.info.body)


def test_error_after_content_keeps_the_content_then_raises() -> None:
    delta = (
        b"event: content_block_delta\n"
        b'data: {"type":"content_block_delta","index":0,'
        b'"delta":{"type":"text_delta","text":"Hel"}}\n\n'
    )
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    payloads = translator.feed(START + delta + ERROR_EVENT)
    assert decoded(payloads) == [
        chunk({"role": "assistant", "content": ""}, msg_id=TEXT_ID, usage=False),
        chunk({"content": "Hel"}, msg_id=TEXT_ID, usage=False),
    ]
    assert translator.has_content
    with pytest.raises(StreamError) as info:
        translator.finish()
    assert info.value.info.outcome is Outcome.FAILURE
    with pytest.raises(StreamError):
        translator.feed(b"")


def test_in_stream_rate_limit_and_invalid_request_errors() -> None:
    for kind, outcome in (
        ("rate_limit_error", Outcome.RATE_LIMITED),
        ("invalid_request_error", Outcome.IGNORED),
    ):
        translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
        event = b"event: error\ndata: " + anthropic_error(kind, "x") + b"\n\n"
        with pytest.raises(StreamError) as info:
            translator.feed(START + event)
        assert info.value.info.outcome is outcome


def test_missing_message_stop_is_a_failure() -> None:
    cut = TEXT_STREAM.split(b"event: message_stop")[0]
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, True)
    payloads = translator.feed(cut)
    assert decoded(payloads) == text_expected(True)[:4]  # content and the finish chunk, no usage
    assert not translator.finished
    with pytest.raises(StreamError) as info:
        translator.finish()
    assert info.value.info.outcome is Outcome.FAILURE
    assert info.value.info.body["error"]["code"] == "upstream_stream_truncated"
    validate("ErrorResponse", info.value.info.body)


def test_malformed_event_is_a_failure() -> None:
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    with pytest.raises(StreamError) as info:
        translator.feed(b"event: message_start\ndata: {not json\n\n")
    assert info.value.info.outcome is Outcome.FAILURE


def test_trailing_message_stop_without_blank_line_still_finishes() -> None:
    stream = TEXT_STREAM.rstrip(b"\n")
    assert decoded(run_stream([stream], False)) == text_expected(False)


def test_stop_without_a_stop_reason_is_a_truncated_stream() -> None:
    """message_stop with no stop_reason before it: the generation died, not a complete answer."""
    delta = b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    delta += b'"delta":{"type":"text_delta","text":"Hi"}}\n\n'
    stream = START + delta + b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
    translator = ADAPTER.stream_translator(Endpoint.CHAT, DEPLOYMENT, CLIENT_MODEL, False)
    payloads = translator.feed(stream)  # the text before the end is still delivered
    assert [orjson.loads(p)["choices"][0]["delta"].get("content") for p in payloads] == ["", "Hi"]
    with pytest.raises(StreamError) as info:
        translator.finish()
    assert info.value.info.body["error"]["code"] == "upstream_stream_truncated"
    assert not translator.finished


def test_a_tool_that_is_not_an_object_is_a_400_naming_it() -> None:
    from proxy.core.errors import InvalidRequest
    from proxy.providers.anthropic import translate_request

    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "tools": ["x"]}
    with pytest.raises(InvalidRequest) as info:
        translate_request(body, "claude", False)
    assert info.value.param == "tools[0].type"


def test_extended_thinking_commits_the_stream_without_leaking_thinking() -> None:
    from proxy.providers.anthropic import AnthropicStreamTranslator

    start = {
        "type": "message_start",
        "message": {"id": "msg_1", "usage": {"input_tokens": 3, "output_tokens": 0}},
    }
    thinking = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "thinking_delta", "thinking": "let me think"},
    }
    stream = b"".join(
        f"event: {e['type']}\ndata: {orjson.dumps(e).decode()}\n\n".encode()
        for e in (start, thinking)
    )
    translator = AnthropicStreamTranslator("claude", include_usage=False, created=1)
    payloads = translator.feed(stream)
    assert translator.has_content  # long thinking never runs into the first-token deadline
    assert len(payloads) == 1
    assert orjson.loads(payloads[0])["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "let me think" not in payloads[0]
