"""Anthropic SDK apps through the proxy: ``POST /v1/messages`` (plain and streamed),
``/v1/messages/count_tokens`` and ``GET /v1/models``, seen by the official ``anthropic`` SDK.

The app changes only ``base_url`` (``api_key="not-needed"``); each test runs against an
Anthropic-, an OpenAI- and a Gemini-format upstream (the mocks), so the reply is
translated back to Anthropic's shape from all three.
"""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import anthropic
import orjson
import pytest
from anthropic import AsyncAnthropic
from anthropic.types import MessageParam, ToolParam

from proxy.mock.app import FormatName
from tests.fakes.upstream import (
    RawReply,
    RawStreamServer,
    RunningMock,
    running_formats,
    running_mock,
)
from tests.harness import ProxyHandle, running_proxy, write_rules

RULES = """
version: 1
providers:
  oai:
    type: openai
    base_url: {openai}/v1
    api_key_env: OPENAI_API_KEY
    timeouts: {{connect: 2, first_token: 3, idle: 3, total: 30}}
  claude:
    type: anthropic
    base_url: {anthropic}
    api_key_env: ANTHROPIC_API_KEY
    timeouts: {{connect: 2, first_token: 3, idle: 3, total: 30}}
  gem:
    type: gemini
    base_url: {gemini}
    api_key_env: GEMINI_API_KEY
    timeouts: {{connect: 2, first_token: 3, idle: 3, total: 30}}
models:
  claude-3-5-haiku:
    provider: claude
    upstream_model: claude-3-5-haiku-latest
    input_cost_per_1k: 0.0008
    output_cost_per_1k: 0.004
  gpt-4o-mini:
    provider: oai
    input_cost_per_1k: 0.00015
    output_cost_per_1k: 0.0006
  gemini-2.0-flash:
    provider: gem
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0004
  embed-only:
    provider: oai
    upstream_model: text-embedding-3-small
    endpoints: [embeddings]
  claude-with-backup:
    deployments:
      - {{provider: claude, upstream_model: claude-3-5-haiku-latest}}
      - {{provider: oai, upstream_model: gpt-4o-mini}}
defaults:
  strategy: cost_optimized
  retry: {{max_attempts: 4, same_deployment_retries: 0}}
"""
KEYS = {"ANTHROPIC_API_KEY": "sk-ant-test", "GEMINI_API_KEY": "gm-test", "OPENAI_API_KEY": "sk-oa"}
MODELS = ("claude-3-5-haiku", "gpt-4o-mini", "gemini-2.0-flash")
HELLO: list[MessageParam] = [{"role": "user", "content": "hello from the app"}]
TOOLS: list[ToolParam] = [
    {
        "name": "get_weather",
        "description": "Weather for a city",
        "input_schema": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    }
]
PNG = (
    "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8/5+hHgAHggJ/"
    "PchI7wAAAABJRU5ErkJggg=="
)


@dataclass
class Trio:
    proxy: ProxyHandle
    openai: RunningMock
    anthropic: RunningMock
    gemini: RunningMock
    sdk: AsyncAnthropic

    @staticmethod
    def replied_model(model: str) -> str:
        """The model a reply names: an Anthropic upstream's reply is relayed as it came."""
        return "claude-3-5-haiku-latest" if model.startswith("claude") else model

    def mock_for(self, model: str) -> RunningMock:
        if model.startswith("claude"):
            return self.anthropic
        return self.gemini if model.startswith("gemini") else self.openai


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[Trio]:
    async with running_formats(
        {"openai": "sk-oa", "anthropic": "sk-ant-test", "gemini": "gm-test"}
    ) as (oa, an, ge):
        path = write_rules(tmp_path, RULES.format(openai=oa.url, anthropic=an.url, gemini=ge.url))
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncAnthropic(base_url=proxy.api_url, api_key="not-needed", max_retries=0) as sdk,
        ):
            yield Trio(proxy, oa, an, ge, sdk)


