"""The upstream layer end to end: strict framing, bounded buffers, local failures.

docs/upstream.md describes the layer.

Each malformed or oversized reply reaches the client as one OpenAI-shaped 502
and counts as a failure of that upstream; a bound is enforced while reading,
so the proxy hangs up long before an endless upstream has sent its bytes
(``RawStreamServer.bytes_written`` shows how much the proxy took). Running
out of pooled connections is the proxy's own failure: it moves on to the next
candidate and never reaches the upstream's breaker.

Everything runs on 127.0.0.1 port 0: the proxy through ``tests.harness``, a
``RawStreamServer`` as the upstream that misbehaves, a mock as the backup.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.sse import EventSizeGuard, EventTooLarge, SSEParser
from proxy.providers.openai import OpenAIStreamRelay
from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.harness import PRIMARY_BACKUP_MODELS, ProxyHandle, running_proxy, write_rules

RULES = (
    """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: {connect}, first_token: 10, idle: 10, total: 30}}
    breaker: {{failure_threshold: 100, min_throughput: 1000, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 2, first_token: 10, idle: 10, total: 30}}
"""
    + PRIMARY_BACKUP_MODELS
)
BODY = {"model": "solo", "messages": [{"role": "user", "content": "hi"}]}
MiB = 1024 * 1024
# An upstream that would send this much if nobody stopped it: the same 64 KiB block, so the
# fake holds one block in memory however many it sends.
ENDLESS_BLOCK = b"a" * (64 * 1024)
ENDLESS = [ENDLESS_BLOCK] * 1024  # 64 MiB
# The proxy may take what sits in socket buffers before it reads the bound: a few MiB at most.
TAKEN_BOUND = 24 * MiB
CONTENT = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
CONTENT += b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'


@dataclass
class Rig:
    proxy: ProxyHandle
    backup: RunningMock


@asynccontextmanager
async def rig(
    tmp_path: Path, primary: str, *, connect: float = 2, **overrides: Any
) -> AsyncIterator[Rig]:
    async with running_mock("openai", name="backup") as backup:
        text = RULES.format(primary=primary, backup=backup.url, connect=connect)
        async with running_proxy(write_rules(tmp_path, text), **overrides) as proxy:
            yield Rig(proxy, backup)


async def post(proxy: ProxyHandle, body: Mapping[str, Any]) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        return resp.status, await resp.read()


def error_of(raw: bytes) -> dict[str, Any]:
    error: dict[str, Any] = orjson.loads(raw)["error"]
    assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
    return error


def reports(proxy: ProxyHandle, provider: str) -> dict[str, int]:
    result: dict[str, int] = proxy.state.breaker(provider).get_metrics()["reports"]
    return result


def model_reports(proxy: ProxyHandle, provider: str) -> dict[str, int]:
    """solo@provider's reports (BODY's model): a reply's own failures count there."""
    result: dict[str, int] = proxy.model_breaker(provider, "solo").get_metrics()["reports"]
    return result


def assert_a_model_failure(proxy: ProxyHandle, provider: str) -> None:
    """The provider answered: a failure of the model's deployment, a success of its transport."""
    assert model_reports(proxy, provider)["failure"] == 1
    assert reports(proxy, provider)["failure"] == 0


# -- strict framing -----------------------------------------------------------------------------


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"


def exact(head: bytes, *body: bytes, hold: bool = False) -> RawStreamServer:
    """An upstream that sends exactly ``head`` and ``body`` (no framing added)."""
    reply = RawReply(raw_head=head, chunks=body, chunked=False, hold_before=0 if hold else None)
    return RawStreamServer(reply)


async def test_conflicting_content_lengths_are_a_502(tmp_path: Path) -> None:
    head = HEAD + b"Content-Length: 2\r\nContent-Length: 40\r\n\r\n"
    async with (
        exact(head, b"{}") as up,
        rig(tmp_path, up.url) as r,
    ):
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert "Content-Length" in error_of(raw)["message"]
        # The request was written and a reply came: a malformed one is the model server's.
        assert_a_model_failure(r.proxy, "primary")


async def test_content_length_with_transfer_encoding_is_a_502(tmp_path: Path) -> None:
    head = HEAD + b"Content-Length: 2\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with exact(head, b"2\r\n{}\r\n0\r\n\r\n") as up, rig(tmp_path, up.url) as r:
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert "Transfer-Encoding" in error_of(raw)["message"]


