"""The pure translation of Anthropic Messages clients (proxy.providers.anthropic_inbound)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.core.errors import InvalidRequest, UnsupportedParameter, UpstreamHTTPError
from proxy.providers import anthropic_inbound as inbound

BASE: dict[str, Any] = {
    "model": "claude-x",
    "max_tokens": 100,
    "messages": [{"role": "user", "content": "hi"}],
}


def _events(data: bytes) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for frame in data.decode().split("\n\n"):
        if not frame:
            continue
        name, payload = frame.split("\n")
        out.append((name.removeprefix("event: "), orjson.loads(payload.removeprefix("data: "))))
    return out


def _chunk(delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any) -> bytes:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-abc", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    return b"data: " + orjson.dumps({**body, "choices": choices, **extra}) + b"\n\n"


# --- request -------------------------------------------------------------


def test_minimal_request() -> None:
    assert inbound.to_chat(BASE) == {
        "model": "claude-x",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": "hi"}],
    }


def test_system_blocks_sampling_stop_metadata_stream() -> None:
    chat = inbound.to_chat(
        {
            **BASE,
            "system": [{"type": "text", "text": "One."}, {"type": "text", "text": "Two."}],
            "temperature": 0.3,
            "top_p": 0.5,
            "top_k": 5,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u1"},
            "stream": True,
        }
    )
    assert chat["messages"][0] == {"role": "system", "content": "One.\nTwo."}
    assert chat["temperature"] == 0.3
    assert chat["top_p"] == 0.5
    assert "top_k" not in chat  # no OpenAI field
    assert chat["stop"] == ["END"]
    assert chat["user"] == "u1"
    assert chat["stream"] is True
    assert chat["stream_options"] == {"include_usage": True}


def test_images_base64_and_url() -> None:
    chat = inbound.to_chat(
        {
            **BASE,
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "look"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAA"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}},
                    ],
                }
            ],
        }
    )
    assert chat["messages"][0]["content"] == [
        {"type": "text", "text": "look"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAA"}},
        {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
    ]


def test_tool_use_and_results_round_trip() -> None:
    chat = inbound.to_chat(
        {
            **BASE,
            "tools": [{"name": "f", "description": "d", "input_schema": {"type": "object"}}],
            "tool_choice": {"type": "tool", "name": "f", "disable_parallel_tool_use": True},
            "messages": [
                {"role": "user", "content": "go"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "hmm", "signature": "s"},
                        {"type": "text", "text": "calling"},
                        {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {"a": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "and then?"},
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": "42"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "toolu_2",
                            "content": [{"type": "text", "text": "boom"}],
                            "is_error": True,
                        },
                    ],
                },
            ],
        }
    )
    assert chat["tools"] == [
        {
            "type": "function",
            "function": {"name": "f", "parameters": {"type": "object"}, "description": "d"},
        }
    ]
    assert chat["tool_choice"] == {"type": "function", "function": {"name": "f"}}
    assert chat["parallel_tool_calls"] is False
    assistant = chat["messages"][1]
    assert assistant["content"] == "calling"
    assert assistant["tool_calls"] == [
        {"id": "toolu_1", "type": "function", "function": {"name": "f", "arguments": '{"a":1}'}}
    ]
    # Tool results first (they answer the calls), then the rest of the user turn.
    assert chat["messages"][2:] == [
        {"role": "tool", "tool_call_id": "toolu_1", "content": "42"},
        {"role": "tool", "tool_call_id": "toolu_2", "content": "Error: boom"},
        {"role": "user", "content": "and then?"},
    ]


@pytest.mark.parametrize(
    ("choice", "expected"),
    [({"type": "auto"}, "auto"), ({"type": "any"}, "required"), ({"type": "none"}, "none")],
)
def test_tool_choice_modes(choice: dict[str, Any], expected: str) -> None:
    tools = [{"name": "f", "input_schema": {"type": "object"}}]
    assert inbound.to_chat({**BASE, "tools": tools, "tool_choice": choice})["tool_choice"] == (
        expected
    )


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"model": ""}, "model"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"temperature": 1.5}, "temperature"),
        ({"stop_sequences": "END"}, "stop_sequences"),
        ({"thinking": {"type": "enabled", "budget_tokens": 10}}, "thinking.budget_tokens"),
        ({"thinking": {"type": "enabled", "budget_tokens": 2048}}, "max_tokens"),
        ({"tool_choice": {"type": "sometimes"}}, "tool_choice.type"),
    ],
)
def test_bad_requests_name_the_field(change: dict[str, Any], param: str) -> None:
    with pytest.raises(InvalidRequest) as caught:
        inbound.to_chat({**BASE, **change})
    assert caught.value.param == param


def test_server_tools_are_unsupported() -> None:
    with pytest.raises(UnsupportedParameter):
        inbound.to_chat({**BASE, "tools": [{"type": "web_search_20250305", "name": "web_search"}]})


def test_thinking_is_accepted() -> None:
    chat = inbound.to_chat(
        {**BASE, "max_tokens": 4096, "thinking": {"type": "enabled", "budget_tokens": 1024}}
    )
    assert "thinking" not in chat


def test_count_body_keeps_only_counted_fields() -> None:
    body = {**BASE, "system": "s", "stream": True, "metadata": {}}
    assert inbound.count_body(body, "up") == {
        "model": "up",
        "messages": BASE["messages"],
        "system": "s",
    }


# --- replies -------------------------------------------------------------


def test_reply_with_thinking_text_and_tools() -> None:
    reply = {
        "id": "chatcmpl-msg_01",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "reasoning_content": "let me think",
                    "reasoning_signature": "sig",
                    "content": "Sure.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "f", "arguments": '{"x":2}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "g", "arguments": "not json"},
                        },
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 10,
            "completion_tokens": 5,
            "prompt_tokens_details": {"cached_tokens": 4},
        },
        "circuit_breaker": {"provider": "p"},
    }
    msg = inbound.to_message(reply, "client-model")
    assert msg["id"] == "msg_01"
    assert msg["model"] == "client-model"
    assert msg["content"] == [
        {"type": "thinking", "thinking": "let me think", "signature": "sig"},
        {"type": "text", "text": "Sure."},
        {"type": "tool_use", "id": "call_1", "name": "f", "input": {"x": 2}},
        {"type": "tool_use", "id": "call_2", "name": "g", "input": {}},
    ]
    assert msg["stop_reason"] == "tool_use"
    assert msg["usage"] == {
        "input_tokens": 6,
        "output_tokens": 5,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    assert msg["circuit_breaker"] == {"provider": "p"}


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("content_filter", "refusal"),
        (None, "end_turn"),
    ],
)
def test_stop_reasons(finish: str | None, stop: str) -> None:
    reply = {"id": "x", "choices": [{"message": {"content": "a"}, "finish_reason": finish}]}
    assert inbound.to_message(reply, "m")["stop_reason"] == stop


def test_errors_in_anthropic_shape() -> None:
    assert inbound.error_of(InvalidRequest("bad")) == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": "bad"},
    }
    upstream = UpstreamHTTPError(529, {"error": {"message": "busy", "type": "server_error"}})
    assert inbound.error_of(upstream)["error"]["type"] == "overloaded_error"
    assert inbound.error_payload(404, "x")["error"]["type"] == "not_found_error"
    assert inbound.error_payload(502, "x")["error"]["type"] == "api_error"
    assert inbound.error_payload(503, "x")["error"]["type"] == "overloaded_error"


def test_models_list_shape() -> None:
    listed = inbound.models_list({"object": "list", "data": [{"id": "a"}, {"id": "b"}]})
    assert listed["first_id"] == "a"
    assert listed["last_id"] == "b"
    assert listed["has_more"] is False
    assert listed["data"][0] == {
        "type": "model",
        "id": "a",
        "display_name": "a",
        "created_at": inbound.MODEL_CREATED_AT,
    }


# --- stream --------------------------------------------------------------


def test_stream_text_every_event_in_order() -> None:
    writer = inbound.AnthropicSSEWriter("client", prompt_tokens=7)
    data = b"".join(
        [
            _chunk({"role": "assistant", "content": ""}),
            _chunk({"reasoning_content": "think"}),
            _chunk({"reasoning_signature": "sig"}),
            _chunk({"content": "Hel"}),
            _chunk({"content": "lo"}),
            _chunk({}, finish="stop"),
            _chunk(None, usage={"prompt_tokens": 9, "completion_tokens": 3}),
            b"data: [DONE]\n\n",
        ]
    )
    # Split anywhere: the writer buffers partial events.
    out = writer.feed(data[:37]) + writer.feed(data[37:101]) + writer.feed(data[101:])
    out += writer.finish()
    events = _events(out)
    assert [name for name, _ in events] == [
        "message_start",
        "ping",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["model"] == "client"
    assert start["id"] == "msg_abc"
    assert start["usage"] == {"input_tokens": 7, "output_tokens": 0}
    assert events[2][1]["content_block"] == {"type": "thinking", "thinking": "", "signature": ""}
    assert events[3][1]["delta"] == {"type": "thinking_delta", "thinking": "think"}
    assert events[4][1]["delta"] == {"type": "signature_delta", "signature": "sig"}
    assert events[6][1] == {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "text", "text": ""},
    }
    assert events[7][1]["delta"] == {"type": "text_delta", "text": "Hel"}
    final = events[10][1]
    assert final["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert final["usage"]["output_tokens"] == 3
    assert final["usage"]["input_tokens"] == 9


def test_stream_tool_calls_one_block_each() -> None:
    writer = inbound.AnthropicSSEWriter("m")
    call = {
        "index": 0,
        "id": "call_1",
        "type": "function",
        "function": {"name": "f", "arguments": ""},
    }
    second = {
        "index": 1,
        "id": "call_2",
        "type": "function",
        "function": {"name": "g", "arguments": "{}"},
    }
    out = writer.feed(
        b"".join(
            [
                _chunk({"role": "assistant", "content": "ok"}),
                _chunk({"tool_calls": [call]}),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"a"'}}]}),
                _chunk({"tool_calls": [{"index": 0, "function": {"arguments": ":1}"}}]}),
                _chunk({"tool_calls": [second]}),
                _chunk({}, finish="tool_calls"),
                b"data: [DONE]\n\n",
            ]
        )
    )
    events = _events(out)
    starts = [e for n, e in events if n == "content_block_start"]
    assert [s["content_block"]["type"] for s in starts] == ["text", "tool_use", "tool_use"]
    assert starts[1]["content_block"] == {
        "type": "tool_use",
        "id": "call_1",
        "name": "f",
        "input": {},
    }
    fragments = [
        e["delta"]["partial_json"]
        for n, e in events
        if n == "content_block_delta" and e["index"] == 1
    ]
    assert "".join(fragments) == '{"a":1}'
    assert next(e for n, e in events if n == "message_delta")["delta"]["stop_reason"] == "tool_use"
    assert writer.finish() == b""  # already closed at [DONE]


def test_stream_error_event() -> None:
    writer = inbound.AnthropicSSEWriter("m")
    writer.feed(_chunk({"content": "partial"}))
    frame = writer.error(
        {"error": {"message": "upstream cut", "type": "server_error", "code": None}}
    )
    assert _events(frame) == [
        ("error", {"type": "error", "error": {"type": "api_error", "message": "upstream cut"}})
    ]
    assert writer.finish() == b""  # no message_stop after an error


def test_stream_without_done_is_closed_at_finish() -> None:
    writer = inbound.AnthropicSSEWriter("m")
    out = writer.feed(_chunk({"content": "x"}, finish="length"))
    out += writer.finish()
    names = [n for n, _ in _events(out)]
    assert names[-2:] == ["message_delta", "message_stop"]
    assert _events(out)[-2][1]["delta"]["stop_reason"] == "max_tokens"
