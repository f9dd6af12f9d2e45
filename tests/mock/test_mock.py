"""The mock upstream (proxy.mock.app): each wire format, each fault kind, the control API.

Every test talks to a real server on 127.0.0.1 through aiohttp (and, for the
OpenAI format, through the official SDK). Nothing sleeps to wait: tests wait
on the mock's counters, which wake on change.
"""

from __future__ import annotations

import asyncio
import base64
import math
import os
import signal
import struct
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.mock.anthropic import TOOL_PREAMBLE
from proxy.mock.app import FormatName, MockControl, create_mock_app
from proxy.mock.common import embedding_vector, reply_text, reply_words
from proxy.mock.faults import FaultSpecError
from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.openapi import validate, validate_payloads

JSON = dict[str, Any]
PROMPT = "tell me about circuit breakers"
ANTHROPIC_HEADERS = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
WEATHER_TOOL_SCHEMA: JSON = {
    "type": "object",
    "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
    "required": ["city"],
}
FORMATS: tuple[FormatName, ...] = ("openai", "anthropic", "gemini")


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


# -- request builders per format ---------------------------------------------------


def openai_chat(stream: bool = False, **extra: Any) -> JSON:
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": PROMPT}],
        "stream": stream,
        **extra,
    }


def anthropic_messages(stream: bool = False, **extra: Any) -> JSON:
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 100,
        "messages": [{"role": "user", "content": PROMPT}],
    }
    return {**body, "stream": stream, **extra}


def gemini_contents(**extra: Any) -> JSON:
    return {"contents": [{"role": "user", "parts": [{"text": PROMPT}]}], **extra}


def chat_request(m: RunningMock, fmt: FormatName, stream: bool) -> tuple[str, JSON, dict[str, str]]:
    """URL, body and headers of a minimal valid generation request in ``fmt``."""
    if fmt == "openai":
        return f"{m.url}/v1/chat/completions", openai_chat(stream), {}
    if fmt == "anthropic":
        return f"{m.url}/v1/messages", anthropic_messages(stream), ANTHROPIC_HEADERS
    action = "streamGenerateContent?alt=sse" if stream else "generateContent"
    return f"{m.url}/v1beta/models/gemini-2.0-flash:{action}", gemini_contents(), {}


def split_events(raw: bytes, separator: bytes = b"\n\n") -> list[bytes]:
    assert raw.endswith(separator), raw[-40:]
    return raw[: -len(separator)].split(separator)


def data_payloads(raw: bytes) -> list[str]:
    """The ``data:`` payloads of an OpenAI stream, checking nothing else is on the wire."""
    payloads = []
    for event in split_events(raw):
        assert event.startswith(b"data: "), event
        assert b"\n" not in event, event
        payloads.append(event[len(b"data: ") :].decode())
    return payloads


def anthropic_events(raw: bytes) -> list[tuple[str, JSON]]:
    events = []
    for event in split_events(raw):
        name_line, data_line = event.split(b"\n")
        assert name_line.startswith(b"event: ")
        assert data_line.startswith(b"data: ")
        name, data = (
            name_line[len(b"event: ") :].decode(),
            orjson.loads(data_line[len(b"data: ") :]),
        )
        assert data["type"] == name
        events.append((name, data))
    return events


def gemini_chunks(raw: bytes) -> list[JSON]:
    events = split_events(raw, b"\r\n\r\n")
    assert all(e.startswith(b"data: ") for e in events)
    return [orjson.loads(e[len(b"data: ") :]) for e in events]


# -- deterministic content ------------------------------------------------------


@settings(max_examples=50, deadline=None)
@given(prompt=st.text(max_size=40), words=st.integers(min_value=1, max_value=40))
def test_reply_text_has_exactly_the_requested_words_and_is_stable(prompt: str, words: int) -> None:
    assert len(reply_words(prompt, words)) == words
    assert reply_text(prompt, words) == reply_text(prompt, words)
    assert reply_words(prompt, words)[0] == "mock"


@settings(max_examples=30, deadline=None)
@given(text=st.text(min_size=1, max_size=30), dims=st.integers(min_value=1, max_value=64))
def test_embedding_vectors_are_unit_length_float32_and_stable(text: str, dims: int) -> None:
    vector = embedding_vector(text, dims)
    assert len(vector) == dims
    assert vector == embedding_vector(text, dims)
    assert math.isclose(math.sqrt(sum(v * v for v in vector)), 1.0, rel_tol=1e-5)
    assert list(struct.unpack(f"<{dims}f", struct.pack(f"<{dims}f", *vector))) == vector


def test_create_mock_app_rejects_bad_options() -> None:
    with pytest.raises(ValueError, match="unknown mock format"):
        create_mock_app("cohere")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="words"):
        create_mock_app("openai", words=0)
    with pytest.raises(ValueError, match="tokens_per_second"):
        create_mock_app("openai", tokens_per_second=0)


# -- OpenAI --------------------------------------------------------------------------


async def test_openai_chat_reply_matches_the_spec(session: aiohttp.ClientSession) -> None:
    async with (
        running_mock("openai", name="primary", words=9) as m,
        session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r,
    ):
        assert r.status == 200
        assert r.headers["x-mock-upstream"] == "primary"
        assert r.headers["x-request-id"]
        body = await r.json()
    validate("CreateChatCompletionResponse", body)
    assert body["model"] == "gpt-4o-mini"
    assert body["choices"][0]["message"]["content"] == reply_text(PROMPT, 9)
    assert body["choices"][0]["finish_reason"] == "stop"
    assert body["usage"] == {"prompt_tokens": 5, "completion_tokens": 9, "total_tokens": 14}


@pytest.mark.parametrize("include_usage", [True, False])
async def test_openai_chat_stream_matches_the_spec(
    session: aiohttp.ClientSession, include_usage: bool
) -> None:
    body = openai_chat(stream=True, stream_options={"include_usage": include_usage})
    async with (
        running_mock("openai") as m,
        session.post(f"{m.url}/v1/chat/completions", json=body) as r,
    ):
        assert r.headers["Content-Type"].startswith("text/event-stream")
        payloads = data_payloads(await r.read())
    validate_payloads(payloads)
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert [i for i, d in enumerate(deltas) if "role" in d] == [0]
    assert "".join(d.get("content") or "" for d in deltas) == reply_text(PROMPT)
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "stop"
    assert set(finishes[:-1]) == {None}
    if include_usage:
        assert chunks[-1]["choices"] == []
        assert chunks[-1]["usage"]["completion_tokens"] == 12
        assert all(c["usage"] is None for c in chunks[:-1])
    else:
        assert all("usage" not in c for c in chunks)


