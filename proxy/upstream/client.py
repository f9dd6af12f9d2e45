"""A lean HTTP/1.1 client for the hot path: keep-alive pool, streaming bodies.

Why not aiohttp's ClientSession: a sidecar's whole job is the upstream call,
and ClientSession builds a dozen objects per request (request and response
wrappers, payload, timers, tracing, cookie handling) that a proxy never uses.
Profiling showed that machinery costing more CPU than all of the proxy's own
logic. This client does only what an LLM API call needs:

- HTTP/1.1 with keep-alive, one request per connection at a time, a pool of
  idle connections per origin (scheme, host, port), TLS with the system's
  default context and SNI for https upstreams;
- request bodies sent with Content-Length; no compression negotiated (no
  Accept-Encoding is sent, so servers answer with identity encoding);
- response bodies framed by Content-Length, chunked transfer coding, or the
  connection's end, read whole (``read``) or piece by piece (``read_chunk``).

Invariants:
- A connection returns to the pool only after its response body was read to
  the end with keep-alive intact; anything else (cancellation, an error, a
  body left unread, ``Connection: close``) closes it.
- A request that fails on a reused idle connection before any response byte
  arrived is sent once more on a fresh connection: the server may have closed
  the idle connection while it sat in the pool (the keep-alive race).
- Timeouts are the caller's (``forward`` runs each phase under a deadline);
  only connecting has its own, and a connection taken from the pool costs no
  timer at all.
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections.abc import Mapping
from functools import lru_cache
from urllib.parse import urlsplit

from multidict import CIMultiDict, CIMultiDictProxy

MAX_HEADER_BYTES = 64 * 1024
MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 30.0  # under the 60-75 s idle timeouts of common servers and balancers
HIGH_WATER = 1 << 20  # pause reading an upstream whose data the client is not taking
LOW_WATER = 1 << 16
# The keep-alive race shows within a round trip; a close later than this may follow a
# request the server read and worked on, which must not be sent twice (POST is not idempotent).
RESEND_WINDOW = 0.5
HEAD_END = b"\r\n\r\n"
HEX_DIGITS = b"0123456789abcdefABCDEF"
CRLF = b"\r\n"
NO_BODY_STATUSES = frozenset({204, 304})
# Framing is this client's job: a caller-supplied copy would desynchronise the upstream.
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})


class UpstreamHTTPError(Exception):
    """Base of this client's errors."""


class ConnectFailed(UpstreamHTTPError):
    """No connection: refused, unreachable, DNS or TLS failure, or a connect timeout."""


class ConnectTimeout(ConnectFailed):
    pass


class Disconnected(UpstreamHTTPError):
    """The upstream closed the connection before the response headers were complete."""


class PayloadError(UpstreamHTTPError):
    """The response body ended early or was malformed."""


@lru_cache(maxsize=1024)
def split_url(url: str) -> tuple[tuple[str, str, int], str, str]:
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


class _Connection(asyncio.Protocol):
    """One upstream connection; the response side is read through ``Response``."""

    def __init__(self, origin: tuple[str, str, int]) -> None:
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.eof = False
        self.error: BaseException | None = None
        self.idle_since = 0.0
        self.got_bytes = False  # any response byte since the current request was sent
        self._waiter: asyncio.Future[None] | None = None
        self._paused = False

    # -- asyncio.Protocol -------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.got_bytes = True
        self.buffer += data
        if len(self.buffer) > HIGH_WATER and self.transport is not None and not self._paused:
            self._paused = True
            self.transport.pause_reading()
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
        self._wake()

    # -- helpers for Response ---------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def wait_data(self) -> None:
        """Wait until more bytes or the end arrive."""
        if self._paused and len(self.buffer) < LOW_WATER and self.transport is not None:
            self._paused = False
            self.transport.resume_reading()
        waiter = asyncio.get_running_loop().create_future()
        self._waiter = waiter
        try:
            await waiter
        finally:
            self._waiter = None

    def take(self, size: int) -> bytes:
        data = bytes(self.buffer[:size])
        del self.buffer[:size]
        return data

    @property
    def alive(self) -> bool:
        return self.transport is not None and not self.eof and not self.transport.is_closing()

    def close(self) -> None:
        if self.transport is not None:
            self.transport.abort()  # no lingering half-closed sockets for abandoned bodies
            self.transport = None
        self.eof = True