async def test_a_transfer_encoding_other_than_chunked_is_a_502(tmp_path: Path) -> None:
    """llhttp would read a gzip-coded body until the close and hand over compressed bytes."""
    head = HEAD + b"Transfer-Encoding: gzip, chunked\r\n\r\n"
    async with exact(head, b"2\r\n{}\r\n0\r\n\r\n") as up, rig(tmp_path, up.url) as r:
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert "Transfer-Encoding" in error_of(raw)["message"]


async def test_a_bad_chunk_size_is_a_502(tmp_path: Path) -> None:
    head = HEAD + b"Transfer-Encoding: chunked\r\n\r\n"
    async with exact(head, b"0x2\r\n{}\r\n0\r\n\r\n") as up, rig(tmp_path, up.url) as r:
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert "chunk size" in error_of(raw)["message"]
        assert_a_model_failure(r.proxy, "primary")


# -- bounded buffers ----------------------------------------------------------------------------


async def test_an_oversized_response_head_is_a_502(tmp_path: Path) -> None:
    head = HEAD + b"X-Big: " + b"h" * (80 * 1024) + b"\r\nContent-Length: 2\r\n\r\n"
    async with (
        exact(head, b"{}") as up,
        rig(tmp_path, up.url, upstream_max_header_bytes=32 * 1024) as r,
    ):
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        error = error_of(raw)
        assert error["code"] == "upstream_response_too_large"
        assert "32768" in error["message"]
        assert_a_model_failure(r.proxy, "primary")


async def test_a_plain_body_over_the_limit_is_a_502_and_is_not_read_whole(tmp_path: Path) -> None:
    reply = RawReply(headers={"Content-Type": "application/json"}, chunks=ENDLESS)
    async with (
        RawStreamServer(reply) as up,
        rig(tmp_path, up.url, upstream_max_body_bytes=1 * MiB) as r,
    ):
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert error_of(raw)["code"] == "upstream_response_too_large"
        assert_a_model_failure(r.proxy, "primary")
    assert up.bytes_written < TAKEN_BOUND  # the proxy hung up; 64 MiB were never taken


async def test_a_declared_length_over_the_limit_fails_before_reading(tmp_path: Path) -> None:
    head = HEAD + f"Content-Length: {64 * MiB}\r\n\r\n".encode()
    reply = RawReply(raw_head=head, chunks=ENDLESS, chunked=False, hold_before=0)
    async with (
        RawStreamServer(reply) as up,
        rig(tmp_path, up.url, upstream_max_body_bytes=1 * MiB) as r,
    ):
        status, raw = await post(r.proxy, BODY)
        assert status == 502
        assert "declares" in error_of(raw)["message"]
    assert up.bytes_written == 0  # the body was held back: the head alone decided


async def test_an_sse_event_over_the_limit_before_content_is_a_502(tmp_path: Path) -> None:
    """A stream without a newline: bounded, and linear (it was re-copied on every read)."""
    reply = RawReply(chunks=ENDLESS)
    async with (
        RawStreamServer(reply) as up,
        rig(tmp_path, up.url, upstream_max_event_bytes=256 * 1024) as r,
    ):
        status, raw = await post(r.proxy, {**BODY, "stream": True})
        assert status == 502
        error = error_of(raw)
        assert error["code"] == "upstream_response_too_large"
        assert "server-sent event" in error["message"]
        assert_a_model_failure(r.proxy, "primary")
    assert up.bytes_written < TAKEN_BOUND


