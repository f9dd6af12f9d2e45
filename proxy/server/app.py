"""The aiohttp applications: the API (loopback, port 3000) and the metrics/admin listener.

``create_app`` builds the API app around a ``ProxyState``; ``create_admin_app``
builds the metrics listener's app on the same state. The API app owns the
shared resources in its ``cleanup_ctx``: the one upstream client
(``proxy.upstream.client.UpstreamPool``) and the rules file watcher.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import re
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from typing import TypeVar

from aiohttp import web

from proxy.config.model import RulesError, RuleSet, file_fingerprint
from proxy.core.errors import (
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
    ProxyError,
    UpstreamHTTPError,
)
from proxy.server import admin, admission, api, health, messages
from proxy.server.api import STATE, request_id
from proxy.server.connections import expect_handler
from proxy.server.drain import DRAIN, Drain, shutting_down
from proxy.server.state import REQUEST_INFO, ProxyState, RequestInfo
from proxy.upstream.client import UpstreamPool

LOG = logging.getLogger("cb_proxy")
ENDPOINT_NAMES = {
    "/v1/chat/completions": "chat",
    "/chat/completions": "chat",
    "/v1/completions": "completions",
    "/completions": "completions",
    "/v1/embeddings": "embeddings",
    "/embeddings": "embeddings",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
KnownPaths = tuple[frozenset[str], tuple["re.Pattern[str]", ...]]
KNOWN_PATHS: web.AppKey[KnownPaths] = web.AppKey("known_paths")
ADMIN_MAX_BODY_BYTES = 1024 * 1024  # the admin API takes no bodies; a bound all the same
_Arg = TypeVar("_Arg")
_Result = TypeVar("_Result")


def render_error(err: ProxyError, rid: str) -> web.Response:
    headers = {"x-request-id": rid, **err.headers}
    if isinstance(err, UpstreamHTTPError):
        headers.setdefault("x-should-retry", "false" if err.http_status < 500 else "true")
    return web.Response(
        status=err.http_status, body=err.to_json(), content_type="application/json", headers=headers
    )


def _render(request: web.Request, err: ProxyError, rid: str) -> web.Response:
    """The error in the shape of the API the client speaks: Anthropic's under /v1/messages."""
    if request.path.startswith(messages.PATH_PREFIX):
        return messages.error_response(err, rid)
    return render_error(err, rid)


def _from_http_exception(exc: web.HTTPException, request: web.Request) -> ProxyError:
    if isinstance(exc, web.HTTPNotFound):
        return NotFound(f"unknown endpoint {request.method} {request.path}")
    if isinstance(exc, web.HTTPMethodNotAllowed):
        return MethodNotAllowed(f"method {request.method} is not allowed on {request.path}")
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body exceeds the limit")
    err = ProxyError(exc.reason or "error")
    err.status = exc.status  # type: ignore[misc]
    return err


def _overloaded(state: ProxyState, request: web.Request, endpoint: str) -> web.Response:
    """The fast 503 of admission control: nothing read, planned or sent upstream."""
    rid = request_id(request)
    state.metrics.rejections.labels(admission.NO_UPSTREAM, admission.OVERLOADED).inc()
    state.record_request(endpoint, RequestInfo(rid), 503, 0.0)
    return _render(request, admission.overloaded(state.max_in_flight), rid)


async def guarded(
    request: web.Request, handler: Handler, endpoint: str | None
) -> web.StreamResponse:
    """Every error as OpenAI JSON with x-request-id; request accounting; one place."""
    state = request.app[STATE]
    # Admission control: only proxied requests count and can be turned away; /healthz,
    # /readyz, /metrics and the admin API are never starved (proxy.server.admission).
    if endpoint is not None and 0 < state.max_in_flight <= state.in_flight:
        return _overloaded(state, request, endpoint)
    drain = request.app[DRAIN]
    task = drain.enter()
    rid = request_id(request)
    info = RequestInfo(rid)
    request[REQUEST_INFO] = info
    started = time.perf_counter()
    if endpoint is not None:
        state.in_flight += 1
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except ProxyError as err:
        status = err.http_status
        if status >= 500:
            LOG.warning("request %s failed: %s", rid, err.message)
        return _render(request, err, rid)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        converted = _from_http_exception(exc, request)
        status = converted.http_status
        return _render(request, converted, rid)
    except Exception:
        LOG.exception("request %s: unexpected error", rid)
        status = 500
        return _render(request, ProxyError("internal error in the proxy"), rid)
    except asyncio.CancelledError:
        if not drain.claim():
            raise  # the client went away: nobody to answer
        status = 503  # the grace period ended (server/drain.py): answered, not cut
        return _render(request, shutting_down(), rid)
    finally:
        drain.leave(task)
        if endpoint is not None:
            state.in_flight -= 1
            state.record_request(endpoint, info, status, time.perf_counter() - started)