class Response:
    """An upstream response: status and headers now, the body on demand."""

    __slots__ = ("_chunk_left", "_conn", "_done", "_keep", "_left", "_pool", "headers", "status")

    def __init__(
        self,
        pool: UpstreamPool,
        conn: _Connection,
        status: int,
        headers: CIMultiDictProxy[str],
        framing: int | None,
        keep_alive: bool,
    ) -> None:
        self._pool = pool
        self._conn = conn
        self.status = status
        self.headers = headers
        # framing: None = until the connection ends, -1 = chunked, n >= 0 = Content-Length
        self._left = framing
        self._chunk_left = 0  # bytes (plus CRLF) left in the current chunk, for chunked bodies
        self._keep = keep_alive and framing is not None
        self._done = framing == 0
        if self._done:
            self._finish()

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
            piece = self._decode()
            if piece:
                return piece
            if self._done:
                break
            if conn.eof:
                # Framed by the connection's end: a clean close ends the body, a reset
                # leaves it incomplete (RFC 9112 section 8).
                if self._left is None and conn.error is None:
                    self._done = True
                    self._keep = False
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

    def _decode(self) -> bytes:
        buf = self._conn.buffer
        left = self._left
        if left is None:  # until the end of the connection
            if not buf:
                return b""
            return self._conn.take(len(buf))
        if left >= 0:  # Content-Length
            if not buf:
                return b""
            data = self._conn.take(min(left, len(buf)))
            self._left = left - len(data)
            if self._left == 0:
                self._done = True
                self._finish()
            return data
        return self._decode_chunked(buf)

    def _decode_chunked(self, buf: bytearray) -> bytes:
        """Decode whatever whole pieces of chunked body the buffer holds.

        Scans with an index and trims the buffer once at the end: an LLM stream
        is many small chunks, and shifting the buffer per chunk would copy it
        over and over.
        """
        out: list[bytearray] = []
        pos = 0
        size_buf = len(buf)
        left = self._chunk_left  # bytes of the current chunk still due, its CRLF included
        while True:
            if left > 2:  # inside a chunk's data
                take = min(left - 2, size_buf - pos)
                if take <= 0:
                    break
                out.append(buf[pos : pos + take])
                pos += take
                left -= take
                if left > 2:
                    break  # the rest of this chunk has not arrived yet
            if left:  # the CRLF that ends a chunk's data
                if size_buf - pos < left:
                    break
                if buf[pos : pos + left] != CRLF[2 - left :]:
                    self.close()
                    raise PayloadError("malformed chunked body (missing CRLF after a chunk)")
                pos += left
                left = 0
            line_end = buf.find(CRLF, pos)
            if line_end < 0:
                if size_buf - pos > MAX_HEADER_BYTES:
                    self.close()
                    raise PayloadError("malformed chunked body (chunk size line too long)")
                break
            size = _chunk_size(buf[pos:line_end])
            if size is None:
                self.close()
                raise PayloadError(f"malformed chunk size {bytes(buf[pos:line_end])[:20]!r}")
            if size == 0:
                # The last chunk; then optional trailers, ending with an empty line.
                end = buf.find(HEAD_END, line_end)
                if end < 0:
                    if size_buf - line_end > MAX_HEADER_BYTES:
                        self.close()
                        raise PayloadError("malformed chunked body (trailers too large)")
                    break
                pos = end + 4
                self._done = True
                break
            pos = line_end + 2
            left = size + 2
        self._chunk_left = left
        if pos:
            del buf[:pos]
        if self._done:
            self._finish()
        return b"".join(out)

    def _finish(self) -> None:
        conn = self._conn
        if self._keep and not conn.buffer and conn.alive:
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


def _chunk_size(line: bytearray) -> int | None:
    """A chunk-size line's value (RFC 9112 7.1), chunk extensions ignored; None if malformed."""
    end = line.find(b";")
    text = line if end < 0 else line[:end].rstrip(b" \t")
    # chunk-size = 1*HEXDIG; int(x, 16) alone would also take "+5", "0x5", "5_0", " 5".
    if not text or text.translate(None, HEX_DIGITS):
        return None
    return int(text, 16)


def _parse_head(head: bytes) -> tuple[int, CIMultiDictProxy[str], int | None, bool]:
    """Status, headers, body framing and keep-alive from a response head."""
    lines = head.decode("latin-1").split("\r\n")
    status_line = lines[0].split(" ", 2)
    if len(status_line) < 2 or not status_line[0].startswith("HTTP/1."):
        raise Disconnected(f"not an HTTP/1.x response: {lines[0][:60]!r}")
    try:
        status = int(status_line[1])
    except ValueError:
        raise Disconnected(f"bad status line {lines[0][:60]!r}") from None
    headers: CIMultiDict[str] = CIMultiDict()
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers.add(name.strip(), value.strip())
    keep_alive = status_line[0] != "HTTP/1.0"
    connection = headers.get("connection", "").lower()
    if "close" in connection:
        keep_alive = False
    elif "keep-alive" in connection:
        keep_alive = True
    framing: int | None
    if status in NO_BODY_STATUSES or 100 <= status < 200:
        framing = 0
    elif "chunked" in headers.get("transfer-encoding", "").lower():
        framing = -1
    elif "content-length" in headers:
        length = headers["content-length"]
        if not (length.isascii() and length.isdigit()):  # 1*DIGIT (RFC 9110 8.6): no sign, no _
            raise Disconnected("bad Content-Length in the upstream response")
        framing = int(length)
    else:
        framing = None
    return status, CIMultiDictProxy(headers), framing, keep_alive


