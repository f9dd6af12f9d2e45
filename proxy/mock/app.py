"""The mock upstream server behind ``cb-proxy mock``, the tests and the demo.

One server speaks one wire format (``openai``, ``anthropic``, ``gemini``;
replies are built in ``mock_openai`` / ``mock_anthropic`` / ``mock_gemini``)
and takes faults at run time over a small JSON control API on the same port:

    POST   /_mock/faults   a fault spec or a list of them (see ``mock_faults``)
    GET    /_mock/faults   the faults in force
    DELETE /_mock/faults   clear them and release every stalled request
    GET    /_mock/stats    requests, by_path, by_model, last_body, last_headers,
                           in_flight, cancelled, history
    POST   /_mock/reset    clear faults and statistics
    GET    /_mock/wait?requests=N|cancelled=N|in_flight=N&timeout=S
                           answers once the counter reaches N (504 on timeout)

Order of work for an API request: count it; wait ``latency_ms``; apply a
before-reply fault (status, rate_limit, quota, stall, drop, slow_first_token);
check the credential; refuse a prefill (``reject_prefill``, a 400 in the
format's shape, only for a request ending with an assistant turn); build the
reply; for a stream, apply an in-stream fault (stall_stream, cut_stream,
error_event, malformed_event) after N events while pacing events at
``tokens_per_second``. Control endpoints are never counted nor faulted.

A stall released by clearing the faults goes on as if nothing happened;
``cut_stream``, ``error_event`` and ``malformed_event`` never let the terminal
marker through (``cut_stream`` with ``end_marker`` sends the format's bare end
event, without a finish reason, before it hangs up).

A client that goes away is seen as a cancelled handler, which needs
``handler_cancellation=True`` on the runner: use ``start_mock_server``.
``MockControl.of(app)`` reaches faults and statistics in-process.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import orjson
from aiohttp import web

from proxy.mock.anthropic import AnthropicFormat
from proxy.mock.common import (
    DEFAULT_WORDS,
    INVALID_JSON,
    Handler,
    JsonReply,
    MockFormat,
    MockOptions,
    MockRequest,
    StreamReply,
)
from proxy.mock.faults import (
    BEFORE_REPLY,
    IN_STREAM,
    ON_PREFILL,
    Fault,
    FaultBoard,
    FaultKind,
    FaultSpecError,
    MockStats,
    parse_faults,
)
from proxy.mock.gemini import GeminiFormat
from proxy.mock.openai import OpenAIFormat

FormatName = Literal["openai", "anthropic", "gemini"]
FORMATS: dict[str, type[MockFormat]] = {
    "openai": OpenAIFormat,
    "anthropic": AnthropicFormat,
    "gemini": GeminiFormat,
}
UPSTREAM_HEADER = "x-mock-upstream"
CONTROL_PREFIX = "/_mock"
DEFAULT_WAIT_SECONDS = 5.0
MAX_WAIT_SECONDS = 300.0
WAIT_COUNTERS = ("requests", "cancelled", "in_flight")
# Stalls are released on shutdown, so handlers finish quickly; this only bounds a stuck client.
SHUTDOWN_TIMEOUT_SECONDS = 5.0


@dataclass
class MockState:
    fmt: MockFormat
    options: MockOptions
    faults: FaultBoard
    stats: MockStats


MOCK_STATE = web.AppKey("mock_state", MockState)


@dataclass(frozen=True)
class MockControl:
    """In-process access to a mock app's faults and statistics (the demo, the tests)."""

    state: MockState

    @classmethod
    def of(cls, app: web.Application) -> MockControl:
        return cls(app[MOCK_STATE])

    def set_faults(self, specs: Any) -> None:
        """Add a fault spec or a list of them, like ``POST /_mock/faults`` (FaultSpecError)."""
        self.state.faults.add(parse_faults(specs))

    def clear_faults(self) -> None:
        self.state.faults.clear()

    def reset(self) -> None:
        self.state.faults.clear()
        self.state.stats.reset()

    def request_count(self) -> int:
        return self.state.stats.requests

    def stats(self) -> dict[str, Any]:
        return self.state.stats.snapshot()