def weather_tools(*names: str) -> list[JSON]:
    return [
        {"type": "function", "function": {"name": n, "parameters": WEATHER_TOOL_SCHEMA}}
        for n in names
    ]


async def test_openai_streams_parallel_tool_calls_like_openai(
    session: aiohttp.ClientSession,
) -> None:
    body = openai_chat(stream=True, tools=weather_tools("get_weather", "get_time", "get_tide"))
    async with (
        running_mock("openai") as m,
        session.post(f"{m.url}/v1/chat/completions", json=body) as r,
    ):
        payloads = data_payloads(await r.read())
    validate_payloads(payloads)
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    calls: dict[int, JSON] = {}
    for chunk in chunks:
        for tc in chunk["choices"][0]["delta"].get("tool_calls", []):
            if tc["index"] not in calls:
                assert tc["id"].startswith("call_")
                assert tc["type"] == "function"
                assert tc["function"]["arguments"] == ""
                calls[tc["index"]] = {"name": tc["function"]["name"], "arguments": ""}
            else:
                assert set(tc) == {"index", "function"}
                assert set(tc["function"]) == {"arguments"}
                calls[tc["index"]]["arguments"] += tc["function"]["arguments"]
    assert [calls[i]["name"] for i in sorted(calls)] == ["get_weather", "get_time"]  # at most 2
    assert all(orjson.loads(c["arguments"]) == {"city": "tell", "days": 1} for c in calls.values())
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


@pytest.mark.parametrize(
    ("extra", "expected_calls"),
    [
        ({"parallel_tool_calls": False}, ["get_weather"]),
        ({"tool_choice": {"type": "function", "function": {"name": "get_time"}}}, ["get_time"]),
        ({"tool_choice": "none"}, []),
    ],
)
async def test_openai_tool_choice_and_parallel_flag(
    session: aiohttp.ClientSession, extra: JSON, expected_calls: list[str]
) -> None:
    body = openai_chat(tools=weather_tools("get_weather", "get_time"), **extra)
    async with (
        running_mock("openai") as m,
        session.post(f"{m.url}/v1/chat/completions", json=body) as r,
    ):
        reply = await r.json()
    validate("CreateChatCompletionResponse", reply)
    message = reply["choices"][0]["message"]
    assert [c["function"]["name"] for c in message.get("tool_calls", [])] == expected_calls
    assert (message["content"] is None) == bool(expected_calls)


async def test_openai_sdk_round_trip_with_tools() -> None:
    async with running_mock("openai") as m:
        client = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="x", max_retries=0)
        async with client:
            first = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": PROMPT}],
                tools=weather_tools("get_weather"),  # type: ignore[arg-type]
            )
            calls = first.choices[0].message.tool_calls or []
            assert first.choices[0].finish_reason == "tool_calls"
            assert len(calls) == 1
            call = calls[0]
            assert call.type == "function"
            second = await client.chat.completions.create(
                model="gpt-4o-mini",
                messages=[
                    {"role": "user", "content": PROMPT},
                    {
                        "role": "assistant",
                        "content": None,
                        "tool_calls": [
                            {
                                "id": call.id,
                                "type": "function",
                                "function": {
                                    "name": call.function.name,
                                    "arguments": call.function.arguments,
                                },
                            }
                        ],
                    },
                    {"role": "tool", "tool_call_id": call.id, "content": "sunny"},
                ],
                tools=weather_tools("get_weather"),  # type: ignore[arg-type]
            )
        assert second.choices[0].message.content == reply_text(PROMPT)
        assert m.stats()["last_headers"]["authorization"] == "Bearer x"


async def test_openai_sdk_stream_accumulates_the_reply() -> None:
    async with running_mock("openai", words=20) as m:
        client = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="x", max_retries=0)
        async with client:
            stream = await client.chat.completions.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "héllo wörld 👋"}],
                stream=True,
                stream_options={"include_usage": True},
            )
            text, usage = "", None
            async for chunk in stream:
                if chunk.choices:
                    text += chunk.choices[0].delta.content or ""
                usage = chunk.usage or usage
    assert text == reply_text("héllo wörld 👋", 20)
    assert usage is not None
    assert usage.completion_tokens == 20
    assert usage.prompt_tokens == 3


