"""Fake upstreams that run inside the test's event loop on 127.0.0.1, port 0.

``running_mock`` serves ``proxy.mock.app`` (the same server as ``cb-proxy mock``)
and gives direct access to its faults and statistics, so tests neither sleep
nor poll: ``await m.wait_requests(n)`` wakes on the mock's own change event.

``RawStreamServer``, a script on the one raw server (``tests.fakes.raw``),
answers with exactly the bytes it is given, each chunk written and drained on
its own, so a test controls where the body is split (inside an SSE event,
inside a UTF-8 sequence), can hold the body at a chunk until ``release()``, can
hang up mid-body, and can send a head of exact bytes (``raw_head``: duplicate or
conflicting framing headers). Its ``requests`` are ``tests.fakes.raw.RawRequest``.

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
from tests.fakes.raw import DEFAULT_WAIT_SECONDS, Peer, RawUpstream


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


@contextlib.asynccontextmanager
async def running_formats(
    keys: Mapping[str, str],
) -> AsyncIterator[tuple[RunningMock, RunningMock, RunningMock]]:
    """One mock of each wire format (openai, anthropic, gemini), each named after its format.

    ``keys`` maps a format to the key its mock requires (the proxy must inject it); a format
    not in ``keys`` takes any key.
    """
    async with (
        running_mock("openai", name="openai", require_key=keys.get("openai")) as oa,
        running_mock("anthropic", name="anthropic", require_key=keys.get("anthropic")) as an,
        running_mock("gemini", name="gemini", require_key=keys.get("gemini")) as ge,
    ):
        yield oa, an, ge


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


class RawStreamServer(RawUpstream):
    """``async with RawStreamServer(RawReply(...)) as s:``; replies in order, the last repeats.

    One request per connection (each reply says ``Connection: close``); the reply is chosen by
    the request's arrival order.
    """

    def __init__(self, *replies: RawReply) -> None:
        super().__init__(self._serve)
        self.replies = list(replies) or [RawReply()]
        self.bytes_written = 0  # body bytes the client took before it hung up (or all of them)
        self._release = asyncio.Event()

    def release(self) -> None:
        self._release.set()

    async def wait_requests(self, n: int, within: float = DEFAULT_WAIT_SECONDS) -> None:
        await self.wait_until(lambda s: len(s.requests) >= n, within)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()
        await super().__aexit__(exc_type, exc, tb)

    async def _serve(self, peer: Peer) -> None:
        if await peer.receive() is None:
            return
        # No await since the request was recorded: it is the last one.
        reply = self.replies[min(len(self.requests) - 1, len(self.replies) - 1)]
        writer = peer.writer
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
                return  # the server closes the socket: a body cut mid-way
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
