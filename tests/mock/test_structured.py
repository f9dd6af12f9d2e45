"""The mock honours what a request asks of the reply: response_format, n, logprobs, tool_choice.

OpenAI format first (plain and streamed, through aiohttp and the official SDK), then the
same fields where Anthropic and Gemini have them. What the mock cannot honour is a 400 in
the format's error shape, never a reply that ignores the request.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
import jsonschema
import openai
import orjson
import pytest
from pydantic import BaseModel

from proxy.mock.openai import MAX_CHOICES
from tests.fakes.upstream import RunningMock, running_mock
from tests.mock.test_mock import (
    ANTHROPIC_HEADERS,
    PROMPT,
    WEATHER_TOOL_SCHEMA,
    anthropic_messages,
    data_payloads,
    gemini_chunks,
    gemini_contents,
    openai_chat,
    weather_tools,
)
from tests.openapi import validate, validate_payloads

JSON = dict[str, Any]
NESTED_TOOL: JSON = {
    "type": "function",
    "function": {
        "name": "book_trip",
        "parameters": {
            "type": "object",
            "properties": {
                "traveller": {"$ref": "#/$defs/Person"},
                "legs": {"type": "array", "items": {"$ref": "#/$defs/Leg"}, "minItems": 1},
                "class": {"enum": ["economy", "business"]},
            },
            "required": ["traveller", "legs", "class"],
            "additionalProperties": False,
            "$defs": {
                "Person": {
                    "type": "object",
                    "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
                    "required": ["name", "age"],
                },
                "Leg": {
                    "type": "object",
                    "properties": {"from": {"type": "string"}, "to": {"type": "string"}},
                    "required": ["from", "to"],
                },
            },
        },
    },
}


class Weather(BaseModel):
    city: str
    celsius: float
    sky: Literal["sunny", "cloudy"]
    warnings: list[str]


@pytest.fixture
async def mock() -> AsyncIterator[RunningMock]:
    async with running_mock("openai") as m:
        yield m


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


async def post(session: aiohttp.ClientSession, url: str, body: JSON) -> tuple[int, Any]:
    async with session.post(url, json=body) as r:
        raw = await r.read()
        if body.get("stream"):
            return r.status, data_payloads(raw) if r.status == 200 else orjson.loads(raw)
        return r.status, orjson.loads(raw)


def chunks_of(payloads: list[str]) -> list[JSON]:
    validate_payloads(payloads)
    assert payloads[-1] == "[DONE]"
    return [orjson.loads(p) for p in payloads[:-1]]


def content_by_choice(chunks: list[JSON]) -> dict[int, str]:
    out: dict[int, str] = {}
    for chunk in chunks:
        for choice in chunk["choices"]:
            out[choice["index"]] = out.get(choice["index"], "") + (
                choice["delta"].get("content") or ""
            )
    return out


# -- response_format --------------------------------------------------------------


async def test_sdk_parse_with_a_pydantic_model(mock: RunningMock) -> None:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c:
        completion = await c.chat.completions.parse(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Paris weather"}],
            response_format=Weather,
        )
    parsed = completion.choices[0].message.parsed
    assert parsed == Weather(city="Paris", celsius=1.5, sky="sunny", warnings=[])
    sent = mock.stats()["last_body"]["response_format"]
    assert sent["type"] == "json_schema"
    assert sent["json_schema"]["strict"] is True


async def test_sdk_streams_a_parsed_reply(mock: RunningMock) -> None:
    async with (
        openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c,
        c.chat.completions.stream(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Oslo weather"}],
            response_format=Weather,
        ) as stream,
    ):
        async for _ in stream:
            pass
        final = await stream.get_final_completion()
    assert final.choices[0].message.parsed == Weather(
        city="Oslo", celsius=1.5, sky="sunny", warnings=[]
    )


async def test_json_object_and_json_schema_plain_and_streamed(
    mock: RunningMock, session: aiohttp.ClientSession
) -> None:
    schema = NESTED_TOOL["function"]["parameters"]
    formats: list[JSON] = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "trip", "schema": schema}},
    ]
    url = f"{mock.url}/v1/chat/completions"
    for response_format in formats:
        status, reply = await post(session, url, openai_chat(response_format=response_format))
        assert status == 200, reply
        validate("CreateChatCompletionResponse", reply)
        content = orjson.loads(reply["choices"][0]["message"]["content"])
        assert isinstance(content, dict)
        if response_format["type"] == "json_schema":
            jsonschema.validate(content, schema)
        status, payloads = await post(
            session, url, openai_chat(stream=True, response_format=response_format)
        )
        streamed = content_by_choice(chunks_of(payloads))[0]
        assert orjson.loads(streamed) == content


# -- n and logprobs -----------------------------------------------------------------


async def test_n_choices_plain_and_streamed(
    mock: RunningMock, session: aiohttp.ClientSession
) -> None:
    url = f"{mock.url}/v1/chat/completions"
    _, one = await post(session, url, openai_chat())
    status, reply = await post(session, url, openai_chat(n=3))
    assert status == 200
    validate("CreateChatCompletionResponse", reply)
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    texts = {c["message"]["content"] for c in reply["choices"]}
    assert texts == {one["choices"][0]["message"]["content"]}
    assert reply["usage"]["completion_tokens"] == 3 * one["usage"]["completion_tokens"]

    _, payloads = await post(
        session, url, openai_chat(stream=True, n=2, stream_options={"include_usage": True})
    )
    chunks = chunks_of(payloads)
    assert content_by_choice(chunks) == {0: next(iter(texts)), 1: next(iter(texts))}
    finishes = [c["index"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert finishes == [0, 1]


async def test_logprobs_plain_and_streamed(
    mock: RunningMock, session: aiohttp.ClientSession
) -> None:
    url = f"{mock.url}/v1/chat/completions"
    status, reply = await post(session, url, openai_chat(logprobs=True, top_logprobs=3))
    assert status == 200
    validate("CreateChatCompletionResponse", reply)
    choice = reply["choices"][0]
    tokens = choice["logprobs"]["content"]
    assert "".join(t["token"] for t in tokens) == choice["message"]["content"]
    for token in tokens:
        validate("ChatCompletionTokenLogprob", token)
        assert token["logprob"] <= 0
        assert bytes(token["bytes"]).decode() == token["token"]
        assert len(token["top_logprobs"]) == 3
        assert token["top_logprobs"][0]["token"] == token["token"]
        ranked = [t["logprob"] for t in token["top_logprobs"]]
        assert ranked == sorted(ranked, reverse=True)

    _, payloads = await post(session, url, openai_chat(stream=True, logprobs=True))
    streamed = [
        t
        for ch in chunks_of(payloads)
        for c in ch["choices"]
        if c["logprobs"]
        for t in c["logprobs"]["content"]
    ]
    assert [t["token"] for t in streamed] == [t["token"] for t in tokens]
    assert all(t["top_logprobs"] == [] for t in streamed)

    _, plain = await post(session, url, openai_chat())
    assert plain["choices"][0]["logprobs"] is None


async def test_sdk_reads_n_and_logprobs(mock: RunningMock) -> None:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c:
        reply = await c.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": PROMPT}],
            n=2,
            logprobs=True,
            top_logprobs=2,
        )
    assert len(reply.choices) == 2
    logprobs = reply.choices[1].logprobs
    assert logprobs is not None
    assert logprobs.content
    assert len(logprobs.content[0].top_logprobs) == 2


# -- tool_choice ------------------------------------------------------------------------


async def test_a_forced_function_gets_arguments_valid_for_its_schema(
    mock: RunningMock, session: aiohttp.ClientSession
) -> None:
    body = openai_chat(
        tools=[*weather_tools("get_weather"), NESTED_TOOL],
        tool_choice={"type": "function", "function": {"name": "book_trip"}},
    )
    for stream in (False, True):
        status, reply = await post(
            session, f"{mock.url}/v1/chat/completions", {**body, "stream": stream}
        )
        assert status == 200, reply
        if stream:
            chunks = chunks_of(reply)
            deltas = [
                call
                for ch in chunks
                for c in ch["choices"]
                for call in c["delta"].get("tool_calls") or []
            ]
            names = [d["function"]["name"] for d in deltas if "name" in d.get("function", {})]
            arguments = "".join(d["function"].get("arguments", "") for d in deltas)
        else:
            calls = reply["choices"][0]["message"]["tool_calls"]
            names = [c["function"]["name"] for c in calls]
            arguments = calls[0]["function"]["arguments"]
        assert names == ["book_trip"]
        jsonschema.validate(orjson.loads(arguments), NESTED_TOOL["function"]["parameters"])


async def test_required_always_calls_and_none_never_calls(
    mock: RunningMock, session: aiohttp.ClientSession
) -> None:
    after_tool_result: list[JSON] = [
        {"role": "user", "content": PROMPT},
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": "{}"},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    url = f"{mock.url}/v1/chat/completions"
    tools = weather_tools("get_weather")
    for choice, calls in (("required", True), ("auto", False), ("none", False)):
        for stream in (False, True):
            body = openai_chat(stream, messages=after_tool_result, tools=tools, tool_choice=choice)
            status, reply = await post(session, url, body)
            assert status == 200, reply
            if stream:
                finish = [
                    c["finish_reason"]
                    for ch in chunks_of(reply)
                    for c in ch["choices"]
                    if c["finish_reason"]
                ]
            else:
                finish = [reply["choices"][0]["finish_reason"]]
            assert finish == (["tool_calls"] if calls else ["stop"]), (choice, stream)
    _, reply = await post(session, url, openai_chat(tools=tools, tool_choice="none"))
    assert "tool_calls" not in reply["choices"][0]["message"]


# -- what the mock refuses ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"n": MAX_CHOICES + 1}, "n"),
        ({"n": 0}, "n"),
        (
            {"modalities": ["text", "audio"], "audio": {"voice": "alloy", "format": "wav"}},
            "modalities",
        ),
        ({"top_logprobs": 2}, "top_logprobs"),
        ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
        ({"response_format": {"type": "yaml"}}, "response_format"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {}}},
            "response_format.json_schema",
        ),
        (
            {
                "response_format": {
                    "type": "json_schema",
                    "json_schema": {"name": "x", "schema": {"type": "object", "not": {}}},
                }
            },
            "response_format",
        ),
        ({"tool_choice": "required"}, "tool_choice"),
        (
            {
                "tools": weather_tools("get_weather"),
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
            "tool_choice",
        ),
        (
            {
                "tools": [
                    {
                        "type": "function",
                        "function": {
                            "name": "f",
                            "parameters": {
                                "type": "object",
                                "properties": {"code": {"type": "string", "pattern": "^z{9}$"}},
                                "required": ["code"],
                            },
                        },
                    }
                ],
                "tool_choice": "required",
            },
            "tools",
        ),
    ],
)
async def test_what_cannot_be_honoured_is_a_clear_400(
    mock: RunningMock, session: aiohttp.ClientSession, extra: JSON, param: str
) -> None:
    for stream in (False, True):
        status, reply = await post(
            session, f"{mock.url}/v1/chat/completions", openai_chat(stream, **extra)
        )
        assert status == 400
        validate("ErrorResponse", reply)
        assert reply["error"]["type"] == "invalid_request_error"
        assert reply["error"]["param"] == param
        assert reply["error"]["message"]
    assert mock.stats()["requests"] >= 2


async def test_the_sdk_raises_bad_request_for_an_unsatisfiable_schema(mock: RunningMock) -> None:
    async with openai.AsyncOpenAI(base_url=mock.url + "/v1", api_key="x", max_retries=0) as c:
        with pytest.raises(openai.BadRequestError, match="pattern"):
            await c.chat.completions.create(
                model="gpt-4o-mini",
                messages=[{"role": "user", "content": PROMPT}],
                response_format={
                    "type": "json_schema",
                    "json_schema": {
                        "name": "code",
                        "schema": {"type": "string", "pattern": "^z{9}$"},
                    },
                },
            )


# -- the same fields in the Anthropic and Gemini formats ------------------------------------


async def test_anthropic_tool_choice(session: aiohttp.ClientSession) -> None:
    tools = [{"name": "get_weather", "input_schema": WEATHER_TOOL_SCHEMA}]
    answered = [
        {"role": "user", "content": PROMPT},
        {
            "role": "assistant",
            "content": [{"type": "tool_use", "id": "toolu_1", "name": "get_weather", "input": {}}],
        },
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "sunny"}],
        },
    ]
    async with running_mock("anthropic") as m:
        url = f"{m.url}/v1/messages"

        async def stop_reason(**extra: Any) -> str:
            async with session.post(
                url, json=anthropic_messages(tools=tools, **extra), headers=ANTHROPIC_HEADERS
            ) as r:
                reply = await r.json()
            assert r.status == 200, reply
            for block in reply["content"]:
                if block["type"] == "tool_use":
                    jsonschema.validate(block["input"], WEATHER_TOOL_SCHEMA)
            return str(reply["stop_reason"])

        assert await stop_reason(tool_choice={"type": "any"}, messages=answered) == "tool_use"
        assert await stop_reason(messages=answered) == "end_turn"
        assert await stop_reason(tool_choice={"type": "none"}) == "end_turn"
        assert await stop_reason(tool_choice={"type": "tool", "name": "get_weather"}) == "tool_use"
        async with session.post(
            url,
            json=anthropic_messages(tools=tools, tool_choice={"type": "tool", "name": "nope"}),
            headers=ANTHROPIC_HEADERS,
        ) as r:
            error = await r.json()
        assert r.status == 400
        assert error["error"]["type"] == "invalid_request_error"
        assert "nope" in error["error"]["message"]


async def test_gemini_candidates_json_schema_and_forced_calls(
    session: aiohttp.ClientSession,
) -> None:
    schema = {
        "type": "OBJECT",
        "properties": {"city": {"type": "STRING"}, "days": {"type": "INTEGER"}},
        "required": ["city", "days"],
    }
    config = {"candidateCount": 2, "responseMimeType": "application/json", "responseSchema": schema}
    async with running_mock("gemini") as m:
        base = f"{m.url}/v1beta/models/gemini-2.0-flash"
        async with session.post(
            f"{base}:generateContent", json=gemini_contents(generationConfig=config)
        ) as r:
            reply = await r.json()
        assert [c["index"] for c in reply["candidates"]] == [0, 1]
        for candidate in reply["candidates"]:
            value = orjson.loads(candidate["content"]["parts"][0]["text"])
            assert value == {"city": "tell", "days": 1}
        async with session.post(
            f"{base}:streamGenerateContent?alt=sse", json=gemini_contents(generationConfig=config)
        ) as r:
            chunks = gemini_chunks(await r.read())
        assert {c["index"] for ch in chunks for c in ch["candidates"]} == {0, 1}

        forced = gemini_contents(
            tools=[{"functionDeclarations": [{"name": "f", "parameters": WEATHER_TOOL_SCHEMA}]}],
            toolConfig={"functionCallingConfig": {"mode": "ANY"}},
        )
        async with session.post(f"{base}:generateContent", json=forced) as r:
            reply = await r.json()
        call = reply["candidates"][0]["content"]["parts"][0]["functionCall"]
        jsonschema.validate(call["args"], WEATHER_TOOL_SCHEMA)

        too_many = gemini_contents(generationConfig={"candidateCount": 99})
        async with session.post(f"{base}:generateContent", json=too_many) as r:
            error = await r.json()
        assert r.status == 400
        assert error["error"]["status"] == "INVALID_ARGUMENT"
