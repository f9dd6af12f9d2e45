"""Two breaker levels (docs/breaker.md, 'Keys'), against the running proxy and mock upstreams.

A provider breaker per upstream judges the transport (connect refused, resets, the proxy's
key); a deployment breaker per ``model@provider`` judges the model (5xx, stalls, bodies).
"""

from __future__ import annotations

import socket
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.breaker import State
from tests.conftest import Stack
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape

CHAT = [{"role": "user", "content": "hello"}]
THRESHOLD = 3
PROBES = 2
OPEN_SECONDS = 30.0  # never waited for: the deployment breakers' clock is stepped past it
API = "/api/circuit-breaker"

ONE_PROVIDER_RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 20}}
    breaker: {{failure_threshold: {threshold}, min_throughput: 1000,
               open_seconds: {open_seconds}, half_open_probes: {probes}}}
models:
  big:
    provider: primary
  small:
    provider: primary
defaults:
  strategy: cost_optimized
  fallback_models: [small]
  retry: {{max_attempts: 4, same_deployment_retries: 1, backoff_ms: 1, max_backoff_ms: 2}}
"""

PAIR_RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 1, first_token: 5, idle: 5, total: 20}}
    breaker: {{failure_threshold: {threshold}, min_throughput: 1000, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 1, first_token: 5, idle: 5, total: 20}}
models:
  pair:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
defaults:
  strategy: cost_optimized  # equal prices: the declared order, primary first
  retry: {{max_attempts: 4, same_deployment_retries: 1, backoff_ms: 1, max_backoff_ms: 2,
           quick_failure_ms: {quick_failure_ms}}}
"""


class SteppedClock:
    """The breakers' clock: real monotonic time plus whatever the test stepped forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


async def chat(proxy: ProxyHandle, model: str) -> tuple[int, Mapping[str, str], Any]:
    body = {"model": model, "messages": CHAT}
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        return resp.status, dict(resp.headers), orjson.loads(await resp.read())


async def call(url: str, method: str, path: str) -> tuple[int, Any]:
    async with aiohttp.ClientSession() as session, session.request(method, url + path) as resp:
        return resp.status, orjson.loads(await resp.read())


def closed_port() -> int:
    """A loopback port nobody listens on: a connect there is refused."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


@asynccontextmanager
async def pair_rig(
    tmp_path: Path, *, primary_url: str | None = None, quick_failure_ms: float = 2000, **mock: Any
) -> AsyncIterator[tuple[ProxyHandle, RunningMock, RunningMock]]:
    async with (
        running_mock("openai", name="primary", **mock) as primary,
        running_mock("openai", name="backup") as backup,
    ):
        text = PAIR_RULES.format(
            primary=primary_url or primary.url,
            backup=backup.url,
            threshold=THRESHOLD,
            quick_failure_ms=quick_failure_ms,
        )
        async with running_proxy(write_rules(tmp_path, text)) as proxy:
            yield proxy, primary, backup


# -- (1) one model's outage on a provider that serves the fallback model -------------------------


