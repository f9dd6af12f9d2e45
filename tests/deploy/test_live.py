"""Live check of the monitoring stack: a real Prometheus scrapes real proxies during an outage.

Two proxies run in the test's event loop in front of the four mock upstreams of rules/demo.yaml:
one enforcing, one monitor-only (CIRCUIT_BREAKER_ENABLED=false), as in a fleet mid-rollout. A
real Prometheus server (the Debian `prometheus` binary, the same package as promtool) scrapes
both under job "cb-proxy" every second and evaluates deploy/prometheus/alerts.yml. After normal
traffic, an outage of the primary OpenAI mock in two steps (a model-level one: gpt-4o-mini answers
503, its deployment breaker opens and it fails over to the backup; then a provider-level one: the
mock refuses the proxy's key, the provider breaker opens, with rejections and would-block) and a
good and a bad rules reload, every query of deploy/grafana/dashboard.json and every recording rule
must return data, the breaker alerts of both levels must be active, and no rule may fail to
evaluate.

No sleeps: Prometheus scrapes through a relay that counts scrapes and keeps the last body, and the
test waits for scrape events. A scrape of a target starts only after the previous one was stored, so
once scrape n+1 arrives, everything scrape n read is queryable.
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import yaml
from aiohttp import web

from proxy.mock.app import FormatName, start_mock_server
from proxy.server.app import reload_rules
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboard.json"
DEMO_RULES = ROOT / "rules" / "demo.yaml"
PROMETHEUS = shutil.which("prometheus")

SCRAPE_EVENT_SECONDS = 20.0  # Prometheus start-up on a loaded machine, then 1 s per scrape
RETRY_SCRAPES = 8
STOP_SECONDS = 10.0
# Grafana's variables, as the dashboard would expand them with "All" selected.
GRAFANA_VARIABLES = {
    "$__rate_interval": "10s",
    "$__range": "5m",
    "$namespace": ".*",
    "$pod": ".*",
    "$upstream": ".*",
}
LOOPBACK_URL = re.compile(r"http://127\.0\.0\.1:(\d+)(?!\w)")
# The deployment the model-level outage opens (upstream, model), as its state gauge shows it open.
FAILED_DEPLOYMENT = ("mock-openai", "gpt-4o-mini")
DEPLOYMENT_OPEN = re.compile(
    r'^circuit_breaker_deployment_state\{(?=[^}]*\bupstream="mock-openai")'
    r'(?=[^}]*\bmodel="gpt-4o-mini")[^}]*\} 2(?:\.0)?$',
    re.MULTILINE,
)
CHAT_MODELS = ("gpt-4o-mini", "gpt-4o", "claude-3-5-haiku", "gemini-2.0-flash")


@dataclass
class ScrapeRelay:
    """Serves a proxy's /metrics to Prometheus and counts the scrapes."""

    upstream: str
    session: aiohttp.ClientSession
    scrapes: int = 0
    body: str = ""  # what the last scrape served
    changed: asyncio.Condition = field(default_factory=asyncio.Condition)
    url: str = ""
    log: Path = Path("/dev/null")

    async def handle(self, request: web.Request) -> web.Response:
        async with self.session.get(self.upstream + "/metrics") as resp:
            body = await resp.read()
            content_type = resp.headers["Content-Type"]
        async with self.changed:
            self.scrapes += 1
            self.body = body.decode("utf-8", errors="replace")
            self.changed.notify_all()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def wait_scrapes(self, count: int) -> None:
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: self.scrapes >= count), SCRAPE_EVENT_SECONDS
            )

    async def next_scrapes(self, more: int) -> None:
        await self.wait_scrapes(self.scrapes + more)

    async def wait_served(self, pattern: re.Pattern[str]) -> None:
        """Until a scrape served a body matching ``pattern`` (bounded like the other waits)."""
        async with self.changed:
            await asyncio.wait_for(
                self.changed.wait_for(lambda: pattern.search(self.body) is not None),
                SCRAPE_EVENT_SECONDS,
            )


@asynccontextmanager
async def relay_for(
    proxy: ProxyHandle, session: aiohttp.ClientSession
) -> AsyncIterator[ScrapeRelay]:
    relay = ScrapeRelay(proxy.metrics_url, session)
    app = web.Application()
    app.router.add_get("/metrics", relay.handle)
    runner, relay.url = await start_mock_server(app)
    try:
        yield relay
    finally:
        await runner.cleanup()