@pytest.mark.parametrize("model", MODELS)
async def test_plain_message(trio: Trio, model: str) -> None:
    raw = await trio.sdk.messages.with_raw_response.create(
        model=model,
        max_tokens=256,
        system=[{"type": "text", "text": "Be brief."}],
        messages=HELLO,
        # Sampling fields this SDK release no longer declares still ride in the body.
        extra_body={"temperature": 0.5, "top_p": 0.9, "top_k": 40},
        stop_sequences=["\n\nHuman:"],
        metadata={"user_id": "user-1"},
    )
    message = await raw.parse()
    assert message.type == "message"
    assert message.role == "assistant"
    assert message.model == trio.replied_model(model)
    assert message.id.startswith("msg_")
    assert message.stop_reason == "end_turn"
    assert message.content[0].type == "text"
    assert message.content[0].text
    assert message.usage.input_tokens > 0
    assert message.usage.output_tokens > 0
    assert raw.headers["x-cb-model"]
    assert float(raw.headers["x-cb-cost-usd"]) > 0
    # The client's key never reaches the upstream: the proxy's own is injected.
    stats = trio.mock_for(model).stats()
    assert stats["requests"] == 1
    body = stats["last_body"]
    assert "not-needed" not in orjson.dumps(body).decode()


@pytest.mark.parametrize("model", MODELS)
async def test_stream_events_in_order(trio: Trio, model: str) -> None:
    events: list[Any] = []
    async with trio.sdk.messages.stream(model=model, max_tokens=256, messages=HELLO) as stream:
        async for event in stream:
            events.append(event)
        final = await stream.get_final_message()
    kinds = [e.type for e in events]
    assert kinds[0] == "message_start"
    assert kinds[-1] == "message_stop"
    assert "content_block_start" in kinds
    assert "content_block_stop" in kinds
    assert kinds[-2] == "message_delta"
    # Every delta belongs to the block started last, and is closed once.
    open_block: int | None = None
    for event in events:
        if event.type == "content_block_start":
            assert open_block is None
            open_block = event.index
        elif event.type == "content_block_delta":
            assert event.index == open_block
        elif event.type == "content_block_stop":
            assert event.index == open_block
            open_block = None
    assert open_block is None
    text = "".join(e.delta.text for e in events if e.type == "content_block_delta")
    assert final.content[0].type == "text"
    assert final.content[0].text == text
    assert final.stop_reason == "end_turn"
    assert final.usage.output_tokens > 0
    assert final.model == trio.replied_model(model)


async def test_stream_raw_wire_format(trio: Trio) -> None:
    raw = await trio.sdk.messages.with_raw_response.create(
        model="claude-3-5-haiku", max_tokens=64, messages=HELLO, stream=True
    )
    assert raw.headers["content-type"].startswith("text/event-stream")
    body = await raw.http_response.aread()
    frames = [f for f in body.decode().split("\n\n") if f]
    for frame in frames:
        name, data = frame.split("\n")
        assert name.startswith("event: ")
        assert orjson.loads(data.removeprefix("data: "))["type"] == name.removeprefix("event: ")
    assert any(frame.startswith("event: ping") for frame in frames)


@pytest.mark.parametrize("model", MODELS)
async def test_tool_use_round_trip(trio: Trio, model: str) -> None:
    ask: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = await trio.sdk.messages.create(
        model=model, max_tokens=256, messages=ask, tools=TOOLS, tool_choice={"type": "any"}
    )
    assert first.stop_reason == "tool_use"
    calls = [b for b in first.content if b.type == "tool_use"]
    assert calls
    assert calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict)
    follow: list[Any] = [
        *ask,
        {"role": "assistant", "content": [b.model_dump() for b in first.content]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": calls[0].id, "content": "18 C, sunny"}
            ],
        },
    ]
    second = await trio.sdk.messages.create(
        model=model, max_tokens=256, messages=follow, tools=TOOLS
    )
    assert second.stop_reason == "end_turn"
    assert second.content[0].type == "text"


