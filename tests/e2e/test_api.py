"""The OpenAI-compatible API end to end: the official SDK -> proxy -> mock upstreams."""

from __future__ import annotations

import asyncio
import base64
import io
import struct
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI, OpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.conftest import PRIMARY_KEY, Stack
from tests.openapi import validate

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello there"}]
CB_HEADERS = (
    "x-request-id",
    "x-cb-provider",
    "x-cb-model",
    "x-cb-upstream",
    "x-cb-attempts",
    "x-cb-fallback",
    "x-cb-breaker-state",
    "x-cb-route",
)


@pytest.fixture
async def sdk(stack: Stack) -> AsyncIterator[AsyncOpenAI]:
    async with AsyncOpenAI(base_url=stack.proxy.base_url, api_key="not-needed", max_retries=0) as c:
        yield c


async def post(stack: Stack, path: str, body: Any, **kw: Any) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else orjson.dumps(body)
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            stack.proxy.api_url + path,
            data=data,
            headers={"content-type": "application/json", **kw.pop("headers", {})},
            **kw,
        ) as resp,
    ):
        raw = await resp.read()
        return resp.status, resp.headers, orjson.loads(raw) if raw else None


async def test_async_sdk_plain_chat_gets_a_valid_completion_with_headers(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(model="gpt-4o-mini", messages=CHAT)
    completion = raw.parse()
    assert completion.choices[0].message.content
    body = orjson.loads(raw.http_response.content)
    validate("CreateChatCompletionResponse", body)
    for name in CB_HEADERS:
        assert raw.headers.get(name), name
    assert raw.headers["x-cb-provider"] == "primary"
    assert raw.headers["x-cb-fallback"] == "false"
    meta = body["circuit_breaker"]
    assert meta["provider"] == "primary"
    assert meta["fallback_used"] is False
    assert meta["attempts"] == 1
    usage = body["usage"]
    expected = (usage["prompt_tokens"] * 0.00015 + usage["completion_tokens"] * 0.0006) / 1000
    assert meta["cost_usd"] == pytest.approx(expected)
    assert float(raw.headers["x-cb-cost-usd"]) == pytest.approx(expected, abs=1e-8)


async def test_sync_sdk_plain_and_stream(stack: Stack) -> None:
    sync = OpenAI(base_url=stack.proxy.base_url, api_key="not-needed", max_retries=0)

    def calls() -> tuple[str, str]:
        # The sync client blocks: it runs in a thread while the proxy serves on this loop.
        plain = sync.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
        pieces = [
            c.choices[0].delta.content or ""
            for c in sync.chat.completions.create(
                model="gpt-4o-mini",
                messages=CHAT,
                stream=True,
            )
            if c.choices
        ]
        return plain.choices[0].message.content or "", "".join(pieces)

    try:
        plain, streamed = await asyncio.to_thread(calls)
    finally:
        sync.close()
    assert plain
    assert streamed == plain  # the mock's text is deterministic per prompt


async def test_async_sdk_stream_chunks_validate_and_usage_arrives_once(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    stream = await sdk.chat.completions.create(
        model="gpt-4o-mini", messages=CHAT, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    roles = [c.choices[0].delta.role for c in chunks if c.choices and c.choices[0].delta.role]
    assert roles == ["assistant"]
    usage_chunks = [c for c in chunks if c.usage is not None]
    assert len(usage_chunks) == 1
    assert usage_chunks[0].choices == []
    for c in chunks:
        validate("CreateChatCompletionStreamResponse", c.model_dump(exclude_unset=True))
    assert chunks[-2].choices[0].finish_reason == "stop" or any(
        c.choices and c.choices[0].finish_reason == "stop" for c in chunks
    )


async def test_stream_without_usage_request_gets_no_usage_chunk_but_is_costed(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    stream = await sdk.chat.completions.create(model="gpt-4o-mini", messages=CHAT, stream=True)
    chunks = [c async for c in stream]
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)
    # The proxy asked the upstream for usage on the client's behalf, for cost accounting.
    assert stack.primary.stats()["last_body"]["stream_options"] == {"include_usage": True}
    totals = stack.proxy.state.usage.by_model[("primary", "gpt-4o-mini")]
    assert totals.completion_tokens > 0


async def test_raw_stream_bytes_are_exact_sse(stack: Stack) -> None:
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(stack.proxy.api_url + "/v1/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200
        assert resp.headers["content-type"].startswith("text/event-stream")
        assert resp.headers["x-cb-provider"] == "primary"
        text = (await resp.read()).decode()
    events = text.split("\n\n")
    assert events[-1] == ""
    assert events[-2] == "data: [DONE]"
    for event in events[:-2]:
        assert event.startswith("data: ")
        assert "\n" not in event
        validate("CreateChatCompletionStreamResponse", orjson.loads(event[6:]))


async def test_extension_is_validated_and_never_forwarded(stack: Stack, sdk: AsyncOpenAI) -> None:
    c = sdk
    await c.chat.completions.create(
        model="gpt-4o-mini",
        messages=CHAT,
        extra_body={"circuit_breaker": {"routing_strategy": "cost_optimized"}},
    )
    assert "circuit_breaker" not in stack.primary.stats()["last_body"]
    with pytest.raises(openai.BadRequestError) as info:
        await c.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_body={"circuit_breaker": {"routing_stratgy": "cost_optimized"}},
        )
    assert info.value.body is not None
    assert "routing_stratgy" in str(info.value.body)
    with pytest.raises(openai.BadRequestError):
        await c.chat.completions.create(
            model="gpt-4o-mini",
            messages=CHAT,
            extra_body={"circuit_breaker": {"max_latency_ms": "fast"}},
        )


async def test_provider_key_injected_and_client_key_not_forwarded(stack: Stack) -> None:
    async with AsyncOpenAI(
        base_url=stack.proxy.base_url, api_key="sk-client-own-key", max_retries=0
    ) as c:
        await c.chat.completions.create(model="gpt-4o-mini", messages=CHAT)
        seen = stack.primary.stats()["last_headers"]
        assert seen.get("authorization") == f"Bearer {PRIMARY_KEY}"
        await c.chat.completions.create(model="backup-only", messages=CHAT)
    seen = stack.backup.stats()["last_headers"]
    assert "authorization" not in {k.lower() for k in seen}


async def test_model_rewrite_alias_and_header_route(stack: Stack, sdk: AsyncOpenAI) -> None:
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-3.5-turbo-0125", messages=CHAT
    )
    assert raw.headers["x-cb-model"] == "gpt-4o-mini"
    assert "rewrote" in raw.headers["x-cb-route"]
    assert stack.primary.stats()["last_body"]["model"] == "gpt-4o-mini"
    raw = await sdk.chat.completions.with_raw_response.create(
        model="gpt-4o-mini-2024-07-18", messages=CHAT
    )
    assert raw.headers["x-cb-upstream"] == "gpt-4o-mini@primary"
    raw = await sdk.chat.completions.with_raw_response.create(model="solo", messages=CHAT)
    assert stack.primary.stats()["last_body"]["model"] == "solo-upstream"
    async with AsyncOpenAI(
        base_url=stack.proxy.base_url,
        api_key="x",
        max_retries=0,
        default_headers={"X-Team": "research-nlp"},
    ) as c:
        raw = await c.chat.completions.with_raw_response.create(
            model="team-anything", messages=CHAT
        )
    assert raw.headers["x-cb-provider"] == "backup"
    with pytest.raises(openai.NotFoundError):
        await sdk.chat.completions.create(model="team-anything", messages=CHAT)


async def test_models_lists_models_aliases_and_virtual_models(
    stack: Stack, sdk: AsyncOpenAI
) -> None:
    page = await sdk.models.list()
    ids = {m.id for m in page.data}
    assert {"gpt-4o-mini", "gpt-4o-mini-2024-07-18", "solo", "auto"} <= ids
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.proxy.api_url + "/v1/models") as resp,
    ):
        validate("ListModelsResponse", await resp.json())


