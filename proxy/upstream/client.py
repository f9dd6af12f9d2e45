"""The one upstream HTTP/1.1 client: keep-alive pool, strict parsing, bounded buffers.

Why not aiohttp's ClientSession: a sidecar's whole job is the upstream call,
and ClientSession builds a dozen objects per request (request and response
wrappers, payload, timers, tracing, cookie handling) that a proxy never uses.
Profiling showed that machinery costing more CPU than all of the proxy's own
logic. This client does only what an LLM API call needs (docs/upstream.md):

- HTTP/1.1 with keep-alive, one request per connection at a time, a pool of
  idle connections per origin (scheme, host, port) and a cap on the open
  connections per origin; TLS with the system CAs plus ``SSL_CERT_FILE`` /
  ``SSL_CERT_DIR``, SNI; egress through ``HTTPS_PROXY`` / ``HTTP_PROXY``
  (CONNECT) unless ``NO_PROXY`` says otherwise (``proxy.upstream.egress``);
- request bodies sent with Content-Length; no compression negotiated (no
  Accept-Encoding is sent, so servers answer with identity encoding);
- responses parsed by llhttp (``httptools``, the parser uvicorn uses), which
  refuses duplicate Content-Length, Content-Length with Transfer-Encoding,
  malformed chunk sizes, bare LF line ends and obsolete line folding; where
  llhttp is lenient for responses this client refuses too: a
  Transfer-Encoding other than exactly ``chunked`` (llhttp would read until
  the close), and a response head over ``max_header_bytes``;
- bodies framed by Content-Length, chunked coding, or the connection's end,
  read whole (``read``) or piece by piece (``read_chunk``).

Invariants:
- A connection returns to the pool only after its response body was read to
  the end with keep-alive intact and nothing after it; anything else
  (cancellation, an error, a body left unread, ``Connection: close``, bytes
  after the body or on an idle connection) closes it.
- Body bytes are parsed as they arrive; once more than ``HIGH_WATER`` of them
  wait for the reader, the socket stops being read until the reader takes them.
- At most ``max_per_host`` connections per origin are open; a request that
  finds none free waits at most its connect timeout, then fails with
  ``PoolExhausted`` (a local failure, never the upstream's).
- A request is sent a second time only on the terms of Go's net/http
  (``transport.go``, ``shouldRetryRequest``): see ``may_resend``.
- Timeouts are the caller's (``forward`` runs each phase under a deadline);
  only connecting has its own, and a connection taken from the pool costs no
  timer at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from functools import lru_cache
from urllib.parse import urlsplit

import httptools
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.settings import Settings
from proxy.upstream.egress import EgressProxies, ProxyRoute
from proxy.upstream.errors import (
    BodyTooLarge,
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    HeaderTooLarge,
    LocalFailure,
    MalformedHead,
    PayloadError,
    PoolExhausted,
    TransportError,
    from_os_error,
)

DEFAULT_MAX_HEADER_BYTES = 64 * 1024  # CB_UPSTREAM_MAX_HEADER_BYTES (docs/upstream.md)
DEFAULT_MAX_PER_HOST = 256  # CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST
MAX_HEADER_BYTES = DEFAULT_MAX_HEADER_BYTES
MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 30.0  # under the 60-75 s idle timeouts of common servers and balancers
HIGH_WATER = 1 << 20  # pause reading an upstream whose data the client is not taking
LOW_WATER = 1 << 16
NO_BODY_STATUSES = frozenset({204, 304})
# Framing is this client's job: a caller-supplied copy would desynchronise the upstream.
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# Go's Request.isReplayable: these methods, or any request carrying one of these headers.
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDEMPOTENCY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})

Origin = tuple[str, str, int]
Opener = Callable[..., Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]]

__all__ = [
    "DEFAULT_MAX_HEADER_BYTES",
    "DEFAULT_MAX_PER_HOST",
    "HIGH_WATER",
    "MAX_HEADER_BYTES",
    "BodyTooLarge",
    "ConnectFailed",
    "ConnectTimeout",
    "Disconnected",
    "LocalFailure",
    "PayloadError",
    "PoolExhausted",
    "Response",
    "TLSConfigError",
    "UpstreamPool",
    "check_environment",
    "may_resend",
    "split_url",
    "system_ssl_context",
]


@lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[Origin, str, str]:
    """(origin key, Host header value, request target) for an absolute http(s) URL."""
    parts = urlsplit(url)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https") or not parts.hostname:
        raise ConnectFailed(f"unsupported upstream URL {url!r}")
    default = 443 if scheme == "https" else 80
    port = parts.port or default
    host = parts.hostname
    host_header = host if port == default else f"{host}:{port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if port == default else f"[{host}]:{port}"
    target = parts.path or "/"
    if parts.query:
        target += "?" + parts.query
    return (scheme, host, port), host_header, target


class TLSConfigError(ValueError):
    """``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` cannot be loaded; the message names the variable."""


def system_ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The system's CAs, plus ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` from ``environ``.

    OpenSSL reads those two variables itself, but only from the process
    environment and only instead of its default bundle; loading them here
    adds them to the system CAs and honours the environment the proxy was
    started with (tests inject theirs). A file that cannot be loaded is a
    ``TLSConfigError``: a start-up error, never a failure of every https upstream.
    """
    context = ssl.create_default_context()
    cafile = environ.get("SSL_CERT_FILE") or None
    capath = environ.get("SSL_CERT_DIR") or None
    if cafile or capath:
        try:
            context.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError) as exc:
            names = " / ".join(
                f"{name}={value!r}"
                for name, value in (("SSL_CERT_FILE", cafile), ("SSL_CERT_DIR", capath))
                if value
            )
            raise TLSConfigError(f"{names}: cannot load the CA certificates: {exc}") from exc
    return context


def check_environment(environ: Mapping[str, str]) -> None:
    """Raise a ValueError naming the variable if the egress or CA settings cannot be used.

    ``serve`` calls it before it starts, so a bad value stops start-up with a message
    instead of failing (and being blamed on) every upstream call later.
    """
    EgressProxies(environ)
    system_ssl_context(environ)


def may_resend(exc: Disconnected, reused: bool, method: str, headers: Mapping[str, str]) -> bool:
    """May a request that failed with ``exc`` be sent again on a fresh connection?

    Go's net/http (``transport.go``, ``shouldRetryRequest``): only when the
    failed connection was a reused keep-alive one (the server may have closed
    it while idle), and either nothing of the request was written yet, or the
    request is replayable (GET, HEAD, OPTIONS, TRACE, or it carries an
    ``Idempotency-Key`` / ``X-Idempotency-Key`` header) and the connection
    ended before any response byte. A POST whose bytes may have reached the
    upstream is never sent twice: the upstream may be working on it (and
    charging for it).
    """
    if not reused:
        return False
    if not exc.request_written:
        return True
    if exc.response_started:
        return False
    return method in REPLAYABLE_METHODS or any(
        name.lower() in IDEMPOTENCY_HEADERS for name in headers
    )


class _Connection(asyncio.Protocol):
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
        on_release: Callable[[_Connection], None] | None = None,
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


@lru_cache(maxsize=64)
def _latin1(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(name.encode("latin-1") for name in names)


class Response:
    """An upstream response: status and headers now, the body on demand.

    The head is kept as one bytes object (its header lines as they came) and turned
    into a header mapping only when asked: a held stream keeps its Response for its
    whole life, and a multidict of an API's 20-odd headers costs kilobytes per stream.
    """

    __slots__ = ("_conn", "_done", "_head", "_pool", "content_length", "status")

    def __init__(self, pool: UpstreamPool, conn: _Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        # llhttp refuses CR, LF and NUL in header lines and ':' in names: "\r\n" and ": "
        # split the lines back into (name, value) exactly.
        self._head = b"\r\n".join([name + b": " + value for name, value in conn.raw_headers])
        conn.raw_headers = []
        # The declared body length (llhttp checked it is one plain number), or None.
        self.content_length = None if conn.head_only else conn.content_length
        self._done = False
        if conn.complete and not conn.body:
            self._finish()

    def _header_items(self) -> list[tuple[str, str]]:
        if not self._head:
            return []
        items = []
        for line in self._head.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            items.append((name.decode("latin-1"), value.decode("latin-1")))
        return items

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The response headers (built on each access: read it once and keep it)."""
        return CIMultiDictProxy(CIMultiDict(self._header_items()))

    def headers_with_prefix(self, prefixes: tuple[str, ...]) -> dict[str, str]:
        """The headers whose lower-cased name starts with one of ``prefixes`` (lower case),
        without building the whole mapping (the relayed rate-limit headers)."""
        if not self._head:
            return {}
        wanted = _latin1(prefixes)
        found: dict[str, str] = {}
        for line in self._head.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            if name.lower().startswith(wanted):
                found[name.decode("latin-1")] = value.decode("latin-1")
        return found

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._conn.buffered

    @property
    def connection_closed(self) -> bool:
        return self._conn.transport is None

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body (at most ``limit`` bytes; the connection is then dropped)."""
        parts: list[bytes] = []
        size = 0
        while True:
            piece = await self.read_chunk()
            if not piece:
                return b"".join(parts)
            parts.append(piece)
            size += len(piece)
            if limit is not None and size >= limit:
                self.close()
                return b"".join(parts)[:limit]

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        conn = self._conn
        while not self._done:
            if conn.body:
                piece = conn.take_body()
                if conn.complete:
                    self._finish()  # the last piece: the connection goes back at once
                return piece
            if conn.complete:
                self._finish()
                break
            if conn.failure is not None:
                self.close()
                raise conn.failure
            if conn.eof:
                # Framed by the connection's end: a clean close ends the body, a reset
                # leaves it incomplete (RFC 9112 section 8).
                if conn.until_close and conn.error is None:
                    self._finish()
                    break
                self.close()
                raise PayloadError("the upstream closed the connection in the middle of the body")
            try:
                await conn.wait_data()
            except BaseException:  # cancelled (a deadline, a client gone): the rest is lost
                self.close()
                raise
        return b""

    def _finish(self) -> None:
        self._done = True
        conn = self._conn
        if conn.keep_alive and conn.complete and conn.alive:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response; the connection is closed unless the body was complete."""
        if not self._done:
            self._done = True
            self._conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


