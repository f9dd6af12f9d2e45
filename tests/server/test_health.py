"""Active health checks against real mock upstreams; the schedule runs on a stepped fake clock."""

from __future__ import annotations

import asyncio
import logging
import socket
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest

from proxy.config.check import load_rules
from proxy.core.breaker import CircuitBreaker, State
from proxy.server.health import (
    RECOVERY_INTERVAL_SECONDS,
    HealthChecker,
    Verdict,
    checker_of,
    judge_status,
)
from proxy.server.state import ProxyState
from tests.conftest import PRIMARY_KEY, Stack
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

MODELS = "/v1/models"
ANTHROPIC_KEY = "sk-ant-test-right"
GEMINI_KEY = "gm-test-key"

FORMATS_RULES = """
version: 1
providers:
  claude:
    type: anthropic
    base_url: {anthropic}
    api_key_env: ANTHROPIC_TEST_KEY
  gem:
    type: gemini
    base_url: {gemini}
    api_key_env: GEMINI_TEST_KEY
  dead:
    type: openai
    base_url: http://127.0.0.1:{dead_port}/v1
models:
  claude-x: {{provider: claude}}
  gem-x: {{provider: gem}}
  dead-x: {{provider: dead}}
"""

SCHEDULE_RULES = """
version: 1
providers:
  a:
    type: openai
    base_url: {a}/v1
  b:
    type: openai
    base_url: {b}/v1
    health_check: {{interval: 45}}
  quiet:
    type: openai
    base_url: {quiet}/v1
    health_check: {{interval: 0}}
models:
  a-x: {{provider: a}}
  b-x: {{provider: b}}
  quiet-x: {{provider: quiet}}
"""

RELOADED_RULES = """
version: 1
providers:
  a:
    type: openai
    base_url: {a}/v1
  c:
    type: openai
    base_url: {c}/v1
models:
  a-x: {{provider: a}}
  c-x: {{provider: c}}
"""


def models_calls(mock: RunningMock) -> int:
    return int(mock.stats()["by_path"].get(MODELS, 0))


def checker_for(proxy: ProxyHandle, timeout: float = 5.0) -> HealthChecker:
    # The harness runs the proxy with HEALTH_CHECK_INTERVAL=0: only this checker sends checks.
    return HealthChecker(proxy.state, interval=30, timeout=timeout)


def state_of(breaker: CircuitBreaker) -> State:
    return breaker.state  # a call, so that mypy does not narrow a property across awaits


async def chat(proxy: ProxyHandle, model: str) -> tuple[int, str | None]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        await resp.read()
        return resp.status, resp.headers.get("x-cb-provider")


def assert_window_untouched(state: ProxyState, name: str) -> None:
    metrics = state.breaker(name).get_metrics()
    assert metrics["calls"] == 0
    assert sum(metrics["reports"].values()) == 0


# -- the verdict table ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        (200, Verdict.PASS),
        (204, Verdict.PASS),
        (500, Verdict.FAIL),
        (502, Verdict.FAIL),
        (503, Verdict.FAIL),
        (529, Verdict.FAIL),  # Anthropic overloaded
        (401, Verdict.FAIL),  # our key was refused
        (402, Verdict.FAIL),
        (403, Verdict.FAIL),
        (408, Verdict.IGNORED),
        (429, Verdict.IGNORED),
        (404, Verdict.IGNORED),  # a wrong health path says nothing about the upstream
        (400, Verdict.IGNORED),
        (301, Verdict.IGNORED),
    ],
)
def test_judge_status(status: int, verdict: Verdict) -> None:
    assert judge_status(status) is verdict


# -- checks against the OpenAI mock -------------------------------------------------------