@pytest.mark.parametrize("model", MODELS)
async def test_streamed_tool_use(trio: Trio, model: str) -> None:
    ask: list[MessageParam] = [{"role": "user", "content": "What is the weather in Paris?"}]
    async with trio.sdk.messages.stream(
        model=model,
        max_tokens=256,
        messages=ask,
        tools=TOOLS,
        tool_choice={"type": "tool", "name": "get_weather"},
    ) as stream:
        kinds = [event.type async for event in stream]
        final = await stream.get_final_message()
    assert "input_json" in kinds or any(k == "content_block_delta" for k in kinds)
    calls = [b for b in final.content if b.type == "tool_use"]
    assert len(calls) == 1
    assert calls[0].name == "get_weather"
    assert isinstance(calls[0].input, dict)
    assert "city" in calls[0].input
    assert final.stop_reason == "tool_use"


@pytest.mark.parametrize("model", MODELS)
async def test_images_reach_the_upstream(trio: Trio, model: str) -> None:
    message = await trio.sdk.messages.create(
        model=model,
        max_tokens=64,
        messages=[
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "what is in this picture?"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/png", "data": PNG},
                    },
                ],
            }
        ],
    )
    assert message.content[0].type == "text"
    assert PNG in orjson.dumps(trio.mock_for(model).stats()["last_body"]).decode()


async def test_unknown_model_is_an_anthropic_error(trio: Trio) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        await trio.sdk.messages.create(model="no-such-model", max_tokens=8, messages=HELLO)
    assert caught.value.status_code in (400, 404)
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] in ("invalid_request_error", "not_found_error")


async def test_an_embeddings_model_never_serves_a_message(trio: Trio) -> None:
    with pytest.raises(anthropic.APIStatusError) as caught:
        await trio.sdk.messages.create(model="embed-only", max_tokens=8, messages=HELLO)
    assert caught.value.status_code == 400
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert trio.openai.stats()["requests"] == 0


async def test_missing_max_tokens_is_invalid_request(trio: Trio) -> None:
    client = trio.sdk._client  # the SDK's own httpx client: a request the SDK would not send
    resp = await client.post(
        trio.proxy.api_url + "/v1/messages",
        json={"model": "claude-3-5-haiku", "messages": HELLO},
        headers={"anthropic-version": "2023-06-01"},
    )
    assert resp.status_code == 400
    assert resp.json() == {
        "type": "error",
        "error": {"type": "invalid_request_error", "message": resp.json()["error"]["message"]},
    }
    assert "max_tokens" in resp.json()["error"]["message"]


async def test_upstream_overload_is_overloaded_error(trio: Trio) -> None:
    await trio.anthropic.set_fault(kind="status", status=529)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await trio.sdk.messages.create(model="claude-3-5-haiku", max_tokens=8, messages=HELLO)
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] == "overloaded_error"


async def test_failover_to_openai_format_keeps_anthropic_shape(trio: Trio) -> None:
    await trio.anthropic.set_fault(kind="status", status=500)
    raw = await trio.sdk.messages.with_raw_response.create(
        model="claude-with-backup", max_tokens=64, messages=HELLO
    )
    assert raw.headers["x-cb-fallback"] == "true"
    assert raw.headers["x-cb-provider"] == "oai"
    assert (await raw.parse()).content[0].type == "text"


