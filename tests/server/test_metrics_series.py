"""The labelled series the alerts and the dashboard read exist at 0 from the start.

A series born with its first increment has no earlier sample, so ``increase()`` and
``rate()`` miss that first event (CircuitBreakerFlapping, CbProxyRulesReloadFailed, the
5xx and fallback ratios in deploy/prometheus/alerts.yml). ``Metrics.init_series`` creates
them for the names in the rules, at start and after every reload.
"""

from __future__ import annotations

import ast
import os
from pathlib import Path

import aiohttp
from prometheus_client import generate_latest

from proxy.core.breaker import TRANSITIONS
from proxy.core.outcome import Outcome
from proxy.server import app as app_module
from proxy.server import exchange
from proxy.server.metrics import (
    CODE_CLASSES,
    ENDPOINTS,
    MODEL_SERIES_MAX,
    REJECTION_REASONS,
    UPSTREAM_OUTCOMES,
    Metrics,
)
from proxy.server.state import BREAKER_TRANSITIONS
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape

ROOT = Path(__file__).resolve().parents[2]
RULES = """
version: 1
providers:
  alpha: {type: openai, base_url: "http://127.0.0.1:9/v1"}
  beta: {type: gemini, base_url: "http://127.0.0.1:9"}
models:
  m1: {provider: alpha}
  m2: {deployments: [{provider: alpha}, {provider: beta, upstream_model: gem-2}]}
virtual_models:
  auto: {strategy: balanced}
"""
DEPLOYMENTS = (("alpha", "openai", "m1"), ("alpha", "openai", "m2"), ("beta", "gemini", "m2"))
GAMMA = """
  gamma: {type: anthropic, base_url: "http://127.0.0.1:9"}
"""


async def scrape(proxy: ProxyHandle) -> Scrape:
    return Scrape(await proxy.metrics_text())


def zero(s: Scrape, name: str, **labels: str) -> bool:
    """The series exists and is 0 (``total`` alone cannot tell a missing series from 0)."""
    found = [v for n, ls, v in s.samples if n == name and ls == labels]
    return found == [0.0]


async def test_every_series_the_alerts_read_exists_at_zero_right_after_start(
    tmp_path: Path,
) -> None:
    async with running_proxy(write_rules(tmp_path, RULES)) as proxy:
        s = await scrape(proxy)
    for upstream in ("alpha", "beta"):
        assert zero(s, "circuit_breaker_state", upstream=upstream)
        assert zero(s, "circuit_breaker_would_block_total", upstream=upstream)
        for source, target in BREAKER_TRANSITIONS:
            labels = {"upstream": upstream, "from_state": source, "to_state": target}
            assert zero(s, "circuit_breaker_transitions_total", **labels)
        for reason in REJECTION_REASONS:
            assert zero(s, "cb_proxy_rejections_total", upstream=upstream, reason=reason)
        assert zero(s, "cb_proxy_retries_total", upstream=upstream)
        assert zero(s, "cb_proxy_upstream_duration_seconds_count", upstream=upstream)
        assert zero(s, "cb_proxy_time_to_first_token_seconds_count", upstream=upstream)
        for served_by in ("alpha", "beta"):
            assert zero(s, "cb_proxy_fallbacks_total", primary=upstream, served_by=served_by)
    for upstream, provider, model in DEPLOYMENTS:
        for outcome in UPSTREAM_OUTCOMES:
            labels = {"upstream": upstream, "provider": provider, "model": model}
            assert zero(s, "cb_proxy_upstream_calls_total", **labels, outcome=outcome)
        assert zero(s, "cb_proxy_cost_usd_total", provider=upstream, model=model)
        for kind in ("prompt", "completion"):
            assert zero(s, "cb_proxy_tokens_total", provider=upstream, model=model, kind=kind)
    for model in ("m1", "m2", "auto", "unknown"):
        for endpoint in ENDPOINTS:
            for code_class in CODE_CLASSES:
                labels = {"endpoint": endpoint, "model": model, "code_class": code_class}
                assert zero(s, "cb_proxy_requests_total", **labels)
    for endpoint in ENDPOINTS:
        for stream in ("false", "true"):
            assert zero(
                s, "cb_proxy_request_duration_seconds_count", endpoint=endpoint, stream=stream
            )
    assert zero(s, "cb_proxy_overhead_seconds_count")
    for result in ("ok", "error"):
        assert zero(s, "cb_proxy_rules_reloads_total", result=result)