def create_mock_app(
    fmt: FormatName,
    *,
    name: str = "mock",
    latency_ms: float = 0,
    tokens_per_second: float | None = None,
    words: int = DEFAULT_WORDS,
    require_key: str | None = None,
    models: Sequence[str] | None = None,
    strict_thought_signatures: bool = False,
) -> web.Application:
    """A mock upstream speaking ``fmt``; run it with ``start_mock_server`` (or ``run_mock``)."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown mock format {fmt!r}; expected one of {', '.join(FORMATS)}")
    if words < 1:
        raise ValueError("words must be at least 1")
    if tokens_per_second is not None and tokens_per_second <= 0:
        raise ValueError("tokens_per_second must be positive")
    if latency_ms < 0:
        raise ValueError("latency_ms must not be negative")
    options = MockOptions(
        name=name,
        words=words,
        latency_ms=latency_ms,
        tokens_per_second=tokens_per_second,
        require_key=require_key,
        models=tuple(models) if models is not None else None,
        strict_thought_signatures=strict_thought_signatures,
    )
    wire = FORMATS[fmt](options)
    app = web.Application()
    app[MOCK_STATE] = MockState(wire, options, FaultBoard(), MockStats())
    app.router.add_post(f"{CONTROL_PREFIX}/faults", _set_faults)
    app.router.add_get(f"{CONTROL_PREFIX}/faults", _get_faults)
    app.router.add_delete(f"{CONTROL_PREFIX}/faults", _clear_faults)
    app.router.add_get(f"{CONTROL_PREFIX}/stats", _get_stats)
    app.router.add_post(f"{CONTROL_PREFIX}/reset", _reset)
    app.router.add_get(f"{CONTROL_PREFIX}/wait", _wait)
    for route in wire.routes():
        app.router.add_route(route.method, route.path, _endpoint(route.handler))
    app.router.add_route("*", CONTROL_PREFIX + "/{tail:.*}", _unknown_control)
    app.router.add_route("*", "/{tail:.*}", _endpoint(wire.not_found))
    app.on_response_prepare.append(_name_upstream)
    app.on_shutdown.append(_release_stalls)
    return app


async def start_mock_server(
    app: web.Application, host: str = "127.0.0.1", port: int = 0
) -> tuple[web.AppRunner, str]:
    """Serve ``app`` on host:port (0 = any free port); returns the runner and the base URL."""
    runner = web.AppRunner(
        app, handler_cancellation=True, shutdown_timeout=SHUTDOWN_TIMEOUT_SECONDS
    )
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port).start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_port = runner.addresses[0][1]
    shown_host = f"[{host}]" if ":" in host else host
    return runner, f"http://{shown_host}:{bound_port}"


def run_mock(fmt: FormatName, host: str = "127.0.0.1", port: int = 0, **opts: Any) -> None:
    """Serve a mock upstream until SIGINT or SIGTERM (blocking; for the CLI)."""
    app = create_mock_app(fmt, **opts)  # validate options before starting a loop
    asyncio.run(_serve_until_signalled(app, fmt, host, port))


async def _serve_until_signalled(app: web.Application, fmt: str, host: str, port: int) -> None:
    runner, url = await start_mock_server(app, host, port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    signals = (signal.SIGINT, signal.SIGTERM)
    for sig in signals:
        loop.add_signal_handler(sig, stop.set)
    name = app[MOCK_STATE].options.name
    print(
        f"cb-proxy mock: {fmt} upstream {name!r} listening on {url} "
        f"(control: {url}{CONTROL_PREFIX}/)",
        flush=True,
    )
    try:
        await stop.wait()
    finally:
        for sig in signals:
            loop.remove_signal_handler(sig)
        await runner.cleanup()


# -- API requests -------------------------------------------------------------


@dataclass
class _Served:
    cancelled: bool = False


def _endpoint(handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def serve(request: web.Request) -> web.StreamResponse:
        return await _serve(request, handler)

    return serve


async def _serve(request: web.Request, handler: Handler) -> web.StreamResponse:
    state = request.app[MOCK_STATE]
    raw = await request.read() if request.can_read_body else b""
    body: Any = None
    if raw:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError:
            body = INVALID_JSON
    req = MockRequest(
        request.method, request.path, request.match_info, request.query, request.headers, body
    )
    model, stream = state.fmt.model_of(req), state.fmt.wants_stream(req)
    shown_body = raw.decode(errors="replace") if body is INVALID_JSON else body
    state.stats.begin(
        req.path, model, stream, shown_body, request.headers, request.query.get("key")
    )
    served = _Served()
    try:
        return await _respond(request, state, req, handler, model, stream, served)
    except asyncio.CancelledError:
        served.cancelled = True  # the client went away (handler cancellation)
        raise
    finally:
        state.stats.end(cancelled=served.cancelled)


async def _respond(
    request: web.Request,
    state: MockState,
    req: MockRequest,
    handler: Handler,
    model: str | None,
    stream: bool,
    served: _Served,
) -> web.StreamResponse:
    if state.options.latency_ms > 0:
        await asyncio.sleep(state.options.latency_ms / 1000)
    first_event_delay = 0.0
    taken = state.faults.take(req.path, model, stream=stream, kinds=BEFORE_REPLY)
    if taken is not None:
        fault, release = taken
        if fault.kind is FaultKind.STALL:
            await release.wait()
        elif fault.kind is FaultKind.DROP:
            _hang_up(request, abort=True)
            return web.Response(status=500)  # never reaches the client: the transport is gone
        elif fault.kind is FaultKind.SLOW_FIRST_TOKEN:
            if stream:
                first_event_delay = fault.ms / 1000
            else:
                await asyncio.sleep(fault.ms / 1000)
        else:
            return _json_response(_fault_reply(state.fmt, fault))
    if state.fmt.is_prefill(req):
        refused = state.faults.take(req.path, model, stream=stream, kinds=ON_PREFILL)
        if refused is not None:
            return _json_response(
                state.fmt.error(400, "this model does not support assistant message prefill")
            )
    reply = state.fmt.authorize(req) or handler(req)
    if isinstance(reply, JsonReply):
        return _json_response(reply)
    in_stream = state.faults.take(req.path, model, stream=True, kinds=IN_STREAM)
    return await _write_stream(request, state, reply, in_stream, first_event_delay, served)


def _fault_reply(wire: MockFormat, fault: Fault) -> JsonReply:
    if fault.kind is FaultKind.RATE_LIMIT:
        base = wire.rate_limited(fault.retry_after)
    elif fault.kind is FaultKind.QUOTA:
        base = wire.quota_exhausted()
    else:
        base = wire.error(fault.status)
    status = fault.status if fault.kind is FaultKind.STATUS else base.status
    body = fault.body if fault.body is not None else base.body
    return JsonReply(status, body, {**base.headers, **fault.response_headers()})


def _json_response(reply: JsonReply) -> web.Response:
    if isinstance(reply.body, bytes):
        body, content_type = reply.body, "application/octet-stream"
    elif isinstance(reply.body, str):
        body, content_type = reply.body.encode(), "text/plain; charset=utf-8"
    else:
        body, content_type = orjson.dumps(reply.body), "application/json"
    response = web.Response(status=reply.status, body=body)
    response.headers["Content-Type"] = content_type
    for key, value in reply.headers.items():
        response.headers[key] = value  # may replace the content type (an HTML error page ...)
    return response


async def _write_stream(
    request: web.Request,
    state: MockState,
    reply: StreamReply,
    taken: tuple[Fault, asyncio.Event] | None,
    first_event_delay: float,
    served: _Served,
) -> web.StreamResponse:
    response = web.StreamResponse(status=200)
    for key, value in reply.headers.items():
        response.headers[key] = value
    response.headers["Content-Type"] = reply.content_type
    response.headers["Cache-Control"] = "no-cache"
    events = reply.events
    # An in-stream fault acts at most just before the terminal marker, which it never lets through.
    stop_at = min(taken[0].after_events, len(events) - reply.terminal) if taken else -1
    pace = 1 / state.options.tokens_per_second if state.options.tokens_per_second else 0.0
    try:
        await response.prepare(request)
        if first_event_delay > 0:
            await asyncio.sleep(first_event_delay)
        for index, event in enumerate(events):
            if taken is not None and index == stop_at:
                fault, release = taken
                if fault.kind is FaultKind.STALL_STREAM:
                    await release.wait()
                elif fault.kind is FaultKind.CUT_STREAM:
                    if fault.end_marker and state.fmt.bare_end():
                        await response.write(state.fmt.bare_end())
                    _hang_up(request, abort=False)
                    return response
                elif fault.kind is FaultKind.MALFORMED_EVENT:
                    await response.write(state.fmt.malformed_event())
                    await response.write_eof()
                    return response
                else:
                    await response.write(state.fmt.in_band_error())
                    await response.write_eof()
                    return response
            if pace and index:
                await asyncio.sleep(pace)
            await response.write(event)
        await response.write_eof()
    except ConnectionResetError:
        served.cancelled = True  # the client went away mid-stream
    return response


def _hang_up(request: web.Request, *, abort: bool) -> None:
    """Close the connection under the response (``abort`` drops buffered bytes, close flushes)."""
    transport = request.transport
    if transport is None:
        return
    if abort:
        transport.abort()
    else:
        transport.close()


async def _name_upstream(request: web.Request, response: web.StreamResponse) -> None:
    response.headers[UPSTREAM_HEADER] = request.app[MOCK_STATE].options.name


async def _release_stalls(app: web.Application) -> None:
    app[MOCK_STATE].faults.clear()


# -- control API ----------------------------------------------------------------


def _control_json(payload: Any, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


async def _unknown_control(request: web.Request) -> web.Response:
    return _control_json({"error": f"no control endpoint {request.method} {request.path}"}, 404)


async def _set_faults(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    try:
        faults = parse_faults(orjson.loads(await request.read()))
    except orjson.JSONDecodeError:
        return _control_json({"error": "the body must be a JSON fault spec or a list of them"}, 400)
    except FaultSpecError as exc:
        return _control_json({"error": str(exc)}, 400)
    state.faults.add(faults)
    return _control_json({"faults": state.faults.snapshot()})


async def _get_faults(request: web.Request) -> web.Response:
    return _control_json({"faults": request.app[MOCK_STATE].faults.snapshot()})


async def _clear_faults(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].faults.clear()
    return _control_json({"faults": []})


async def _get_stats(request: web.Request) -> web.Response:
    return _control_json(request.app[MOCK_STATE].stats.snapshot())


async def _reset(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    state.faults.clear()
    state.stats.reset()
    return _control_json(state.stats.snapshot())


async def _wait(request: web.Request) -> web.Response:
    stats = request.app[MOCK_STATE].stats
    try:
        targets = {k: int(request.query[k]) for k in WAIT_COUNTERS if k in request.query}
        timeout = min(float(request.query.get("timeout", DEFAULT_WAIT_SECONDS)), MAX_WAIT_SECONDS)
    except ValueError:
        return _control_json(
            {"error": "requests, cancelled, in_flight must be integers; timeout a number"}, 400
        )
    if not targets:
        return _control_json({"error": f"name at least one of {', '.join(WAIT_COUNTERS)}"}, 400)

    def reached(s: MockStats) -> bool:
        return all(getattr(s, k) >= n for k, n in targets.items())

    ok = await stats.wait_until(reached, timeout)
    counters = {k: getattr(stats, k) for k in WAIT_COUNTERS}
    return _control_json({"ok": ok, **counters}, 200 if ok else 504)