async def test_openai_max_tokens_cuts_the_reply(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        body = openai_chat(max_completion_tokens=4)
        async with session.post(f"{m.url}/v1/chat/completions", json=body) as r:
            reply = await r.json()
    assert reply["choices"][0]["message"]["content"] == " ".join(reply_words(PROMPT)[:4])
    assert reply["choices"][0]["finish_reason"] == "length"


async def test_openai_legacy_completions(session: aiohttp.ClientSession) -> None:
    body = {"model": "gpt-3.5-turbo-instruct", "prompt": "say this"}
    async with running_mock("openai") as m:
        async with session.post(f"{m.url}/v1/completions", json=body) as r:
            reply = await r.json()
        stream_body = {**body, "stream": True, "stream_options": {"include_usage": True}}
        async with session.post(f"{m.url}/v1/completions", json=stream_body) as r:
            payloads = data_payloads(await r.read())
    validate("CreateCompletionResponse", reply)
    assert reply["object"] == "text_completion"
    assert reply["choices"][0]["text"] == reply_text("say this")
    assert payloads[-1] == "[DONE]"
    chunks = [orjson.loads(p) for p in payloads[:-1]]
    assert all(c["object"] == "text_completion" for c in chunks)
    assert "".join(c["choices"][0]["text"] for c in chunks if c["choices"]) == reply_text(
        "say this"
    )
    assert chunks[-2]["choices"][0]["finish_reason"] == "stop"
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"]["total_tokens"] == 14


async def test_openai_embeddings_float_and_base64(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        body = {
            "model": "text-embedding-3-small",
            "input": ["alpha beta", "gamma"],
            "dimensions": 5,
        }
        async with session.post(f"{m.url}/v1/embeddings", json=body) as r:
            floats = await r.json()
        async with session.post(
            f"{m.url}/v1/embeddings", json={**body, "encoding_format": "base64"}
        ) as r:
            encoded = await r.json()
        client = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="x", max_retries=0)
        async with client:
            via_sdk = await client.embeddings.create(
                model="text-embedding-3-small", input="alpha beta"
            )
        assert m.stats()["last_body"]["encoding_format"] == "base64"  # the SDK's default
    validate("CreateEmbeddingResponse", floats)
    assert [d["embedding"] for d in floats["data"]] == [
        embedding_vector("alpha beta", 5),
        embedding_vector("gamma", 5),
    ]
    assert floats["usage"] == {"prompt_tokens": 3, "total_tokens": 3}
    decoded = [
        list(struct.unpack("<5f", base64.b64decode(d["embedding"]))) for d in encoded["data"]
    ]
    assert decoded == [d["embedding"] for d in floats["data"]]
    assert via_sdk.data[0].embedding == embedding_vector("alpha beta", 8)


async def test_openai_models_and_unknown_paths(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai", models=["gpt-4o"]) as m:
        async with session.get(f"{m.url}/v1/models") as r:
            listing = await r.json()
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            missing_model = (r.status, await r.json())
        async with session.post(f"{m.url}/v1/nowhere", json={}) as r:
            missing_path = (r.status, await r.json())
    validate("ListModelsResponse", listing)
    assert [d["id"] for d in listing["data"]] == ["gpt-4o"]
    assert missing_model[0] == 404
    assert missing_model[1]["error"]["code"] == "model_not_found"
    assert missing_path[0] == 404
    assert "Invalid URL" in missing_path[1]["error"]["message"]
    validate("ErrorResponse", missing_model[1])
    validate("ErrorResponse", missing_path[1])


@pytest.mark.parametrize(
    ("messages", "fragment"),
    [
        (
            [{"role": "tool", "tool_call_id": "call_1", "content": "x"}],
            "preceeding message with 'tool_calls'",
        ),
        (
            [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "tool_calls": [{"id": "call_1", "type": "function"}]},
                {"role": "user", "content": "next"},
            ],
            "call_1",
        ),
        ([{"role": "wizard", "content": "x"}], "role"),
        ([], "non-empty"),
    ],
)
async def test_openai_rejects_malformed_conversations(
    session: aiohttp.ClientSession, messages: list[JSON], fragment: str
) -> None:
    async with running_mock("openai") as m:
        body = {"model": "gpt-4o", "messages": messages}
        async with session.post(f"{m.url}/v1/chat/completions", json=body) as r:
            assert r.status == 400
            error = await r.json()
    validate("ErrorResponse", error)
    assert fragment in error["error"]["message"]


async def test_openai_requires_the_configured_key() -> None:
    async with running_mock("openai", require_key="sk-good") as m:
        bad = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="sk-bad", max_retries=0)
        good = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="sk-good", max_retries=0)
        async with bad, good:
            with pytest.raises(openai.AuthenticationError) as caught:
                await bad.models.list()
            assert caught.value.code == "invalid_api_key"
            assert [model.id async for model in await good.models.list()]
        assert [h["credential"] for h in m.stats()["history"]] == [
            "Bearer sk-bad",
            "Bearer sk-good",
        ]


# -- Anthropic --------------------------------------------------------------------------


async def test_anthropic_message_reply_shape(session: aiohttp.ClientSession) -> None:
    async with (
        running_mock("anthropic", name="claude") as m,
        session.post(
            f"{m.url}/v1/messages", json=anthropic_messages(), headers=ANTHROPIC_HEADERS
        ) as r,
    ):
        assert r.status == 200
        assert r.headers["x-mock-upstream"] == "claude"
        assert r.headers["request-id"]
        message = await r.json()
    assert message["type"] == "message"
    assert message["role"] == "assistant"
    assert message["model"] == "claude-sonnet-4-5"
    assert message["id"].startswith("msg_")
    assert message["content"] == [{"type": "text", "text": reply_text(PROMPT)}]
    assert message["stop_reason"] == "end_turn"
    assert message["stop_sequence"] is None
    assert message["usage"] == {
        "input_tokens": 5,
        "output_tokens": 12,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
    }


async def test_anthropic_stream_event_sequence(session: aiohttp.ClientSession) -> None:
    body = anthropic_messages(stream=True, max_tokens=5)
    async with (
        running_mock("anthropic") as m,
        session.post(f"{m.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as r,
    ):
        events = anthropic_events(await r.read())
    names = [n for n, _ in events]
    assert names[:3] == ["message_start", "content_block_start", "ping"]
    assert names[-4:] == [
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == []
    assert start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == 5
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == " ".join(reply_words(PROMPT)[:5])
    delta = events[-2][1]
    assert delta["delta"]["stop_reason"] == "max_tokens"
    assert delta["usage"] == {"output_tokens": 5}


async def test_anthropic_streams_tool_use_blocks(session: aiohttp.ClientSession) -> None:
    tools = [{"name": n, "input_schema": WEATHER_TOOL_SCHEMA} for n in ("get_weather", "get_time")]
    async with running_mock("anthropic") as m:
        body = anthropic_messages(stream=True, tools=tools)
        async with session.post(f"{m.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as r:
            events = anthropic_events(await r.read())
        plain = anthropic_messages(tools=tools)
        async with session.post(f"{m.url}/v1/messages", json=plain, headers=ANTHROPIC_HEADERS) as r:
            message = await r.json()
    starts = {d["index"]: d["content_block"] for n, d in events if n == "content_block_start"}
    assert starts[0] == {"type": "text", "text": ""}
    assert [starts[i]["name"] for i in (1, 2)] == ["get_weather", "get_time"]
    assert all(starts[i]["input"] == {} and starts[i]["id"].startswith("toolu_") for i in (1, 2))
    for index in (1, 2):
        partial = "".join(
            d["delta"]["partial_json"]
            for n, d in events
            if n == "content_block_delta" and d["index"] == index
        )
        assert orjson.loads(partial) == {"city": "tell", "days": 1}
    assert events[-2][1]["delta"]["stop_reason"] == "tool_use"
    assert message["stop_reason"] == "tool_use"
    assert message["content"][0] == {"type": "text", "text": TOOL_PREAMBLE}
    assert [b["id"] for b in message["content"][1:]] == [starts[1]["id"], starts[2]["id"]]


async def test_anthropic_accepts_a_valid_tool_round_trip(session: aiohttp.ClientSession) -> None:
    tools = [{"name": "get_weather", "input_schema": WEATHER_TOOL_SCHEMA}]
    messages = [
        {"role": "user", "content": PROMPT},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"},
                {"type": "text", "text": "thanks"},
            ],
        },
    ]
    body = {
        "model": "claude-sonnet-4-5",
        "max_tokens": 50,
        "messages": messages,
        "tools": tools,
        "system": [
            {"type": "text", "text": "be brief now", "cache_control": {"type": "ephemeral"}}
        ],
    }
    async with (
        running_mock("anthropic") as m,
        session.post(f"{m.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as r,
    ):
        assert r.status == 200, await r.text()
        message = await r.json()
    assert message["stop_reason"] == "end_turn"
    assert message["content"][0]["text"] == reply_text("sunny thanks")
    assert message["usage"]["cache_read_input_tokens"] == 3
    # The prompt's 5 words and "sunny thanks"; the cached system words are reported apart.
    assert message["usage"]["input_tokens"] == 5 + 2


def _user(content: Any) -> JSON:
    return {"role": "user", "content": content}


def _assistant(content: Any) -> JSON:
    return {"role": "assistant", "content": content}


TOOL_USE = {"type": "tool_use", "id": "toolu_1", "name": "f", "input": {}}


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ({"max_tokens": None}, "max_tokens: Field required"),
        ({"n": 2}, "n: Extra inputs are not permitted"),
        ({"stream_options": {}}, "stream_options: Extra inputs"),
        ({"temperature": 1.5}, "temperature"),
        ({"messages": [_assistant("hi"), _user("x")]}, 'first message must use the "user" role'),
        ({"messages": [_user("a"), _user("b")]}, "roles must alternate"),
        (
            {"messages": [{"role": "system", "content": "s"}, _user("a")]},
            'Unexpected role "system"',
        ),
        ({"messages": [_user([{"type": "text", "text": ""}])]}, "non-whitespace text"),
        ({"messages": [_user("")]}, "non-empty content"),
        (
            {"messages": [_user("a"), _assistant([{**TOOL_USE, "id": "call.1"}])]},
            "String should match pattern",
        ),
        (
            {
                "messages": [
                    _user([{"type": "tool_result", "tool_use_id": "toolu_9", "content": "x"}])
                ]
            },
            "unexpected `tool_use_id`",
        ),
        ({"messages": [_user("a"), _assistant([TOOL_USE]), _user("b")]}, "without `tool_result`"),
        (
            {
                "messages": [
                    _user("a"),
                    _assistant([TOOL_USE]),
                    _user(
                        [
                            {"type": "text", "text": "b"},
                            {"type": "tool_result", "tool_use_id": "toolu_1"},
                        ]
                    ),
                ]
            },
            "must come first",
        ),
        ({"tools": [{"name": "bad name", "input_schema": {}}]}, "tools.0.custom.name"),
        ({"tool_choice": {"type": "required"}}, "tool_choice"),
    ],
)
async def test_anthropic_rejects_what_the_real_api_rejects(
    session: aiohttp.ClientSession, change: JSON, fragment: str
) -> None:
    body = {k: v for k, v in {**anthropic_messages(), **change}.items() if v is not None}
    async with (
        running_mock("anthropic") as m,
        session.post(f"{m.url}/v1/messages", json=body, headers=ANTHROPIC_HEADERS) as r,
    ):
        assert r.status == 400
        error = await r.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == "invalid_request_error"
    assert fragment in error["error"]["message"]