async def test_one_models_outage_is_served_by_the_fallback_on_the_same_provider(
    tmp_path: Path,
) -> None:
    async with running_mock("openai", name="primary") as primary:
        text = ONE_PROVIDER_RULES.format(
            primary=primary.url, threshold=THRESHOLD, open_seconds=OPEN_SECONDS, probes=PROBES
        )
        async with running_proxy(write_rules(tmp_path, text)) as proxy:
            clock = SteppedClock()
            proxy.state.deployment_breakers.use_clock(clock)
            big = proxy.model_breaker("primary", "big")
            small = proxy.model_breaker("primary", "small")
            await primary.set_fault(kind="status", status=503, model="big")

            def big_calls() -> int:
                by_model: dict[str, int] = primary.stats()["by_model"]
                return by_model.get("big", 0)

            async def served_by_small(requests: int) -> None:
                for _ in range(requests):
                    status, headers, body = await chat(proxy, "big")
                    assert status == 200, body
                    assert (headers["x-cb-provider"], headers["x-cb-model"]) == ("primary", "small")
                    assert headers["x-cb-fallback"] == "true"
                    assert headers["x-cb-breaker-state"] == "closed"
                    assert headers["x-cb-deployment-breaker-state"] == "closed"  # small's
                    assert body["choices"][0]["message"]["content"]

            # Open period 1: at most THRESHOLD calls to the dead model (a retry counts too).
            for _ in range(THRESHOLD):
                if big.state is State.OPEN:
                    break
                await served_by_small(1)
            assert big.state is State.OPEN
            assert big_calls() == THRESHOLD
            await served_by_small(5)  # while open: the dead model gets nothing
            assert big_calls() == THRESHOLD

            # Past the open period: half-open lets at most PROBES calls through, they fail,
            # and it opens again.
            clock.step(2 * OPEN_SECONDS)  # past any jitter
            assert big.get_metrics()["state"] == "half_open"
            for _ in range(PROBES + 1):
                if big.state is State.OPEN:
                    break
                await served_by_small(1)
            assert big.state is State.OPEN
            probes = big_calls() - THRESHOLD
            assert 1 <= probes <= PROBES
            await served_by_small(5)
            assert big_calls() == THRESHOLD + probes

            provider = proxy.state.breaker("primary").get_metrics()
            assert provider["state"] == "closed"
            assert provider["reports"]["failure"] == 0  # every 503 was an HTTP reply
            assert small.state is State.CLOSED
            assert small.get_metrics()["reports"]["failure"] == 0
            scrape = Scrape(await proxy.metrics_text())
    state = "circuit_breaker_deployment_state"
    assert scrape.total(state, upstream="primary", model="big") == 2
    assert scrape.total(state, upstream="primary", model="small") == 0
    assert scrape.total("circuit_breaker_state", upstream="primary") == 0
    transitions = scrape.counts(
        "circuit_breaker_deployment_transitions_total", "model", "from_state", "to_state"
    )
    assert {k: n for k, n in transitions.items() if n} == {
        ("big", "closed", "open"): 1,
        ("big", "open", "half_open"): 1,
        ("big", "half_open", "open"): 1,
    }
    assert scrape.total("circuit_breaker_transitions_total") == 0


# -- (2) a transport failure is the provider's -------------------------------------------------


async def test_connect_refused_opens_the_provider_breaker_and_no_deployment_breaker(
    tmp_path: Path,
) -> None:
    refused = f"http://127.0.0.1:{closed_port()}"
    async with pair_rig(tmp_path, primary_url=refused) as (proxy, _, backup):
        provider = proxy.state.breaker("primary")
        for _ in range(THRESHOLD):
            if provider.state is State.OPEN:
                break
            status, headers, _ = await chat(proxy, "pair")
            assert (status, headers["x-cb-provider"]) == (200, "backup")
        assert provider.state is State.OPEN
        served_before = backup.stats()["requests"]
        status, headers, _ = await chat(proxy, "pair")
        assert (status, headers["x-cb-provider"], headers["x-cb-attempts"]) == (200, "backup", "1")
        assert backup.stats()["requests"] == served_before + 1
        for name in ("primary", "backup"):
            deployment = proxy.model_breaker(name, "pair")
            assert deployment.state is State.CLOSED
            assert deployment.get_metrics()["reports"]["failure"] == 0
        scrape = Scrape(await proxy.metrics_text())
    assert scrape.total("circuit_breaker_state", upstream="primary") == 2
    assert scrape.total("circuit_breaker_deployment_state", upstream="primary", model="pair") == 0
    assert scrape.total("circuit_breaker_deployment_transitions_total") == 0


# -- (3) the admin API addresses either level -----------------------------------------------------


