"""The one upstream HTTP/1.1 client: the keep-alive pool and the request function.

Why not aiohttp's ClientSession: a sidecar's whole job is the upstream call,
and ClientSession builds a dozen objects per request (request and response
wrappers, payload, timers, tracing, cookie handling) that a proxy never uses.
Profiling showed that machinery costing more CPU than all of the proxy's own
logic. This client does only what an LLM API call needs (docs/upstream.md):

- HTTP/1.1 with keep-alive, one request per connection at a time, a pool of
  idle connections per origin (scheme, host, port) and a cap on the open
  connections per origin; egress through ``HTTPS_PROXY`` / ``HTTP_PROXY``
  (CONNECT) unless ``NO_PROXY`` says otherwise (``proxy.upstream.egress``);
  TLS with the system CAs plus ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``, SNI
  (``proxy.upstream.tls``);
- request bodies sent with Content-Length; no compression negotiated (no
  Accept-Encoding is sent, so servers answer with identity encoding);
- responses parsed strictly by llhttp with bounded buffers
  (``proxy.upstream.connection``), their bodies read whole or piece by piece
  (``proxy.upstream.response``).

Invariants:
- At most ``max_per_host`` connections per origin are open; a request that
  finds none free waits at most its connect timeout, then fails with
  ``PoolExhausted`` (a local failure, never the upstream's).
- A connection comes back to the pool only from a ``Response`` whose body was
  read to the end (``proxy.upstream.response``); an idle one past
  ``KEEPALIVE_SECONDS`` or no longer alive is closed, never reused.
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

from proxy.config.settings import Settings
from proxy.upstream.connection import DEFAULT_MAX_HEADER_BYTES, Connection, Origin
from proxy.upstream.egress import EgressProxies
from proxy.upstream.errors import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    PoolExhausted,
    TransportError,
    from_os_error,
)
from proxy.upstream.response import Response
from proxy.upstream.tls import system_ssl_context

DEFAULT_MAX_PER_HOST = 256  # CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST
MAX_IDLE_PER_ORIGIN = 256
KEEPALIVE_SECONDS = 30.0  # under the 60-75 s idle timeouts of common servers and balancers
# Framing is this client's job: a caller-supplied copy would desynchronise the upstream.
FRAMING_HEADERS = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# Go's Request.isReplayable: these methods, or any request carrying one of these headers.
REPLAYABLE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
IDEMPOTENCY_HEADERS = frozenset({"idempotency-key", "x-idempotency-key"})

Opener = Callable[..., Awaitable[tuple[asyncio.BaseTransport, asyncio.BaseProtocol]]]

__all__ = [
    "DEFAULT_MAX_PER_HOST",
    "Progress",
    "Response",
    "UpstreamPool",
    "check_environment",
    "may_resend",
    "split_url",
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
        self._idle: dict[Origin, list[Connection]] = {}
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

    def idle_connections(self, origin: Origin) -> list[Connection]:
        return list(self._idle.get(origin, ()))

    def open_connections(self, origin: Origin) -> int:
        return self._open.get(origin, 0)

    def waiting(self, origin: Origin) -> int:
        """Requests queued for a connection to ``origin`` (its cap is reached)."""
        return sum(not w.done() for w in self._waiters.get(origin, ()))

    def put(self, conn: Connection) -> None:
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

    def _take_idle(self, origin: Origin) -> Connection | None:
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

    def _released(self, conn: Connection) -> None:
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
    ) -> Connection:
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

    async def _connect(self, origin: Origin, seconds: float) -> Connection:
        scheme, host, port = origin
        self._open[origin] = self._open.get(origin, 0) + 1  # the slot is taken from now on
        conn = Connection(origin, self._max_header_bytes, self._released)
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
        self, conn: Connection, head: bytes, body: bytes | None, head_only: bool = False
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