async def test_anthropic_requires_version_header_and_key(session: aiohttp.ClientSession) -> None:
    async with running_mock("anthropic", require_key="ak") as m:
        url, body = f"{m.url}/v1/messages", anthropic_messages()
        async with session.post(url, json=body, headers={"x-api-key": "ak"}) as r:
            no_version = (r.status, await r.json())
        async with session.post(
            url, json=body, headers={**ANTHROPIC_HEADERS, "x-api-key": "wrong"}
        ) as r:
            wrong_key = (r.status, await r.json())
        async with session.post(
            url, json=body, headers={**ANTHROPIC_HEADERS, "x-api-key": "ak"}
        ) as r:
            assert r.status == 200
        async with session.get(
            f"{m.url}/v1/models", headers={**ANTHROPIC_HEADERS, "x-api-key": "ak"}
        ) as r:
            listing = await r.json()
        assert m.stats()["last_headers"]["x-api-key"] == "ak"
    assert no_version[0] == 400
    assert "anthropic-version" in no_version[1]["error"]["message"]
    assert wrong_key[0] == 401
    assert wrong_key[1]["error"]["type"] == "authentication_error"
    assert listing["data"][0]["type"] == "model"
    assert listing["has_more"] is False


# -- Gemini ---------------------------------------------------------------------------


async def test_gemini_generate_content_shape(session: aiohttp.ClientSession) -> None:
    async with running_mock("gemini", name="g") as m:
        url = f"{m.url}/v1beta/models/gemini-2.0-flash:generateContent"
        body = gemini_contents(systemInstruction={"parts": [{"text": "be nice"}]})
        async with session.post(url, json=body) as r:
            assert r.headers["x-mock-upstream"] == "g"
            reply = await r.json()
    candidate = reply["candidates"][0]
    assert candidate["content"] == {"parts": [{"text": reply_text(PROMPT)}], "role": "model"}
    assert candidate["finishReason"] == "STOP"
    assert reply["usageMetadata"] == {
        "promptTokenCount": 7,
        "candidatesTokenCount": 12,
        "totalTokenCount": 19,
    }
    assert reply["modelVersion"] == "gemini-2.0-flash"
    assert reply["responseId"]


async def test_gemini_sse_stream_repeats_usage_and_ends_with_finish_reason(
    session: aiohttp.ClientSession,
) -> None:
    async with running_mock("gemini", words=7) as m:
        url = f"{m.url}/v1beta/models/gemini-2.0-flash:streamGenerateContent?alt=sse"
        async with session.post(url, json=gemini_contents()) as r:
            assert r.headers["Content-Type"].startswith("text/event-stream")
            chunks = gemini_chunks(await r.read())
        async with session.post(url.replace("?alt=sse", ""), json=gemini_contents()) as r:
            as_array = await r.json()
    assert len(chunks) == 3
    assert "".join(c["candidates"][0]["content"]["parts"][0]["text"] for c in chunks) == reply_text(
        PROMPT, 7
    )
    assert [c["usageMetadata"]["candidatesTokenCount"] for c in chunks] == [3, 6, 7]
    assert all(c["usageMetadata"]["promptTokenCount"] == 5 for c in chunks)
    assert [c["candidates"][0].get("finishReason") for c in chunks] == [None, None, "STOP"]
    assert [{**c, "responseId": ""} for c in as_array] == [{**c, "responseId": ""} for c in chunks]


async def test_gemini_function_calls_arrive_whole_with_a_signature(
    session: aiohttp.ClientSession,
) -> None:
    declarations = [
        {"name": n, "parameters": WEATHER_TOOL_SCHEMA} for n in ("get_weather", "get_time", "x")
    ]
    body = gemini_contents(tools=[{"functionDeclarations": declarations}])
    async with running_mock("gemini") as m:
        url = f"{m.url}/v1beta/models/gemini-2.5-pro:streamGenerateContent?alt=sse"
        async with session.post(url, json=body) as r:
            chunks = gemini_chunks(await r.read())
        config = {"functionCallingConfig": {"mode": "NONE"}}
        async with session.post(url, json={**body, "toolConfig": config}) as r:
            text_chunks = gemini_chunks(await r.read())
    assert len(chunks) == 1
    parts = chunks[0]["candidates"][0]["content"]["parts"]
    assert [p["functionCall"]["name"] for p in parts] == ["get_weather", "get_time"]
    assert all(p["functionCall"]["args"] == {"city": "tell", "days": 1} for p in parts)
    assert parts[0]["thoughtSignature"]
    assert "thoughtSignature" not in parts[1]
    assert chunks[0]["candidates"][0]["finishReason"] == "STOP"
    assert all("text" in c["candidates"][0]["content"]["parts"][0] for c in text_chunks)