def free_port() -> int:
    # Prometheus cannot report a port it picked itself; the race with another process is harmless
    # in practice and would show up as a start-up failure, not a wrong result.
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@asynccontextmanager
async def running_prometheus(tmp: Path, targets: dict[str, str]) -> AsyncIterator[str]:
    """Prometheus scraping ``targets`` (pod label -> host:port) as job cb-proxy every second."""
    config = {
        "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "cb-proxy",
                "static_configs": [
                    {"targets": [address], "labels": {"namespace": "live", "pod": pod}}
                    for pod, address in targets.items()
                ],
            }
        ],
    }
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    port = free_port()
    assert PROMETHEUS is not None, "the prometheus binary is missing: run `make tools`"
    with (tmp / "prometheus.log").open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            PROMETHEUS,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield f"http://127.0.0.1:{port}"
        finally:
            process.terminate()
            try:
                await asyncio.wait_for(process.wait(), STOP_SECONDS)
            except TimeoutError:
                process.kill()
                await process.wait()


def demo_rules_for(mocks: dict[str, RunningMock]) -> str:
    """rules/demo.yaml with each provider's 127.0.0.1 address replaced by its running mock."""
    text = DEMO_RULES.read_text(encoding="utf-8")
    by_port = {}
    for name, provider in yaml.safe_load(text)["providers"].items():
        address = LOOPBACK_URL.match(provider["base_url"])
        if address:
            by_port[address.group(1)] = mocks[name].url
    return LOOPBACK_URL.sub(lambda m: by_port[m.group(1)], text)


