"""The Anthropic passthrough (proxy.providers.anthropic_native): request and byte relay."""

from __future__ import annotations

import orjson
import pytest

from proxy.config.model import Deployment, Provider
from proxy.core.outcome import Outcome
from proxy.providers.anthropic_native import AnthropicEventRelay, AnthropicPassthrough
from proxy.providers.base import StreamError

START = (
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"m",'
    b'"usage":{"input_tokens":5,"cache_read_input_tokens":2,"output_tokens":1}}}\n\n'
)
EMPTY_TEXT = (
    b"event: content_block_start\n"
    b'data: {"type":"content_block_start","index":0,"content_block":{"type":"text","text":""}}\n\n'
)
DELTA = (
    b"event: content_block_delta\ndata: "
    b'{"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"hi"}}\n\n'
)
END = (
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},'
    b'"usage":{"output_tokens":9}}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
)
ERROR = (
    b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error","message":"busy"}}\n\n'
)


def test_held_until_content_then_every_byte_as_it_came() -> None:
    relay = AnthropicEventRelay()
    wire = START + EMPTY_TEXT + DELTA + END
    out = [relay.feed(wire[i : i + 7]) for i in range(0, len(wire), 7)]
    cut = len(START + EMPTY_TEXT) + 7
    assert b"".join(out[: (cut - 7) // 7]) == b""  # nothing before the first delta
    assert b"".join(out) + relay.finish() == wire
    assert relay.finished
    assert relay.usage is not None
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (7, 9)


def test_crlf_framing_is_relayed_unchanged() -> None:
    relay = AnthropicEventRelay()
    wire = (START + DELTA + END).replace(b"\n", b"\r\n")
    out = b"".join(relay.feed(wire[i : i + 5]) for i in range(0, len(wire), 5))
    assert out + relay.finish() == wire


def test_error_before_content_raises() -> None:
    relay = AnthropicEventRelay()
    with pytest.raises(StreamError) as caught:
        relay.feed(START + ERROR)
    assert caught.value.info.outcome is Outcome.FAILURE
    assert not relay.error_relayed


def test_error_after_content_is_relayed_then_fails() -> None:
    relay = AnthropicEventRelay()
    assert relay.feed(START + DELTA) == START + DELTA
    assert relay.feed(ERROR) == ERROR
    assert relay.error_relayed
    with pytest.raises(StreamError):
        relay.finish()


def test_truncated_stream_fails() -> None:
    relay = AnthropicEventRelay()
    relay.feed(START + DELTA)
    with pytest.raises(StreamError) as caught:
        relay.finish()
    assert caught.value.info.body["error"]["code"] == "upstream_stream_truncated"


def test_tool_use_start_commits() -> None:
    relay = AnthropicEventRelay()
    start = (
        b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
        b'"content_block":{"type":"tool_use","id":"t","name":"f","input":{}}}\n\n'
    )
    assert relay.feed(START + start) == START + start
    assert relay.has_content


def test_request_is_the_clients_body_with_the_proxys_key() -> None:
    provider = Provider(
        name="claude", type="anthropic", base_url="https://api.example", api_key_env=None
    )
    deployment = Deployment(model="claude", provider="claude", upstream_model="claude-up")
    body = {
        "model": "claude",
        "max_tokens": 10,
        "messages": [],
        "top_k": 3,
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "circuit_breaker": {"routing_strategy": "cost_optimized"},
    }
    req = AnthropicPassthrough().build_request(body, provider, deployment, "sk-ant")
    assert req.url == "https://api.example/v1/messages"
    assert req.headers["x-api-key"] == "sk-ant"
    assert req.headers["anthropic-version"] == "2023-06-01"
    assert req.body is not None
    sent = orjson.loads(req.body)
    assert sent["model"] == "claude-up"
    assert sent["top_k"] == 3
    assert sent["thinking"] == body["thinking"]
    assert "circuit_breaker" not in sent
    assert body["model"] == "claude"  # not mutated


def test_reply_usage() -> None:
    passthrough = AnthropicPassthrough()
    usage = passthrough.reply_usage(b'{"usage":{"input_tokens":3,"output_tokens":4}}')
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens) == (3, 4)
    with pytest.raises(StreamError):
        passthrough.reply_usage(b"[]")