def openai_errors(handler: Handler, endpoint: str | None = None) -> Handler:
    """Wrap one handler with ``guarded``.

    The API app wraps its handlers instead of using a middleware: aiohttp runs
    no middleware machinery at all for an app without middlewares, which is
    two coroutine layers less on every proxied request.
    """

    # A partial, not a closure awaiting guarded: one coroutine frame less per request
    # (aiohttp accepts a partial of a coroutine function as a handler).
    return functools.partial(guarded, handler=handler, endpoint=endpoint)


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The admin listener's error rendering (a cold path: a middleware is fine there)."""
    return await guarded(request, handler, ENDPOINT_NAMES.get(request.path))


def _known(app: web.Application, path: str) -> bool:
    """Is ``path`` served by some route of ``app`` (with another method)?"""
    static, patterns = app[KNOWN_PATHS]
    return path in static or any(p.fullmatch(path) for p in patterns)


async def _unmatched(request: web.Request) -> web.StreamResponse:
    """The API app's catch-all: unknown paths are 404s, known paths with a wrong method 405s."""
    if _known(request.app, request.path):
        raise MethodNotAllowed(f"method {request.method} is not allowed on {request.path}")
    raise NotFound(f"unknown endpoint {request.method} {request.path}")


async def _upstream_client(app: web.Application) -> AsyncIterator[None]:
    """The one upstream client (docs/upstream.md): every upstream call, health checks included."""
    state = app[STATE]
    state.upstream = UpstreamPool.from_settings(state.settings)
    yield
    await state.upstream.close()
    state.upstream = None
    state.watchdog.close()


def _reject(state: ProxyState, message: str, *args: object) -> bool:
    state.metrics.rules_reloads.labels("error").inc()
    LOG.error(message, *args)
    return False


def runtime_problems(state: ProxyState, rules: RuleSet) -> list[str]:
    """What would stop ``rules`` from running: each provider's breaker config is built first.

    Nothing check accepts fails here (the breaker's ranges are the rules' declaration and
    ``with_overrides`` settles the one cross-field rule), so this is a guard, not a check:
    a reload must never apply half of a file.
    """
    problems = []
    for name, provider in rules.providers.items():
        try:
            state.breaker_defaults.with_overrides(provider.breaker)
        except ValueError as exc:
            problems.append(f"providers.{name}.breaker: {exc}")
    return problems


def _checked_rules(state: ProxyState) -> RuleSet:
    """Read, check and vet the rules file (blocking: seconds for a large file).

    Touches nothing of the live state but the immutable breaker defaults, so it may run
    in a worker thread while the loop serves requests.
    """
    path = state.settings.rules_path
    rules = state.rules_loader(path, state.settings.rules_max_bytes)
    problems = runtime_problems(state, rules)
    if problems:
        raise RulesError(problems, str(path))
    return rules


def _reload_failed(state: ProxyState, exc: BaseException) -> bool:
    path = state.settings.rules_path
    if isinstance(exc, RulesError):
        return _reject(state, "rules file %s rejected, keeping the rules in force:\n%s", path, exc)
    if isinstance(exc, OSError):
        return _reject(state, "rules file %s unreadable, keeping the rules in force: %s", path, exc)
    LOG.error("rules reload from %s failed, keeping the rules in force", path, exc_info=exc)
    state.metrics.rules_reloads.labels("error").inc()
    return False


def _apply_rules(state: ProxyState, rules: RuleSet) -> bool:
    """Swap checked rules in (on the loop: the swap is quick and must not race requests)."""
    try:
        state.swap_rules(rules)
    except Exception as exc:
        return _reload_failed(state, exc)
    state.metrics.rules_reloads.labels("ok").inc()
    state.metrics.rules_info.set(time.time())
    LOG.info("rules reloaded from %s", state.settings.rules_path)
    return True


def reload_rules(state: ProxyState) -> bool:
    """Load the rules file again, blocking the caller; keep the rules in force on any problem.

    Returns whether the new rules are in force. A rejection is logged with every
    problem and counted as ``cb_proxy_rules_reloads_total{result="error"}``;
    nothing here raises (an unexpected error is logged with its traceback and
    counted the same way), so the watcher survives any file. The watcher uses
    ``reload_rules_off_loop``, which does the same with the loading in a thread.
    """
    try:
        rules = _checked_rules(state)
    except Exception as exc:
        return _reload_failed(state, exc)
    return _apply_rules(state, rules)