async def test_routing_extension_in_header(trio: Trio) -> None:
    raw = await trio.sdk.messages.with_raw_response.create(
        model="claude-with-backup",
        max_tokens=64,
        messages=HELLO,
        extra_headers={"x-cb-routing": '{"routing_strategy": "cost_optimized"}'},
    )
    assert "cost_optimized" in raw.headers["x-cb-route"]
    bad = await trio.sdk._client.post(
        trio.proxy.api_url + "/v1/messages",
        content=orjson.dumps({"model": "claude-3-5-haiku", "max_tokens": 8, "messages": HELLO}),
        headers={"x-cb-routing": "{not json", "content-type": "application/json"},
    )
    assert bad.status_code == 400
    assert bad.json()["error"]["type"] == "invalid_request_error"


async def test_thinking_and_top_k_reach_an_anthropic_upstream_unchanged(trio: Trio) -> None:
    thinking = {"type": "enabled", "budget_tokens": 1024}
    message = await trio.sdk.messages.create(
        model="claude-3-5-haiku",
        max_tokens=2048,
        messages=HELLO,
        thinking={"type": "enabled", "budget_tokens": 1024},
        extra_body={"top_k": 7, "circuit_breaker": {"routing_strategy": "cost_optimized"}},
    )
    assert message.content
    stats = trio.anthropic.stats()
    sent = stats["last_body"]
    assert sent["thinking"] == thinking
    assert sent["top_k"] == 7
    assert sent["model"] == "claude-3-5-haiku-latest"
    assert sent["messages"] == HELLO
    assert "circuit_breaker" not in sent  # the routing extension is the proxy's
    assert "not-needed" not in orjson.dumps(stats["last_headers"]).decode()


COUNT_RULES = """
version: 1
providers:
  claude:
    type: anthropic
    base_url: {url}
    api_key_env: ANTHROPIC_API_KEY
models:
  claude-3-5-haiku:
    provider: claude
    upstream_model: claude-3-5-haiku-latest
"""


async def test_count_tokens_exact_on_anthropic(tmp_path: Path) -> None:
    reply = RawReply(headers={"Content-Type": "application/json"}, chunks=[b'{"input_tokens":42}'])
    async with RawStreamServer(reply) as upstream:
        path = write_rules(tmp_path, COUNT_RULES.format(url=upstream.url))
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncAnthropic(base_url=proxy.api_url, api_key="not-needed", max_retries=0) as sdk,
        ):
            raw = await sdk.messages.with_raw_response.count_tokens(
                model="claude-3-5-haiku", messages=HELLO, system="Be brief.", tools=TOOLS
            )
            assert (await raw.parse()).input_tokens == 42
            assert "x-cb-usage-estimated" not in raw.headers
    (request,) = upstream.requests
    assert request.path == "/v1/messages/count_tokens"
    head = request.head.decode().lower()
    assert "x-api-key: sk-ant-test" in head
    assert "not-needed" not in head  # the client's key is never forwarded
    sent = orjson.loads(request.body)
    assert sent["model"] == "claude-3-5-haiku-latest"
    assert sent["system"] == "Be brief."
    assert sent["tools"][0]["name"] == "get_weather"


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gemini-2.0-flash"])
async def test_count_tokens_estimated_elsewhere(trio: Trio, model: str) -> None:
    raw = await trio.sdk.messages.with_raw_response.count_tokens(model=model, messages=HELLO)
    assert (await raw.parse()).input_tokens > 0
    assert raw.headers["x-cb-usage-estimated"] == "true"
    assert trio.mock_for(model).stats()["requests"] == 0


async def test_models_in_anthropic_shape(trio: Trio) -> None:
    page = await trio.sdk.models.list()
    ids = [m.id for m in page.data]
    assert "claude-3-5-haiku" in ids
    assert "gpt-4o-mini" in ids
    assert all(m.type == "model" for m in page.data)
    # Without anthropic-version: the OpenAI list as before.
    resp = await trio.sdk._client.get(trio.proxy.api_url + "/v1/models")
    assert resp.json()["object"] == "list"


