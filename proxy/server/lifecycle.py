"""Process lifecycle for `cb-proxy serve`: two listeners, readiness, graceful drain.

Shutdown on SIGTERM (Kubernetes stopping the pod) spends one budget, the grace period
(--grace-period, CB_GRACE_PERIOD), from the signal on:

1. /readyz answers 503 at once, and the API keeps accepting for the shutdown delay
   (--shutdown-delay, CB_SHUTDOWN_DELAY; at most the grace period), so whatever routes
   by readiness stops sending before anything is refused.
2. The API listener closes; idle keep-alive connections close now, busy ones after
   their response (``Connection: close``).
3. Requests and streams in flight finish, until the grace period is over.
4. Then every stream still open gets one in-band error event (``proxy_shutting_down``)
   and the end of its body, every request still waiting a 503 (server/drain.py), and
   they get ``END_WINDOW`` to write it.
5. aiohttp's own shutdown closes what is left: its ``shutdown_timeout`` is only this
   last resort (``FORCE_WINDOW``, waited at most twice per connection), never a second
   drain after ours. The cleanup contexts run and the process exits 0.

So the process exits within grace + END_WINDOW + 4 x FORCE_WINDOW, under grace + 1 s
(deploy/k8s: terminationGracePeriodSeconds = grace + margin). SIGINT (Ctrl-C), or a
second signal, skips what is left of the delay: nobody routes traffic to a terminal.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from proxy.config.model import RuleSet
from proxy.config.settings import Settings
from proxy.server.app import create_admin_app, create_app
from proxy.server.connections import ClientLimits, ProxyRunner
from proxy.server.drain import DRAIN
from proxy.server.metrics import Metrics
from proxy.server.state import ProxyState

LOG = logging.getLogger("cb_proxy")
BACKLOG = 1024
# After the grace period: for the handlers to write their 503 or in-band error and end.
END_WINDOW = 0.3
# aiohttp's shutdown_timeout: it waits up to this for a handler, then again after cancelling it.
FORCE_WINDOW = 0.1


def _bound(runner: web.AppRunner) -> str:
    host, port = runner.addresses[0][:2]
    return f"http://{host}:{port}"


async def serve(
    settings: Settings,
    rules: RuleSet,
    *,
    on_ready: Callable[[ProxyState, str, str], None] | None = None,
    stop: asyncio.Event | None = None,
    handle_signals: bool = True,
) -> int:
    state = ProxyState(settings=settings, rules=rules, metrics=Metrics())
    state.metrics.rules_info.set(time.time())
    limits = ClientLimits(
        header_timeout=settings.client_header_timeout,
        body_timeout=settings.client_body_timeout,
        keepalive_timeout=settings.client_keepalive_timeout,
    )
    api_runner = ProxyRunner(
        create_app(state),
        limits=limits,
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=FORCE_WINDOW,  # the drain is ours (_drain); this is the last resort
        access_log=None,
        # aiohttp would inflate a gzip body whole before the body limit sees it (1 MB on the
        # wire, 1 GB in memory): bodies stay as sent, and api.read_json refuses an encoding.
        auto_decompress=False,
    )
    admin_runner = ProxyRunner(
        create_admin_app(state),
        limits=limits,
        handler_cancellation=True,
        shutdown_timeout=FORCE_WINDOW,
        access_log=None,
        auto_decompress=False,
    )
    await api_runner.setup()
    await admin_runner.setup()
    try:
        await web.TCPSite(
            admin_runner,
            settings.metrics_listen.host,
            settings.metrics_listen.port,
            backlog=BACKLOG,
        ).start()
        await web.TCPSite(
            api_runner, settings.listen.host, settings.listen.port, backlog=BACKLOG
        ).start()
    except OSError as exc:
        LOG.error("cannot listen: %s", exc)
        await api_runner.cleanup()
        await admin_runner.cleanup()
        return 2
    state.api_listening = True
    api_url, metrics_url = _bound(api_runner), _bound(admin_runner)
    LOG.info("cb-proxy listening: api %s, metrics %s, rules %s", api_url, metrics_url, rules.source)
    if settings.shutdown_delay > settings.grace_period:
        # The delay is part of the grace period (docs/architecture.md), so it is cut to fit.
        LOG.warning(
            "shutdown delay %.1f s is longer than the grace period %.1f s: it is cut to %.1f s",
            settings.shutdown_delay,
            settings.grace_period,
            settings.grace_period,
        )
    settle_gc()
    print(f"cb-proxy ready api={api_url} metrics={metrics_url}", flush=True)
    if on_ready is not None:
        on_ready(state, api_url, metrics_url)

    stop = stop or asyncio.Event()
    hurry = asyncio.Event()  # no (more) shutdown delay

    def on_signal(sig: signal.Signals) -> None:
        if sig is signal.SIGINT or stop.is_set():
            hurry.set()
        stop.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT) if handle_signals else ():
        # Not possible outside the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, on_signal, sig)
    await stop.wait()
    await _drain(state, api_runner, hurry)
    await admin_runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT) if handle_signals else ():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
    return 0


async def _drain(state: ProxyState, runner: ProxyRunner, hurry: asyncio.Event) -> None:
    """Steps 1 to 5 of the module docstring, for the API listener."""
    settings = state.settings
    loop = asyncio.get_running_loop()
    started = loop.time()
    deadline = started + settings.grace_period
    drain = runner.app[DRAIN]
    state.draining = True  # /readyz: 503 from now on
    delay = 0.0 if hurry.is_set() else min(settings.shutdown_delay, settings.grace_period)
    LOG.info(
        "draining: %d request(s) in flight, up to %.0f s; accepting for %.1f s more",
        len(drain),
        settings.grace_period,
        delay,
    )
    if delay > 0:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(hurry.wait(), delay)  # the propagation delay, or a 2nd signal
    for site in runner.sites:
        await site.stop()
    runner.stop_accepting()
    state.api_listening = False
    elapsed = loop.time() - started
    LOG.info("API listener closed after %.2f s; %d request(s) in flight", elapsed, len(drain))
    if not await drain.wait_idle(deadline):
        cut = drain.expire()
        LOG.warning(
            "grace period over: %d request(s) still running get a 503 or an in-band error", cut
        )
        await drain.wait_idle(loop.time() + END_WINDOW)
    await runner.cleanup()
    LOG.info("drained in %.2f s", loop.time() - started)


# Collections of the youngest generation every 20,000 net allocations instead of 700: a
# request allocates a few hundred short-lived objects, nearly all freed by refcount, so the
# default threshold runs a collection every few requests for nothing (measured: 3-6% of the
# proxy's CPU per request, no change in RSS). Older generations keep their default ratios.
GC_THRESHOLDS = (20_000, 50, 100)


def settle_gc() -> None:
    """Once started: the startup objects (rules, app, modules) leave the collector's scans."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


def run(main: Callable[[], object]) -> object:
    """Run a coroutine function on uvloop where available."""
    try:
        import uvloop

        return uvloop.run(main())  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(main())  # type: ignore[arg-type]


__all__ = ["run", "serve", "sys"]
