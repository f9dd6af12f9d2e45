"""Overload end to end: local failures, admission control, stalled upstreams.

- A proxy out of descriptors (its socket opener fails with EMFILE, through the
  pool's ``opener`` injection point) answers clean 503s ``proxy_overloaded`` with
  ``Retry-After``, opens no breaker, and serves normally once sockets are back.
- A deadline that fires while a request waits for a pooled connection slot, before
  a byte of it left the proxy, is the proxy's failure, not the upstream's.
- Requests beyond ``CB_MAX_IN_FLIGHT`` get a fast 503 while /healthz, /readyz and
  /metrics still answer; a burst of 2,000 against a limit of 100 gets only 200s
  and clean 503s.
- A stalled upstream's breaker opens once ``failure_threshold`` attempts are stuck
  past the stall threshold: the next request fails over at once, well within the
  first-token timeout (the breaker reads a stepped fake clock, the deadlines run
  on the loop's).

Real sockets on 127.0.0.1 port 0; nothing sleeps to wait: the tests wait on the
mocks' counters and on the requests themselves.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.config.settings import SettingsError, derived_max_in_flight, load_settings
from proxy.core.breaker import STALL_FRACTION, State
from proxy.server.admission import NO_UPSTREAM, OVERLOADED, raise_fd_limit
from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.harness import PRIMARY_BACKUP_MODELS, ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape

RULES = (
    """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: {connect}, first_token: {first_token}, idle: 10, total: 30}}
    breaker: {{failure_threshold: {threshold}, min_throughput: 1000, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 2, first_token: 10, idle: 10, total: 30}}
    breaker: {{failure_threshold: 1, open_seconds: 30}}