async def test_admin_deployment_key_mutates_one_breaker_and_an_upstream_cascades(
    stack: Stack,
) -> None:
    state = stack.proxy.state
    url = stack.proxy.api_url
    mini = stack.proxy.model_breaker("primary", "gpt-4o-mini")
    solo = stack.proxy.model_breaker("primary", "solo")
    mini_backup = stack.proxy.model_breaker("backup", "gpt-4o-mini")

    status, body = await call(url, "POST", f"{API}/force-open/gpt-4o-mini@primary")
    assert status == 200
    assert body["breaker"]["state"] == "forced_open"
    assert mini.state is State.FORCED_OPEN
    assert solo.state is State.CLOSED
    assert mini_backup.state is State.CLOSED
    assert state.breaker("primary").state is State.CLOSED
    _, health = await call(url, "GET", f"{API}/health")
    assert health["status"] == "degraded"
    assert health["open_deployments"] == ["gpt-4o-mini@primary"]
    assert health["open"] == []
    status, headers, _ = await chat(stack.proxy, "gpt-4o-mini")
    assert (status, headers["x-cb-provider"]) == (200, "backup")  # the other deployment serves
    status, headers, _ = await chat(stack.proxy, "solo")  # the provider's other model
    assert (status, headers["x-cb-provider"]) == (200, "primary")

    status, body = await call(url, "POST", f"{API}/reset/gpt-4o-mini@primary")
    assert (status, body["breaker"]["state"]) == (200, "closed")
    assert mini.get_metrics()["state"] == "closed"

    status, body = await call(url, "POST", f"{API}/force-open/primary")
    assert status == 200
    assert body["breaker"]["state"] == "forced_open"
    on_primary = {"gpt-4o-mini@primary", "solo@primary", "text-embedding-3-small@primary"}
    assert set(body["deployments"]) == on_primary
    assert {b["state"] for b in body["deployments"].values()} == {"forced_open"}
    assert state.breaker("primary").state is State.FORCED_OPEN
    assert (mini.state, solo.state) == (State.FORCED_OPEN, State.FORCED_OPEN)
    assert mini_backup.state is State.CLOSED  # another upstream's deployment is untouched
    assert state.breaker("backup").state is State.CLOSED

    status, body = await call(url, "POST", f"{API}/reset/primary")
    assert (status, body["breaker"]["state"]) == (200, "closed")
    assert {b["state"] for b in body["deployments"].values()} == {"closed"}
    assert (mini.state, solo.state) == (State.CLOSED, State.CLOSED)


# -- (4) the deployment series exist from the start ---------------------------------------------


async def test_metrics_export_every_deployment_at_zero_from_the_start(stack: Stack) -> None:
    scrape = Scrape(await stack.proxy.metrics_text())
    deployments = {
        (d.provider, name)
        for name, model in stack.proxy.state.rules.models.items()
        for d in model.deployments
    }
    assert ("primary", "gpt-4o-mini") in deployments  # the rules' deployments, not none

    def series(name: str) -> dict[tuple[str, str], float]:
        return {
            (labels["upstream"], labels["model"]): value
            for sample, labels, value in scrape.samples
            if sample == name
        }

    assert series("circuit_breaker_deployment_state") == dict.fromkeys(deployments, 0)
    assert set(series("circuit_breaker_deployment_error_rate")) == deployments
    assert set(series("circuit_breaker_deployment_latency_p95")) == deployments
    opened = {
        (labels["upstream"], labels["model"]): value
        for sample, labels, value in scrape.samples
        if sample == "circuit_breaker_deployment_transitions_total"
        and (labels["from_state"], labels["to_state"]) == ("closed", "open")
    }
    assert opened == dict.fromkeys(deployments, 0)


# -- (5) a slow failure is never retried on the same deployment ----------------------------------


@pytest.mark.parametrize(
    ("quick_failure_ms", "retried"), [(2000, True), (100, False)], ids=["quick", "slow"]
)
async def test_a_failure_slower_than_quick_failure_ms_is_not_retried_on_the_same_deployment(
    tmp_path: Path, quick_failure_ms: float, retried: bool
) -> None:
    # Every primary reply takes 300 ms: under the default bound (2000), over a bound of 100.
    async with pair_rig(tmp_path, quick_failure_ms=quick_failure_ms, latency_ms=300) as (
        proxy,
        primary,
        backup,
    ):
        await primary.set_fault(kind="status", status=503, count=1)
        status, headers, _ = await chat(proxy, "pair")
        scrape = Scrape(await proxy.metrics_text())
        assert status == 200
        assert headers["x-cb-attempts"] == "2"
        if retried:  # the transient 503 came quickly: one more try on the same deployment
            assert headers["x-cb-provider"] == "primary"
            assert (primary.stats()["requests"], backup.stats()["requests"]) == (2, 0)
        else:  # it came late: the request moved on to the next deployment at once
            assert headers["x-cb-provider"] == "backup"
            assert (primary.stats()["requests"], backup.stats()["requests"]) == (1, 1)
    assert scrape.total("cb_proxy_retries_total") == (1 if retried else 0)
