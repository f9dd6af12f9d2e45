"""Process lifecycle for `cb-proxy serve`: two listeners, readiness, graceful drain.

On SIGTERM (Kubernetes stopping the pod) or SIGINT: /readyz turns 503, the API
listener stops accepting, requests and streams in flight get up to the grace
period to finish, then the process exits 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Callable

from aiohttp import web

from proxy.config.model import RuleSet
from proxy.config.settings import Settings
from proxy.server.app import create_admin_app, create_app
from proxy.server.metrics import Metrics
from proxy.server.state import ProxyState

LOG = logging.getLogger("cb_proxy")
BACKLOG = 1024


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
    api_runner = web.AppRunner(
        create_app(state),
        handler_cancellation=True,  # a client that goes away cancels its upstream call
        shutdown_timeout=settings.grace_period,
        access_log=None,
    )
    admin_runner = web.AppRunner(
        create_admin_app(state), handler_cancellation=True, shutdown_timeout=2.0, access_log=None
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
    print(f"cb-proxy ready api={api_url} metrics={metrics_url}", flush=True)
    if on_ready is not None:
        on_ready(state, api_url, metrics_url)

    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT) if handle_signals else ():
        # Not possible outside the main thread.
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    state.draining = True
    LOG.info(
        "draining: %d request(s) in flight, up to %.0f s", state.in_flight, settings.grace_period
    )
    started = time.monotonic()
    await api_runner.cleanup()
    LOG.info("drained in %.2f s", time.monotonic() - started)
    await admin_runner.cleanup()
    for sig in (signal.SIGTERM, signal.SIGINT) if handle_signals else ():
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.remove_signal_handler(sig)
    return 0


def run(main: Callable[[], object]) -> object:
    """Run a coroutine function on uvloop where available."""
    try:
        import uvloop

        return uvloop.run(main())  # type: ignore[arg-type]
    except ImportError:  # pragma: no cover - platforms without uvloop
        return asyncio.run(main())  # type: ignore[arg-type]


__all__ = ["run", "serve", "sys"]