class Progress:
    """How far one request got, for telling the proxy's own delays from the upstream's.

    ``connecting``: a new connection was being opened (not waiting for a pooled slot);
    ``written``: the request was handed to a connection. A deadline that fires before
    ``written`` found the upstream without the request (docs/upstream.md).
    ``on_written`` is called once at that moment (the breaker starts judging stalls there).
    """

    __slots__ = ("connecting", "on_written", "written")

    def __init__(self, on_written: Callable[[], None] | None = None) -> None:
        self.connecting = False
        self.written = False
        self.on_written = on_written


class UpstreamPool:
    """Keep-alive connections per origin, capped per origin, and the request function."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float = KEEPALIVE_SECONDS,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
        max_per_host: int = DEFAULT_MAX_PER_HOST,
        max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
        environ: Mapping[str, str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        opener: Opener | None = None,
    ) -> None:
        """``environ`` (default: the process's) supplies the proxy and CA variables;
        ``clock`` ages idle connections; ``opener`` stands in for
        ``loop.create_connection`` (tests inject failures there, also on a running pool
        through the ``opener`` attribute; None = the loop's)."""
        env = os.environ if environ is None else environ
        self._environ = env
        self._idle: dict[Origin, list[_Connection]] = {}
        self._open: dict[Origin, int] = {}
        self._waiters: dict[Origin, deque[asyncio.Future[None]]] = {}
        self._ssl = ssl_context
        self._keepalive = keepalive
        self._max_idle = max_idle
        self._max_per_host = max_per_host
        self._max_header_bytes = max_header_bytes
        self._clock = clock
        self.opener = opener
        # Called with the origin each time a request starts waiting for a connection (its
        # cap reached): an observation point for tests and diagnostics; None = nobody asks.
        self.on_queue: Callable[[Origin], None] | None = None
        self.proxies = EgressProxies(env)
        self._closed = False

    @classmethod
    def from_settings(cls, settings: Settings) -> UpstreamPool:
        """The app's one pool: limits from the settings, proxies and CAs from its environment."""
        per_host = settings.upstream_max_connections_per_host
        return cls(
            max_idle=min(MAX_IDLE_PER_ORIGIN, per_host),
            max_per_host=per_host,
            max_header_bytes=settings.upstream_max_header_bytes,
            environ=settings.environ,
        )

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = system_ssl_context(self._environ)
        return self._ssl

    def idle_connections(self, origin: Origin) -> list[_Connection]:
        return list(self._idle.get(origin, ()))

    def open_connections(self, origin: Origin) -> int:
        return self._open.get(origin, 0)

    def waiting(self, origin: Origin) -> int:
        """Requests queued for a connection to ``origin`` (its cap is reached)."""
        return sum(not w.done() for w in self._waiters.get(origin, ()))

    def put(self, conn: _Connection) -> None:
        conn.active = False
        if self._closed:
            conn.close()
            return
        idle = self._idle.get(conn.origin)
        if idle is None:
            idle = self._idle[conn.origin] = []
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = self._clock()
        conn.reused = True
        idle.append(conn)
        if self._waiters:
            self._notify(conn.origin)

    def _take_idle(self, origin: Origin) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        horizon = self._clock() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            if conn.alive and conn.idle_since > horizon:
                return conn
            conn.close()
        return None

    def _released(self, conn: _Connection) -> None:
        """A connection of this pool is gone: its slot under the per-host cap is free."""
        origin = conn.origin
        left = self._open.get(origin, 1) - 1
        if left > 0:
            self._open[origin] = left
        else:
            self._open.pop(origin, None)
        if self._waiters:
            self._notify(origin)

    def _notify(self, origin: Origin) -> None:
        waiters = self._waiters.get(origin)
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    async def _acquire(
        self, origin: Origin, seconds: float, *, reuse: bool, progress: Progress | None = None
    ) -> _Connection:
        """An idle connection (when ``reuse``), else a new one once the cap leaves room."""
        loop = asyncio.get_running_loop()
        deadline: float | None = None
        while True:
            if reuse:
                conn = self._take_idle(origin)
                if conn is not None:
                    return conn
            if self._open.get(origin, 0) < self._max_per_host:
                if progress is not None:
                    progress.connecting = True
                return await self._connect(origin, seconds)
            # Every allowed connection is busy: wait for one to come back or close, within
            # the connect timeout (a wait for a connection is part of connecting).
            if deadline is None:
                deadline = loop.time() + seconds
            left = deadline - loop.time()
            waiter: asyncio.Future[None] = loop.create_future()
            queue = self._waiters.setdefault(origin, deque())
            queue.append(waiter)
            if self.on_queue is not None:
                self.on_queue(origin)
            try:
                if left <= 0:
                    raise TimeoutError
                async with asyncio.timeout(left):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    self._notify(origin)  # woken just as the time ran out: pass the turn on
                raise PoolExhausted(
                    f"all {self._max_per_host} connections to {origin[1]}:{origin[2]} are busy "
                    f"(CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST); none came free within {seconds:g} s"
                ) from None
            finally:
                if not waiter.done():
                    waiter.cancel()
                    with contextlib.suppress(ValueError):
                        queue.remove(waiter)
                if not queue and self._waiters.get(origin) is queue:
                    del self._waiters[origin]

    async def _connect(self, origin: Origin, seconds: float) -> _Connection:
        scheme, host, port = origin
        self._open[origin] = self._open.get(origin, 0) + 1  # the slot is taken from now on
        conn = _Connection(origin, self._max_header_bytes, self._released)
        route = self.proxies.route(scheme, host, port)
        where = f"{host}:{port}"
        if route is not None:
            where += f" via {route.host}:{route.port}"
        loop = asyncio.get_running_loop()
        opener: Opener = self.opener or loop.create_connection
        try:
            async with asyncio.timeout(seconds):
                if route is None:
                    tls = scheme == "https"
                    await opener(
                        lambda: conn,
                        host,
                        port,
                        ssl=self._ssl_context() if tls else None,
                        server_hostname=host if tls else None,
                    )
                else:
                    await opener(lambda: conn, route.host, route.port)
                    await conn.tunnel(host, port, route)
                    if scheme == "https" and conn.transport is not None:
                        conn.transport = await loop.start_tls(
                            conn.transport, conn, self._ssl_context(), server_hostname=host
                        )
        except TimeoutError:
            conn.close()
            raise ConnectTimeout(f"connecting to {where} took over {seconds:g} s") from None
        except TransportError:
            conn.close()
            raise
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError), EMFILE
            conn.close()
            raise from_os_error(exc, where) from exc
        except BaseException:
            conn.close()
            raise
        return conn

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        connect_timeout: float,
        progress: Progress | None = None,
    ) -> Response:
        """Send a request; return once the response head arrived (``progress``: how far)."""
        origin, host_header, target = split_url(url)
        head = _request_head(method, target, host_header, headers, body)
        head_only = method == "HEAD"
        conn = self._take_idle(origin)
        if conn is None:
            conn = await self._acquire(origin, connect_timeout, reuse=True, progress=progress)
        if progress is not None:
            progress.written = True
            if progress.on_written is not None:
                progress.on_written()
        try:
            return await self._exchange(conn, head, body, head_only)
        except Disconnected as exc:
            if not may_resend(exc, conn.reused, method, headers):
                raise
        # The keep-alive race, on Go's terms (may_resend): once more, on a fresh connection.
        conn = await self._acquire(origin, connect_timeout, reuse=False)
        return await self._exchange(conn, head, body, head_only)

    async def _exchange(
        self, conn: _Connection, head: bytes, body: bytes | None, head_only: bool = False
    ) -> Response:
        transport = conn.transport
        if transport is None or not conn.alive:
            conn.close()
            raise Disconnected(
                "the connection closed before the request was sent", request_written=False
            )
        conn.begin(head_only)
        try:
            if body:
                transport.writelines((head, body))
            else:
                transport.write(head)
            while not conn.head_done:
                if conn.failure is not None:
                    raise conn.failure
                if conn.eof:
                    detail = f": {conn.error}" if conn.error else ""
                    raise Disconnected(
                        f"the upstream closed the connection before replying{detail}",
                        response_started=conn.got_bytes,
                    )
                await conn.wait_data()
        except BaseException:
            conn.close()
            raise
        return Response(self, conn)

    async def close(self) -> None:
        self._closed = True
        for idle in self._idle.values():
            for conn in idle:
                conn.close()
        self._idle.clear()


def _request_head(
    method: str, target: str, host: str, headers: Mapping[str, str], body: bytes | None
) -> bytes:
    lines = [f"{method} {target} HTTP/1.1\r\nHost: {host}\r\n"]
    for name, value in headers.items():
        if "\r" in value or "\n" in value or "\x00" in value or ":" in name:
            # Never the value in the message: it may be a provider key.
            raise ValueError(f"refusing to send header {name!r}: CR, LF or NUL in its value")
        if name.lower() not in FRAMING_HEADERS:
            lines.append(f"{name}: {value}\r\n")
    if body is not None or method in ("POST", "PUT", "PATCH"):
        lines.append(f"Content-Length: {len(body) if body else 0}\r\n")
    lines.append("\r\n")
    return "".join(lines).encode("latin-1")