"""
    + PRIMARY_BACKUP_MODELS
)
SOLO = {"model": "solo", "messages": [{"role": "user", "content": "hi"}]}
PAIR = {**SOLO, "model": "pair"}
CONTENT = b'data: {"id":"c","object":"chat.completion.chunk","created":1,"model":"m",'
CONTENT += b'"choices":[{"index":0,"delta":{"content":"Hi"},"finish_reason":null}]}\n\n'
FAST = 1.0  # seconds: what a "fast" answer takes at most, on a loaded CI machine too


@dataclass
class Rig:
    proxy: ProxyHandle
    primary: RunningMock
    backup: RunningMock

    async def scrape(self) -> Scrape:
        return Scrape(await self.proxy.metrics_text())

    def breaker_states(self) -> dict[str, State]:
        return {name: self.proxy.state.breaker(name).state for name in ("primary", "backup")}

    def failures(self, provider: str) -> int:
        reports: dict[str, int] = self.proxy.state.breaker(provider).get_metrics()["reports"]
        return reports["failure"]


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    primary_url: str | None = None,
    connect: float = 2,
    first_token: float = 10,
    threshold: int = 1,
    **overrides: Any,
) -> AsyncIterator[Rig]:
    async with (
        running_mock("openai", name="primary") as primary,
        running_mock("openai", name="backup") as backup,
    ):
        text = RULES.format(
            primary=primary_url or primary.url,
            backup=backup.url,
            connect=connect,
            first_token=first_token,
            threshold=threshold,
        )
        async with running_proxy(write_rules(tmp_path, text), **overrides) as proxy:
            yield Rig(proxy, primary, backup)


@dataclass
class Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    seconds: float

    @property
    def error(self) -> dict[str, Any]:
        error: dict[str, Any] = orjson.loads(self.body)["error"]
        assert set(error) == {"message", "type", "param", "code"}  # OpenAI's shape
        return error

    @property
    def provider(self) -> str:
        return self.headers.get("x-cb-provider", "")


async def post(session: aiohttp.ClientSession, proxy: ProxyHandle, body: Any) -> Answer:
    started = time.monotonic()
    async with session.post(proxy.base_url + "/chat/completions", json=body) as resp:
        raw = await resp.read()
        return Answer(resp.status, dict(resp.headers), raw, time.monotonic() - started)


def assert_overloaded(answer: Answer) -> None:
    assert answer.status == 503, answer.body
    assert answer.error["code"] == "proxy_overloaded"
    assert answer.error["type"] == "server_error"
    assert answer.headers["Retry-After"] == "1"
    assert answer.headers["retry-after-ms"] == "1000"


def session(limit: int = 0) -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=limit))


# -- local failures ------------------------------------------------------------------------------


async def no_descriptors(*args: Any, **kwargs: Any) -> Any:
    raise OSError(errno.EMFILE, "Too many open files")


async def test_a_burst_out_of_descriptors_opens_no_breaker_and_the_proxy_recovers(
    tmp_path: Path,
) -> None:
    burst = 300  # more than the per-host connection cap: no slot may leak per failure
    async with rig(tmp_path, upstream_max_connections_per_host=64) as r, session() as client:
        pool = r.proxy.state.upstream
        assert pool is not None
        pool.opener = no_descriptors
        answers = await asyncio.gather(
            *(post(client, r.proxy, SOLO if i % 2 else PAIR) for i in range(burst))
        )
        for answer in answers:
            assert_overloaded(answer)
        assert r.breaker_states() == {"primary": State.CLOSED, "backup": State.CLOSED}
        assert r.failures("primary") == r.failures("backup") == 0
        assert r.primary.stats()["requests"] == r.backup.stats()["requests"] == 0
        scrape = await r.scrape()
        calls = "cb_proxy_upstream_calls_total"
        assert scrape.total(calls, upstream="primary", outcome="local_failure") == burst
        assert scrape.total(calls, upstream="backup", outcome="local_failure") == burst // 2
        assert scrape.total(calls, outcome="failure") == 0
        assert scrape.total("circuit_breaker_transitions_total") == 0

        pool.opener = None  # descriptors are back
        answers = await asyncio.gather(*(post(client, r.proxy, SOLO) for _ in range(50)))
        assert [a.status for a in answers] == [200] * 50
        assert {a.provider for a in answers} == {"primary"}
        assert r.breaker_states() == {"primary": State.CLOSED, "backup": State.CLOSED}


async def test_a_deadline_while_waiting_for_a_pooled_connection_is_the_proxys_failure(
    tmp_path: Path,
) -> None:
    """First-token deadline (0.5 s) under the connect timeout: it fires in the slot queue."""
    held = RawReply(chunks=[CONTENT, b"data: [DONE]\n\n"], hold_before=1)
    async with (
        RawStreamServer(held) as up,
        rig(
            tmp_path,
            primary_url=up.url,
            connect=5,
            first_token=0.5,
            upstream_max_connections_per_host=1,
        ) as r,
        session() as client,
    ):
        first = asyncio.create_task(post(client, r.proxy, {**SOLO, "stream": True}))
        await up.wait_requests(1)  # committed at its first content, then held: its only
        # connection is busy from now on
        waited = await post(client, r.proxy, SOLO)
        assert_overloaded(waited)
        assert "CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST" in waited.error["message"]
        assert waited.seconds < 0.5 + FAST  # at the deadline, not at the connect timeout
        assert len(up.requests) == 1  # nothing of it ever reached the upstream
        served = await post(client, r.proxy, PAIR)  # the backup has free connections
        assert served.status == 200
        assert served.provider == "backup"
        up.release()
        assert (await first).status == 200
        assert r.failures("primary") == 0
        assert r.breaker_states() == {"primary": State.CLOSED, "backup": State.CLOSED}
        scrape = await r.scrape()
        assert (
            scrape.total(
                "cb_proxy_upstream_calls_total", upstream="primary", outcome="local_failure"
            )
            == 2
        )


# -- admission control ---------------------------------------------------------------------------


def test_the_limit_is_set_or_derived_from_the_open_file_limit() -> None:
    assert load_settings({}, {}).max_in_flight is None  # derived at start
    assert load_settings({"CB_MAX_IN_FLIGHT": "250"}, {}).max_in_flight == 250
    assert load_settings({"CB_MAX_IN_FLIGHT": "0"}, {}).max_in_flight == 0  # no limit
    for bad in ("-1", "many", "1.5"):
        with pytest.raises(SettingsError, match="CB_MAX_IN_FLIGHT"):
            load_settings({"CB_MAX_IN_FLIGHT": bad}, {})
    assert derived_max_in_flight(4096) == 1024  # two sockets a request, half the table spare
    assert derived_max_in_flight(20) == 16
    assert derived_max_in_flight(-1) == derived_max_in_flight(1 << 40) == (1 << 20) // 4
    soft = raise_fd_limit()
    assert raise_fd_limit() == soft  # at the hard limit now: nothing more to raise


async def test_requests_beyond_the_limit_get_fast_503s_while_health_answers(
    tmp_path: Path,
) -> None:
    limit, extra = 5, 12
    async with rig(tmp_path, max_in_flight=limit) as r, session() as client:
        assert r.proxy.state.max_in_flight == limit
        await r.primary.set_fault(kind="stall")  # held until cleared
        held = [asyncio.create_task(post(client, r.proxy, SOLO)) for _ in range(limit)]
        await r.primary.wait_in_flight(limit)
        rejected = await asyncio.gather(*(post(client, r.proxy, SOLO) for _ in range(extra)))
        for answer in rejected:
            assert_overloaded(answer)
            assert "CB_MAX_IN_FLIGHT" in answer.error["message"]
            assert answer.seconds < FAST
        # Never starved, never counted: both listeners' health, readiness and metrics.
        for base in (r.proxy.api_url, r.proxy.metrics_url):
            for path in ("/healthz", "/readyz"):
                async with client.get(base + path) as resp:
                    assert resp.status == 200, (base, path)
        scrape = await r.scrape()
        assert scrape.total("cb_proxy_in_flight_requests") == limit
        rejections = "cb_proxy_rejections_total"
        assert scrape.total(rejections, upstream=NO_UPSTREAM, reason=OVERLOADED) == extra
        assert r.primary.stats()["requests"] == limit  # the rejected never went upstream
        assert scrape.total("cb_proxy_requests_total", code_class="5xx") == extra

        r.primary.clear_faults()  # the held requests complete normally
        assert [a.status for a in await asyncio.gather(*held)] == [200] * limit
        answers = await asyncio.gather(*(post(client, r.proxy, SOLO) for _ in range(limit)))
        assert [a.status for a in answers] == [200] * limit
        for _ in range(3):
            assert (await post(client, r.proxy, SOLO)).status == 200
        assert r.proxy.state.in_flight == 0
        assert r.breaker_states() == {"primary": State.CLOSED, "backup": State.CLOSED}


async def test_the_rejection_series_exists_from_the_start(tmp_path: Path) -> None:
    async with rig(tmp_path, max_in_flight=0) as r:
        assert r.proxy.state.max_in_flight == 0  # 0 = no admission control
        scrape = await r.scrape()
        assert {"upstream": NO_UPSTREAM, "reason": OVERLOADED} in scrape.label_sets(
            "cb_proxy_rejections_total"
        )


async def test_a_burst_of_2000_against_a_limit_of_100_gets_only_200s_and_clean_503s(
    tmp_path: Path,
) -> None:
    burst, limit = 2000, 100
    async with rig(tmp_path, max_in_flight=limit, threshold=1) as r, session() as client:
        started = time.monotonic()
        answers = await asyncio.gather(*(post(client, r.proxy, SOLO) for _ in range(burst)))
        elapsed = time.monotonic() - started
        statuses = {a.status for a in answers}
        assert statuses <= {200, 503}, statuses
        ok = [a for a in answers if a.status == 200]
        for answer in answers:
            if answer.status == 503:
                assert_overloaded(answer)
        assert ok, "some requests must be served"
        assert elapsed < 30
        scrape = await r.scrape()
        rejected = scrape.total("cb_proxy_rejections_total", upstream=NO_UPSTREAM)
        assert rejected == burst - len(ok)
        assert r.primary.stats()["requests"] == len(ok)
        assert scrape.total("circuit_breaker_transitions_total") == 0
        assert r.failures("primary") == 0
        assert r.proxy.state.in_flight == 0


# -- a stalled upstream --------------------------------------------------------------------------


class SteppedClock:
    """The breakers' clock: real monotonic time plus whatever the test stepped forward."""

    def __init__(self) -> None:
        self.offset = 0.0

    def __call__(self) -> float:
        return time.monotonic() + self.offset

    def step(self, seconds: float) -> None:
        self.offset += seconds


