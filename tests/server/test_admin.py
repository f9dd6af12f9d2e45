"""The circuit-breaker admin API on both listeners, against the running proxy and mock upstreams.

Peers on real sockets are loopback here; the non-loopback rules are checked
with aiohttp's ``make_mocked_request`` and a different ``remote``, run through
the real error middleware.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from prometheus_client.parser import text_string_to_metric_families

from proxy.config.check import load_rules
from proxy.config.settings import Settings
from proxy.core.breaker import State
from proxy.server import admin
from proxy.server.api import STATE
from proxy.server.app import create_admin_app, error_middleware
from proxy.server.health import checker_of
from proxy.server.metrics import Metrics
from proxy.server.state import ProxyState
from tests.conftest import PRIMARY_KEY, RULES_TEMPLATE, Stack
from tests.fakes.upstream import running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

API = "/api/circuit-breaker"
NAMES = ["backup", "nokey", "primary"]
# The conftest rules' deployments: one breaker per model@provider (docs/breaker.md, 'Keys').
DEPLOYMENTS = [
    "backup-only@backup",
    "gpt-4o-mini@backup",
    "gpt-4o-mini@primary",
    "locked@nokey",
    "solo@primary",
    "text-embedding-3-small@primary",
]
TOKEN = "admin-token-for-tests"
CHAT_PATH = "/v1/chat/completions"


async def call(
    url: str, method: str, path: str, headers: Mapping[str, str] | None = None
) -> tuple[int, Any]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url + path, headers=headers) as resp,
    ):
        raw = await resp.read()
        return resp.status, orjson.loads(raw) if raw else None


async def chat(proxy: ProxyHandle, model: str) -> int:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        await resp.read()
        return resp.status


async def scrape(proxy: ProxyHandle, metric: str, labels: Mapping[str, str]) -> float | None:
    for family in text_string_to_metric_families(await proxy.metrics_text()):
        for sample in family.samples:
            if sample.name == metric and sample.labels == dict(labels):
                return float(sample.value)
    return None


def transitions(state: ProxyState, name: str, source: State, target: State) -> float:
    labels = {"upstream": name, "from_state": source.value, "to_state": target.value}
    value = state.metrics.registry.get_sample_value("circuit_breaker_transitions_total", labels)
    return value or 0.0


def deployment_transitions(
    state: ProxyState, upstream: str, model: str, source: State, target: State
) -> float:
    labels = {
        "upstream": upstream,
        "model": model,
        "from_state": source.value,
        "to_state": target.value,
    }
    metric = "circuit_breaker_deployment_transitions_total"
    return state.metrics.registry.get_sample_value(metric, labels) or 0.0


@pytest.fixture(params=["api", "metrics"])
def url(request: pytest.FixtureRequest, stack: Stack) -> str:
    """Each test runs against both listeners."""
    return stack.proxy.api_url if request.param == "api" else stack.proxy.metrics_url


# -- reads -------------------------------------------------------------------------------


async def test_status_lists_every_breaker_compactly(stack: Stack, url: str) -> None:
    status, body = await call(url, "GET", f"{API}/status")
    assert status == 200
    closed = {"state": "closed", "mode": "enforce"}
    assert body == {
        "breakers": dict.fromkeys(NAMES, closed),
        "deployments": dict.fromkeys(DEPLOYMENTS, closed),
    }


async def test_metrics_returns_each_breakers_metrics(stack: Stack, url: str) -> None:
    status, body = await call(url, "GET", f"{API}/metrics")
    assert status == 200
    assert sorted(body["breakers"]) == NAMES
    primary = body["breakers"]["primary"]
    expected = stack.proxy.state.breaker("primary").get_metrics()
    assert primary.keys() == expected.keys()
    assert (primary["name"], primary["state"], primary["calls"]) == ("primary", "closed", 0)
    assert primary["error_rate"] == -1


async def test_health_is_healthy_degraded_or_unhealthy_by_open_breakers(
    stack: Stack, url: str
) -> None:
    state = stack.proxy.state
    status, body = await call(url, "GET", f"{API}/health")
    assert status == 200
    assert body["status"] == "healthy"
    assert body["breakers"]["total"] == 3
    assert body["breakers"]["closed"] == 3
    assert body["open"] == []
    assert body["health_checks"]["enabled"] is False  # the harness sets HEALTH_CHECK_INTERVAL=0

    state.breaker("primary").trip()
    state.breaker("primary").end_open_period()  # now half-open
    _, body = await call(url, "GET", f"{API}/health")
    assert (body["status"], body["half_open"], body["open"]) == ("degraded", ["primary"], [])

    await call(url, "POST", f"{API}/force-open/backup")
    _, body = await call(url, "GET", f"{API}/health")
    assert (body["status"], body["open"]) == ("degraded", ["backup"])
    assert body["breakers"]["forced_open"] == 1

    await call(url, "POST", f"{API}/force-open/primary")
    await call(url, "POST", f"{API}/force-open/nokey")
    status, body = await call(url, "GET", f"{API}/health")
    assert status == 200  # a report, never a probe failure
    assert (body["status"], body["open"]) == ("unhealthy", NAMES)

    await call(url, "POST", f"{API}/reset-all")
    _, body = await call(url, "GET", f"{API}/health")
    assert body["status"] == "healthy"


async def test_health_includes_the_health_check_results(tmp_path: Path) -> None:
    async with (
        running_mock("openai", name="primary") as primary,
        running_mock("openai", name="backup") as backup,
    ):
        path = write_rules(tmp_path, RULES_TEMPLATE.format(primary=primary.url, backup=backup.url))
        environ = {"PRIMARY_KEY": PRIMARY_KEY}
        async with running_proxy(path, environ=environ, health_check_interval=3600) as proxy:
            checker = checker_of(proxy.state)
            assert checker is not None
            await checker.check_all()  # the app's own first round may still be running
            status, body = await call(proxy.metrics_url, "GET", f"{API}/health")
    assert status == 200
    checks = body["health_checks"]
    assert (checks["enabled"], checks["interval_seconds"]) == (True, 3600)
    results = {n: p["last_result"] for n, p in checks["providers"].items()}
    assert results == {"backup": "pass", "nokey": "skipped", "primary": "pass"}
    assert checks["providers"]["primary"]["consecutive_failures"] == 0


# -- mutations ---------------------------------------------------------------------------


async def test_force_open_rejects_every_request_without_upstream_io(
    stack: Stack, url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cb_proxy")
    status, body = await call(url, "POST", f"{API}/force-open/primary")
    assert status == 200
    assert body["action"] == "force-open"
    assert body["breaker"]["state"] == "forced_open"
    assert body["breaker"]["retry_after"] is None  # never times out by itself
    assert "admin: force-open on breaker primary by loopback peer 127.0.0.1" in caplog.text

    _, listed = await call(url, "GET", f"{API}/status")
    assert listed["breakers"]["primary"] == {"state": "forced_open", "mode": "enforce"}
    labels = {"upstream": "primary"}
    assert await scrape(stack.proxy, "circuit_breaker_state", labels) == 2

    for _ in range(3):
        assert await chat(stack.proxy, "solo") == 503  # solo has primary only
    assert await chat(stack.proxy, "gpt-4o-mini") == 200  # the backup serves
    assert stack.primary.stats()["requests"] == 0
    state = stack.proxy.state
    assert state.breaker("primary").state is State.FORCED_OPEN
    assert transitions(state, "primary", State.CLOSED, State.FORCED_OPEN) == 1


async def test_disabled_permits_everything_and_records_nothing(stack: Stack, url: str) -> None:
    status, body = await call(url, "POST", f"{API}/disable/primary")
    assert (status, body["breaker"]["state"]) == (200, "disabled")
    await stack.primary.set_fault(kind="status", status=500, path=CHAT_PATH)
    for _ in range(4):  # each request tries twice: well past failure_threshold 3
        assert await chat(stack.proxy, "solo") == 500
    assert stack.primary.stats()["by_path"][CHAT_PATH] >= 4
    _, body = await call(url, "GET", f"{API}/metrics")
    primary = body["breakers"]["primary"]
    assert primary["state"] == "disabled"
    assert (primary["calls"], primary["failures"], primary["consecutive_failures"]) == (0, 0, 0)
    assert await scrape(stack.proxy, "circuit_breaker_state", {"upstream": "primary"}) == 0


async def test_reset_closes_with_a_fresh_window(stack: Stack, url: str) -> None:
    state = stack.proxy.state
    solo = stack.proxy.model_breaker("primary", "solo")
    labels = {"upstream": "primary", "model": "solo"}
    await stack.primary.set_fault(kind="status", status=500, path=CHAT_PATH)
    for _ in range(2):  # two attempts each: four failures open the breaker (threshold 3)
        await chat(stack.proxy, "solo")
    # A 500 is the model's failure: its deployment opens, the provider's transport answered.
    assert solo.state is State.OPEN
    assert state.breaker("primary").state is State.CLOSED
    assert await scrape(stack.proxy, "circuit_breaker_deployment_state", labels) == 2
    assert await scrape(stack.proxy, "circuit_breaker_state", {"upstream": "primary"}) == 0
    stack.primary.clear_faults()

    status, body = await call(url, "POST", f"{API}/reset/solo@primary")
    assert status == 200
    breaker = body["breaker"]
    assert (breaker["state"], breaker["calls"], breaker["failures"]) == ("closed", 0, 0)
    assert (breaker["opens"], breaker["consecutive_failures"]) == (0, 0)
    assert solo.get_metrics()["state"] == "closed"
    assert deployment_transitions(state, "primary", "solo", State.OPEN, State.CLOSED) == 1
    assert await scrape(stack.proxy, "circuit_breaker_deployment_state", labels) == 0
    assert await chat(stack.proxy, "solo") == 200

    # Resetting a closed breaker is allowed and emits no transition.
    status, body = await call(url, "POST", f"{API}/reset/solo@primary")
    assert (status, body["breaker"]["state"], body["breaker"]["calls"]) == (200, "closed", 0)
    assert deployment_transitions(state, "primary", "solo", State.OPEN, State.CLOSED) == 1
    assert deployment_transitions(state, "primary", "solo", State.CLOSED, State.CLOSED) == 0


async def test_monitor_and_enforce_change_the_mode_and_reset_keeps_it(
    stack: Stack, url: str
) -> None:
    status, body = await call(url, "POST", f"{API}/monitor/primary")
    assert (status, body["action"], body["breaker"]["mode"]) == (200, "monitor", "monitor_only")
    await call(url, "POST", f"{API}/force-open/primary")
    _, listed = await call(url, "GET", f"{API}/status")
    assert listed["breakers"]["primary"] == {"state": "forced_open", "mode": "monitor_only"}
    assert await chat(stack.proxy, "solo") == 503  # an admin order outranks monitor-only

    _, body = await call(url, "POST", f"{API}/reset/primary")
    assert (body["breaker"]["state"], body["breaker"]["mode"]) == ("closed", "monitor_only")
    _, body = await call(url, "POST", f"{API}/enforce/primary")
    assert (body["breaker"]["state"], body["breaker"]["mode"]) == ("closed", "enforce")
    _, listed = await call(url, "GET", f"{API}/status")
    assert listed["breakers"]["primary"] == {"state": "closed", "mode": "enforce"}


async def test_reset_all_closes_every_breaker(stack: Stack, url: str) -> None:
    await call(url, "POST", f"{API}/force-open/primary")
    await call(url, "POST", f"{API}/disable/backup")
    status, body = await call(url, "POST", f"{API}/reset-all")
    assert status == 200
    assert body["action"] == "reset-all"
    assert {n: b["state"] for n, b in body["breakers"].items()} == dict.fromkeys(NAMES, "closed")
    _, listed = await call(url, "GET", f"{API}/status")
    assert {n: b["state"] for n, b in listed["breakers"].items()} == dict.fromkeys(NAMES, "closed")


async def test_unknown_breaker_is_a_404_listing_the_known_ones(stack: Stack, url: str) -> None:
    status, body = await call(url, "POST", f"{API}/force-open/nope")
    assert status == 404
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert (error["type"], error["param"], error["code"]) == (
        "invalid_request_error",
        "name",
        "breaker_not_found",
    )
    assert "'nope'" in error["message"]
    assert "backup, nokey, primary" in error["message"]
    _, listed = await call(url, "GET", f"{API}/status")
    assert sorted(listed["breakers"]) == NAMES  # the lookup created nothing


async def test_wrong_methods_and_actions(stack: Stack, url: str) -> None:
    status, body = await call(url, "GET", f"{API}/reset/primary")
    assert (status, body["error"]["code"]) == (405, "method_not_allowed")
    status, body = await call(url, "POST", f"{API}/explode/primary")
    assert (status, body["error"]["code"]) == (404, "not_found")
    status, _ = await call(url, "POST", f"{API}/status")
    assert status == 405
    assert stack.proxy.state.breaker("primary").state is State.CLOSED


# -- who may mutate ----------------------------------------------------------------------


def admin_app(tmp_path: Path, token: str | None) -> web.Application:
    text = RULES_TEMPLATE.format(primary="http://127.0.0.1:9", backup="http://127.0.0.1:9")
    path = write_rules(tmp_path, text)
    settings = Settings(rules_path=path, admin_token=token)
    return create_admin_app(
        ProxyState(settings=settings, rules=load_rules(path), metrics=Metrics())
    )


def breaker_state(app: web.Application) -> State:
    return app[STATE].breaker("primary").state


async def force_open_from(
    app: web.Application, remote: str, authorization: str | None = None
) -> web.StreamResponse:
    headers = {} if authorization is None else {"Authorization": authorization}
    request = make_mocked_request(
        "POST",
        f"{API}/force-open/primary",
        headers=headers,
        app=app,
        match_info={"action": "force-open", "name": "primary"},
    ).clone(remote=remote)
    return await error_middleware(request, admin.mutate_breaker)


def error_of(response: web.StreamResponse) -> dict[str, Any]:
    assert isinstance(response, web.Response)
    assert isinstance(response.body, bytes)
    error: dict[str, Any] = orjson.loads(response.body)["error"]
    return error


async def test_a_token_holder_may_mutate_from_anywhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="cb_proxy")
    app = admin_app(tmp_path, TOKEN)
    response = await force_open_from(app, "10.0.0.5", f"Bearer {TOKEN}")
    assert response.status == 200
    assert breaker_state(app) is State.FORCED_OPEN
    assert "force-open on breaker primary by token holder at 10.0.0.5" in caplog.text
    assert TOKEN not in caplog.text


async def test_a_wrong_token_is_401_even_from_loopback(tmp_path: Path) -> None:
    app = admin_app(tmp_path, TOKEN)
    for remote in ("10.0.0.5", "127.0.0.1"):
        response = await force_open_from(app, remote, "Bearer not-the-token")
        assert response.status == 401
        assert response.headers["WWW-Authenticate"].startswith("Bearer")
        assert error_of(response)["type"] == "authentication_error"
    assert breaker_state(app) is State.CLOSED


@pytest.mark.parametrize("token", [TOKEN, None])
async def test_no_token_from_another_address_is_403(tmp_path: Path, token: str | None) -> None:
    app = admin_app(tmp_path, token)
    for authorization in (None, "Basic dXNlcjpwYXNz", f"Bearer {TOKEN}" if token is None else None):
        response = await force_open_from(app, "10.0.0.5", authorization)
        assert response.status == 403
        assert error_of(response)["type"] == "permission_error"
    assert breaker_state(app) is State.CLOSED


@pytest.mark.parametrize("remote", ["127.0.0.1", "127.8.9.10", "::1", "::ffff:127.0.0.1"])
async def test_loopback_peers_need_no_token(tmp_path: Path, remote: str) -> None:
    app = admin_app(tmp_path, TOKEN)
    response = await force_open_from(app, remote)
    assert response.status == 200
    assert breaker_state(app) is State.FORCED_OPEN


@pytest.mark.parametrize("remote", ["10.0.0.5", "::ffff:10.0.0.5", "fe80::1%eth0", "", "garbage"])
async def test_other_peers_are_not_loopback(tmp_path: Path, remote: str) -> None:
    app = admin_app(tmp_path, None)
    response = await force_open_from(app, remote)
    assert response.status == 403
    assert breaker_state(app) is State.CLOSED


async def test_reads_need_no_token(tmp_path: Path) -> None:
    app = admin_app(tmp_path, TOKEN)
    request = make_mocked_request("GET", f"{API}/status", app=app).clone(remote="10.0.0.5")
    response = await error_middleware(request, admin.breaker_status)
    assert response.status == 200


async def test_reset_all_needs_authorization_too(tmp_path: Path) -> None:
    app = admin_app(tmp_path, TOKEN)
    app[STATE].breaker("primary").force_open()
    request = make_mocked_request("POST", f"{API}/reset-all", app=app).clone(remote="10.0.0.5")
    response = await error_middleware(request, admin.reset_all_breakers)
    assert response.status == 403
    assert breaker_state(app) is State.FORCED_OPEN


async def test_mutations_from_a_real_loopback_socket(stack: Stack) -> None:
    # The harness binds both listeners on 127.0.0.1: the peer is loopback on both.
    for url in (stack.proxy.api_url, stack.proxy.metrics_url):
        status, _ = await call(url, "POST", f"{API}/force-open/primary")
        assert status == 200
        status, _ = await call(url, "POST", f"{API}/reset/primary")
        assert status == 200
