"""One upstream connection: an ``asyncio.Protocol`` feeding llhttp, and its bounded buffers.

Responses are parsed by llhttp (``httptools``, the parser uvicorn uses), which
refuses duplicate Content-Length, Content-Length with Transfer-Encoding,
malformed chunk sizes, bare LF line ends and obsolete line folding. Where
llhttp is lenient for responses this protocol refuses too: a Transfer-Encoding
other than exactly ``chunked`` or sent more than once (llhttp would read until
the close), and a response head over ``max_header_bytes``.

Invariants:
- Body bytes are parsed as they arrive; once more than ``HIGH_WATER`` of them
  wait for the reader, the socket stops being read until the reader takes them.
- The head, and the bytes that carry no body (chunk framing, trailers), are each
  bounded by ``max_header_bytes``; going over fails the reply (``failure``).
- Bytes on an idle connection (closed at once) or after a complete body answer
  nothing that was asked: they never pass for the next reply, and the connection
  is not reused.
- A reply to HEAD has no body; its connection is not reused.
- A connection frees its slot under the per-origin cap (``on_release``) exactly
  once, when it closes or is lost.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import httptools

from proxy.upstream.egress import ProxyRoute
from proxy.upstream.errors import (
    ConnectFailed,
    HeaderTooLarge,
    MalformedHead,
    PayloadError,
    TransportError,
)

DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # CB_UPSTREAM_MAX_HEADER_BYTES (docs/upstream.md)
MAX_HEADER_BYTES = DEFAULT_MAX_HEADER_BYTES
HIGH_WATER = 1 << 20  # pause reading an upstream whose data the client is not taking
LOW_WATER = 1 << 16
NO_BODY_STATUSES = frozenset({204, 304})

Origin = tuple[str, str, int]

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "HIGH_WATER",
    "MAX_HEADER_BYTES",
    "Connection",
    "Origin",
]


class Connection(asyncio.Protocol):
    """One upstream connection and the response in progress on it (llhttp callbacks).

    Slotted: a held stream keeps its connection for its whole life, and an instance
    dict of this many attributes cost 1.5 KiB per open stream.
    """

    __slots__ = (
        "_closed",
        "_framing_seen",
        "_head_bytes",
        "_head_seen",
        "_on_release",
        "_parser",
        "_paused",
        "_released",
        "_tunnel",
        "_waiter",
        "active",
        "body",
        "body_total",
        "buffered",
        "complete",
        "content_length",
        "eof",
        "error",
        "failure",
        "got_bytes",
        "head_done",
        "head_only",
        "idle_since",
        "keep_alive",
        "max_header_bytes",
        "origin",
        "raw_headers",
        "reused",
        "status",
        "transport",
        "until_close",
    )

    def __init__(
        self,
        origin: Origin,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        on_release: Callable[[Connection], None] | None = None,
    ) -> None:
        self.origin = origin
        self.max_header_bytes = max_header_bytes
        self.transport: asyncio.Transport | None = None
        self.eof = False
        self.error: BaseException | None = None  # how the transport ended, if in error
        self.failure: TransportError | None = None  # a parse error or a bound exceeded
        self.idle_since = 0.0
        self.reused = False
        self._closed: asyncio.Event | None = None  # made on demand: see ``closed``
        self._on_release = on_release
        self._released = False
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False
        self._parser = httptools.HttpResponseParser(self)
        self._tunnel: bytearray | None = None  # the CONNECT reply while a tunnel is set up
        # The response in progress (reset by ``begin``).
        self.active = False
        self.got_bytes = False
        self.head_only = False
        self.head_done = False
        self.complete = False
        self.keep_alive = False
        self.until_close = False  # the body ends with the connection
        self.status = 0
        self.content_length: int | None = None
        self.raw_headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []
        self.buffered = 0
        self.body_total = 0
        self._head_bytes = 0
        self._head_seen = 0
        self._framing_seen = 0

    def begin(self, head_only: bool) -> None:
        self.active = True
        self.got_bytes = False
        self.head_only = head_only
        self.head_done = self.complete = self.keep_alive = self.until_close = False
        self.status = 0
        self.content_length = None
        self.raw_headers = []
        self._head_bytes = 0  # header lines parsed so far
        self._head_seen = 0  # bytes received while the head was not complete
        self._framing_seen = 0  # bytes received since the last body byte

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        if self._tunnel is not None:
            self._tunnel += data
            self._wake()
            return
        if not self.active or self.complete:
            # Bytes on an idle connection (a 408 before a close) or after a complete body
            # answer nothing we asked: never let them pass for the next reply.
            self.keep_alive = False
            if not self.active:
                self.close()
            return
        self.got_bytes = True
        body_before = self.body_total
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(MalformedHead(f"unexpected protocol switch (HTTP {self.status or 101})"))
        except httptools.HttpParserError as exc:
            if self.failure is None and not self.complete:
                if self.head_done:
                    self._fail(PayloadError(f"malformed response body: {exc}"))
                else:
                    self._fail(MalformedHead(f"malformed response head: {exc}"))
            self.keep_alive = False
        else:
            if not self.head_done:
                # Bytes of a head still open (llhttp keeps a partial header line itself).
                self._head_seen += len(data)
                if self._head_seen > self.max_header_bytes:
                    self._fail(self._too_large())
            else:
                if self.buffered > HIGH_WATER and not self._paused and self.transport is not None:
                    self._paused = True
                    self.transport.pause_reading()
                # Bytes that carry no body (chunk framing, trailers) are bounded like the head:
                # llhttp keeps a partial trailer line in memory without a limit. A read that
                # also carried body bytes counts only when framing outweighs the body in it.
                delta = self.body_total - body_before
                framing = len(data) - delta
                if delta:
                    self._framing_seen = framing if framing > delta else 0
                else:
                    self._framing_seen += framing
                if self._framing_seen > self.max_header_bytes:
                    self._fail(
                        PayloadError(
                            f"chunk framing or trailers over {self.max_header_bytes} bytes"
                        )
                    )
        self._wake()

    def eof_received(self) -> bool:
        self.eof = True
        self._wake()
        return False  # close the transport

    def connection_lost(self, exc: Exception | None) -> None:
        self.eof = True
        if exc is not None:
            self.error = exc
        self.transport = None
        self._release()
        self._wake()

    # -- llhttp callbacks (httptools calls the ones that exist) ---------------------------

    def on_message_begin(self) -> None:
        if self.complete:
            raise _AfterBody  # a second message: the connection is not reusable

    def on_header(self, name: bytes, value: bytes) -> None:
        self._head_bytes += len(name) + len(value) + 4
        if self._head_bytes > self.max_header_bytes:
            raise self._fail(self._too_large())
        self.raw_headers.append((name, value))

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status < 200:
            self.raw_headers = []  # an interim reply (1xx): the final one follows
            return
        self.status = status
        self.keep_alive = self._parser.should_keep_alive()
        te: bytes | None = None
        framed = False
        for name, value in self.raw_headers:
            size = len(name)
            if size == 17 and name.lower() == b"transfer-encoding":
                if te is not None:
                    raise self._fail(MalformedHead("more than one Transfer-Encoding header"))
                te = value
            elif size == 14 and name.lower() == b"content-length":
                framed = True
                self.content_length = int(value)  # llhttp accepted it: one plain number
        if te is not None:
            # RFC 9112 6.1: the only coding this client asked for (none) plus chunked. llhttp
            # would read any other coding until the close, and hand us still-encoded bytes.
            if te.strip().lower() != b"chunked":
                raise self._fail(MalformedHead(f"unsupported Transfer-Encoding {te[:40]!r}"))
            framed = True
        if self.head_only:
            # RFC 9110 9.3.2: a reply to HEAD has no body, whatever it says. llhttp cannot be
            # told so, and would wait for one: the connection is not reused after a HEAD.
            self.complete = True
            self.keep_alive = False
        elif not framed and status not in NO_BODY_STATUSES:
            self.until_close = True
            self.keep_alive = False
        self.head_done = True

    def on_body(self, body: bytes) -> None:
        if not self.complete:
            self.body.append(body)
            self.buffered += len(body)
            self.body_total += len(body)

    def on_message_complete(self) -> None:
        if self.head_done:  # not the end of an interim reply
            self.complete = True

    # -- helpers --------------------------------------------------------------------------

    def _too_large(self) -> HeaderTooLarge:
        return HeaderTooLarge(
            f"the response head is over {self.max_header_bytes} bytes "
            "(CB_UPSTREAM_MAX_HEADER_BYTES)"
        )

    def _fail(self, failure: TransportError) -> TransportError:
        if self.failure is None:
            self.failure = failure
        self.keep_alive = False
        return failure

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_data(self) -> None:
        """Wait until more bytes or the end arrive."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def take_body(self) -> bytes:
        body = self.body
        piece = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        return piece

    async def tunnel(self, host: str, port: int, route: ProxyRoute) -> None:
        """Ask the egress proxy for a CONNECT tunnel to host:port (RFC 9110 9.3.6)."""
        transport = self.transport
        if transport is None:
            raise ConnectFailed(f"the egress proxy {route.host}:{route.port} closed at once")
        authority = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        lines = [f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"]
        if route.authorization:
            lines.append(f"Proxy-Authorization: {route.authorization}\r\n")
        lines.append("\r\n")
        self._tunnel = buf = bytearray()
        try:
            transport.write("".join(lines).encode("latin-1"))
            while (end := buf.find(b"\r\n\r\n")) < 0:
                if len(buf) > self.max_header_bytes:
                    raise ConnectFailed("the egress proxy's CONNECT reply is too large")
                if self.eof:
                    raise ConnectFailed(
                        f"the egress proxy {route.host}:{route.port} closed during CONNECT"
                    )
                await self.wait_data()
        finally:
            self._tunnel = None
        status_line = bytes(buf[: buf.find(b"\r\n")]).decode("latin-1")
        parts = status_line.split(" ", 2)
        if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].startswith("2"):
            raise ConnectFailed(
                f"the egress proxy refused CONNECT {authority}: {status_line[:80]!r}"
            )
        if len(buf) > end + 4:
            raise ConnectFailed("the egress proxy sent bytes before the tunnel was used")

    @property
    def closed(self) -> asyncio.Event:
        """Set once the connection is gone (tests wait on it); made only when asked for."""
        if self._closed is None:
            self._closed = asyncio.Event()
            if self._released:
                self._closed.set()
        return self._closed

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.eof and not self.transport.is_closing()

    def _release(self) -> None:
        if not self._released:
            self._released = True
            if self._closed is not None:
                self._closed.set()
            if self._on_release is not None:
                self._on_release(self)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # no lingering half-closed sockets for abandoned bodies
            self.transport = None
        self.eof = True
        self.active = False
        self.body.clear()
        self.buffered = 0
        self._release()


class _AfterBody(Exception):
    """Raised inside the parser to stop at a second message after a complete one."""