async def test_two_failures_in_a_row_trip_the_breaker(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    state = stack.proxy.state
    checker = checker_for(stack.proxy)
    primary = state.rules.providers["primary"]
    await stack.primary.set_fault(kind="status", status=503, path=MODELS)
    caplog.set_level(logging.INFO, logger="cb_proxy")

    first = await checker.check_once(primary)
    assert (first.verdict, first.consecutive_failures) == (Verdict.FAIL, 1)
    assert state.breaker("primary").state is State.CLOSED
    second = await checker.check_once(primary)
    assert (second.verdict, second.consecutive_failures) == (Verdict.FAIL, 2)
    assert state.breaker("primary").state is State.OPEN

    assert models_calls(stack.primary) == 2
    assert stack.primary.stats()["last_headers"]["authorization"] == f"Bearer {PRIMARY_KEY}"
    assert_window_untouched(state, "primary")  # results never enter the request window
    assert "primary failed 2 times in a row (HTTP 503); breaker closed -> open" in caplog.text
    assert PRIMARY_KEY not in caplog.text
    snapshot = checker.snapshot()["providers"]["primary"]
    assert snapshot["last_result"] == "fail"
    assert snapshot["consecutive_failures"] == 2
    assert snapshot["last_checked"] is not None

    status, served_by = await chat(stack.proxy, "gpt-4o-mini")
    assert (status, served_by) == (200, "backup")
    assert stack.primary.stats()["by_path"].get("/v1/chat/completions", 0) == 0


async def test_a_pass_breaks_the_streak(stack: Stack) -> None:
    checker = checker_for(stack.proxy)
    primary = stack.proxy.state.rules.providers["primary"]
    await stack.primary.set_fault(kind="status", status=502, path=MODELS, count=1)
    assert (await checker.check_once(primary)).verdict is Verdict.FAIL
    assert (await checker.check_once(primary)).verdict is Verdict.PASS
    await stack.primary.set_fault(kind="status", status=502, path=MODELS, count=1)
    health = await checker.check_once(primary)
    assert (health.verdict, health.consecutive_failures) == (Verdict.FAIL, 1)
    assert stack.proxy.state.breaker("primary").state is State.CLOSED


async def test_a_pass_while_open_only_lets_the_next_request_probe(
    stack: Stack, caplog: pytest.LogCaptureFixture
) -> None:
    state = stack.proxy.state
    checker = checker_for(stack.proxy)
    primary = state.rules.providers["primary"]
    breaker = state.breaker("primary")
    await stack.primary.set_fault(kind="status", status=503, path=MODELS, count=2)
    await checker.check_once(primary)
    await checker.check_once(primary)
    assert state_of(breaker) is State.OPEN
    left = breaker.retry_after_seconds()
    assert left is not None
    assert left > 20  # open_seconds 30, +-10 % jitter
    caplog.set_level(logging.INFO, logger="cb_proxy")

    health = await checker.check_once(primary)
    assert (health.verdict, health.consecutive_failures) == (Verdict.PASS, 0)
    assert "primary passed while its breaker was open" in caplog.text
    # The open period is over, but the breaker did not close: the next call is a probe.
    assert state_of(breaker) is State.HALF_OPEN
    assert breaker.retry_after_seconds() == 0
    assert (await checker.check_once(primary)).verdict is Verdict.PASS
    assert state_of(breaker) is State.HALF_OPEN  # passes while half-open change nothing
    assert stack.primary.stats()["by_path"].get("/v1/chat/completions", 0) == 0
    assert_window_untouched(state, "primary")

    probes = breaker.config.half_open_probes
    for n in range(1, probes + 1):
        assert state_of(breaker) is State.HALF_OPEN
        assert await chat(stack.proxy, "solo") == (200, "primary")
        assert breaker.get_metrics()["half_open"]["succeeded"] == (n if n < probes else 0)
    assert state_of(breaker) is State.CLOSED  # closed by real probes, not by the checks


async def test_429_and_408_are_neither_pass_nor_failure(stack: Stack) -> None:
    state = stack.proxy.state
    checker = checker_for(stack.proxy)
    primary = state.rules.providers["primary"]
    breaker = state.breaker("primary")
    await stack.primary.set_fault(
        [
            {"kind": "status", "status": 503, "path": MODELS, "count": 1},
            {"kind": "rate_limit", "path": MODELS, "count": 1, "retry_after": "1"},
            {"kind": "status", "status": 408, "path": MODELS, "count": 1},
            {"kind": "status", "status": 503, "path": MODELS, "count": 1},
            {"kind": "status", "status": 429, "path": MODELS, "count": 1},
        ]
    )
    verdicts = []
    for _ in range(3):
        health = await checker.check_once(primary)
        verdicts.append((health.verdict, health.consecutive_failures, breaker.state))
    assert verdicts == [
        (Verdict.FAIL, 1, State.CLOSED),
        (Verdict.IGNORED, 1, State.CLOSED),
        (Verdict.IGNORED, 1, State.CLOSED),
    ]
    assert (await checker.check_once(primary)).verdict is Verdict.FAIL
    assert state_of(breaker) is State.OPEN  # the ignored answers did not break the streak
    left = breaker.retry_after_seconds()
    health = await checker.check_once(primary)  # a 429 while open
    assert (health.verdict, health.detail) == (Verdict.IGNORED, "HTTP 429")
    assert state_of(breaker) is State.OPEN
    after = breaker.retry_after_seconds()
    assert left is not None
    assert after is not None
    assert 0 < after <= left  # not ended early
    assert models_calls(stack.primary) == 5


async def test_a_refused_key_is_a_failure(stack: Stack) -> None:
    checker = checker_for(stack.proxy)
    primary = stack.proxy.state.rules.providers["primary"]
    await stack.primary.set_fault(kind="status", status=401, path=MODELS, count=1)
    await stack.primary.set_fault(kind="status", status=403, path=MODELS, count=1)
    assert (await checker.check_once(primary)).detail == "HTTP 401"
    health = await checker.check_once(primary)
    assert (health.verdict, health.detail) == (Verdict.FAIL, "HTTP 403")
    assert stack.proxy.state.breaker("primary").state is State.OPEN


async def test_a_provider_without_its_key_is_skipped(stack: Stack) -> None:
    state = stack.proxy.state
    checker = checker_for(stack.proxy)
    before = models_calls(stack.backup)  # nokey shares backup's URL
    health = await checker.check_once(state.rules.providers["nokey"])
    assert health.verdict is Verdict.SKIPPED
    assert "CB_TEST_UNSET_KEY" in health.detail
    assert models_calls(stack.backup) == before
    assert state.breaker("nokey").state is State.CLOSED


async def test_check_all_checks_every_provider_at_once(stack: Stack) -> None:
    results = await checker_for(stack.proxy).check_all()
    assert {n: h.verdict for n, h in results.items()} == {
        "primary": Verdict.PASS,
        "backup": Verdict.PASS,
        "nokey": Verdict.SKIPPED,
    }
    assert results["primary"].latency_ms is not None
    assert models_calls(stack.primary) == 1
    assert models_calls(stack.backup) == 1


# -- other wire formats, transport failures ---------------------------------------------------


@dataclass
class Formats:
    proxy: ProxyHandle
    anthropic: RunningMock
    gemini: RunningMock


@pytest.fixture
def refused_port() -> Iterator[int]:
    # Bound but not listening: connections are refused, and no other test can take the port.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def formats(tmp_path: Path, refused_port: int) -> AsyncIterator[Formats]:
    async with (
        running_mock("anthropic", name="claude", require_key=ANTHROPIC_KEY) as anthropic,
        running_mock("gemini", name="gem", require_key=GEMINI_KEY) as gemini,
    ):
        text = FORMATS_RULES.format(
            anthropic=anthropic.url, gemini=gemini.url, dead_port=refused_port
        )
        environ = {"ANTHROPIC_TEST_KEY": ANTHROPIC_KEY, "GEMINI_TEST_KEY": GEMINI_KEY}
        async with running_proxy(write_rules(tmp_path, text), environ=environ) as proxy:
            yield Formats(proxy, anthropic, gemini)


async def test_anthropic_and_gemini_checks_send_their_headers(formats: Formats) -> None:
    checker = checker_for(formats.proxy)
    providers = formats.proxy.state.rules.providers
    assert (await checker.check_once(providers["claude"])).verdict is Verdict.PASS
    headers = formats.anthropic.stats()["last_headers"]
    assert headers["x-api-key"] == ANTHROPIC_KEY
    assert headers["anthropic-version"]
    assert (await checker.check_once(providers["gem"])).verdict is Verdict.PASS
    assert formats.gemini.stats()["by_path"] == {"/v1beta/models": 1}
    assert formats.gemini.stats()["last_headers"]["x-goog-api-key"] == GEMINI_KEY


async def test_a_wrong_key_fails_the_check(tmp_path: Path) -> None:
    async with running_mock("anthropic", require_key=ANTHROPIC_KEY) as anthropic:
        text = FORMATS_RULES.format(anthropic=anthropic.url, gemini=anthropic.url, dead_port=9)
        path = write_rules(tmp_path, text)
        environ = {"ANTHROPIC_TEST_KEY": "sk-ant-revoked"}
        async with running_proxy(path, environ=environ) as proxy:
            checker = checker_for(proxy)
            health = await checker.check_once(proxy.state.rules.providers["claude"])
            assert (health.verdict, health.detail) == (Verdict.FAIL, "HTTP 401")


async def test_connection_refused_is_a_failure(formats: Formats) -> None:
    checker = checker_for(formats.proxy)
    dead = formats.proxy.state.rules.providers["dead"]
    health = await checker.check_once(dead)
    assert health.verdict is Verdict.FAIL
    assert "Connect" in health.detail
    await checker.check_once(dead)
    assert formats.proxy.state.breaker("dead").state is State.OPEN


async def test_a_check_without_an_answer_times_out(stack: Stack) -> None:
    checker = checker_for(stack.proxy, timeout=0.2)
    await stack.primary.set_fault(kind="stall", path=MODELS)
    try:
        health = await checker.check_once(stack.proxy.state.rules.providers["primary"])
    finally:
        stack.primary.clear_faults()  # releases the stalled request on the mock
    assert (health.verdict, health.detail) == (Verdict.FAIL, "no answer within 0.2 s")


# -- the schedule -----------------------------------------------------------------------


class SteppedTime:
    """A fake clock whose ``wait`` blocks until the test releases it, then advances."""

    def __init__(self) -> None:
        self.now = 0.0
        self._asked: asyncio.Queue[tuple[float, asyncio.Future[None]]] = asyncio.Queue()
        self._pending: tuple[float, asyncio.Future[None]] | None = None

    def clock(self) -> float:
        return self.now

    async def wait(self, seconds: float) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        await self._asked.put((seconds, done))
        await done

    async def next_wait(self) -> float:
        """The loop's next wait (it asks only once the round's checks are done)."""
        async with asyncio.timeout(5):
            self._pending = await self._asked.get()
        return self._pending[0]

    def release(self) -> None:
        if self._pending is None:
            raise RuntimeError("no wait to release")
        seconds, done = self._pending
        self._pending = None
        self.now += seconds
        done.set_result(None)


@dataclass
class Scheduled:
    proxy: ProxyHandle
    a: RunningMock
    b: RunningMock
    quiet: RunningMock
    c: RunningMock
    tmp: Path


@pytest.fixture
async def scheduled(tmp_path: Path) -> AsyncIterator[Scheduled]:
    async with (
        running_mock("openai", name="a") as a,
        running_mock("openai", name="b") as b,
        running_mock("openai", name="quiet") as quiet,
        running_mock("openai", name="c") as c,
    ):
        path = write_rules(tmp_path, SCHEDULE_RULES.format(a=a.url, b=b.url, quiet=quiet.url))
        async with running_proxy(path) as proxy:
            yield Scheduled(proxy, a, b, quiet, c, tmp_path)


async def test_the_loop_follows_each_providers_interval(scheduled: Scheduled) -> None:
    state = scheduled.proxy.state
    time = SteppedTime()
    checker = HealthChecker(
        state, interval=30, clock=time.clock, wall_clock=time.clock, wait=time.wait
    )
    checker.start()
    try:
        steps: list[tuple[float, float, int, int]] = []
        for _ in range(7):
            wait = await time.next_wait()
            steps.append((time.now, wait, models_calls(scheduled.a), models_calls(scheduled.b)))
            time.release()
        # a every 30 s (global), b every 45 s (its own), quiet never; never asleep over 10 s.
        assert steps == [
            (0, 10, 1, 1),
            (10, 10, 1, 1),
            (20, 10, 1, 1),
            (30, 10, 2, 1),
            (40, 5, 2, 1),
            (45, 10, 2, 2),
            (55, 5, 2, 2),
        ]
        assert models_calls(scheduled.quiet) == 0
        snapshot = checker.snapshot()
        assert set(snapshot["providers"]) == {"a", "b"}
        assert snapshot["providers"]["a"]["last_checked"] == 30
        assert snapshot["providers"]["b"]["interval_seconds"] == 45

        # An open breaker is checked every 10 s, whatever its interval: at t=60 b (last
        # checked at 45) is due together with a, and its pass ends the open period.
        state.breaker("b").trip()
        assert checker.interval_for(state.rules.providers["b"]) == RECOVERY_INTERVAL_SECONDS
        assert await time.next_wait() == RECOVERY_INTERVAL_SECONDS
        assert (models_calls(scheduled.a), models_calls(scheduled.b)) == (3, 3)
        assert state.breaker("b").state is State.HALF_OPEN
    finally:
        await checker.stop()
    assert not checker.running


async def test_a_rules_reload_changes_what_is_checked(scheduled: Scheduled) -> None:
    state = scheduled.proxy.state
    time = SteppedTime()
    checker = HealthChecker(state, interval=30, clock=time.clock, wait=time.wait)
    checker.start()
    try:
        await time.next_wait()
        assert set(checker.snapshot()["providers"]) == {"a", "b"}
        text = RELOADED_RULES.format(a=scheduled.a.url, c=scheduled.c.url)
        state.swap_rules(load_rules(write_rules(scheduled.tmp, text, "reloaded.yaml")))
        time.release()
        await time.next_wait()  # the next round sees the new rules: c is new, so due at once
        assert models_calls(scheduled.c) == 1
        assert models_calls(scheduled.a) == 1
        assert set(checker.snapshot()["providers"]) == {"a", "c"}
    finally:
        await checker.stop()


async def test_interval_zero_turns_checks_off(scheduled: Scheduled) -> None:
    state = scheduled.proxy.state
    app_checker = checker_of(state)  # the app's own, under HEALTH_CHECK_INTERVAL=0
    assert app_checker is not None
    assert not app_checker.enabled
    assert not app_checker.running
    assert app_checker.snapshot()["enabled"] is False

    waits: list[float] = []

    async def record(seconds: float) -> None:
        waits.append(seconds)

    off = HealthChecker(state, interval=0, wait=record)
    await off.run()  # returns at once: no loop, no waits
    off.start()
    assert not off.running
    assert await off.check_all() == {}
    assert waits == []
    # A provider's own interval 0 turns just that one off.
    on = HealthChecker(state, interval=30)
    assert set(await on.check_all()) == {"a", "b"}
    assert on.interval_for(state.rules.providers["quiet"]) == 0
    for mock in (scheduled.a, scheduled.b, scheduled.quiet):
        assert models_calls(mock) == (0 if mock is scheduled.quiet else 1)


async def test_the_app_runs_checks_and_stops_them(tmp_path: Path) -> None:
    async with running_mock("openai", name="a") as a, running_mock("openai", name="b") as b:
        path = write_rules(tmp_path, SCHEDULE_RULES.format(a=a.url, b=b.url, quiet=b.url))
        async with running_proxy(path, health_check_interval=3600) as proxy:
            checker = checker_of(proxy.state)
            assert checker is not None
            assert checker.running
            await a.wait_requests(1)  # the first round starts with the app
            assert a.stats()["by_path"] == {MODELS: 1}
        assert not checker.running