@pytest.mark.parametrize("model", MODELS)
async def test_error_after_content_is_an_error_event(trio: Trio, model: str) -> None:
    await trio.mock_for(model).set_fault(kind="cut_stream", after_events=4)
    seen: list[str] = []

    async def consume() -> None:
        async with trio.sdk.messages.stream(model=model, max_tokens=256, messages=HELLO) as stream:
            async for event in stream:
                seen.append(event.type)  # kept as they arrive, up to the error

    with pytest.raises(anthropic.APIStatusError) as caught:
        await consume()
    assert seen[0] == "message_start"
    assert "message_stop" not in seen
    body: Any = caught.value.body
    assert body["type"] == "error"
    assert body["error"]["type"] in ("api_error", "overloaded_error")


async def test_error_before_content_fails_over(trio: Trio) -> None:
    await trio.anthropic.set_fault(kind="error_event", after_events=0)
    async with trio.sdk.messages.stream(
        model="claude-with-backup", max_tokens=64, messages=HELLO
    ) as stream:
        final = await stream.get_final_message()
    assert final.content[0].type == "text"
    assert trio.openai.stats()["requests"] == 1


async def test_protocol_and_admission_errors_on_the_messages_path_use_anthropics_shape(
    trio: Trio,
) -> None:
    client = trio.sdk._client  # the SDK's httpx client: requests the SDK itself would not send
    wrong_method = await client.get(trio.proxy.api_url + "/v1/messages")
    assert wrong_method.status_code == 405
    body = wrong_method.json()
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    # Admission control answers before anything is read: with no room left, a 503.
    state = trio.proxy.state
    saved = state.max_in_flight
    state.max_in_flight = 1
    state.in_flight += 1  # one request is (as if) in flight
    try:
        with pytest.raises(anthropic.APIStatusError) as caught:
            await trio.sdk.messages.create(model="claude-3-5-haiku", max_tokens=8, messages=HELLO)
    finally:
        state.in_flight -= 1
        state.max_in_flight = saved
    assert caught.value.status_code == 503
    overloaded: Any = caught.value.body
    assert overloaded["type"] == "error"
    assert overloaded["error"]["type"] in ("overloaded_error", "api_error")
    # The OpenAI endpoints keep OpenAI's shape.
    other = await client.get(trio.proxy.api_url + "/v1/chat/completions")
    assert "type" not in other.json()
    assert other.json()["error"]["type"] == "invalid_request_error"


# One Anthropic stream as an upstream sends it: a thinking block with its signature, text,
# the stop_sequence stop reason; split inside events and inside a UTF-8 sequence.
NATIVE_EVENTS = [
    b'event: message_start\ndata: {"type":"message_start","message":{"id":"msg_n1",'
    b'"type":"message","role":"assistant","model":"claude-3-5-haiku-latest","content":[],'
    b'"stop_reason":null,"stop_sequence":null,"usage":{"input_tokens":21,"output_tokens":1}}}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":0,'
    b'"content_block":{"type":"thinking","thinking":"","signature":""}}\n\n',
    b'event: ping\ndata: {"type": "ping"}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"thinking_delta","thinking":"Let me think."}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,'
    b'"delta":{"type":"signature_delta","signature":"EqQBCgIYAhIM1gbcDa9GJwZA2b3h"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":0}\n\n',
    b'event: content_block_start\ndata: {"type":"content_block_start","index":1,'
    b'"content_block":{"type":"text","text":""}}\n\n',
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":1,'
    b'"delta":{"type":"text_delta","text":"Caf\xc3\xa9 au lait"}}\n\n',
    b'event: content_block_stop\ndata: {"type":"content_block_stop","index":1}\n\n',
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":'
    b'"stop_sequence","stop_sequence":"END"},"usage":{"output_tokens":17}}\n\n',
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n',
]
NATIVE_RULES = """
version: 1
providers:
  claude:
    type: anthropic
    base_url: {url}
    api_key_env: ANTHROPIC_API_KEY
models:
  claude-3-5-haiku:
    provider: claude
    upstream_model: claude-3-5-haiku-latest
    input_cost_per_1k: 1.0
    output_cost_per_1k: 2.0
"""


