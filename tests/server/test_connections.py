"""Client connections on raw sockets: read timeouts, `Expect: 100-continue`, HTTP-level errors.

Every case talks HTTP/1.1 by hand (asyncio.open_connection) to the real proxy, so what
is checked is the bytes a client gets: the status line, OpenAI's error JSON, and the
close. The timeouts are set to a fraction of a second; the tests wait on the socket
(its response or its end), never on a clock.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest

from tests.fakes.upstream import running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

RULES = """
version: 1
providers:
  a: {{type: openai, base_url: "{a}/v1"}}
models:
  m: {{provider: a}}
"""
BODY = orjson.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]})
LIMIT = 4096  # max_body_bytes in these tests
SHORT = 0.2  # seconds: the client timeouts in these tests
CHAT = b"POST /v1/chat/completions HTTP/1.1\r\nHost: proxy\r\n"


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes

    def error(self) -> dict[str, Any]:
        assert self.headers.get("content-type", "").startswith("application/json"), self
        parsed = orjson.loads(self.body)
        assert isinstance(parsed, dict)
        error = parsed["error"]
        assert isinstance(error, dict)
        assert set(error) == {"message", "type", "param", "code"}
        return error


async def read_reply(reader: asyncio.StreamReader) -> Reply:
    """One response with a Content-Length body (every error the proxy sends has one)."""
    head = await reader.readuntil(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        if line:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return Reply(status, headers, body)


@asynccontextmanager
async def proxy_with(tmp_path: Path, **settings: Any) -> AsyncIterator[ProxyHandle]:
    async with running_mock("openai", name="a") as a:
        path = write_rules(tmp_path, RULES.format(a=a.url))
        opts: dict[str, Any] = {
            "max_body_bytes": LIMIT,
            "client_header_timeout": SHORT,
            "client_body_timeout": SHORT,
            "client_keepalive_timeout": SHORT,
        }
        async with running_proxy(path, **{**opts, **settings}) as proxy:
            yield proxy


@asynccontextmanager
async def connection(
    url: str,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    parts = urlsplit(url)
    assert parts.hostname is not None
    assert parts.port is not None
    reader, writer = await asyncio.open_connection(parts.hostname, parts.port)
    try:
        yield reader, writer
    finally:
        writer.close()
        await writer.wait_closed()


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    return await reader.read() == b""


# --- timeouts -------------------------------------------------------------------------------


async def test_an_idle_keep_alive_connection_is_closed(tmp_path: Path) -> None:
    async with proxy_with(tmp_path) as proxy, connection(proxy.api_url) as (reader, writer):
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: proxy\r\n\r\n")
        reply = await read_reply(reader)
        assert reply.status == 200
        assert reply.headers.get("connection", "keep-alive").lower() != "close"
        assert await closed_by_server(reader)  # CB_CLIENT_KEEPALIVE_TIMEOUT


async def test_a_connection_that_never_sends_is_closed(tmp_path: Path) -> None:
    async with proxy_with(tmp_path) as proxy, connection(proxy.api_url) as (reader, _):
        assert await closed_by_server(reader)


async def test_partial_headers_get_408_and_the_close(tmp_path: Path) -> None:
    # A long keep-alive timeout: the header timeout alone must end this.
    async with (
        proxy_with(tmp_path, client_keepalive_timeout=60) as proxy,
        connection(proxy.api_url) as (reader, writer),
    ):
        writer.write(CHAT + b"Content-Type: application/json\r\n")  # and never the blank line
        reply = await read_reply(reader)
        assert reply.status == 408
        error = reply.error()
        assert error["code"] == "request_timeout"
        assert "CB_CLIENT_HEADER_TIMEOUT" in error["message"]
        assert reply.headers["connection"].lower() == "close"
        assert await closed_by_server(reader)


async def test_a_body_that_never_ends_gets_408_and_the_close(tmp_path: Path) -> None:
    async with (
        proxy_with(tmp_path, client_keepalive_timeout=60, client_header_timeout=60) as proxy,
        connection(proxy.api_url) as (reader, writer),
    ):
        writer.write(CHAT + b"Content-Length: %d\r\nx-request-id: slow-1\r\n\r\n" % len(BODY))
        writer.write(BODY[:10])  # and never the rest
        reply = await read_reply(reader)
        assert reply.status == 408
        error = reply.error()
        assert error["code"] == "request_timeout"
        assert "CB_CLIENT_BODY_TIMEOUT" in error["message"]
        assert reply.headers["x-request-id"] == "slow-1"
        assert reply.headers["connection"].lower() == "close"
        assert await closed_by_server(reader)
        metrics = await proxy.metrics_text()
        assert 'code_class="4xx"' in metrics


async def test_keep_alive_requests_within_the_timeouts_are_served(tmp_path: Path) -> None:
    # A body in pieces, each within the body timeout, then a second request on the connection.
    async with (
        proxy_with(tmp_path, client_body_timeout=30, client_header_timeout=30) as proxy,
        connection(proxy.api_url) as (reader, writer),
    ):
        for _ in range(2):
            writer.write(CHAT + b"Content-Length: %d\r\n\r\n" % len(BODY))
            for at in range(0, len(BODY), 16):
                writer.write(BODY[at : at + 16])
                await writer.drain()
            reply = await read_reply(reader)
            assert reply.status == 200, reply
            assert orjson.loads(reply.body)["object"] == "chat.completion"


# --- Expect: 100-continue ---------------------------------------------------------------------


async def test_expect_continue_over_the_limit_gets_413_without_100(tmp_path: Path) -> None:
    async with proxy_with(tmp_path) as proxy, connection(proxy.api_url) as (reader, writer):
        writer.write(CHAT + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % (LIMIT + 1))
        reply = await read_reply(reader)
        assert reply.status == 413  # the first thing on the wire: no interim 100 before it
        assert reply.error()["code"] == "request_too_large"
        assert reply.headers["connection"].lower() == "close"


async def test_expect_continue_within_the_limit_gets_100_then_the_reply(tmp_path: Path) -> None:
    async with proxy_with(tmp_path) as proxy, connection(proxy.api_url) as (reader, writer):
        writer.write(CHAT + b"Content-Length: %d\r\nExpect: 100-continue\r\n\r\n" % len(BODY))
        assert await reader.readuntil(b"\r\n\r\n") == b"HTTP/1.1 100 Continue\r\n\r\n"
        writer.write(BODY)
        reply = await read_reply(reader)
        assert reply.status == 200
        assert orjson.loads(reply.body)["object"] == "chat.completion"


async def test_an_unknown_expectation_gets_417(tmp_path: Path) -> None:
    async with proxy_with(tmp_path) as proxy, connection(proxy.api_url) as (reader, writer):
        writer.write(CHAT + b"Content-Length: %d\r\nExpect: something-else\r\n\r\n" % len(BODY))
        reply = await read_reply(reader)
        assert reply.status == 417
        assert reply.error()["code"] == "expectation_failed"


# --- errors of the HTTP layer -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("request_bytes", "status", "code"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, "bad_request", id="bad-method"),
        pytest.param(b"GET / HTTP/1.1 extra\r\nHost: x\r\n\r\n", 400, "bad_request", id="bad-line"),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nBad Header: v\r\n\r\n",
            400,
            "bad_request",
            id="bad-header-name",
        ),
        pytest.param(
            b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: abc\r\n\r\n",
            400,
            "bad_request",
            id="bad-content-length",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 65536 + b"\r\n\r\n",
            431,
            "request_header_fields_too_large",
            id="64-KiB-header",
        ),
        pytest.param(
            b"GET / HTTP/1.1\r\nHost: x\r\n"
            + b"".join(b"X-H%d: v\r\n" % i for i in range(1000))
            + b"\r\n",
            431,
            "request_header_fields_too_large",
            id="1000-headers",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
            % (LIMIT + 1)
            + b"x" * (LIMIT + 1),
            413,
            "request_too_large",
            id="body-over-the-limit",
        ),
    ],
)
async def test_http_layer_errors_are_openai_json(
    tmp_path: Path, request_bytes: bytes, status: int, code: str
) -> None:
    async with proxy_with(tmp_path) as proxy:
        for url in (proxy.api_url, proxy.metrics_url):
            if status == 413 and url == proxy.metrics_url:
                continue  # the metrics listener has no endpoint that takes a body
            async with connection(url) as (reader, writer):
                writer.write(request_bytes)
                reply = await read_reply(reader)
                assert reply.status == status, reply
                error = reply.error()
                assert error["code"] == code
                assert error["type"] == "invalid_request_error"
                assert b"aaaa" not in reply.body  # the client's bytes are not echoed back