async def test_completions_and_embeddings(stack: Stack, sdk: AsyncOpenAI) -> None:
    c = sdk
    done = await c.completions.create(model="gpt-4o-mini", prompt="Say this is a test")
    assert done.choices[0].text
    chunks = [
        x async for x in await c.completions.create(model="gpt-4o-mini", prompt="hi", stream=True)
    ]
    assert any(ch.choices and ch.choices[0].text for ch in chunks)
    emb = await c.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(emb.data) == 2
    assert len(emb.data[0].embedding) > 0
    # The SDK asked for base64 by default: the proxy relays it as is and the SDK decodes it.
    assert stack.primary.stats()["last_body"]["encoding_format"] == "base64"
    status, _, body = await post(
        stack,
        "/v1/embeddings",
        {"model": "text-embedding-3-small", "input": "x", "encoding_format": "base64"},
    )
    assert status == 200
    floats = struct.unpack(
        f"<{len(base64.b64decode(body['data'][0]['embedding'])) // 4}f",
        base64.b64decode(body["data"][0]["embedding"]),
    )
    assert len(floats) > 0


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"{not json", "not valid JSON"),
        (b"", "empty"),
        (b"[1, 2]", "JSON object"),
        ({"messages": CHAT}, "'model'"),
        ({"model": "gpt-4o-mini"}, "'messages'"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, "'messages' must be"),
        ({"model": 5, "messages": CHAT}, "'model' must be"),
        ({"model": "gpt-4o-mini", "messages": [{"content": "x"}]}, "role"),
        ({"model": "gpt-4o-mini", "messages": CHAT, "stream": "yes"}, "'stream'"),
        ({"model": "gpt-4o-mini", "messages": CHAT, "circuit_breaker": 3}, "circuit_breaker"),
        # Deep nesting parses (orjson reads 1,024 levels) but could not be written again.
        (
            b'{"model": "gpt-4o-mini", "messages": [], "x": ' + b"[" * 300 + b"]" * 300 + b"}",
            "deeper than 128",
        ),
        (b'{"model": "gpt-4o-mini", "x": ' + b"[" * 1000 + b"]" * 1000 + b"}", "deeper than 128"),
        (b'{"x": ' + b"[" * 2000 + b"]" * 2000 + b"}", "not valid JSON"),
    ],
)
async def test_bad_requests_get_400_in_openai_shape(stack: Stack, body: Any, fragment: str) -> None:
    status, headers, payload = await post(stack, "/v1/chat/completions", body)
    assert status == 400
    validate("ErrorResponse", payload)
    assert payload["error"]["type"] == "invalid_request_error"
    assert fragment in payload["error"]["message"]
    assert headers["x-request-id"]
    assert stack.primary.stats()["requests"] == 0