def _gemini_call_turn(signature: str | None = None) -> list[JSON]:
    call: JSON = {"functionCall": {"name": "get_weather", "args": {}}}
    if signature is not None:
        call["thoughtSignature"] = signature
    return [
        {"role": "user", "parts": [{"text": "weather?"}]},
        {"role": "model", "parts": [call]},
        {
            "role": "user",
            "parts": [{"functionResponse": {"name": "get_weather", "response": {"output": "sun"}}}],
        },
    ]


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        ({"contents": []}, "contents is not specified"),
        ({"contents": [{"role": "system", "parts": [{"text": "x"}]}]}, "valid role"),
        ({"contents": [{"role": "user", "parts": []}]}, "parts must not be empty"),
        ({"contents": [{"role": "user", "parts": [{"text": ""}]}]}, "empty text parameter"),
        ({"messages": []}, 'Unknown name "messages"'),
        ({"contents": _gemini_call_turn()[2:]}, "function response turn comes immediately after"),
        (
            {
                "contents": [
                    *_gemini_call_turn()[:2],
                    {"role": "user", "parts": [{"functionResponse": {}}] * 2},
                ]
            },
            "number of function response parts",
        ),
        (
            {
                "contents": [{"role": "user", "parts": [{"text": "x"}]}],
                "tools": [
                    {
                        "functionDeclarations": [
                            {
                                "name": "f",
                                "parameters": {"type": "object", "additionalProperties": False},
                            }
                        ]
                    }
                ],
            },
            'Unknown name "additionalProperties"',
        ),
    ],
)
async def test_gemini_rejects_what_the_real_api_rejects(
    session: aiohttp.ClientSession, body: JSON, fragment: str
) -> None:
    async with (
        running_mock("gemini") as m,
        session.post(f"{m.url}/v1beta/models/gemini-2.0-flash:generateContent", json=body) as r,
    ):
        assert r.status == 400
        error = await r.json()
    assert error["error"]["code"] == 400
    assert error["error"]["status"] == "INVALID_ARGUMENT"
    assert fragment in error["error"]["message"]


async def test_gemini_strict_thought_signatures(session: aiohttp.ClientSession) -> None:
    async with running_mock("gemini", strict_thought_signatures=True) as m:
        url = f"{m.url}/v1beta/models/gemini-2.5-pro:generateContent"
        async with session.post(url, json={"contents": _gemini_call_turn()}) as r:
            unsigned = (r.status, await r.json())
        async with session.post(url, json={"contents": _gemini_call_turn("c2lnbmF0dXJl")}) as r:
            signed = (r.status, await r.json())
    assert unsigned[0] == 400
    assert "thought_signature" in unsigned[1]["error"]["message"]
    assert signed[0] == 200
    assert signed[1]["candidates"][0]["content"]["parts"][0]["text"] == reply_text("weather?")


async def test_gemini_embeddings_models_and_keys(session: aiohttp.ClientSession) -> None:
    async with running_mock("gemini", require_key="gk") as m:
        base = f"{m.url}/v1beta/models/text-embedding-004"
        content = {"content": {"parts": [{"text": "alpha"}]}, "outputDimensionality": 4}
        async with session.post(
            f"{base}:embedContent", json=content, headers={"x-goog-api-key": "gk"}
        ) as r:
            single = await r.json()
        batch = {"requests": [{"model": "models/text-embedding-004", **content}] * 2}
        async with session.post(f"{base}:batchEmbedContents?key=gk", json=batch) as r:
            many = await r.json()
        async with session.get(f"{m.url}/v1beta/models", headers={"x-goog-api-key": "gk"}) as r:
            listing = await r.json()
        async with session.get(f"{m.url}/v1beta/models", headers={"x-goog-api-key": "nope"}) as r:
            wrong = (r.status, await r.json())
        async with session.get(f"{m.url}/v1beta/models") as r:
            missing = (r.status, await r.json())
        credentials = [h["credential"] for h in m.stats()["history"]]
    assert single == {"embedding": {"values": embedding_vector("alpha", 4)}}
    assert many == {"embeddings": [single["embedding"]] * 2}
    assert listing["models"][0]["name"] == "models/gemini-2.0-flash"
    assert wrong[0] == 400
    assert wrong[1]["error"]["details"][0]["reason"] == "API_KEY_INVALID"
    assert missing[0] == 403
    assert missing[1]["error"]["status"] == "PERMISSION_DENIED"
    assert credentials == ["gk", "gk", "gk", "nope", None]


# -- faults, for every format ------------------------------------------------------------


EXPECTED_503 = {
    "openai": lambda b: b["error"]["type"] == "server_error",
    "anthropic": lambda b: b["type"] == "error" and b["error"]["type"] == "api_error",
    "gemini": lambda b: b["error"]["status"] == "UNAVAILABLE" and b["error"]["code"] == 503,
}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_status_fault_counts_down_then_serves(
    session: aiohttp.ClientSession, fmt: FormatName
) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="status", status=503, retry_after="2", retry_after_ms=1500, count=2)
        url, body, headers = chat_request(m, fmt, stream=False)
        statuses = []
        for _ in range(3):
            async with session.post(url, json=body, headers=headers) as r:
                statuses.append(r.status)
                if r.status == 503:
                    assert r.headers["retry-after"] == "2"
                    assert r.headers["retry-after-ms"] == "1500"
                    assert EXPECTED_503[fmt](await r.json())
        assert statuses == [503, 503, 200]
        assert m.stats()["requests"] == 3


async def test_status_fault_with_a_custom_body_and_headers(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(
            kind="status",
            status=502,
            body="<html>bad gateway</html>",
            headers={"x-should-retry": "false"},
        )
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            assert r.status == 502
            assert r.headers["x-should-retry"] == "false"
            assert await r.text() == "<html>bad gateway</html>"


@pytest.mark.parametrize(
    ("fmt", "status", "check"),
    [
        ("openai", 429, lambda b: b["error"]["code"] == "insufficient_quota"),
        ("anthropic", 400, lambda b: "credit balance is too low" in b["error"]["message"]),
        (
            "gemini",
            429,
            lambda b: (
                b["error"]["status"] == "RESOURCE_EXHAUSTED" and "quota" in b["error"]["message"]
            ),
        ),
    ],
)
async def test_quota_fault(
    session: aiohttp.ClientSession, fmt: FormatName, status: int, check: Any
) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="quota")
        url, body, headers = chat_request(m, fmt, stream=False)
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == status
            assert check(await r.json())