def _split(data: bytes, *cuts: int) -> list[bytes]:
    edges = [0, *cuts, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(edges)]


async def test_an_anthropic_stream_is_relayed_byte_for_byte(tmp_path: Path) -> None:
    wire = b"".join(NATIVE_EVENTS)
    accent = wire.index(b"\xc3\xa9") + 1  # inside the UTF-8 sequence
    chunks = _split(wire, 40, len(NATIVE_EVENTS[0]) + 10, accent, len(wire) - 30)
    reply = RawReply(chunks=chunks)
    async with RawStreamServer(reply) as upstream:
        path = write_rules(tmp_path, NATIVE_RULES.format(url=upstream.url))
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncAnthropic(base_url=proxy.api_url, api_key="not-needed", max_retries=0) as sdk,
        ):
            raw = await sdk.messages.with_raw_response.create(
                model="claude-3-5-haiku",
                max_tokens=2048,
                messages=HELLO,
                stream=True,
                thinking={"type": "enabled", "budget_tokens": 1024},
                stop_sequences=["END"],
                extra_body={"top_k": 3},
            )
            body = await raw.http_response.aread()
            assert body == wire
            assert raw.headers["x-cb-provider"] == "claude"
            assert raw.headers["x-cb-model"] == "claude-3-5-haiku-latest"
            assert raw.headers["x-cb-attempts"] == "1"
            # The SDK reads it whole: thinking, its signature and the stop_sequence stop reason.
            async with sdk.messages.stream(
                model="claude-3-5-haiku", max_tokens=2048, messages=HELLO
            ) as stream:
                final = await stream.get_final_message()
            totals = proxy.state.usage.snapshot()
    assert final.stop_reason == "stop_sequence"
    assert final.stop_sequence == "END"
    assert final.content[0].type == "thinking"
    assert final.content[0].signature == "EqQBCgIYAhIM1gbcDa9GJwZA2b3h"
    assert final.content[1].type == "text"
    assert final.content[1].text == "Caf\u00e9 au lait"
    row: Any = totals["by_model"]
    assert (row[0]["requests"], row[0]["prompt_tokens"], row[0]["completion_tokens"]) == (
        2,
        42,
        34,
    )
    assert row[0]["estimated_requests"] == 0
    request = upstream.requests[0]
    head = request.head.decode().lower()
    assert "x-api-key: sk-ant-test" in head
    assert "anthropic-version: 2023-06-01" in head
    assert "not-needed" not in head  # the client's key is never forwarded
    sent = orjson.loads(request.body)
    assert sent["model"] == "claude-3-5-haiku-latest"
    assert sent["thinking"] == {"type": "enabled", "budget_tokens": 1024}
    assert sent["top_k"] == 3
    assert sent["stream"] is True


async def test_an_anthropic_reply_is_relayed_byte_for_byte(tmp_path: Path) -> None:
    wire = (
        b'{"id":"msg_p1","type":"message","role":"assistant","model":"claude-3-5-haiku-latest",'
        b'"content":[{"type":"thinking","thinking":"Hmm.","signature":"c2ln"},'
        b'{"type":"text","text":"Done"}],"stop_reason":"stop_sequence","stop_sequence":"END",'
        b'"usage":{"input_tokens":10,"output_tokens":5}}'
    )
    reply = RawReply(headers={"Content-Type": "application/json"}, chunks=[wire])
    async with RawStreamServer(reply) as upstream:
        path = write_rules(tmp_path, NATIVE_RULES.format(url=upstream.url))
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncAnthropic(base_url=proxy.api_url, api_key="not-needed", max_retries=0) as sdk,
        ):
            raw = await sdk.messages.with_raw_response.create(
                model="claude-3-5-haiku", max_tokens=64, messages=HELLO
            )
            assert await raw.http_response.aread() == wire
            message = await raw.parse()
            assert message.stop_reason == "stop_sequence"
            assert message.content[0].type == "thinking"
            assert raw.headers["x-cb-provider"] == "claude"
            assert raw.headers["request-id"]
            assert float(raw.headers["x-cb-cost-usd"]) == pytest.approx((10 * 1.0 + 5 * 2.0) / 1000)
            totals: Any = proxy.state.usage.snapshot()
    assert totals["by_model"][0]["completion_tokens"] == 5
    assert totals["by_model"][0]["estimated_requests"] == 0