async def test_a_stalled_upstream_opens_after_threshold_stuck_requests(tmp_path: Path) -> None:
    first_token, threshold = 3.0, 3
    async with (
        rig(tmp_path, first_token=first_token, threshold=threshold) as r,
        session() as client,
    ):
        clock = SteppedClock()
        # Stalls are the model's failure: its deployment breaker judges them (docs/breaker.md).
        r.proxy.state.deployment_breakers.use_clock(clock)
        await r.primary.set_fault(kind="stall")
        started = time.monotonic()
        stuck = [asyncio.create_task(post(client, r.proxy, PAIR)) for _ in range(threshold)]
        await r.primary.wait_in_flight(threshold)
        # The stuck attempts age past the stall threshold (half the first-token timeout).
        clock.step(STALL_FRACTION * first_token)
        fourth = await post(client, r.proxy, PAIR)
        assert fourth.status == 200
        assert fourth.provider == "backup"
        assert fourth.headers["x-cb-fallback"] == "true"
        assert fourth.seconds < FAST  # at once: not after the first-token timeout
        assert time.monotonic() - started < first_token  # before any stuck one timed out
        assert r.primary.stats()["requests"] == threshold  # it never reached the primary
        assert r.proxy.model_breaker("primary", "pair").state is State.OPEN
        assert r.proxy.state.breaker("primary").state is State.CLOSED  # no stall rule there
        # The stuck ones fail over at their own deadline, and count nothing more.
        for answer in await asyncio.gather(*stuck):
            assert answer.status == 200
            assert answer.provider == "backup"
            assert answer.seconds >= first_token - 0.1
        scrape = await r.scrape()
        transitions = scrape.counts(
            "circuit_breaker_deployment_transitions_total", "upstream", "model", "to_state"
        )
        assert {key: n for key, n in transitions.items() if n} == {("primary", "pair", "open"): 1}
        assert scrape.total("circuit_breaker_transitions_total") == 0
        assert (
            scrape.total("cb_proxy_rejections_total", upstream="primary", reason="breaker_open")
            == 1
        )