async def test_unknown_model_is_404_listing_what_exists(stack: Stack, sdk: AsyncOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await sdk.chat.completions.create(model="gpt-9", messages=CHAT)
    body: Any = info.value.body
    assert body["code"] == "model_not_found"
    assert "gpt-4o-mini" in body["message"]
    assert "auto" in body["message"]


async def test_body_over_the_limit_is_413(stack: Stack) -> None:
    limit = stack.proxy.state.settings.max_body_bytes
    big = orjson.dumps(
        {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "x" * (limit + 10)}]}
    )

    async def chunked() -> AsyncIterator[bytes]:
        # No Content-Length: the limit must hold while the body streams in.
        for start in range(0, len(big), 1 << 20):
            yield big[start : start + (1 << 20)]

    for data in (io.BytesIO(big), chunked()):
        async with (
            aiohttp.ClientSession() as session,
            session.post(stack.proxy.api_url + "/v1/chat/completions", data=data) as resp,
        ):
            assert resp.status == 413
            validate("ErrorResponse", await resp.json())
    assert stack.primary.stats()["requests"] == 0


async def test_unknown_endpoint_and_method_are_openai_errors(stack: Stack) -> None:
    status, _, payload = await post(stack, "/v1/nothing-here", {})
    assert status == 404
    validate("ErrorResponse", payload)
    async with (
        aiohttp.ClientSession() as session,
        session.get(stack.proxy.api_url + "/v1/chat/completions") as resp,
    ):
        assert resp.status == 405
        validate("ErrorResponse", await resp.json())