def expand(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, PromQL) for every panel target and every label_values variable query."""
    dashboard = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = [
        (f"panel {panel['title']!r} {target['refId']}", expand(target["expr"]))
        for panel in dashboard["panels"]
        if panel["type"] != "row"
        for target in panel["targets"]
    ]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            inner = re.fullmatch(r"label_values\((.*),\s*\w+\)", variable["query"]["query"])
            assert inner, variable["name"]
            queries.append((f"variable {variable['name']}", expand(inner.group(1))))
    return queries


async def query(session: aiohttp.ClientSession, prometheus: str, expr: str) -> list[Any]:
    async with session.get(prometheus + "/api/v1/query", params={"query": expr}) as resp:
        payload = await resp.json()
    assert payload["status"] == "success", (expr, payload)
    result: list[Any] = payload["data"]["result"]
    return result


async def eventually(relay: ScrapeRelay, check: Callable[[], Awaitable[list[str]]]) -> list[str]:
    """Run ``check`` (it returns its problems) until it passes, once per scrape, a few times."""
    problems: list[str] = []
    for _ in range(RETRY_SCRAPES):
        try:
            problems = await check()
        except aiohttp.ClientConnectionError as exc:  # Prometheus' web server not up yet
            problems = [repr(exc)]
        if not problems:
            return []
        await relay.next_scrapes(1)
    return [*problems, f"prometheus log: {relay.log.read_text(errors='replace')[-2000:]}"]


async def chat(
    session: aiohttp.ClientSession, proxy: ProxyHandle, model: str, *, stream: bool = False
) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hello"}], "stream": stream}
    async with session.post(proxy.base_url + "/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status


async def drive_traffic(
    session: aiohttp.ClientSession, proxies: list[ProxyHandle], primary: RunningMock
) -> None:
    statuses: list[int] = []
    for proxy in proxies:
        for model in CHAT_MODELS:
            statuses.append(await chat(session, proxy, model))
            statuses.append(await chat(session, proxy, model, stream=True))
        # Enough calls to one upstream that its breaker window has an error rate (min_throughput).
        for _ in range(12):
            statuses.append(await chat(session, proxy, "claude-3-5-haiku"))
    # A model-level outage (until cleared): 5xx count on the deployment breaker of gpt-4o-mini
    # on the primary, not on the primary's provider breaker; the backup deployment serves.
    await primary.set_fault(kind="status", status=503, model="gpt-4o-mini")
    for proxy in proxies:
        for _ in range(10):
            statuses.append(await chat(session, proxy, "gpt-4o-mini"))
    # Then a provider-level one: the primary refuses the proxy's key (401). That counts on its
    # provider breaker (opens after failure_threshold), and gpt-4o fails over to its fallbacks.
    # (A hang-up after the request was written is the model's failure, docs/breaker.md 'Keys'.)
    await primary.set_fault(kind="status", status=401)
    for proxy in proxies:
        for _ in range(5):
            statuses.append(await chat(session, proxy, "gpt-4o", stream=True))
    assert set(statuses) == {200}, "failover should have served every request"


def reload_good_and_bad(proxy: ProxyHandle) -> None:
    good = proxy.rules_path.read_text(encoding="utf-8")
    proxy.rules_path.write_text("version: 1\nproviders: {broken: {type: nonsense}}\n")
    assert not reload_rules(proxy.state)
    proxy.rules_path.write_text(good, encoding="utf-8")
    assert reload_rules(proxy.state)


async def test_dashboard_and_rules_on_live_metrics(tmp_path: Path) -> None:
    async with AsyncExitStack() as stack:
        mocks: dict[str, RunningMock] = {}
        for name, provider in yaml.safe_load(DEMO_RULES.read_text("utf-8"))["providers"].items():
            fmt: FormatName = provider["type"]
            mocks[name] = await stack.enter_async_context(running_mock(fmt, name=name))
        rules = write_rules(tmp_path, demo_rules_for(mocks))
        enforce = await stack.enter_async_context(running_proxy(rules))
        monitor = await stack.enter_async_context(
            running_proxy(rules, environ={"CIRCUIT_BREAKER_ENABLED": "false"})
        )
        session = await stack.enter_async_context(aiohttp.ClientSession())
        relays = {
            "enforce": await stack.enter_async_context(relay_for(enforce, session)),
            "monitor": await stack.enter_async_context(relay_for(monitor, session)),
        }
        prometheus = await stack.enter_async_context(
            running_prometheus(
                tmp_path,
                {pod: relay.url.removeprefix("http://") for pod, relay in relays.items()},
            )
        )

        # A baseline sample of every series before the outage, so increase() sees it happen.
        for relay in relays.values():
            await relay.wait_scrapes(2)
        await drive_traffic(session, [enforce, monitor], mocks["mock-openai"])
        # The deployment breaker half-opens after open_seconds (5 s in rules/demo.yaml) at the
        # first read: wait until each proxy was scraped while it was open.
        for relay in relays.values():
            await relay.wait_served(DEPLOYMENT_OPEN)
        reload_good_and_bad(enforce)
        # +3: the scrape in flight may predate the traffic's end; the next one does not, and
        # the one after proves it was stored.
        for relay in relays.values():
            await relay.next_scrapes(3)

        async def empty_queries() -> list[str]:
            return [
                f"{where}: no data for {expr}"
                for where, expr in dashboard_queries()
                if not await query(session, prometheus, expr)
            ]

        async def silent_rules() -> list[str]:
            async with session.get(prometheus + "/api/v1/rules") as resp:
                groups = (await resp.json())["data"]["groups"]
            problems = [
                f"{rule['name']}: {rule.get('lastError')}"
                for group in groups
                for rule in group["rules"]
                if rule["health"] != "ok"
            ]
            for group in groups:
                for rule in group["rules"]:
                    if rule["type"] == "recording" and not await query(
                        session, prometheus, rule["query"]
                    ):
                        problems.append(f"recording rule {rule['name']}: no data")
            return problems

        async def missing_alerts() -> list[str]:
            upstream, model = FAILED_DEPLOYMENT
            expected = {
                # The primary's provider breaker opened in both pods (it only blocks in "enforce").
                ("CircuitBreakerOpen", "pending", "mock-openai", "", "enforce"),
                ("CircuitBreakerOpen", "pending", "mock-openai", "", "monitor"),
                ("CircuitBreakerWouldBlock", "firing", "mock-openai", "", ""),
                # The deployment breaker opened: one alert per namespace, pending for 5 minutes.
                ("CbProxyDeploymentBreakerOpen", "pending", upstream, model, ""),
            }
            active = {
                (
                    a["metric"]["alertname"],
                    a["metric"]["alertstate"],
                    a["metric"].get("upstream", ""),
                    a["metric"].get("model", ""),
                    a["metric"].get("pod", ""),
                )
                for a in await query(session, prometheus, "ALERTS")
            }
            return [f"alert not active: {alert}" for alert in sorted(expected - active)]

        watch = relays["enforce"]
        watch.log = tmp_path / "prometheus.log"
        assert await eventually(watch, empty_queries) == []
        assert await eventually(watch, silent_rules) == []
        assert await eventually(watch, missing_alerts) == []
        # Monitor-only never rejected, enforcing did; the dashboard's would-block panel has data.
        blocked = await query(
            session, prometheus, 'circuit_breaker_would_block_total{upstream="mock-openai"} > 0'
        )
        assert {sample["metric"]["pod"] for sample in blocked} == {"monitor"}
        for mock in mocks.values():
            mock.clear_faults()