async def test_endless_preamble_before_the_first_content_is_bounded_and_a_502(
    tmp_path: Path,
) -> None:
    """Role-only deltas without end: every event is small, their sum is held until content."""
    role = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
    role += b'"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}\n\n'
    block = role * (64 * 1024 // len(role))
    reply = RawReply(chunks=[block] * 1024)  # ~64 MiB of preamble if nobody stopped it
    async with (
        RawStreamServer(reply) as up,
        rig(tmp_path, up.url, upstream_max_body_bytes=2 * MiB) as r,
    ):
        status, raw = await post(r.proxy, {**BODY, "stream": True})
        assert status == 502
        error = error_of(raw)
        assert error["code"] == "upstream_response_too_large"
        assert "before its first content event" in error["message"]
        assert_a_model_failure(r.proxy, "primary")
    assert up.bytes_written < TAKEN_BOUND


async def test_an_sse_event_over_the_limit_after_content_is_an_in_band_error(
    tmp_path: Path,
) -> None:
    reply = RawReply(chunks=[CONTENT, *ENDLESS])
    async with (
        RawStreamServer(reply) as up,
        rig(tmp_path, up.url, upstream_max_event_bytes=256 * 1024) as r,
    ):
        status, raw = await post(r.proxy, {**BODY, "stream": True})
        assert status == 200  # committed at the first content event
        events = [e for e in raw.split(b"\n\n") if e]
        assert events[0] == CONTENT.rstrip(b"\n")
        last = orjson.loads(events[-1].removeprefix(b"data: "))
        assert last["error"]["code"] == "upstream_response_too_large"
        assert_a_model_failure(r.proxy, "primary")
    assert up.bytes_written < TAKEN_BOUND


# -- local failures -----------------------------------------------------------------------------


async def test_pool_exhaustion_is_a_local_failure_that_fails_over_uncounted(
    tmp_path: Path,
) -> None:
    """One connection per host: the second request waits the connect timeout, then moves on."""
    held = RawReply(chunks=[CONTENT, b"data: [DONE]\n\n"], hold_before=1)
    async with (
        RawStreamServer(held) as up,
        rig(tmp_path, up.url, connect=0.3, upstream_max_connections_per_host=1) as r,
    ):
        first = asyncio.create_task(post(r.proxy, {**BODY, "model": "pair", "stream": True}))
        await up.wait_requests(1)  # the primary's only connection is now busy
        status, raw = await post(r.proxy, {**BODY, "model": "pair"})
        assert status == 200
        assert orjson.loads(raw)["circuit_breaker"]["provider"] == "backup"
        primary = reports(r.proxy, "primary")
        assert primary["failure"] == 0  # never the upstream's fault
        up.release()
        assert (await first)[0] == 200
        calls = [
            line
            for line in (await r.proxy.metrics_text()).splitlines()
            if line.startswith("cb_proxy_upstream_calls_total{") and 'upstream="primary"' in line
        ]
        assert any('outcome="local_failure"' in line for line in calls), calls


async def test_pool_exhaustion_with_no_other_candidate_is_a_503(tmp_path: Path) -> None:
    held = RawReply(chunks=[CONTENT, b"data: [DONE]\n\n"], hold_before=1)
    async with (
        RawStreamServer(held) as up,
        rig(tmp_path, up.url, connect=0.3, upstream_max_connections_per_host=1) as r,
    ):
        first = asyncio.create_task(post(r.proxy, {**BODY, "stream": True}))
        await up.wait_requests(1)
        status, raw = await post(r.proxy, BODY)
        assert status == 503
        error = error_of(raw)
        assert error["code"] == "proxy_overloaded"
        assert "CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST" in error["message"]
        assert reports(r.proxy, "primary")["failure"] == 0
        up.release()
        assert (await first)[0] == 200


# -- the relay and parser paths stay linear and exact at every split ----------------------------


def test_relay_parser_and_guard_agree_at_every_split() -> None:
    """Pieces without a newline are kept, not re-joined per read; the output is unchanged."""
    finish = CONTENT.replace(b'"finish_reason":null', b'"finish_reason":"stop"')
    assert finish != CONTENT  # a [DONE] needs a finish reason before it (else truncated)
    stream = CONTENT.replace(b"\n\n", b"\r\n\r\n") + finish + b"data: [DONE]\n\n"
    whole = OpenAIStreamRelay(strip_usage=False)
    expected = whole.feed(stream) + whole.finish()
    for size in (1, 2, 3, 7, 64):
        relay = OpenAIStreamRelay(strip_usage=False)
        parser = SSEParser()
        guard = EventSizeGuard(len(CONTENT) + 4)
        out, events = b"", []
        for at in range(0, len(stream), size):
            piece = stream[at : at + size]
            guard.feed(piece)  # never more than one event's bytes since a blank line
            out += relay.feed(piece)
            events += parser.feed(piece)
        assert out + relay.finish() == expected
        assert [e.data for e in events + parser.close()][-1] == "[DONE]"
    guard = EventSizeGuard(10)
    for _ in range(10):
        guard.feed(b"a")  # ten bytes of one unfinished event: at the bound, not over it
    with pytest.raises(EventTooLarge):
        guard.feed(b"a")