async def test_waiting_for_a_pooled_connection_never_ages_into_a_stall(tmp_path: Path) -> None:
    """Requests queued behind the per-host cap have not reached the upstream: no stall."""
    first_token, threshold = 3.0, 3
    async with (
        rig(
            tmp_path,
            connect=10,
            first_token=first_token,
            threshold=threshold,
            upstream_max_connections_per_host=1,
        ) as r,
        session() as client,
    ):
        clock = SteppedClock()
        r.proxy.state.deployment_breakers.use_clock(clock)
        await r.primary.set_fault(kind="stall")
        holder = asyncio.create_task(post(client, r.proxy, SOLO))  # takes the only connection
        await r.primary.wait_in_flight(1)
        pool = r.proxy.state.upstream
        assert pool is not None
        all_queued = asyncio.Event()
        queued_count = 0

        def on_queue(origin: object) -> None:
            nonlocal queued_count
            queued_count += 1
            if queued_count == 4:
                all_queued.set()

        pool.on_queue = on_queue
        queued = [asyncio.create_task(post(client, r.proxy, SOLO)) for _ in range(4)]
        async with asyncio.timeout(5):
            await all_queued.wait()
        origin = ("http", "127.0.0.1", int(r.primary.url.rsplit(":", 1)[1]))
        assert pool.waiting(origin) == 4
        clock.step(STALL_FRACTION * first_token * 4)  # everything aged far past the threshold
        breaker = r.proxy.model_breaker("primary", "solo")  # stalls count per deployment
        assert breaker.state is State.CLOSED
        assert breaker.get_metrics()["stalled"] == 1  # only the request that was sent
        assert r.proxy.state.breaker("primary").get_metrics()["stalled"] == 0
        r.primary.clear_faults()
        answers = await asyncio.gather(holder, *queued)
        assert [a.status for a in answers] == [200] * 5
        assert breaker.state is State.CLOSED