async def reload_rules_off_loop(state: ProxyState) -> bool:
    """``reload_rules`` with the reading, decoding and checking in a worker thread.

    A 10 MB file takes seconds to decode and check; on the loop that would stall every
    request and health probe for as long. Only the swap runs on the loop.
    """
    try:
        rules = await in_daemon_thread(_checked_rules, state, name="rules-loader")
    except Exception as exc:
        return _reload_failed(state, exc)
    return _apply_rules(state, rules)


async def in_daemon_thread(fn: Callable[[_Arg], _Result], arg: _Arg, *, name: str) -> _Result:
    """``fn(arg)`` on a new daemon thread, awaited without blocking the loop.

    Not ``asyncio.to_thread``: its executor's threads are joined when the loop closes
    and again at interpreter exit, so a stop during a long load would wait for the load,
    eating into the shutdown grace period. A daemon thread is abandoned instead. One
    load at a time (the watcher awaits each), so a thread per reload costs nothing.
    """
    result: concurrent.futures.Future[_Result] = concurrent.futures.Future()

    def run() -> None:
        if not result.set_running_or_notify_cancel():
            return
        try:
            result.set_result(fn(arg))
        except BaseException as exc:  # handed to the awaiting task, raised there
            result.set_exception(exc)

    threading.Thread(target=run, name=name, daemon=True).start()
    # wrap_future hands the outcome to this loop, and drops it if the loop closed meanwhile.
    return await asyncio.wrap_future(result)


async def watch_rules(state: ProxyState, interval: float) -> None:
    """Poll the rules file; a Kubernetes ConfigMap update is a symlink swap, which stat sees.

    Polling (not inotify) because a ConfigMap volume swaps a ``..data`` symlink,
    which watches on the file itself miss, and a stat per second costs nothing.
    The loop ends only when cancelled: every attempt, whatever it raised, is
    logged, counted and recorded in ``state.reload_results``.
    """
    path = state.settings.rules_path
    seen = file_fingerprint(path)
    while True:
        await asyncio.sleep(interval)
        try:
            current = file_fingerprint(path)
            if current is None or current == seen:
                continue
            seen = current
            ok = await reload_rules_off_loop(state)
        except Exception:
            LOG.exception("rules reload from %s failed, keeping the rules in force", path)
            with suppress(Exception):
                state.metrics.rules_reloads.labels("error").inc()
            ok = False
        async with state.reloads:
            state.reload_results.append(ok)
            state.reloads.notify_all()


async def _rules_watcher(app: web.Application) -> AsyncIterator[None]:
    state = app[STATE]
    task = asyncio.create_task(
        watch_rules(state, state.settings.reload_interval), name="rules-watcher"
    )
    yield
    task.cancel()
    with suppress(asyncio.CancelledError):
        await task


def create_app(state: ProxyState) -> web.Application:
    """The OpenAI-compatible API app; owns the upstream client and the rules watcher."""
    admission.configure(state)
    app = web.Application(client_max_size=state.settings.max_body_bytes)
    app[STATE] = state
    app[DRAIN] = Drain()
    expect = expect_handler(state.settings.max_body_bytes)
    api.add_routes(app, wrap=openai_errors, expect=expect)
    messages.add_routes(app, wrap=openai_errors, expect=expect)  # Anthropic SDK apps
    admin.add_routes(app, api_port=True, wrap=openai_errors, expect=expect)
    resources = list(app.router.resources())
    app[KNOWN_PATHS] = (
        frozenset(r.canonical for r in resources if "{" not in r.canonical),
        tuple(r.get_info()["pattern"] for r in resources if isinstance(r, web.DynamicResource)),
    )
    app.router.add_route("*", "/{tail:.*}", openai_errors(_unmatched), expect_handler=expect)
    app.cleanup_ctx.append(_upstream_client)
    app.cleanup_ctx.append(_rules_watcher)
    app.cleanup_ctx.append(health.health_checks)  # after the upstream client: it uses it
    return app


def create_admin_app(state: ProxyState) -> web.Application:
    """The metrics listener: /metrics, /healthz, /readyz and the admin API."""
    app = web.Application(middlewares=[error_middleware], client_max_size=ADMIN_MAX_BODY_BYTES)
    app[STATE] = state
    app[DRAIN] = Drain()
    admin.add_routes(app, api_port=False, expect=expect_handler(ADMIN_MAX_BODY_BYTES))
    return app