@pytest.mark.parametrize("fmt", FORMATS)
async def test_rate_limit_fault(session: aiohttp.ClientSession, fmt: FormatName) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="rate_limit", retry_after="1")
        url, body, headers = chat_request(m, fmt, stream=True)
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 429
            assert r.headers["retry-after"] == "1"
            error = await r.json()
    if fmt == "openai":
        assert error["error"]["code"] == "rate_limit_exceeded"
    elif fmt == "anthropic":
        assert error["error"]["type"] == "rate_limit_error"
    else:
        assert error["error"]["details"][0]["retryDelay"] == "1s"


async def test_openai_sdk_sees_rate_limit_and_drop_as_its_own_errors() -> None:
    async with running_mock("openai") as m:
        client = openai.AsyncOpenAI(base_url=m.url + "/v1", api_key="x", max_retries=0)
        async with client:
            await m.set_fault(kind="rate_limit", retry_after="1", count=1)
            with pytest.raises(openai.RateLimitError) as caught:
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
            assert caught.value.code == "rate_limit_exceeded"
            await m.set_fault(kind="drop", count=1)
            with pytest.raises(openai.APIConnectionError):
                await client.chat.completions.create(
                    model="gpt-4o", messages=[{"role": "user", "content": "x"}]
                )
            ok = await client.chat.completions.create(
                model="gpt-4o", messages=[{"role": "user", "content": "x"}]
            )
    assert ok.choices[0].message.content == reply_text("x")


@pytest.mark.parametrize("fmt", FORMATS)
async def test_drop_closes_before_headers(session: aiohttp.ClientSession, fmt: FormatName) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="drop")
        url, body, headers = chat_request(m, fmt, stream=True)
        with pytest.raises(aiohttp.ServerDisconnectedError):
            async with session.post(url, json=body, headers=headers):
                pass
        assert m.stats()["cancelled"] == 0


@pytest.mark.parametrize("fmt", FORMATS)
async def test_stall_holds_until_cleared(session: aiohttp.ClientSession, fmt: FormatName) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="stall")
        url, body, headers = chat_request(m, fmt, stream=False)

        async def call() -> int:
            async with session.post(url, json=body, headers=headers) as r:
                await r.read()
                return r.status

        pending = asyncio.ensure_future(call())
        await m.wait_requests(1)
        assert not pending.done()
        assert m.stats()["in_flight"] == 1
        m.clear_faults()
        assert await pending == 200
        assert m.stats()["in_flight"] == 0


async def test_stalled_client_going_away_counts_as_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(kind="stall")
        pending = asyncio.ensure_future(
            session.post(f"{m.url}/v1/chat/completions", json=openai_chat())
        )
        await m.wait_requests(1)
        pending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pending
        await m.wait_cancelled(1)
        assert m.stats()["in_flight"] == 0


SEPARATORS = {"openai": b"\n\n", "anthropic": b"\n\n", "gemini": b"\r\n\r\n"}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_stall_stream_sends_events_then_holds(
    session: aiohttp.ClientSession, fmt: FormatName
) -> None:
    async with running_mock(fmt, words=9) as m:
        await m.set_fault(kind="stall_stream", after_events=2)
        url, body, headers = chat_request(m, fmt, stream=True)
        async with session.post(url, json=body, headers=headers) as r:
            first = [await r.content.readuntil(SEPARATORS[fmt]) for _ in range(2)]
            assert m.stats()["in_flight"] == 1
            m.clear_faults()
            rest = await r.read()
        async with session.post(url, json=body, headers=headers) as r:
            whole = await r.read()
    separator = SEPARATORS[fmt]
    assert all(event.count(separator) == 1 for event in first)
    assert (b"".join(first) + rest).count(separator) == whole.count(separator)
    assert TERMINALS[fmt] in rest


async def test_client_leaving_a_stalled_stream_counts_as_cancelled(
    session: aiohttp.ClientSession,
) -> None:
    async with running_mock("anthropic") as m:
        await m.set_fault(kind="stall_stream", after_events=1)
        url, body, headers = chat_request(m, "anthropic", stream=True)
        async with session.post(url, json=body, headers=headers) as r:
            assert (await r.content.readuntil(b"\n\n")).startswith(b"event: message_start")
            r.close()  # hang up mid-stream
        await m.wait_cancelled(1)
        assert m.stats()["in_flight"] == 0


async def read_cut_stream(
    session: aiohttp.ClientSession, url: str, body: JSON, headers: dict[str, str]
) -> bytes:
    """The bytes of a 200 stream that must end in a broken body, not a clean end."""
    received = b""
    async with session.post(url, json=body, headers=headers) as r:
        assert r.status == 200
        try:
            async for data in r.content.iter_any():
                received += data
        except aiohttp.ClientPayloadError:
            return received
    raise AssertionError(f"the stream ended cleanly: {received!r}")


TERMINALS = {
    "openai": b"data: [DONE]",
    "anthropic": b"event: message_stop",
    "gemini": b'"finishReason"',
}


@pytest.mark.parametrize("fmt", FORMATS)
async def test_cut_stream_ends_without_the_terminal_marker(
    session: aiohttp.ClientSession, fmt: FormatName
) -> None:
    async with running_mock(fmt, words=9) as m:
        await m.set_fault(kind="cut_stream", after_events=2)
        url, body, headers = chat_request(m, fmt, stream=True)
        received = await read_cut_stream(session, url, body, headers)
    assert received.count(SEPARATORS[fmt]) == 2
    assert received.endswith(SEPARATORS[fmt])
    assert TERMINALS[fmt] not in received


async def test_cut_stream_never_sends_the_terminal_even_when_late(
    session: aiohttp.ClientSession,
) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(kind="cut_stream", after_events=10_000)
        url = f"{m.url}/v1/chat/completions"
        received = await read_cut_stream(session, url, openai_chat(stream=True), {})
    assert b"[DONE]" not in received
    assert b'"finish_reason":"stop"' in received


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("after", [0, 2])
async def test_error_event_inside_a_200_stream(
    session: aiohttp.ClientSession, fmt: FormatName, after: int
) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="error_event", after_events=after)
        url, body, headers = chat_request(m, fmt, stream=True)
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 200
            raw = await r.read()
    events = split_events(raw, SEPARATORS[fmt])
    assert len(events) == after + 1
    last = events[-1]
    if fmt == "openai":
        payload = orjson.loads(last[len(b"data: ") :])
        validate("ErrorResponse", payload)
    elif fmt == "anthropic":
        name, data = last.split(b"\n")
        assert name == b"event: error"
        assert orjson.loads(data[len(b"data: ") :])["error"]["type"] == "overloaded_error"
    else:
        assert orjson.loads(last[len(b"data: ") :])["error"]["status"] == "UNAVAILABLE"
    assert TERMINALS[fmt] not in raw