async def test_upstream_4xx_passes_through_unchanged(stack: Stack) -> None:
    custom = {
        "error": {
            "message": "bad temperature",
            "type": "invalid_request_error",
            "param": "temperature",
            "code": "invalid_value",
        }
    }
    await stack.primary.set_fault(kind="status", status=400, body=custom)
    status, headers, payload = await post(
        stack, "/v1/chat/completions", {"model": "gpt-4o-mini", "messages": CHAT}
    )
    assert status == 400
    assert payload == custom
    assert headers["x-request-id"]
    assert stack.backup.stats()["requests"] == 0  # a caller fault never fails over


async def test_connect_failure_is_502_when_nothing_else_can_serve(stack: Stack) -> None:
    # 'solo' is only on the primary; point its provider at a closed port by stopping nothing:
    # use the no-key provider's sibling instead: a deployment whose upstream refuses.
    rules = stack.proxy.state.rules
    closed_port = _closed_port()
    from dataclasses import replace

    primary = replace(rules.providers["primary"], base_url=f"http://127.0.0.1:{closed_port}/v1")
    stack.proxy.state.swap_rules(replace(rules, providers={**rules.providers, "primary": primary}))
    status, _, payload = await post(
        stack, "/v1/chat/completions", {"model": "solo", "messages": CHAT}
    )
    assert status == 502
    validate("ErrorResponse", payload)
    assert "unreachable" in payload["error"]["message"]


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_stalled_upstream_is_504_per_phase(stack: Stack) -> None:
    await stack.primary.set_fault(kind="stall")
    status, _, payload = await post(
        stack, "/v1/chat/completions", {"model": "solo", "messages": CHAT}
    )
    assert status == 504
    validate("ErrorResponse", payload)
    assert "first token" in payload["error"]["message"] or "headers" in payload["error"]["message"]
    stack.primary.clear_faults()


async def test_missing_key_means_provider_unavailable(stack: Stack) -> None:
    status, _, payload = await post(
        stack, "/v1/chat/completions", {"model": "locked", "messages": CHAT}
    )
    assert status == 503
    assert "CB_TEST_UNSET_KEY" in payload["error"]["message"]


async def test_nesting_at_the_limit_is_served_and_one_level_more_is_a_400(stack: Stack) -> None:
    def body(depth: int) -> bytes:
        # The top-level object is level 1; "user" nests depth - 1 arrays inside it.
        inner = b"[" * (depth - 1) + b"]" * (depth - 1)
        return (
            b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], '
            b'"user_x": ' + inner + b"}"
        )

    status, _, payload = await post(stack, "/v1/chat/completions", body(129))
    assert status == 400, payload
    assert "deeper than 128" in payload["error"]["message"]
    status, _, payload = await post(stack, "/v1/chat/completions", body(128))
    assert status == 200, payload


async def test_a_compressed_body_is_refused_unread_with_415(stack: Stack) -> None:
    import gzip

    # 1 MiB of zeros inside a JSON string: ~1 KiB on the wire, inflated it would be 1 MiB.
    inflated = b'{"model": "gpt-4o-mini", "messages": [], "x": "' + b"0" * (1 << 20) + b'"}'
    bomb = gzip.compress(inflated)
    assert len(bomb) < 4096
    status, _, payload = await post(
        stack, "/v1/chat/completions", bomb, headers={"content-encoding": "gzip"}
    )
    assert status == 415
    validate("ErrorResponse", payload)
    assert payload["error"]["code"] == "unsupported_media_type"
    assert "gzip" in payload["error"]["message"]
    assert stack.primary.stats()["requests"] == 0
    status, _, _ = await post(
        stack,
        "/v1/chat/completions",
        {"model": "gpt-4o-mini", "messages": CHAT},
        headers={"content-encoding": "identity"},
    )
    assert status == 200
