"""Fake upstreams that run inside the test's event loop on 127.0.0.1, port 0.

``running_mock`` serves ``proxy.mock.app`` (the same server as ``cb-proxy mock``)
and gives direct access to its faults and statistics, so tests neither sleep
nor poll: ``await m.wait_requests(n)`` wakes on the mock's own change event.

``RawStreamServer`` answers with exactly the bytes it is given, each chunk
written and drained on its own, so a test controls where the body is split
(inside an SSE event, inside a UTF-8 sequence), can hold the body at a chunk
until ``release()``, can hang up mid-body, and can send a head of exact bytes
(``raw_head``: duplicate or conflicting framing headers).

``ConnectProxy`` (``tests.fakes.connect_proxy``) is the egress proxy fake.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from aiohttp import web

from proxy.mock.app import (
    MOCK_STATE,
    FormatName,
    MockControl,
    MockState,
    create_mock_app,
    start_mock_server,
)

DEFAULT_WAIT_SECONDS = 5.0
HEADER_LIMIT = 64 * 1024


@dataclass
class RunningMock:
    url: str  # base URL without /v1
    port: int
    app: web.Application

    @property
    def state(self) -> MockState:
        return self.app[MOCK_STATE]

    async def set_fault(
        self, spec: Mapping[str, Any] | Sequence[Mapping[str, Any]] | None = None, /, **fields: Any
    ) -> None:
        """Add faults, as a spec (or list) like the control API takes, or as keyword fields."""
        payload: Any = list(spec) if isinstance(spec, Sequence) else dict(spec or {}, **fields)
        self.control.set_faults(payload)

    @property
    def control(self) -> MockControl:
        return MockControl.of(self.app)

    def clear_faults(self) -> None:
        self.control.clear_faults()

    def reset(self) -> None:
        self.control.reset()

    def stats(self) -> dict[str, Any]:
        return self.control.stats()

    async def wait_requests(self, n: int, within: float = DEFAULT_WAIT_SECONDS) -> None:
        await self._wait("requests", n, within)

    async def wait_cancelled(self, n: int, within: float = DEFAULT_WAIT_SECONDS) -> None:
        await self._wait("cancelled", n, within)

    async def wait_in_flight(self, n: int, within: float = DEFAULT_WAIT_SECONDS) -> None:
        await self._wait("in_flight", n, within)

    async def _wait(self, counter: str, n: int, within: float) -> None:
        stats = self.state.stats
        if not await stats.wait_until(lambda s: getattr(s, counter) >= n, within):
            raise TimeoutError(f"mock {counter} never reached {n}: {stats.snapshot()}")


@contextlib.asynccontextmanager
async def running_mock(fmt: FormatName = "openai", **opts: Any) -> AsyncIterator[RunningMock]:
    """``async with running_mock("anthropic", name="primary") as m:`` then use ``m.url``."""
    app = create_mock_app(fmt, **opts)
    runner, url = await start_mock_server(app)
    try:
        yield RunningMock(url, int(url.rsplit(":", 1)[1]), app)
    finally:
        await runner.cleanup()


@dataclass(frozen=True)
class RawReply:
    status: int = 200
    headers: Mapping[str, str] = field(
        default_factory=lambda: {"Content-Type": "text/event-stream"}
    )
    chunks: Sequence[bytes] = ()
    chunked: bool = True  # Transfer-Encoding: chunked; False = no length, the close ends the body
    stop_after: int | None = None  # hang up after this many chunks, without the final chunk
    hold_before: int | None = None  # wait for release() before writing chunks[hold_before]
    raw_head: bytes | None = None  # the status line and headers exactly (no CRLF CRLF added)


@dataclass(frozen=True)
class RawRequest:
    method: str
    path: str
    headers: Mapping[str, str]  # lower-cased names
    body: bytes


class RawStreamServer:
    """``async with RawStreamServer(RawReply(...)) as s:``; replies in order, the last repeats."""

    def __init__(self, *replies: RawReply) -> None:
        self.replies = list(replies) or [RawReply()]
        self.requests: list[RawRequest] = []
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._release = asyncio.Event()
        self._changed = asyncio.Event()
        self.bytes_written = 0  # body bytes the client took before it hung up (or all of them)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def release(self) -> None:
        self._release.set()

    async def wait_requests(self, n: int, within: float = DEFAULT_WAIT_SECONDS) -> None:
        async with asyncio.timeout(within):
            while len(self.requests) < n:
                changed = self._changed
                await changed.wait()

    async def __aenter__(self) -> RawStreamServer:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0, limit=HEADER_LIMIT)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        try:
            request = await _read_request(reader)
            if request is not None:
                reply = self.replies[min(len(self.requests), len(self.replies) - 1)]
                self.requests.append(request)
                self._changed.set()
                self._changed = asyncio.Event()
                await self._write(writer, reply)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up: nothing left to answer
        finally:
            writer.close()
            if task is not None:
                self._tasks.discard(task)

    async def _write(self, writer: asyncio.StreamWriter, reply: RawReply) -> None:
        if reply.raw_head is not None:
            writer.write(reply.raw_head)
        else:
            lines = [f"HTTP/1.1 {reply.status} Mock", "Connection: close"]
            lines += [f"{k}: {v}" for k, v in reply.headers.items()]
            if reply.chunked:
                lines.append("Transfer-Encoding: chunked")
            writer.write(("\r\n".join(lines) + "\r\n\r\n").encode("latin-1"))
        await writer.drain()
        for index, chunk in enumerate(reply.chunks):
            if reply.stop_after is not None and index >= reply.stop_after:
                return  # the caller closes the socket: a body cut mid-way
            if reply.hold_before == index:
                await self._release.wait()
            if reply.chunked and chunk:  # an empty chunk would end a chunked body
                chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
            writer.write(chunk)
            await writer.drain()
            self.bytes_written += len(chunk)
        if reply.stop_after is None and reply.chunked:
            writer.write(b"0\r\n\r\n")
            await writer.drain()


async def _read_request(reader: asyncio.StreamReader) -> RawRequest | None:
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError:
        return None
    request_line, *header_lines = head.decode("latin-1").rstrip("\r\n").split("\r\n")
    method, path, _ = request_line.split(" ", 2)
    headers = {}
    for line in header_lines:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    if headers.get("transfer-encoding", "").lower() == "chunked":
        body = b""
        while size := int((await reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
            body += (await reader.readexactly(size + 2))[:-2]
        await reader.readuntil(b"\r\n")
    else:
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    return RawRequest(method, path, headers, body)
