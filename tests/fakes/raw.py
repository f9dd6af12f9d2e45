"""The one raw fake server of the suite: scripted per connection, on 127.0.0.1 port 0.

``RawUpstream(handler)`` accepts connections in the test's event loop and runs
``handler(peer)`` for each: the script reads requests (``peer.receive()``),
writes exact bytes (``peer.send``), waits on the test's events, hangs up (it
returns) or resets (``peer.reset()``). ``tls=`` serves HTTPS with the given
context. The server records every connection (``peers``) and every request
read in full (``requests``, in arrival order), and ``wait_until`` wakes at each
accept, request and client close, so a test never sleeps or polls. A script
that fails with anything but the client hanging up fails the test on exit.

The scripts built on it: ``serving`` and ``ok`` here (keep-alive replies),
``RawStreamServer`` in ``tests.fakes.upstream`` (chunk control, hold/release,
hang-up, raw heads) and ``ConnectProxy`` in ``tests.fakes.connect_proxy``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

DEFAULT_WAIT_SECONDS = 5.0
HEADER_LIMIT = 64 * 1024  # the StreamReader limit: a longer request head is the script's error

Handler = Callable[["Peer"], Awaitable[None]]


@dataclass(frozen=True)
class RawRequest:
    head: bytes  # request line and header lines, without the blank line
    body: bytes  # de-chunked if it came chunked

    @property
    def request_line(self) -> str:
        return self.head.split(b"\r\n", 1)[0].decode("latin-1")

    @property
    def method(self) -> str:
        return self.request_line.split(" ", 1)[0]

    @property
    def path(self) -> str:
        return self.request_line.split(" ", 2)[1]

    @property
    def headers(self) -> dict[str, str]:
        """Lower-cased names; a repeated header keeps its last value (``header`` has them all)."""
        fields = {}
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            name, _, value = line.partition(":")
            fields[name.strip().lower()] = value.strip()
        return fields

    def header(self, name: str) -> list[str]:
        values = []
        for line in self.head.decode("latin-1").split("\r\n")[1:]:
            key, _, value = line.partition(":")
            if key.strip().lower() == name.lower():
                values.append(value.strip())
        return values


class Peer:
    """The server's side of one accepted connection."""

    def __init__(
        self,
        server: RawUpstream,
        index: int,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.index = index
        self.reader = reader
        self.writer = writer
        self.requests: list[RawRequest] = []
        self.client_closed = asyncio.Event()  # the client's EOF (or reset) reached the server
        self._server = server

    async def receive(self) -> RawRequest | None:
        """The next request (body by Content-Length or chunked), or None once the client closed."""
        try:
            head = await self.reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self._closed()
            return None
        request = RawRequest(head[:-4], b"")
        if request.headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while size := int((await self.reader.readuntil(b"\r\n")).strip().split(b";")[0], 16):
                body += (await self.reader.readexactly(size + 2))[:-2]
            await self.reader.readuntil(b"\r\n")
        else:
            lengths = request.header("content-length")
            body = await self.reader.readexactly(int(lengths[0])) if lengths else b""
        request = RawRequest(request.head, body)
        self.requests.append(request)
        self._server.requests.append(request)
        self._server.changed()
        return request

    async def until_client_closes(self) -> None:
        try:
            while await self.reader.read(1 << 16):
                pass
        except ConnectionError:
            pass
        self._closed()

    def _closed(self) -> None:
        self.client_closed.set()
        self._server.changed()

    async def send(self, data: bytes) -> None:
        self.writer.write(data)
        await self.writer.drain()

    def reset(self) -> None:
        """Close with RST instead of FIN (SO_LINGER with a zero timeout)."""
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.writer.transport.abort()


class RawUpstream:
    """``async with RawUpstream(handler) as up:``; ``handler(peer)`` runs per connection."""

    def __init__(
        self, handler: Handler, *, tls: ssl.SSLContext | None = None, limit: int = HEADER_LIMIT
    ) -> None:
        self.handler = handler
        self.tls = tls
        self.limit = limit
        self.peers: list[Peer] = []
        self.requests: list[RawRequest] = []  # every request read in full, in arrival order
        self.port = 0
        self.errors: list[BaseException] = []
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self._change = asyncio.Event()

    @property
    def url(self) -> str:
        return f"{'https' if self.tls else 'http'}://127.0.0.1:{self.port}"

    @property
    def connections(self) -> int:
        return len(self.peers)

    @property
    def closed_by_client(self) -> int:
        return sum(peer.client_closed.is_set() for peer in self.peers)

    async def wait_until(
        self, condition: Callable[[Self], bool], within: float = DEFAULT_WAIT_SECONDS
    ) -> None:
        """Wake at each accept, request and client close until ``condition`` holds."""
        async with asyncio.timeout(within):
            while not condition(self):
                change = self._change
                await change.wait()

    def changed(self) -> None:
        """Wake ``wait_until``; scripts call it when they change what a condition reads."""
        self._change.set()
        self._change = asyncio.Event()

    async def __aenter__(self) -> Self:
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", 0, ssl=self.tls, limit=self.limit
        )
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()
        if exc_type is None and self.errors:
            raise self.errors[0]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        peer = Peer(self, len(self.peers), reader, writer)
        self.peers.append(peer)
        self.changed()
        try:
            await self.handler(peer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client hung up; whether that was right is the test's to check
        except asyncio.CancelledError:
            pass  # our own teardown; ending quietly keeps asyncio's accept callback quiet
        except Exception as exc:  # a broken fake must fail the test, not vanish in a log
            self.errors.append(exc)
        finally:
            with contextlib.suppress(ConnectionError):
                writer.close()
            if task is not None:
                self._tasks.discard(task)


def serving(*replies: bytes) -> Handler:
    """Answer every request with the next reply (the last repeats); keep connections open."""
    counter = itertools.count()

    async def handle(peer: Peer) -> None:
        while await peer.receive() is not None:
            await peer.send(replies[min(next(counter), len(replies) - 1)])

    return handle


def ok(body: bytes = b"ok", *headers: str, status: str = "200 OK") -> bytes:
    """A keep-alive HTTP/1.1 response framed by Content-Length."""
    lines = [f"HTTP/1.1 {status}", f"Content-Length: {len(body)}", *headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