class UpstreamPool:
    """Idle keep-alive connections per origin, and the request function."""

    def __init__(
        self,
        *,
        ssl_context: ssl.SSLContext | None = None,
        keepalive: float = KEEPALIVE_SECONDS,
        max_idle: int = MAX_IDLE_PER_ORIGIN,
    ) -> None:
        self._idle: dict[tuple[str, str, int], list[_Connection]] = {}
        self._ssl = ssl_context
        self._keepalive = keepalive
        self._max_idle = max_idle
        self._closed = False

    def _ssl_context(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = ssl.create_default_context()
        return self._ssl

    def put(self, conn: _Connection) -> None:
        if self._closed:
            conn.close()
            return
        idle = self._idle.setdefault(conn.origin, [])
        if len(idle) >= self._max_idle:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def _take_idle(self, origin: tuple[str, str, int]) -> _Connection | None:
        idle = self._idle.get(origin)
        if not idle:
            return None
        horizon = time.monotonic() - self._keepalive
        while idle:
            conn = idle.pop()  # the most recently used: the least likely to be stale
            # Bytes on an idle connection answer no request of ours (e.g. a 408 sent just
            # before the server closes it): they must not pass for the next reply.
            if conn.alive and not conn.buffer and conn.idle_since > horizon:
                return conn
            conn.close()
        return None

    async def _connect(self, origin: tuple[str, str, int], seconds: float) -> _Connection:
        scheme, host, port = origin
        loop = asyncio.get_running_loop()
        conn = _Connection(origin)
        try:
            async with asyncio.timeout(seconds):
                await loop.create_connection(
                    lambda: conn,
                    host,
                    port,
                    ssl=self._ssl_context() if scheme == "https" else None,
                    server_hostname=host if scheme == "https" else None,
                )
        except TimeoutError:
            conn.close()
            raise ConnectTimeout(f"connecting to {host}:{port} took over {seconds:g} s") from None
        except OSError as exc:  # refused, unreachable, DNS (gaierror), TLS (SSLError)
            conn.close()
            raise ConnectFailed(f"cannot connect to {host}:{port}: {exc}") from exc
        return conn

    async def request(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        body: bytes | None,
        *,
        connect_timeout: float,
    ) -> Response:
        """Send a request; return once the response head arrived."""
        origin, host_header, target = split_url(url)
        head = _request_head(method, target, host_header, headers, body)
        conn = self._take_idle(origin)
        if conn is not None:
            sent = time.monotonic()
            try:
                return await self._exchange(conn, head, body, method == "HEAD")
            except Disconnected:
                if conn.got_bytes or time.monotonic() - sent > RESEND_WINDOW:
                    raise
                # The keep-alive race: the server closed the idle connection before it read
                # the request, so nothing was processed. Once more, on a fresh connection.
        conn = await self._connect(origin, connect_timeout)
        return await self._exchange(conn, head, body, method == "HEAD")

    async def _exchange(
        self, conn: _Connection, head: bytes, body: bytes | None, head_only: bool = False
    ) -> Response:
        transport = conn.transport
        if transport is None:
            raise Disconnected("the connection closed before the request was sent")
        conn.got_bytes = False
        try:
            if body:
                transport.writelines((head, body))
            else:
                transport.write(head)
            buf = conn.buffer
            while True:
                end = buf.find(HEAD_END)
                if end < 0:
                    if len(buf) > MAX_HEADER_BYTES:
                        raise Disconnected("the upstream's response head is too large")
                    if conn.eof:
                        detail = f": {conn.error}" if conn.error else ""
                        raise Disconnected(
                            f"the upstream closed the connection before replying{detail}"
                        )
                    await conn.wait_data()
                    continue
                head_bytes = bytes(buf[:end])
                del buf[: end + 4]
                status, resp_headers, framing, keep_alive = _parse_head(head_bytes)
                if not 100 <= status < 200:
                    break
                # An interim response (we never send Expect, but servers may): the real one follows.
        except BaseException:
            conn.close()
            raise
        if head_only:
            framing = 0  # RFC 9110 9.3.2: a reply to HEAD has no body, whatever it says
        return Response(self, conn, status, resp_headers, framing, keep_alive)

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