async def test_a_reload_creates_the_series_of_new_providers_at_zero(tmp_path: Path) -> None:
    path = write_rules(tmp_path, RULES)
    async with running_proxy(path, reload_interval=0.01) as proxy:
        assert (await scrape(proxy)).label_sets("cb_proxy_retries_total") == [
            {"upstream": "alpha"},
            {"upstream": "beta"},
        ]
        new = path.with_name("new.yaml")
        new.write_text(
            RULES.replace("models:", GAMMA.strip("\n") + "\nmodels:", 1).replace(
                "m1: {provider: alpha}", "m1: {provider: gamma}"
            )
        )
        stamp = 1_700_000_000_000_000_000
        os.utime(new, ns=(stamp, stamp))
        new.replace(path)
        assert await proxy.state.wait_reloads(1) == [True]
        s = await scrape(proxy)
    assert zero(
        s,
        "circuit_breaker_transitions_total",
        upstream="gamma",
        from_state="closed",
        to_state="open",
    )
    assert zero(s, "cb_proxy_rejections_total", upstream="gamma", reason="breaker_open")
    assert zero(s, "cb_proxy_fallbacks_total", primary="alpha", served_by="gamma")
    assert zero(
        s,
        "cb_proxy_upstream_calls_total",
        upstream="gamma",
        provider="anthropic",
        model="m1",
        outcome="failure",
    )
    assert zero(s, "cb_proxy_rules_reloads_total", result="error")


async def test_in_flight_does_not_count_the_scrape_itself(tmp_path: Path) -> None:
    async with running_proxy(write_rules(tmp_path, RULES)) as proxy:
        for _ in range(2):  # the first and a later scrape alike
            assert zero(await scrape(proxy), "cb_proxy_in_flight_requests")
        async with aiohttp.ClientSession() as session:
            for url in (proxy.api_url + "/healthz", proxy.api_url + "/readyz"):
                async with session.get(url) as resp:
                    assert resp.status == 200
        assert zero(await scrape(proxy), "cb_proxy_in_flight_requests")


def test_a_large_catalog_gets_no_model_series_ahead() -> None:
    metrics = Metrics()
    deployments = [("p", "openai", f"m{i}") for i in range(MODEL_SERIES_MAX + 1)]
    metrics.init_series(["p"], [("closed", "open")], deployments, [d[2] for d in deployments])
    s = Scrape(_exposition(metrics))
    assert s.label_sets("cb_proxy_upstream_calls_total") == []
    assert s.label_sets("cb_proxy_requests_total") == []
    assert zero(s, "cb_proxy_rejections_total", upstream="p", reason="breaker_open")


def _exposition(metrics: Metrics) -> str:
    return generate_latest(metrics.registry).decode()


def test_the_label_value_sets_agree_with_the_code_that_counts() -> None:
    assert {o.value for o in Outcome} | {exchange.LOCAL_FAILURE} == set(UPSTREAM_OUTCOMES)
    assert set(app_module.ENDPOINT_NAMES.values()) == set(ENDPOINTS)
    assert set(BREAKER_TRANSITIONS) == {
        (s.value, t.value) for (s, _), t in TRANSITIONS.items() if s is not t
    }
    # The reasons forward.py counts per upstream: rejections.labels(<upstream>, "<reason>").
    tree = ast.parse((ROOT / "proxy" / "server" / "forward.py").read_text())
    reasons = {
        node.args[1].value
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "labels"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "rejections"
        and len(node.args) == 2
        and isinstance(node.args[1], ast.Constant)
    }
    assert reasons == set(REJECTION_REASONS)