async def test_stream_faults_leave_plain_requests_alone(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(kind="cut_stream", after_events=1)
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            assert r.status == 200
        assert m.stats()["requests"] == 1
        assert [f["kind"] for f in m.state.faults.snapshot()] == ["cut_stream"]


async def test_faults_scoped_by_path_and_model(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(
            [
                {"kind": "status", "status": 500, "model": "gpt-4o"},
                {"kind": "status", "status": 504, "path": "embeddings"},
            ]
        )
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            assert r.status == 200  # gpt-4o-mini
        async with session.post(
            f"{m.url}/v1/chat/completions", json={**openai_chat(), "model": "gpt-4o"}
        ) as r:
            assert r.status == 500
        async with session.post(f"{m.url}/v1/embeddings", json={"model": "e", "input": "x"}) as r:
            assert r.status == 504
        async with session.get(f"{m.url}/v1/models") as r:
            assert r.status == 200


async def test_slow_first_token_and_latency_delay_the_reply(session: aiohttp.ClientSession) -> None:
    loop = asyncio.get_running_loop()
    async with running_mock("openai", latency_ms=30, tokens_per_second=200, words=5) as m:
        await m.set_fault(kind="slow_first_token", ms=60)
        started = loop.time()
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat(stream=True)) as r:
            headers_at = loop.time()
            payloads = data_payloads(await r.read())
        ended = loop.time()
    assert headers_at - started >= 0.03
    # 60 ms before the first event, then 5 ms before each of the others.
    assert ended - started >= 0.03 + 0.06 + (len(payloads) - 1) * 0.005
    assert payloads[-1] == "[DONE]"


# -- control API over HTTP --------------------------------------------------------------


async def test_control_api_round_trip(session: aiohttp.ClientSession) -> None:
    async with running_mock("gemini") as m:
        control = f"{m.url}/_mock"
        async with session.post(
            f"{control}/faults",
            json=[{"kind": "status", "status": 500, "count": 1}, {"kind": "stall"}],
        ) as r:
            assert [f["kind"] for f in (await r.json())["faults"]] == ["status", "stall"]
        async with session.get(f"{control}/faults") as r:
            assert [f["remaining"] for f in (await r.json())["faults"]] == [1, None]
        url, body, headers = chat_request(m, "gemini", stream=False)
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 500
        stalled = asyncio.ensure_future(session.post(url, json=body, headers=headers))
        async with session.get(f"{control}/wait", params={"requests": "2", "in_flight": "1"}) as r:
            assert r.status == 200
            assert (await r.json())["ok"] is True
        async with session.delete(f"{control}/faults") as r:
            assert (await r.json()) == {"faults": []}
        response = await stalled
        assert response.status == 200
        response.release()
        async with session.get(f"{control}/stats") as r:
            stats = await r.json()
        assert stats["requests"] == 2
        assert stats["in_flight"] == 0
        assert stats["by_path"] == {"/v1beta/models/gemini-2.0-flash:generateContent": 2}
        assert stats["by_model"] == {"gemini-2.0-flash": 2}
        assert stats["last_body"] == body
        async with session.get(f"{control}/wait", params={"requests": "3", "timeout": "0.01"}) as r:
            assert r.status == 504
            assert (await r.json())["ok"] is False
        async with session.post(f"{control}/reset") as r:
            assert (await r.json())["requests"] == 0
        assert m.stats()["requests"] == 0
        assert m.stats()["by_path"] == {}


async def test_wait_endpoint_for_cancelled_requests(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(kind="stall")
        waiter = asyncio.ensure_future(
            session.get(f"{m.url}/_mock/wait", params={"cancelled": "1"})
        )
        pending = asyncio.ensure_future(
            session.post(f"{m.url}/v1/chat/completions", json=openai_chat())
        )
        await m.wait_requests(1)
        assert not waiter.done()
        pending.cancel()
        response = await waiter
        assert response.status == 200
        assert (await response.json())["cancelled"] == 1
        response.release()


async def test_unknown_control_paths_are_not_counted(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        async with session.get(f"{m.url}/_mock/reset") as r:
            assert r.status == 404
            assert "no control endpoint" in (await r.json())["error"]
        assert m.stats()["requests"] == 0


async def test_mock_control_handle_used_by_the_demo(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        control = MockControl.of(m.app)
        control.set_faults([{"kind": "status", "status": 503, "count": 1}])
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            assert r.status == 503
        async with session.post(f"{m.url}/v1/chat/completions", json=openai_chat()) as r:
            assert r.status == 200
        assert control.request_count() == 2
        with pytest.raises(FaultSpecError):
            control.set_faults({"kind": "nope"})
        control.reset()
        assert control.stats()["requests"] == 0


async def test_shutdown_releases_stalled_requests(session: aiohttp.ClientSession) -> None:
    async with running_mock("openai") as m:
        await m.set_fault(kind="stall")
        pending = asyncio.ensure_future(
            session.post(f"{m.url}/v1/chat/completions", json=openai_chat())
        )
        await m.wait_requests(1)
    # Leaving the context shut the server down: the stalled handler was let go, not left hanging.
    assert m.stats()["in_flight"] == 0
    response = await asyncio.wait_for(pending, 10)
    assert response.status == 200
    response.release()


@pytest.mark.parametrize(
    ("payload", "fragment"),
    [
        ({"kind": "explode"}, "kind"),
        ({"kind": "status", "status": 42}, "status"),
        ({"kind": "stall", "count": 0}, "count"),
        ({"kind": "stall", "colour": "red"}, "unknown keys"),
        ([{"kind": "drop"}, {"kind": "cut_stream", "after_events": -1}], "fault[1].after_events"),
    ],
)
async def test_bad_fault_specs_are_rejected(
    session: aiohttp.ClientSession, payload: Any, fragment: str
) -> None:
    async with (
        running_mock("openai") as m,
        session.post(f"{m.url}/_mock/faults", json=payload) as r,
    ):
        assert r.status == 400
        assert fragment in (await r.json())["error"]
    assert m.state.faults.snapshot() == []


# -- run_mock, as the CLI uses it ----------------------------------------------------------


async def test_run_mock_prints_its_url_and_stops_on_sigterm(session: aiohttp.ClientSession) -> None:
    code = "from proxy.mock.app import run_mock; run_mock('anthropic', '127.0.0.1', 0, name='cli')"
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        stdout=asyncio.subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert process.stdout is not None
        line = (await asyncio.wait_for(process.stdout.readline(), 30)).decode()
        url = line.split(" listening on ")[1].split()[0]
        async with session.get(f"{url}/v1/models", headers=ANTHROPIC_HEADERS) as r:
            assert r.status == 200
            assert r.headers["x-mock-upstream"] == "cli"
        process.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


# -- the raw stream fake -------------------------------------------------------------------


async def test_raw_stream_server_splits_and_holds_where_told(
    session: aiohttp.ClientSession,
) -> None:
    chunks = [b'data: {"a"', b":1}\n", b"\ndata: \xf0\x9f", b"\x91\x8b\n\n"]
    async with RawStreamServer(RawReply(chunks=chunks, hold_before=2)) as server:
        async with session.post(f"{server.url}/v1/x", json={"q": 1}) as r:
            assert r.status == 200
            early = await r.content.readexactly(len(chunks[0]) + len(chunks[1]))
            server.release()
            rest = await r.read()
        assert server.requests[0].path == "/v1/x"
        assert orjson.loads(server.requests[0].body) == {"q": 1}
    assert early + rest == b"".join(chunks)


async def test_raw_stream_server_can_hang_up_mid_body(session: aiohttp.ClientSession) -> None:
    replies = (
        RawReply(chunks=[b"data: 1\n\n", b"data: 2\n\n"], stop_after=1),
        RawReply(status=503, chunks=[b"{}"]),
    )
    async with RawStreamServer(*replies) as server:
        with pytest.raises(aiohttp.ClientPayloadError):
            async with session.get(server.url) as r:
                await r.read()
        async with session.get(server.url) as r:
            assert r.status == 503
            assert await r.read() == b"{}"
        await server.wait_requests(2)


# -- continuation support: prefill, bare ends, malformed events ------------------------------


def _openai_text(raw: bytes) -> str:
    text = ""
    for payload in data_payloads(raw):
        if payload != "[DONE]":
            for choice in orjson.loads(payload)["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def _anthropic_text(raw: bytes) -> str:
    return "".join(
        d["delta"].get("text", "")
        for name, d in anthropic_events(raw)
        if name == "content_block_delta"
    )


async def test_anthropic_prefill_continues_the_same_answer(
    session: aiohttp.ClientSession,
) -> None:
    full = reply_text(PROMPT, 9)
    head = " ".join(full.split()[:5])
    async with running_mock("anthropic", words=9) as m:
        url, body, headers = chat_request(m, "anthropic", stream=True)
        body["messages"].append({"role": "assistant", "content": head})
        async with session.post(url, json=body, headers=headers) as r:
            raw = await r.read()
    assert head + _anthropic_text(raw) == full


@pytest.mark.parametrize("prefix", [True, False])
async def test_openai_prefill_needs_the_prefix_flag(
    session: aiohttp.ClientSession, prefix: bool
) -> None:
    full = reply_text(PROMPT, 9)
    head = " ".join(full.split()[:4]) + " "
    async with running_mock("openai", words=9) as m:
        body = openai_chat(stream=True)
        body["messages"].append({"role": "assistant", "content": head, "prefix": prefix})
        async with session.post(f"{m.url}/v1/chat/completions", json=body) as r:
            raw = await r.read()
    text = _openai_text(raw)
    assert text == (full[len(head) - 1 :] if prefix else full)


async def test_gemini_prefill_continues_after_the_model_turn(
    session: aiohttp.ClientSession,
) -> None:
    full = reply_text(PROMPT, 9)
    head = " ".join(full.split()[:3])
    async with running_mock("gemini", words=9) as m:
        url, body, headers = chat_request(m, "gemini", stream=True)
        body["contents"].append({"role": "model", "parts": [{"text": head}]})
        async with session.post(url, json=body, headers=headers) as r:
            raw = await r.read()
    text = "".join(
        p["text"] for c in gemini_chunks(raw) for p in c["candidates"][0]["content"]["parts"]
    )
    assert head + text == full


@pytest.mark.parametrize("fmt", FORMATS)
async def test_reject_prefill_refuses_only_a_trailing_assistant_turn(
    session: aiohttp.ClientSession, fmt: FormatName
) -> None:
    async with running_mock(fmt) as m:
        await m.set_fault(kind="reject_prefill")
        url, body, headers = chat_request(m, fmt, stream=False)
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 200  # no prefill: the fault is not taken
        if fmt == "gemini":
            body["contents"].append({"role": "model", "parts": [{"text": "mock"}]})
        else:
            body["messages"].append({"role": "assistant", "content": "mock"})
        async with session.post(url, json=body, headers=headers) as r:
            assert r.status == 400
            error = (await r.json())["error"]
        assert "prefill" in error["message"]


@pytest.mark.parametrize(
    ("fmt", "end"),
    [
        ("openai", b"data: [DONE]\n\n"),
        ("anthropic", b'event: message_stop\ndata: {"type":"message_stop"}\n\n'),
    ],
)
async def test_cut_stream_with_end_marker_sends_a_bare_end(
    session: aiohttp.ClientSession, fmt: FormatName, end: bytes
) -> None:
    async with running_mock(fmt, words=9) as m:
        await m.set_fault(kind="cut_stream", after_events=4, end_marker=True)
        url, body, headers = chat_request(m, fmt, stream=True)
        raw = await read_cut_stream(session, url, body, headers)
    assert raw.endswith(end)
    assert b'finish_reason":"' not in raw
    assert b'stop_reason":"' not in raw


@pytest.mark.parametrize("fmt", FORMATS)
async def test_malformed_event_is_cut_off_json(
    session: aiohttp.ClientSession, fmt: FormatName
) -> None:
    async with running_mock(fmt, words=9) as m:
        await m.set_fault(kind="malformed_event", after_events=3)
        url, body, headers = chat_request(m, fmt, stream=True)
        async with session.post(url, json=body, headers=headers) as r:
            raw = await r.read()
    last = raw.rstrip().rsplit(b"\n", 1)[-1]
    assert last.startswith(b"data: {")
    with pytest.raises(orjson.JSONDecodeError):
        orjson.loads(last[6:])


def test_end_marker_must_be_a_boolean() -> None:
    with pytest.raises(FaultSpecError, match="end_marker"):
        MockControl.of(create_mock_app("openai")).set_faults(
            {"kind": "cut_stream", "end_marker": 1}
        )
