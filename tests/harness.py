"""Run the real proxy in the test's event loop, on 127.0.0.1 port 0.

The proxy is started through ``proxy.server.lifecycle.serve``, the same code path as
`cb-proxy serve`, so the tests exercise the real listeners, middleware,
client session and drain logic.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import aiohttp

from proxy.config.check import load_rules
from proxy.config.settings import HostPort, Settings
from proxy.core.breaker import CircuitBreaker
from proxy.server.lifecycle import serve
from proxy.server.state import ProxyState

LOOPBACK_ANY_PORT = HostPort("127.0.0.1", 0)

# The models and defaults of a two-provider rules file (providers ``primary`` and ``backup``),
# as a ``str.format`` template tail: ``pair`` fails over from primary to backup, ``solo`` has
# only the primary. No same-deployment retry, so each test can count what an upstream gets.
PRIMARY_BACKUP_MODELS = """models:
  pair:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
  solo:
    provider: primary
defaults:
  strategy: cost_optimized  # equal prices: the declared order, primary first
  retry: {{max_attempts: 4, same_deployment_retries: 0, max_retry_wait: 1,
           backoff_ms: 1, max_backoff_ms: 2}}
"""


@dataclass
class ProxyHandle:
    api_url: str
    metrics_url: str
    state: ProxyState
    stop: asyncio.Event
    rules_path: Path

    @property
    def base_url(self) -> str:
        return self.api_url + "/v1"

    def model_breaker(self, provider: str, model: str | None = None) -> CircuitBreaker:
        """The deployment breaker of ``model`` on ``provider`` (docs/breaker.md, 'Keys').

        Without ``model``: the provider's only model in the rules (a test's usual setup),
        or the first model that has a deployment there.
        """
        for name, declared in self.state.rules.models.items():
            if model is not None and name != model:
                continue
            for dep in declared.deployments:
                if dep.provider == provider:
                    return self.state.deployment_breaker(dep)
        raise LookupError(f"no deployment of {model or 'any model'} on {provider}")

    async def metrics_text(self) -> str:
        async with (
            aiohttp.ClientSession() as session,
            session.get(self.metrics_url + "/metrics") as resp,
        ):
            return await resp.text()


@asynccontextmanager
async def running_proxy(
    rules_path: Path,
    *,
    environ: Mapping[str, str] | None = None,
    **overrides: Any,
) -> AsyncIterator[ProxyHandle]:
    settings = replace(
        Settings(
            rules_path=rules_path,
            listen=LOOPBACK_ANY_PORT,
            metrics_listen=LOOPBACK_ANY_PORT,
            environ=dict(environ or {}),
            health_check_interval=0,
            grace_period=5,
            shutdown_delay=0,  # tests stop the proxy often; test_lifecycle covers the delay
        ),
        **overrides,
    )
    rules = load_rules(rules_path)
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[tuple[ProxyState, str, str]] = loop.create_future()
    stop = asyncio.Event()

    def on_ready(state: ProxyState, api: str, metrics: str) -> None:
        ready.set_result((state, api, metrics))

    task = asyncio.create_task(
        serve(settings, rules, on_ready=on_ready, stop=stop, handle_signals=False)
    )

    def on_exit(finished: asyncio.Task[int]) -> None:
        if not ready.done():
            ready.set_exception(RuntimeError(f"proxy exited before it was ready: {finished!r}"))

    task.add_done_callback(on_exit)
    state, api, metrics = await ready
    try:
        yield ProxyHandle(api, metrics, state, stop, rules_path)
    finally:
        stop.set()
        await task


def write_rules(tmp: Path, text: str, name: str = "rules.yaml") -> Path:
    path = tmp / name
    path.write_text(text)
    return path
