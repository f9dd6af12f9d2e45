"""Anthropic and Gemini upstreams through the proxy, seen by the official OpenAI SDK.

The app speaks OpenAI format only; these tests check it cannot tell that Claude
or Gemini answered: plain replies, streams, parallel tool calls assembled by
the SDK, usage, finish reasons, errors, and failover across providers.
"""

from __future__ import annotations

import base64
import json
import struct
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam, ChatCompletionToolParam

from tests.fakes.upstream import RunningMock, running_formats
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.openapi import validate

RULES = """
version: 1
providers:
  openai-primary:
    type: openai
    base_url: {openai}/v1
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
    upstream_model: claude-3-5-haiku-20241022
    input_cost_per_1k: 0.0008
    output_cost_per_1k: 0.004
  gemini-2.0-flash:
    provider: gem
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0004
  text-embedding-004:
    provider: gem
  gpt-4o:
    provider: openai-primary
routes:
  - match: {{model: gpt-4o}}
    fallbacks: [claude-3-5-haiku, gemini-2.0-flash]
defaults:
  retry: {{max_attempts: 4, same_deployment_retries: 0}}
"""
KEYS = {"ANTHROPIC_API_KEY": "sk-ant-test", "GEMINI_API_KEY": "gm-test"}
HELLO: list[ChatCompletionMessageParam] = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "hello from the app"},
]
TOOLS: list[ChatCompletionToolParam] = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
                "additionalProperties": False,
            },
        },
    },
    {
        "type": "function",
        "function": {
            "name": "get_time",
            "description": "Local time in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    },
]
MODELS = ("claude-3-5-haiku", "gemini-2.0-flash")


@dataclass
class Trio:
    proxy: ProxyHandle
    openai: RunningMock
    anthropic: RunningMock
    gemini: RunningMock
    sdk: AsyncOpenAI

    def mock_for(self, model: str) -> RunningMock:
        return self.anthropic if model.startswith("claude") else self.gemini


@pytest.fixture
async def trio(tmp_path: Path) -> AsyncIterator[Trio]:
    async with running_formats({"anthropic": "sk-ant-test", "gemini": "gm-test"}) as (oa, an, ge):
        path = write_rules(tmp_path, RULES.format(openai=oa.url, anthropic=an.url, gemini=ge.url))
        async with (
            running_proxy(path, environ=KEYS) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            yield Trio(proxy, oa, an, ge, sdk)


@pytest.mark.parametrize("model", MODELS)
async def test_plain_reply_is_openai_shaped(trio: Trio, model: str) -> None:
    raw = await trio.sdk.chat.completions.with_raw_response.create(model=model, messages=HELLO)
    body = orjson.loads(raw.http_response.content)
    validate("CreateChatCompletionResponse", body)
    completion = raw.parse()
    assert completion.object == "chat.completion"
    assert completion.choices[0].message.role == "assistant"
    assert completion.choices[0].message.content
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert completion.usage.prompt_tokens > 0
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    assert raw.headers["x-cb-provider"] in ("claude", "gem")
    assert float(raw.headers["x-cb-cost-usd"]) > 0
    # The system prompt was lifted for the upstream, and its key injected.
    last = trio.mock_for(model).stats()["last_body"]
    if model.startswith("claude"):
        assert last["system"] == "Be brief."
        assert trio.anthropic.stats()["last_headers"]["x-api-key"] == "sk-ant-test"
    else:
        assert last["systemInstruction"]["parts"][0]["text"] == "Be brief."
        assert trio.gemini.stats()["last_headers"]["x-goog-api-key"] == "gm-test"


@pytest.mark.parametrize("model", MODELS)
async def test_stream_text_with_usage_chunk(trio: Trio, model: str) -> None:
    plain = await trio.sdk.chat.completions.create(model=model, messages=HELLO)
    stream = await trio.sdk.chat.completions.create(
        model=model, messages=HELLO, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    for chunk in chunks:
        validate("CreateChatCompletionStreamResponse", chunk.model_dump(exclude_unset=True))
    assert len({c.id for c in chunks}) == 1
    assert len({c.created for c in chunks}) == 1
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == plain.choices[0].message.content
    finishes = [
        c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason
    ]
    assert finishes == ["stop"]
    usage = [c for c in chunks if c.usage is not None]
    assert len(usage) == 1
    assert usage[0].choices == []
    assert plain.usage is not None
    assert usage[0].usage == plain.usage  # never summed over Gemini chunks, never doubled


@pytest.mark.parametrize("model", MODELS)
async def test_streamed_parallel_tool_calls_assemble_in_the_sdk(trio: Trio, model: str) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "weather and time in Paris"}
    ]
    async with trio.sdk.chat.completions.stream(
        model=model, messages=messages, tools=TOOLS
    ) as stream:
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    choice = final.choices[0]
    assert choice.finish_reason == "tool_calls"
    calls = choice.message.tool_calls or []
    assert [c.function.name for c in calls] == ["get_weather", "get_time"]
    for call in calls:
        assert isinstance(json.loads(call.function.arguments), dict)
        assert call.id
    # The conversation goes on with the tool results, translated back for the upstream.
    follow: list[ChatCompletionMessageParam] = [
        *messages,
        choice.message.model_dump(exclude_none=True),  # type: ignore[list-item]
    ]
    for i, c in enumerate(calls):
        follow.append({"role": "tool", "tool_call_id": c.id, "content": f"result {i}"})
    done = await trio.sdk.chat.completions.create(model=model, messages=follow, tools=TOOLS)
    assert done.choices[0].message.content
    last = trio.mock_for(model).stats()["last_body"]
    if model.startswith("claude"):
        results = [b for b in last["messages"][-1]["content"] if b["type"] == "tool_result"]
        assert [r["tool_use_id"] for r in results] == [
            c["id"] for c in last["messages"][-2]["content"] if c["type"] == "tool_use"
        ]
    else:
        calls_sent = [p for p in last["contents"][-2]["parts"] if "functionCall" in p]
        assert "thoughtSignature" in calls_sent[0]  # kept and sent back
        responses = [p for p in last["contents"][-1]["parts"] if "functionResponse" in p]
        assert [r["functionResponse"]["name"] for r in responses] == ["get_weather", "get_time"]


@pytest.mark.parametrize("model", MODELS)
async def test_max_tokens_gives_finish_reason_length(trio: Trio, model: str) -> None:
    done = await trio.sdk.chat.completions.create(model=model, messages=HELLO, max_tokens=2)
    assert done.choices[0].finish_reason == "length"


async def test_unsupported_field_is_a_400_naming_it(trio: Trio) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await trio.sdk.chat.completions.create(
            model="claude-3-5-haiku", messages=HELLO, logit_bias={"1": 5}
        )
    body: Any = info.value.body
    assert body["param"] == "logit_bias"
    assert trio.anthropic.stats()["requests"] == 0


@pytest.mark.parametrize(
    ("model", "fault", "error", "status"),
    [
        ("claude-3-5-haiku", {"kind": "status", "status": 529}, openai.InternalServerError, 503),
        (
            "claude-3-5-haiku",
            {"kind": "rate_limit", "retry_after": "7"},
            openai.RateLimitError,
            429,
        ),
        ("claude-3-5-haiku", {"kind": "status", "status": 400}, openai.BadRequestError, 400),
        ("gemini-2.0-flash", {"kind": "status", "status": 503}, openai.InternalServerError, 503),
        (
            "gemini-2.0-flash",
            {"kind": "rate_limit", "retry_after": "7"},
            openai.RateLimitError,
            429,
        ),
        ("gemini-2.0-flash", {"kind": "status", "status": 400}, openai.BadRequestError, 400),
    ],
)
async def test_upstream_error_classes_map_to_openai_errors(
    trio: Trio, model: str, fault: dict[str, Any], error: type[Exception], status: int
) -> None:
    await trio.mock_for(model).set_fault(fault)
    with pytest.raises(error) as info:
        await trio.sdk.chat.completions.create(model=model, messages=HELLO)
    assert getattr(info.value, "status_code", None) == status
    body = getattr(info.value, "response").json()  # noqa: B009 - APIStatusError has it
    validate("ErrorResponse", body)
    if status == 429:
        assert info.value.response.headers["retry-after"] == "7"  # type: ignore[attr-defined]


async def test_in_band_error_after_content_ends_the_stream(trio: Trio) -> None:
    await trio.anthropic.set_fault(kind="error_event", after_events=5)
    stream = await trio.sdk.chat.completions.create(
        model="claude-3-5-haiku", messages=HELLO, stream=True
    )
    seen: list[str] = []

    async def consume() -> None:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                seen.append(chunk.choices[0].delta.content)

    with pytest.raises(openai.APIError):
        await consume()
    assert seen  # content arrived before the error, and nothing was retried
    assert trio.gemini.stats()["requests"] == 0


async def test_failover_crosses_providers_openai_to_claude_to_gemini(trio: Trio) -> None:
    await trio.openai.set_fault(kind="status", status=503)
    raw = await trio.sdk.chat.completions.with_raw_response.create(model="gpt-4o", messages=HELLO)
    assert raw.headers["x-cb-provider"] == "claude"
    assert raw.headers["x-cb-fallback"] == "true"
    await trio.anthropic.set_fault(kind="status", status=529)
    stream = await trio.sdk.chat.completions.create(model="gpt-4o", messages=HELLO, stream=True)
    text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
    assert text.startswith("mock reply")
    assert trio.gemini.stats()["requests"] == 1


async def test_openai_tool_ids_are_rewritten_for_claude_after_failover(trio: Trio) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "user", "content": "weather?"},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call.abc:1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call.abc:1", "content": "cold"},
    ]
    done = await trio.sdk.chat.completions.create(
        model="claude-3-5-haiku", messages=messages, tools=TOOLS
    )
    assert done.choices[0].message.content
    sent = trio.anthropic.stats()["last_body"]["messages"]
    use_id = sent[1]["content"][0]["id"]
    assert sent[2]["content"][0]["tool_use_id"] == use_id
    assert ":" not in use_id
    assert "." not in use_id


@pytest.mark.parametrize("encoding", ["float", "base64"])
async def test_gemini_embeddings_in_openai_shape(trio: Trio, encoding: str) -> None:
    emb = await trio.sdk.embeddings.create(
        model="text-embedding-004",
        input=["one", "two", "three"],
        encoding_format=encoding,  # type: ignore[arg-type]
    )
    assert [d.index for d in emb.data] == [0, 1, 2]
    first: Any = emb.data[0].embedding
    if encoding == "base64":
        # Asked for explicitly, base64 comes back as little-endian float32, undecoded by the SDK.
        raw = base64.b64decode(first)
        first = list(struct.unpack(f"<{len(raw) // 4}f", raw))
    # The SDK's default (no encoding_format) asks for base64 and decodes it itself.
    single = await trio.sdk.embeddings.create(model="text-embedding-004", input="one")
    assert single.data[0].embedding == pytest.approx(first, rel=1e-6)
    assert trio.gemini.stats()["last_body"]["content"]["parts"][0]["text"] == "one"