async def test_stream_error_event_before_content_fails_over_to_openai(tmp_path: Path) -> None:
    error = (
        b'event: error\ndata: {"type":"error","error":{"type":"overloaded_error",'
        b'"message":"Overloaded"}}\n\n'
    )
    failing = RawReply(chunks=[NATIVE_EVENTS[0], error])
    async with (
        RawStreamServer(failing) as upstream,
        running_mock("openai", name="openai", require_key="sk-oa") as oa,
    ):
        rules = NATIVE_RULES.format(url=upstream.url).replace(
            "models:",
            f"  oai:\n    type: openai\n    base_url: {oa.url}/v1\n"
            "    api_key_env: OPENAI_API_KEY\nmodels:",
        )
        rules += (
            "  backed:\n    deployments:\n"
            "      - {provider: claude, upstream_model: claude-3-5-haiku-latest}\n"
            "      - {provider: oai, upstream_model: gpt-4o-mini}\n"
            "defaults:\n  strategy: cost_optimized\n  retry: {same_deployment_retries: 0}\n"
        )
        path = write_rules(tmp_path, rules)
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncAnthropic(base_url=proxy.api_url, api_key="not-needed", max_retries=0) as sdk,
            sdk.messages.stream(model="backed", max_tokens=64, messages=HELLO) as s,
        ):
            final = await s.get_final_message()
            headers = s.response.headers
    assert final.content[0].type == "text"
    assert final.model == "backed"  # translated back from the OpenAI upstream
    assert headers["x-cb-provider"] == "oai"
    assert headers["x-cb-fallback"] == "true"
    assert len(upstream.requests) == 1
    assert oa.stats()["requests"] == 1


@pytest.mark.parametrize("fmt", ["anthropic", "openai"])  # byte relay, and translation
async def test_a_messages_stream_cut_by_the_shutdown_ends_with_an_anthropic_error_event(
    tmp_path: Path, fmt: FormatName
) -> None:
    async with running_mock(fmt, name="slow", tokens_per_second=4, words=200) as slow:
        base = slow.url + ("/v1" if fmt == "openai" else "")
        rules = f"version: 1\nproviders:\n  up: {{type: {fmt}, base_url: '{base}'}}\n"
        path = write_rules(tmp_path, rules + "models:\n  long: {provider: up}\n")
        async with (
            running_proxy(path, grace_period=1.0) as proxy,
            aiohttp.ClientSession() as session,
            session.post(
                proxy.api_url + "/v1/messages",
                json={"model": "long", "max_tokens": 512, "stream": True, "messages": HELLO},
                headers={"anthropic-version": "2023-06-01"},
            ) as resp,
        ):
            assert resp.status == 200
            first = await resp.content.readuntil(b"content_block_delta")
            assert first
            proxy.stop.set()  # SIGTERM: the stream outlives the 1 s grace period
            rest = await resp.content.read()  # a clean end: no payload error
    frames = [f for f in (first + rest).split(b"\n\n") if f.strip()]
    last = frames[-1]
    assert last.startswith(b"event: error\n"), last
    data = orjson.loads(last.split(b"data: ", 1)[1])
    assert data["type"] == "error"
    assert "shutting down" in data["error"]["message"]
    assert b'"error":{"message"' not in rest  # no OpenAI-shaped frame on this API
