"""Client connections: read timeouts, `Expect: 100-continue`, protocol errors as OpenAI JSON.

aiohttp runs one ``RequestHandler`` (an asyncio protocol) per client connection.
It closes idle keep-alive connections (``keepalive_timeout``) but never a
connection that stalls in the middle of a request's headers or body, and it
answers malformed requests in plain text. ``ProxyRequestHandler`` adds what a
server facing more than one well-behaved client needs:

- a header timeout: from the first byte of a request to the end of its
  headers (CB_CLIENT_HEADER_TIMEOUT); a 408 in OpenAI JSON, then the close;
- a body timeout: the longest gap between two pieces of a request body, as
  nginx's ``client_body_timeout`` (CB_CLIENT_BODY_TIMEOUT); the handler's body
  read fails with a 408 in OpenAI JSON, and the connection closes after it;
- ``handle_error`` (aiohttp's hook for the errors it produces itself: a bad
  request line, malformed or oversized headers) renders OpenAI JSON;
- ``stop_accepting`` for the drain: idle connections close at once, busy ones
  after their response (with ``Connection: close``).

How it is plugged in, with public names only where aiohttp has them:
``ProxyRunner`` is an ``AppRunner`` whose ``_make_server`` (the hook
``BaseRunner`` subclasses implement) hands back a ``ProxyServer``, a
``web.Server`` built from the one aiohttp made for the app and creating
``ProxyRequestHandler`` per connection.

One timer handle per connection, rescheduled lazily like aiohttp's keep-alive
timer: moving a deadline forward is an attribute write, so a keep-alive
request costs no timer operation in the common case.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from aiohttp.http import RawRequestMessage
from aiohttp.http_exceptions import BadHttpMessage, LineTooLong
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler

from proxy.core.errors import (
    ExpectationFailed,
    HeadersTooLarge,
    InvalidRequest,
    PayloadTooLarge,
    ProxyError,
    RequestTimeout,
    UpstreamTimeout,
)
from proxy.server.api import ExpectHandler, request_id

LOG = logging.getLogger("cb_proxy")

# Phases of a connection, for its one deadline.
_IDLE, _HEADERS, _BODY = 0, 1, 2


@dataclass(frozen=True, slots=True)
class ClientLimits:
    header_timeout: float
    body_timeout: float
    keepalive_timeout: float


def error_response(err: ProxyError, *, rid: str | None = None) -> web.Response:
    """OpenAI error JSON that also ends the connection (nothing after it can be trusted)."""
    headers = {"x-request-id": rid} if rid else None
    resp = web.Response(
        status=err.http_status, body=err.to_json(), content_type="application/json", headers=headers
    )
    resp.force_close()
    return resp


def protocol_error(status: int, exc: BaseException | None) -> ProxyError:
    """What aiohttp's own HTTP layer rejected, as an error of the proxy's tree."""
    if isinstance(exc, LineTooLong):
        limit = exc.args[1] if len(exc.args) > 1 else "the limit"
        return HeadersTooLarge(f"a request line or header field is longer than {limit} bytes")
    if isinstance(exc, BadHttpMessage):
        # The parser's first line names the problem; the lines after it quote the client's bytes.
        first = (exc.message or "").strip().splitlines()[0:1] or ["malformed request"]
        text = first[0].rstrip(":")[:200]
        if text.startswith("Too many headers"):
            return HeadersTooLarge("the request has too many header fields")
        return InvalidRequest(f"malformed HTTP request: {text}", code="bad_request")
    if status == 504:
        return UpstreamTimeout("the request timed out in the proxy")
    if 400 <= status < 500:
        return InvalidRequest("malformed HTTP request", code="bad_request")
    return ProxyError("internal error in the proxy")


class ProxyRequestHandler(RequestHandler):
    """aiohttp's HTTP/1.1 connection protocol with client read timeouts and JSON errors."""

    __slots__ = (
        "_body",
        "_closing",
        "_deadline",
        "_early",
        "_in_request",
        "_limits",
        "_phase",
        "_time",
        "_timer",
    )

    def __init__(
        self,
        manager: web.Server,
        *,
        loop: asyncio.AbstractEventLoop,
        limits: ClientLimits,
        **kw: Any,
    ) -> None:
        super().__init__(manager, loop=loop, **kw)
        self._limits = limits
        self._time = loop.time
        self._phase = _IDLE
        self._deadline: float | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._body: StreamReader | None = None  # the request body still being received
        self._in_request = False
        self._early = False  # bytes of a next request arrived while one was being handled
        self._closing = False

    # -- deadlines ------------------------------------------------------------------------

    def _start(self, phase: int, seconds: float) -> None:
        self._phase = phase
        deadline = self._time() + seconds
        self._deadline = deadline
        timer = self._timer
        if timer is None or timer.when() > deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _stop(self) -> None:
        self._phase = _IDLE
        self._deadline = None  # the armed timer, if any, finds nothing to do

    def _on_timer(self) -> None:
        self._timer = None
        deadline = self._deadline
        if deadline is None or self.transport is None:
            return
        if self._time() < deadline:  # moved forward since the timer was armed
            self._timer = self._loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        if self._phase == _HEADERS:
            self._headers_timed_out()
        elif self._phase == _BODY:
            self._body_timed_out()

    def _headers_timed_out(self) -> None:
        seconds = self._limits.header_timeout
        LOG.info("client %s: request headers incomplete after %g s: 408", self.peername, seconds)
        err = RequestTimeout(
            f"the request headers did not arrive within {seconds:g} s (CB_CLIENT_HEADER_TIMEOUT)"
        )
        body = err.to_json()
        head = (
            "HTTP/1.1 408 Request Timeout\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        ).encode()
        if self.transport is not None:
            self.transport.write(head + body)
        self.force_close()  # the transport sends what it holds, then closes

    def _body_timed_out(self) -> None:
        body = self._body
        if body is None or body.is_eof():
            return
        seconds = self._limits.body_timeout
        LOG.info("client %s: no request body bytes for %g s: 408", self.peername, seconds)
        if not self._in_request:  # aiohttp is discarding the rest of an unread body
            self.force_close()
            return
        self._closing = True
        # The handler's body read raises this (rendered by `guarded` as 408 JSON); nothing more
        # is parsed on this connection: what would follow is the rest of a dead body.
        body.set_exception(
            RequestTimeout(
                f"no request body bytes arrived for {seconds:g} s (CB_CLIENT_BODY_TIMEOUT)"
            )
        )
        body.feed_eof()
        self.close()

    # -- aiohttp's protocol ---------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        body = self._body
        if body is not None and not body.is_eof():
            if self._phase == _BODY:
                self._deadline = self._time() + self._limits.body_timeout
        elif self._in_request:
            self._early = True  # a pipelined request: its header clock starts after this one
        elif self._phase != _HEADERS:
            self._start(_HEADERS, self._limits.header_timeout)
        super().data_received(data)
        if self._phase == _BODY and body is not None and body.is_eof():
            self._stop()

    def request_started(self, payload: StreamReader) -> None:
        """Called as aiohttp hands a parsed request to the app: its headers are complete."""
        self._in_request = True
        self._early = False
        if payload.is_eof():
            self._body = None
            self._stop()
        else:
            self._body = payload
            self._start(_BODY, self._limits.body_timeout)

    async def finish_response(
        self, request: web.BaseRequest, resp: web.StreamResponse, start_time: float | None
    ) -> tuple[web.StreamResponse, bool]:
        if self._closing:
            resp.force_close()  # `Connection: close` when the headers are still to be sent
        try:
            return await super().finish_response(request, resp, start_time)
        finally:
            self._in_request = False
            body = self._body
            if body is None or body.is_eof():
                self._body = None
                if self._early and not self._closing:
                    self._start(_HEADERS, self._limits.header_timeout)
                else:
                    self._stop()
            self._early = False

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        super().connection_lost(exc)

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's errors as OpenAI JSON (the base class renders text/plain or HTML).

        aiohttp calls this for what its parser rejects (status 400 with the parser's
        exception) and for a handler that raised past the app (500, or 504 on a timeout);
        the proxy's handlers render their own errors in ``app.guarded``.
        """
        err = protocol_error(status, exc)
        if err.http_status >= 500:
            self.logger.error("error handling a request from %s", request.remote, exc_info=exc)
        else:
            LOG.info("client %s: %d %s", request.remote, err.http_status, err.message)
        if request.writer.output_size > 0:  # as the base class: a response is under way
            raise ConnectionError("a response was already started; cannot send an error")
        return error_response(err)

    # -- the drain ------------------------------------------------------------------------

    def stop_accepting(self) -> None:
        """No more requests on this connection: close it now if idle, else after its response."""
        self._closing = True
        if not self._in_request:
            self.force_close()


class ProxyServer(web.Server):
    """``web.Server`` whose connections are ``ProxyRequestHandler``."""

    def __init__(self, base: web.Server, limits: ClientLimits) -> None:
        # The server aiohttp built for the app knows its handler, request factory and
        # handler kwargs (keep-alive, access log, debug); this one keeps all of them.
        super().__init__(
            base.request_handler,
            request_factory=self._request_factory(base.request_factory),
            handler_cancellation=base.handler_cancellation,
            loop=asyncio.get_running_loop(),
            **base._kwargs,
        )
        self.limits = limits

    @staticmethod
    def _request_factory(
        make: Callable[..., web.BaseRequest],
    ) -> Callable[..., web.BaseRequest]:
        def started(
            message: RawRequestMessage,
            payload: StreamReader,
            protocol: RequestHandler,
            writer: AbstractStreamWriter,
            task: asyncio.Task[None],
        ) -> web.BaseRequest:
            if isinstance(protocol, ProxyRequestHandler):
                protocol.request_started(payload)
            return make(message, payload, protocol, writer, task)

        return started

    def __call__(self) -> ProxyRequestHandler:
        return ProxyRequestHandler(self, loop=self._loop, limits=self.limits, **self._kwargs)

    def stop_accepting(self) -> None:
        for conn in self.connections:
            if isinstance(conn, ProxyRequestHandler):
                conn.stop_accepting()


class ProxyRunner(web.AppRunner):
    """``AppRunner`` serving its app through ``ProxyServer``."""

    __slots__ = ("_limits",)

    def __init__(self, app: web.Application, *, limits: ClientLimits, **kwargs: Any) -> None:
        super().__init__(app, keepalive_timeout=limits.keepalive_timeout, **kwargs)
        self._limits = limits

    async def _make_server(self) -> web.Server:
        return ProxyServer(await super()._make_server(), self._limits)

    def stop_accepting(self) -> None:
        """Idle connections close now, busy ones after their response."""
        if isinstance(self.server, ProxyServer):
            self.server.stop_accepting()


def expect_handler(limit: int) -> ExpectHandler:
    """`Expect: 100-continue` that honours the body limit (RFC 9110 section 10.1.1).

    aiohttp's default sends `100 Continue` to any request that asks; a client that
    announces a body over ``limit`` gets the final 413 instead and never sends it.
    """

    async def expect(request: web.Request) -> web.StreamResponse | None:
        if request.version < (1, 1):
            return None  # HTTP/1.0 has no interim responses: the body comes anyway
        if request.headers.get("Expect", "").lower() != "100-continue":
            return error_response(
                ExpectationFailed("only 'Expect: 100-continue' is supported"),
                rid=request_id(request),
            )
        length = request.content_length
        if length is not None and length > limit:
            return error_response(
                PayloadTooLarge(f"request body is {length} bytes; the limit is {limit}"),
                rid=request_id(request),
            )
        await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        request.writer.output_size = 0  # an interim response: the real one is still to come
        return None

    return expect
