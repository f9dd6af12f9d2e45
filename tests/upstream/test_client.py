"""The upstream client (proxy.upstream.client, connection, response) on real 127.0.0.1 sockets.

The shared raw server (``tests.fakes.raw.RawUpstream``) runs a script per
accepted connection that writes exact response bytes, and records what it
received, so a test can count connections and see the client hang up. The
decoder's split-anywhere properties feed a connection piece by piece
(``ScriptedConnection``) instead: TCP may merge what a server writes
separately, and the point there is to reach every split.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import socket
import ssl
import subprocess
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.upstream.client import UpstreamPool, may_resend, split_url
from proxy.upstream.connection import HIGH_WATER, MAX_HEADER_BYTES, Connection
from proxy.upstream.errors import ConnectFailed, ConnectTimeout, Disconnected, PayloadError
from proxy.upstream.response import Response
from tests.fakes.raw import Handler, Peer, RawUpstream, ok, serving
from tests.fakes.upstream import RawReply, RawStreamServer

CONNECT = 5.0  # connect_timeout for requests to fakes that do accept
WAIT = 5.0  # bound on waiting for an event a test expects to happen
ORIGIN = ("http", "upstream.test", 80)


@pytest.fixture
async def pool() -> AsyncIterator[UpstreamPool]:
    upstream = UpstreamPool()
    yield upstream
    await upstream.close()


async def fetch(
    pool: UpstreamPool, url: str, method: str = "GET", body: bytes | None = None
) -> tuple[int, bytes]:
    resp = await pool.request(method, url, {}, body, connect_timeout=CONNECT)
    async with resp:
        return resp.status, await resp.read()


async def within(awaitable: Awaitable[Any]) -> None:
    async with asyncio.timeout(WAIT):
        await awaitable


def idle_count(pool: UpstreamPool, port: int) -> int:
    return len(pool.idle_connections(("http", "127.0.0.1", port)))


# -- URLs and the request head -------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "origin", "host", "target"),
    [
        ("http://api.test/v1/x?a=1&b=2", ("http", "api.test", 80), "api.test", "/v1/x?a=1&b=2"),
        ("https://API.test", ("https", "api.test", 443), "api.test", "/"),
        ("http://api.test:443/", ("http", "api.test", 443), "api.test:443", "/"),
        ("https://api.test:8443/p", ("https", "api.test", 8443), "api.test:8443", "/p"),
        ("http://[::1]:8080/p", ("http", "::1", 8080), "[::1]:8080", "/p"),
        ("https://[::1]/p", ("https", "::1", 443), "[::1]", "/p"),
    ],
)
def test_split_url(url: str, origin: tuple[str, str, int], host: str, target: str) -> None:
    assert split_url(url) == (origin, host, target)


@pytest.mark.parametrize("url", ["ftp://api.test/", "api.test/v1", "http:///nohost"])
def test_split_url_refuses_what_it_cannot_connect_to(url: str) -> None:
    with pytest.raises(ConnectFailed, match="unsupported upstream URL"):
        split_url(url)


async def test_request_head_carries_host_port_length_and_the_given_headers(
    pool: UpstreamPool,
) -> None:
    async with RawUpstream(serving(ok())) as up:
        body = b'{"model":"m"}'
        headers = {"Authorization": "Bearer k", "Content-Type": "application/json"}
        resp = await pool.request(
            "POST", f"{up.url}/v1/chat?x=1", headers, body, connect_timeout=CONNECT
        )
        async with resp:
            assert await resp.read() == b"ok"
        [got] = up.requests
    assert got.request_line == "POST /v1/chat?x=1 HTTP/1.1"
    assert got.header("host") == [f"127.0.0.1:{up.port}"]
    assert got.header("content-length") == [str(len(body))]
    assert got.header("authorization") == ["Bearer k"]
    assert got.header("content-type") == ["application/json"]
    assert got.header("accept-encoding") == []  # identity bodies only (module docstring)
    assert got.header("transfer-encoding") == []
    assert got.body == body


async def test_get_without_body_sends_no_content_length_and_post_without_body_sends_zero(
    pool: UpstreamPool,
) -> None:
    async with RawUpstream(serving(ok())) as up:
        await fetch(pool, f"{up.url}/models")
        await fetch(pool, f"{up.url}/v1/x", method="POST")
        get, post = up.requests
    assert get.request_line == "GET /models HTTP/1.1"
    assert get.header("content-length") == []
    assert post.header("content-length") == ["0"]


# -- response framing over real sockets ----------------------------------------------------


async def test_content_length_body_and_case_insensitive_multi_headers(pool: UpstreamPool) -> None:
    reply = ok(b"hello", "X-Thing: one", "x-thing: two", "Content-Type: text/plain")
    async with RawUpstream(serving(reply)) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert resp.status == 200
            assert resp.headers.getall("X-THING") == ["one", "two"]
            assert resp.headers["content-type"] == "text/plain"
            assert await resp.read() == b"hello"
            assert await resp.read() == b""  # the end stays the end
            assert await resp.read_chunk() == b""


async def test_chunked_body_with_extensions_and_trailers_then_reuse(pool: UpstreamPool) -> None:
    chunked = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
        b"5;name=value\r\nhello\r\n"
        b'000A;a;b="q;uoted"\r\n world, 10\r\n'
        b"1\r\n!\r\n"
        b"0;last=yes\r\nX-Trailer: t\r\nX-Other: u\r\n\r\n"
    )
    async with RawUpstream(serving(chunked, ok(b"second"))) as up:
        assert await fetch(pool, up.url) == (200, b"hello world, 10!")
        # The trailers were consumed: the next reply on the same connection parses cleanly.
        assert await fetch(pool, up.url) == (200, b"second")
        assert up.connections == 1


async def test_close_delimited_body_ends_at_the_close_and_is_not_pooled(
    pool: UpstreamPool,
) -> None:
    async def close_delimited(peer: Peer) -> None:
        await peer.receive()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nno length, ")
        await peer.send(b"just the end")

    async with RawUpstream(close_delimited) as up:
        assert await fetch(pool, up.url) == (200, b"no length, just the end")
        assert await fetch(pool, up.url) == (200, b"no length, just the end")
        assert up.connections == 2
    assert idle_count(pool, up.port) == 0


async def test_bytes_after_the_body_keep_the_connection_out_of_the_pool(
    pool: UpstreamPool,
) -> None:
    """Whatever follows a complete body answers nothing we asked: never reuse that connection."""
    junk = ok(b"not for you")
    async with RawUpstream(serving(ok(b"first") + junk, ok(b"second"))) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        assert await fetch(pool, up.url) == (200, b"second")
        assert up.connections == 2


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 204 No Content\r\n\r\n",
        b"HTTP/1.1 304 Not Modified\r\nContent-Length: 1234\r\nETag: x\r\n\r\n",
    ],
)
async def test_no_body_statuses_have_no_body_and_keep_the_connection(
    pool: UpstreamPool, reply: bytes
) -> None:
    async with RawUpstream(serving(reply, ok(b"next"))) as up:
        status, body = await fetch(pool, up.url)
        assert (status, body) == (int(reply[9:12]), b"")
        assert await fetch(pool, up.url) == (200, b"next")
        assert up.connections == 1


async def test_interim_1xx_responses_are_skipped(pool: UpstreamPool) -> None:
    reply = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        + ok(b"final", "X-Final: 1")
    )
    async with RawUpstream(serving(reply)) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert resp.status == 200
            assert "link" not in resp.headers
            assert resp.headers["x-final"] == "1"
            assert await resp.read() == b"final"


async def test_read_chunk_yields_pieces_as_they_arrive(pool: UpstreamPool) -> None:
    pieces = [b'data: {"n":1}\n\n', b'data: {"n":2}\n\n', b"data: [DONE]\n\n"]
    async with RawStreamServer(RawReply(chunks=pieces, hold_before=1)) as up:
        resp = await pool.request("POST", f"{up.url}/v1/chat", {}, b"{}", connect_timeout=CONNECT)
        async with resp:
            # Held before the second chunk: the first must come out on its own.
            assert await resp.read_chunk() == pieces[0]
            up.release()
            rest = b""
            while chunk := await resp.read_chunk():
                rest += chunk
            assert rest == b"".join(pieces[1:])


async def test_read_limit_cuts_an_unfinished_body_and_drops_the_connection(
    pool: UpstreamPool,
) -> None:
    async with RawStreamServer(RawReply(chunks=[b"a" * 50, b"b" * 50], hold_before=1)) as raw:
        resp = await pool.request("GET", raw.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert await resp.read(limit=30) == b"a" * 30
            assert resp.connection_closed  # the rest of the body is not worth a connection
            assert await resp.read_chunk() == b""


async def test_read_limit_never_returns_more_than_the_limit(pool: UpstreamPool) -> None:
    body = bytes(range(256)) * 40
    async with RawUpstream(serving(ok(body))) as up:
        for limit in (0, 1, 100, len(body) - 1):
            resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
            async with resp:
                assert await resp.read(limit=limit) == body[:limit]
        # A limit at or above the length is the whole body, and the connection stays.
        for limit in (len(body), len(body) + 1):
            resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
            async with resp:
                assert await resp.read(limit=limit) == body
            assert idle_count(pool, up.port) == 1


async def test_large_body_streams_with_backpressure_and_without_loss(pool: UpstreamPool) -> None:
    size = 12 * 1024 * 1024
    pattern = bytes(range(251))  # a prime length: a lost or repeated block shows up
    body = (pattern * (size // len(pattern) + 1))[:size]

    async def big(peer: Peer) -> None:
        await peer.receive()
        await peer.send(ok(body))
        await peer.until_client_closes()

    async with RawUpstream(big) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            conn = resp._conn
            transport = conn.transport
            assert transport is not None
            paused, resumed = asyncio.Event(), asyncio.Event()
            pause, resume = transport.pause_reading, transport.resume_reading

            def on_pause() -> None:
                paused.set()
                pause()

            def on_resume() -> None:
                resumed.set()
                resume()

            setattr(transport, "pause_reading", on_pause)  # noqa: B010 (a method, not a field)
            setattr(transport, "resume_reading", on_resume)  # noqa: B010
            # Nobody reads yet: the client must stop reading from the socket, not buffer 12 MB.
            await within(paused.wait())
            held = resp.buffered
            assert HIGH_WATER < held <= HIGH_WATER + 1024 * 1024
            digest, total, biggest = hashlib.sha256(), 0, 0
            while chunk := await resp.read_chunk():
                digest.update(chunk)
                total += len(chunk)
                biggest = max(biggest, len(chunk))
            assert resumed.is_set()
            assert total == size
            assert digest.digest() == hashlib.sha256(body).digest()
            assert biggest <= HIGH_WATER + 1024 * 1024


# -- keep-alive ----------------------------------------------------------------------------


async def test_sequential_requests_reuse_one_connection(pool: UpstreamPool) -> None:
    async with RawUpstream(serving(ok(b"a"), ok(b"bb"), ok(b"ccc"))) as up:
        bodies = [await fetch(pool, f"{up.url}/{n}", method="POST", body=b"x") for n in range(3)]
        assert bodies == [(200, b"a"), (200, b"bb"), (200, b"ccc")]
        assert up.connections == 1
        assert [r.request_line for r in up.peers[0].requests] == [
            "POST /0 HTTP/1.1",
            "POST /1 HTTP/1.1",
            "POST /2 HTTP/1.1",
        ]


async def test_concurrent_requests_use_separate_connections_and_max_idle_bounds_the_pool() -> None:
    release = asyncio.Event()

    async def held(peer: Peer) -> None:
        while await peer.receive() is not None:
            await release.wait()
            await peer.send(ok())

    pool = UpstreamPool(max_idle=1)
    try:
        async with RawUpstream(held) as up:
            first = asyncio.create_task(fetch(pool, up.url))
            second = asyncio.create_task(fetch(pool, up.url))
            await up.wait_until(lambda u: len(u.requests) == 2)
            release.set()
            assert await first == await second == (200, b"ok")
            assert up.connections == 2
            assert idle_count(pool, up.port) == 1
            # The one over the bound was closed, not left open outside the pool.
            await up.wait_until(lambda u: u.closed_by_client == 1)
    finally:
        await pool.close()


def drops_the_second_request_unread(drop_idle: asyncio.Event) -> Handler:
    """The first connection answers once, then closes without reading what comes next."""

    async def handle(peer: Peer) -> None:
        if peer.index == 0:
            await peer.receive()
            await peer.send(ok(b"first"))
            await drop_idle.wait()
            return  # closes the connection without reading the request in flight
        while await peer.receive() is not None:
            await peer.send(ok(b"from a fresh connection"))

    return handle


@pytest.mark.parametrize(
    ("method", "headers"),
    [("GET", {}), ("POST", {"Idempotency-Key": "k1"}), ("POST", {"X-Idempotency-Key": "k1"})],
    ids=["get", "post-idempotency-key", "post-x-idempotency-key"],
)
async def test_a_replayable_request_on_a_closed_idle_connection_is_resent_on_a_fresh_one(
    pool: UpstreamPool, method: str, headers: dict[str, str]
) -> None:
    """The keep-alive race (Go's shouldRetryRequest): replayable, and no response byte came."""
    drop_idle = asyncio.Event()
    async with RawUpstream(drops_the_second_request_unread(drop_idle)) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        assert idle_count(pool, up.port) == 1
        # Set, and in the same step send: the pooled connection still looks alive when taken,
        # and the server's close meets the request on the wire.
        drop_idle.set()
        body = b"payload" if method == "POST" else None
        resp = await pool.request(method, f"{up.url}/again", headers, body, connect_timeout=CONNECT)
        async with resp:
            assert (resp.status, await resp.read()) == (200, b"from a fresh connection")
        assert up.connections == 2
        [retried] = up.peers[1].requests
        assert retried.request_line == f"{method} /again HTTP/1.1"
        assert retried.body == (body or b"")


async def test_a_post_whose_bytes_were_written_is_not_resent_even_in_the_keep_alive_race(
    pool: UpstreamPool,
) -> None:
    """No Idempotency-Key: the bytes may have reached the upstream, so never a second copy."""
    drop_idle = asyncio.Event()
    async with RawUpstream(drops_the_second_request_unread(drop_idle)) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        drop_idle.set()
        with pytest.raises(Disconnected) as info:
            await pool.request("POST", f"{up.url}/again", {}, b"once", connect_timeout=CONNECT)
        assert info.value.request_written
        assert not info.value.response_started
        assert up.connections == 1


async def test_a_connection_found_closed_before_writing_is_replaced_for_any_method(
    pool: UpstreamPool,
) -> None:
    """Nothing written yet: safe to send on a fresh connection, POST without a key included."""

    async def one_reply_then_close(peer: Peer) -> None:
        await peer.receive()
        await peer.send(ok(b"reply"))  # keep-alive, then the server closes at once

    async with RawUpstream(one_reply_then_close) as up:
        assert await fetch(pool, up.url) == (200, b"reply")
        [idle] = pool.idle_connections(("http", "127.0.0.1", up.port))
        await within(idle.closed.wait())  # the client saw the close while the connection idled
        assert await fetch(pool, up.url, method="POST", body=b"once") == (200, b"reply")
        assert up.connections == 2
        assert [r.body for r in up.requests] == [b"", b"once"]


def test_may_resend_follows_go_net_http() -> None:
    """transport.go shouldRetryRequest, case by case."""
    unwritten = Disconnected("x", request_written=False)
    idle_closed = Disconnected("x")
    answered = Disconnected("x", response_started=True)
    assert not may_resend(unwritten, False, "POST", {})  # a fresh connection: never
    assert may_resend(unwritten, True, "POST", {})  # nothing written: always
    assert not may_resend(idle_closed, True, "POST", {})  # written, not replayable
    assert may_resend(idle_closed, True, "PUT", {"idempotency-key": "k"})
    assert may_resend(idle_closed, True, "GET", {})
    assert not may_resend(answered, True, "GET", {})  # the upstream had started answering


async def test_server_closing_right_after_a_keep_alive_reply_costs_nothing(
    pool: UpstreamPool,
) -> None:
    async def one_per_connection(peer: Peer) -> None:
        await peer.receive()
        await peer.send(ok(b"once"))  # says keep-alive, then closes anyway

    async with RawUpstream(one_per_connection) as up:
        for _ in range(3):
            assert await fetch(pool, up.url) == (200, b"once")
        assert len(up.requests) == 3


async def test_a_reused_connection_dying_after_reply_bytes_is_not_retried(
    pool: UpstreamPool,
) -> None:
    async def half_a_head_the_second_time(peer: Peer) -> None:
        await peer.receive()
        await peer.send(ok(b"first"))
        await peer.receive()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-")

    async with RawUpstream(half_a_head_the_second_time) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        with pytest.raises(Disconnected):
            await pool.request("POST", up.url, {}, b"charge me once", connect_timeout=CONNECT)
        # The upstream had started answering: it saw the request, so it must not see it twice.
        assert up.connections == 1
        assert len(up.requests) == 2


async def test_a_reused_connection_dying_mid_body_is_a_payload_error_not_a_retry(
    pool: UpstreamPool,
) -> None:
    async def cut_the_second_body(peer: Peer) -> None:
        await peer.receive()
        await peer.send(ok(b"first"))
        await peer.receive()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")

    async with RawUpstream(cut_the_second_body) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert resp.status == 200
            with pytest.raises(PayloadError):
                await resp.read()
        assert up.connections == 1


@pytest.mark.parametrize(
    "reply",
    [
        ok(b"bye", "Connection: close"),
        ok(b"bye", "Connection: Keep-Alive, Close"),
        b"HTTP/1.0 200 OK\r\nContent-Length: 3\r\n\r\nbye",
    ],
    ids=["connection-close", "close-in-a-list", "http-1.0"],
)
async def test_responses_that_end_the_connection_are_not_pooled(
    pool: UpstreamPool, reply: bytes
) -> None:
    async with RawUpstream(serving(reply)) as up:
        assert await fetch(pool, up.url) == (200, b"bye")
        # The server keeps its side open: the client itself must let go.
        await up.wait_until(lambda u: u.closed_by_client == 1)
        assert idle_count(pool, up.port) == 0
        assert await fetch(pool, up.url) == (200, b"bye")
        assert up.connections == 2


async def test_http_1_0_keep_alive_response_is_pooled(pool: UpstreamPool) -> None:
    reply = b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nhi"
    async with RawUpstream(serving(reply)) as up:
        assert await fetch(pool, up.url) == (200, b"hi")
        assert await fetch(pool, up.url) == (200, b"hi")
        assert up.connections == 1


@pytest.mark.parametrize("read_first", [0, 1], ids=["unread", "partly-read"])
async def test_a_body_left_unread_closes_the_connection(
    pool: UpstreamPool, read_first: int
) -> None:
    async with RawStreamServer(RawReply(chunks=[b"one", b"two"], hold_before=1)) as raw:
        resp = await pool.request("GET", raw.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            for _ in range(read_first):
                assert await resp.read_chunk() == b"one"
        assert await resp.read_chunk() == b""  # closed: no more body
    async with RawUpstream(serving(ok(b"0123456789"))) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            pass
        await up.wait_until(lambda u: u.closed_by_client == 1)
        assert idle_count(pool, up.port) == 0
        assert await fetch(pool, up.url) == (200, b"0123456789")
        assert up.connections == 2


async def test_cancelling_a_reader_inside_async_with_closes_the_connection(
    pool: UpstreamPool,
) -> None:
    async with RawStreamServer(RawReply(chunks=[b"one", b"two"], hold_before=1)) as raw:
        resp = await pool.request("GET", raw.url, {}, None, connect_timeout=CONNECT)
        got_first = asyncio.Event()

        async def consume() -> None:
            async with resp:
                await resp.read_chunk()
                got_first.set()
                await resp.read()

        task = asyncio.create_task(consume())
        await within(got_first.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert resp.connection_closed


async def test_cancellation_mid_body_closes_the_connection_by_itself(pool: UpstreamPool) -> None:
    """Module invariant: cancellation closes the connection, even without ``close()``."""
    release_server = asyncio.Event()

    async def slow_body(peer: Peer) -> None:
        await peer.receive()
        await peer.send(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc")
        await peer.until_client_closes()
        release_server.set()

    async with RawUpstream(slow_body) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        reading = asyncio.Event()

        async def consume() -> bytes:
            first = await resp.read_chunk()
            reading.set()
            return first + await resp.read()  # waits for the rest, which never comes

        task = asyncio.create_task(consume())
        await within(reading.wait())
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await within(release_server.wait())
        assert idle_count(pool, up.port) == 0


async def test_a_close_delimited_body_cut_by_a_reset_is_a_payload_error(
    pool: UpstreamPool,
) -> None:
    """RFC 9112 section 8: a close-delimited body is incomplete if the connection ended in error."""
    cut = asyncio.Event()

    async def reset_mid_body(peer: Peer) -> None:
        await peer.receive()
        await peer.send(b"HTTP/1.1 200 OK\r\n\r\npart of it")
        await cut.wait()
        peer.reset()

    async with RawUpstream(reset_mid_body) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert await resp.read_chunk() == b"part of it"
            cut.set()
            with pytest.raises(PayloadError):
                await resp.read_chunk()


# -- failures ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "reply",
    [
        b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhel",
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n",
    ],
    ids=["content-length", "chunked-between-chunks", "chunked-mid-chunk", "chunked-in-trailers"],
)
async def test_connection_ending_mid_body_is_a_payload_error(
    pool: UpstreamPool, reply: bytes
) -> None:
    async def cut(peer: Peer) -> None:
        await peer.receive()
        await peer.send(reply)

    async with RawUpstream(cut) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert resp.status == 200
            with pytest.raises(PayloadError):
                await resp.read()
            assert await resp.read_chunk() == b""  # an errored response stays ended
        assert idle_count(pool, up.port) == 0


async def test_payload_error_via_read_chunk_after_good_pieces(pool: UpstreamPool) -> None:
    pieces = [b"data: 1\n\n", b"data: 2\n\n", b"never sent"]
    async with RawStreamServer(RawReply(chunks=pieces, stop_after=2, hold_before=1)) as raw:
        resp = await pool.request("GET", raw.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            assert await resp.read_chunk() == pieces[0]
            raw.release()
            assert await resp.read_chunk() == pieces[1]
            with pytest.raises(PayloadError):
                await resp.read_chunk()


@pytest.mark.parametrize(
    "body",
    [
        b"zz\r\nhello\r\n0\r\n\r\n",  # not hex
        b"5\r\nhelloXY0\r\n\r\n",  # no CRLF after the chunk's data
        b"5" * (MAX_HEADER_BYTES + 10),  # a size line that never ends
    ],
    ids=["bad-size", "missing-crlf", "endless-size-line"],
)
async def test_malformed_chunked_bodies_are_payload_errors(pool: UpstreamPool, body: bytes) -> None:
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    async with RawUpstream(serving(head + body)) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            with pytest.raises(PayloadError):
                await resp.read()
        await up.wait_until(lambda u: u.closed_by_client == 1)


async def test_endless_trailers_are_a_payload_error(pool: UpstreamPool) -> None:
    """The head and a chunk-size line are bounded; the trailer section must be too."""
    reply = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nok\r\n0\r\n"
        + b"X-Trailer: "
        + b"t" * (MAX_HEADER_BYTES + 10)
    )
    async with RawUpstream(serving(reply)) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            with pytest.raises(PayloadError):
                async with asyncio.timeout(WAIT):
                    await resp.read()


@pytest.mark.parametrize(
    "chunks",
    [b"+5\r\nhello\r\n", b"0x5\r\nhello\r\n", b"0_5\r\nhello\r\n", b"-5\r\n5\r\nhello\r\n"],
    ids=["plus", "0x", "underscore", "negative"],
)
async def test_chunk_sizes_that_are_not_plain_hex_are_payload_errors(
    pool: UpstreamPool, chunks: bytes
) -> None:
    """RFC 9112 section 7.1: chunk-size = 1*HEXDIG; int(x, 16) also takes signs, 0x and '_'."""
    reply = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
    async with RawUpstream(serving(reply)) as up:
        resp = await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        async with resp:
            with pytest.raises(PayloadError):
                await resp.read()


@pytest.mark.parametrize("length", [b"+2", b"0_2", b"\xb2"], ids=["plus", "underscore", "sup2"])
async def test_content_lengths_that_are_not_plain_digits_are_refused(
    pool: UpstreamPool, length: bytes
) -> None:
    """RFC 9110 section 8.6: Content-Length = 1*DIGIT."""
    reply = b"HTTP/1.1 200 OK\r\nContent-Length: " + length + b"\r\n\r\nhi"
    async with RawUpstream(serving(reply)) as up:
        with pytest.raises(Disconnected, match="Content-Length"):
            await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)


async def test_server_closing_before_replying_is_disconnected_without_retry(
    pool: UpstreamPool,
) -> None:
    async def hang_up(peer: Peer) -> None:
        await peer.receive()

    async with RawUpstream(hang_up) as up:
        with pytest.raises(Disconnected, match="before replying"):
            await pool.request("POST", up.url, {}, b"x", connect_timeout=CONNECT)
        assert up.connections == 1  # a fresh connection is not retried


@pytest.mark.parametrize(
    "reply",
    [
        b"SSH-2.0-OpenSSH_9.6\r\n\r\n",
        b"HTTP/1.1 abc Bad\r\n\r\n",
        b"HTTP/1.1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: ten\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nContent-Length: -1\r\n\r\n",
        b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * (MAX_HEADER_BYTES + 10),
    ],
    ids=["not-http", "bad-status", "no-status", "bad-length", "negative-length", "head-too-big"],
)
async def test_malformed_heads_are_disconnected(pool: UpstreamPool, reply: bytes) -> None:
    async with RawUpstream(serving(reply)) as up:
        with pytest.raises(Disconnected):
            await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
        await up.wait_until(lambda u: u.closed_by_client == 1)
        assert idle_count(pool, up.port) == 0


async def test_connection_refused_is_connect_failed(pool: UpstreamPool) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens there now (the port was bound, never listened on, and released).
    with pytest.raises(ConnectFailed) as info:
        await pool.request("GET", f"http://127.0.0.1:{port}/", {}, None, connect_timeout=CONNECT)
    assert not isinstance(info.value, ConnectTimeout)
    assert isinstance(info.value.__cause__, ConnectionRefusedError)


@contextlib.contextmanager
def unanswered_port() -> Iterator[tuple[int, list[socket.socket]]]:
    """A listening port whose accept queue is full, so a new connection's SYN goes unanswered.

    listen(0) with nobody accepting: once the queue holds what the kernel allows, Linux drops
    further SYNs and the connecting side waits (retransmitting) until its own timeout.
    """
    listener = socket.socket()
    fillers: list[socket.socket] = []
    try:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        yield listener.getsockname()[1], fillers
    finally:
        for filler in fillers:
            filler.close()
        listener.close()


async def test_connect_timeout_when_the_syn_goes_unanswered(pool: UpstreamPool) -> None:
    loop = asyncio.get_running_loop()
    with unanswered_port() as (port, fillers):
        for _ in range(16):  # the queue takes one or two on Linux; bounded in case it takes more
            filler = socket.socket()
            filler.setblocking(False)
            try:
                async with asyncio.timeout(0.3):
                    await loop.sock_connect(filler, ("127.0.0.1", port))
            except TimeoutError:
                filler.close()
                break
            fillers.append(filler)
        else:
            pytest.fail("the accept queue never filled up")
        start = loop.time()
        with pytest.raises(ConnectTimeout, match=r"took over 0\.2 s"):
            await pool.request("GET", f"http://127.0.0.1:{port}/", {}, None, connect_timeout=0.2)
        assert loop.time() - start >= 0.2


# -- pool housekeeping ---------------------------------------------------------------------


class FakeMonotonic:
    """The pool's injected clock."""

    def __init__(self) -> None:
        self.now = 1000.0

    def monotonic(self) -> float:
        return self.now


@pytest.mark.parametrize(("idle_for", "reused"), [(9.9, True), (10.1, False)])
async def test_idle_connections_older_than_keepalive_are_not_reused(
    idle_for: float, reused: bool
) -> None:
    clock = FakeMonotonic()
    pool = UpstreamPool(keepalive=10.0, clock=clock.monotonic)  # the pool's clock, not the loop's
    try:
        async with RawUpstream(serving(ok())) as up:
            await fetch(pool, up.url)
            clock.now += idle_for
            await fetch(pool, up.url)
            assert up.connections == (1 if reused else 2)
            if not reused:  # and the stale one was closed, not dropped open
                await up.wait_until(lambda u: u.peers[0].client_closed.is_set())
    finally:
        await pool.close()


async def test_bytes_arriving_on_an_idle_connection_are_not_taken_for_the_next_reply(
    pool: UpstreamPool,
) -> None:
    """E.g. a server's "408 Request Timeout" on an idle connection, just before it closes it."""
    first_read, answer_second = asyncio.Event(), asyncio.Event()

    async def handle(peer: Peer) -> None:
        if peer.index == 0:
            await peer.receive()
            await peer.send(ok(b"first"))
            await first_read.wait()
            await peer.send(ok(b"", "Connection: close", status="408 Request Timeout"))
            await answer_second.wait()
            return
        while await peer.receive() is not None:
            await peer.send(ok(b"second"))

    async with RawUpstream(handle) as up:
        assert await fetch(pool, up.url) == (200, b"first")
        [idle] = pool.idle_connections(("http", "127.0.0.1", up.port))
        first_read.set()
        await within(idle.closed.wait())  # the unsolicited reply made the client drop it
        try:
            assert await fetch(pool, up.url) == (200, b"second")
        finally:
            answer_second.set()


async def test_closing_the_pool_closes_idle_connections_and_refuses_returning_ones() -> None:
    pool = UpstreamPool()
    release = asyncio.Event()
    served = itertools.count()

    async def second_reply_held(peer: Peer) -> None:
        while await peer.receive() is not None:
            if next(served) == 1:
                await release.wait()
            await peer.send(ok())

    async with RawUpstream(second_reply_held) as up:
        await fetch(pool, up.url)
        assert idle_count(pool, up.port) == 1
        in_flight = asyncio.create_task(fetch(pool, up.url))  # takes the idle connection
        await up.wait_until(lambda u: len(u.requests) == 2)
        await pool.close()
        release.set()
        assert await in_flight == (200, b"ok")  # finishes, but its connection is not kept
        await up.wait_until(lambda u: u.closed_by_client == 1)
        assert up.connections == 1
        assert idle_count(pool, up.port) == 0

    pool = UpstreamPool()
    async with RawUpstream(serving(ok())) as up:
        await fetch(pool, up.url)
        await pool.close()
        await up.wait_until(lambda u: u.closed_by_client == 1)


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def self_signed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 (and its key), made by the openssl CLI."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
            "-nodes", "-days", "2", "-subj", "/CN=127.0.0.1",
            "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=30,
    )  # fmt: skip
    return cert, key


def tls_server_context(cert: Path, key: Path) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context


async def test_https_get_with_a_trusted_self_signed_certificate(
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    pool = UpstreamPool(ssl_context=ssl.create_default_context(cafile=str(cert)))
    try:
        async with RawUpstream(serving(ok(b"secret")), tls=tls_server_context(cert, key)) as up:
            assert up.url.startswith("https://")
            assert await fetch(pool, f"{up.url}/v1/models") == (200, b"secret")
            assert await fetch(pool, f"{up.url}/v1/models") == (200, b"secret")
            assert up.connections == 1  # keep-alive works over TLS too
            assert up.requests[0].header("host") == [f"127.0.0.1:{up.port}"]
    finally:
        await pool.close()


async def test_https_with_an_untrusted_certificate_is_connect_failed(
    self_signed: tuple[Path, Path],
) -> None:
    cert, key = self_signed
    pool = UpstreamPool(ssl_context=ssl.create_default_context())  # system CAs only
    try:
        async with RawUpstream(serving(ok()), tls=tls_server_context(cert, key)) as up:
            with pytest.raises(ConnectFailed) as info:
                await pool.request("GET", up.url, {}, None, connect_timeout=CONNECT)
            assert isinstance(info.value.__cause__, ssl.SSLCertVerificationError)
    finally:
        await pool.close()


# -- the body decoder at every split (protocol level) --------------------------------------


class LoopbacklessTransport(asyncio.Transport):
    """Just enough transport for a ``Connection`` fed by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.written = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.written += data

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False


class ScriptedConnection(Connection):
    """Each time the reader waits, the next piece arrives; after the last, the peer closes."""

    def __init__(self, pieces: Sequence[bytes]) -> None:
        super().__init__(ORIGIN)
        self.pieces = deque(p for p in pieces if p)  # TCP never delivers an empty read
        self.connection_made(LoopbacklessTransport())

    async def wait_data(self) -> None:
        if self.pieces:
            self.data_received(self.pieces.popleft())
        elif not self.eof:
            self.eof_received()
            self.connection_lost(None)
        else:
            raise AssertionError("the reader waits for more after the connection ended")


def split(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c % (len(data) + 1) for c in cuts})
    return [data[a:b] for a, b in itertools.pairwise([0, *points, len(data)])]


async def decode(pieces: Sequence[bytes], *, by_chunk: bool) -> tuple[Response, bytes, bool]:
    """Status line to body end through the real code; and whether the connection was pooled."""
    pool = UpstreamPool()
    conn = ScriptedConnection(pieces)
    resp = await pool._exchange(conn, b"GET / HTTP/1.1\r\n\r\n", None)
    if by_chunk:
        body = b""
        while chunk := await resp.read_chunk():
            body += chunk
    else:
        body = await resp.read()
    return resp, body, conn in pool.idle_connections(ORIGIN)


def chunked_body(body: bytes, cuts: Iterable[int], extensions: Sequence[str]) -> bytes:
    out = b""
    for index, chunk in enumerate(c for c in split(body, cuts) if c):
        size = f"{len(chunk):x}"
        size = size.upper() if index % 2 else "00" + size
        ext = extensions[index % len(extensions)] if extensions else ""
        out += f"{size}{ext}\r\n".encode() + chunk + b"\r\n"
    return out


# No whitespace around ';' or '=': llhttp refuses it (RFC 9112 7.1.1 tolerates it as BWS, but
# no server sends chunk extensions to a client that did not ask, and strict is safer).
EXTENSIONS = st.lists(st.sampled_from(["", ";a", ";name=value", ';q="x;y"', ";b=c"]))
TRAILERS = st.lists(st.sampled_from(["X-A: 1", "X-Checksum: abc", "Server-Timing: x;dur=1"]))


@st.composite
def framed_responses(draw: st.DrawFn) -> tuple[bytes, bytes, bool]:
    """(response bytes, body, keep-alive expected) for each framing the client decodes."""
    body = draw(st.binary(max_size=300))
    framing = draw(st.sampled_from(["length", "chunked", "close"]))
    if framing == "length":
        return ok(body, "Content-Type: application/json"), body, True
    if framing == "close":
        return b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + body, body, False
    chunks = chunked_body(body, draw(st.lists(st.integers(0, 300))), draw(EXTENSIONS))
    trailers = "".join(f"{t}\r\n" for t in draw(TRAILERS)).encode()
    head = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    return head + chunks + b"0\r\n" + trailers + b"\r\n", body, True


@settings(max_examples=200, deadline=None)
@given(
    framed=framed_responses(),
    cuts=st.lists(st.integers(0, 2000), max_size=30),
    by_chunk=st.booleans(),
)
def test_any_split_of_any_framing_decodes_to_the_same_body(
    framed: tuple[bytes, bytes, bool], cuts: list[int], by_chunk: bool
) -> None:
    response, body, keep = framed
    resp, got, pooled = asyncio.run(decode(split(response, cuts), by_chunk=by_chunk))
    assert resp.status == 200
    assert got == body
    assert pooled == keep


def test_every_single_split_point_and_byte_by_byte() -> None:
    response = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-A: b\r\n\r\n"
        b"3;ext=1\r\nabc\r\n0A\r\n0123456789\r\n1\r\n\n\r\n"
        b"0;end\r\nX-Trailer: yes\r\n\r\n"
    )
    expected = b"abc0123456789\n"
    splits = [split(response, [i]) for i in range(len(response) + 1)]
    splits.append([response[i : i + 1] for i in range(len(response))])
    for pieces in splits:
        for by_chunk in (False, True):
            resp, got, pooled = asyncio.run(decode(pieces, by_chunk=by_chunk))
            assert (resp.headers["x-a"], got, pooled) == ("b", expected, True), pieces


@settings(
    max_examples=25,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(body=st.binary(min_size=1, max_size=2000), cuts=st.lists(st.integers(0, 2000), max_size=12))
async def test_random_chunks_over_a_real_socket(
    pool: UpstreamPool, body: bytes, cuts: list[int]
) -> None:
    pieces = [p for p in split(body, cuts) if p]
    for chunked in (True, False):
        async with RawStreamServer(RawReply(chunks=pieces, chunked=chunked)) as raw:
            assert await fetch(pool, raw.url) == (200, body)
