"""The issue's "Done when": an outage of the primary under steady traffic, end to end.

The primary answers 503 for OUTAGE_SECONDS of traffic at TRAFFIC_RPS, then
recovers. Every client request must succeed (through the backup while the
primary is out); the primary may see at most failure_threshold +
half_open_probes requests per open period, and none at all while open; after
the recovery the breaker closes and the primary serves again; /metrics shows
exactly the transitions the outage caused and no others.

Real time, kept short by the rules (open 1 s, then at most 2 s, +-10 %
jitter). The client is one sequential loop paced at TRAFFIC_RPS, so each
primary request is ordered against the breaker's transitions: a spy on the
breaker registry's transition callback snapshots the primary's request count
at every transition, and the counts between transitions are the per-phase
budgets.
"""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from itertools import pairwise
from pathlib import Path

from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from proxy.core.breaker import State
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "steady traffic"}]
MODEL = "gpt-4o-mini"
TRAFFIC_RPS = 10
OUTAGE_SECONDS = 6
FAILURE_THRESHOLD = 3
HALF_OPEN_PROBES = 3
# Recovery: the breaker must close within one maximal open period (2 s + 10 % jitter)
# plus the probes; the loop is bounded well above that, then keeps going for a while.
MAX_RECOVERY_REQUESTS = 8 * TRAFFIC_RPS
AFTER_CLOSE_REQUESTS = 10

RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 1, first_token: 2, idle: 2, total: 10}}
    breaker:
      failure_threshold: {threshold}
      half_open_probes: {probes}
      open_seconds: 1
      max_open_seconds: 2
      min_throughput: 100000
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 1, first_token: 2, idle: 2, total: 10}}
    breaker: {{failure_threshold: 3, min_throughput: 100000}}
models:
  gpt-4o-mini:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
defaults:
  # Equal prices: declaration order, whatever the live stats say (primary first).
  strategy: cost_optimized
  retry:
    max_attempts: 4
    same_deployment_retries: 1
    max_retry_wait: 3
    backoff_ms: 1
    max_backoff_ms: 2
"""


@dataclass(frozen=True)
class Transition:
    upstream: str
    source: str
    target: str
    primary_requests: int  # the primary mock's request count when it happened


@dataclass(frozen=True)
class Served:
    provider: str
    fallback: bool
    outage: bool


@dataclass
class Outage:
    proxy: ProxyHandle
    primary: RunningMock
    sdk: AsyncOpenAI
    transitions: list[Transition]
    served: list[Served]

    async def traffic(self, requests: int, *, outage: bool, until_closed: bool = False) -> None:
        """``requests`` sequential requests paced at TRAFFIC_RPS (fewer once closed, if asked)."""
        loop = asyncio.get_running_loop()
        start = loop.time()
        breaker = self.proxy.model_breaker("primary", MODEL)
        for i in range(requests):
            # The traffic's pace, not a wait for a condition: steady load is the test's input.
            await asyncio.sleep(max(0.0, start + i / TRAFFIC_RPS - loop.time()))
            raw = await self.sdk.chat.completions.with_raw_response.create(
                model=MODEL, messages=CHAT
            )
            raw.parse()  # a valid completion, or the SDK raises: every request must succeed
            self.served.append(
                Served(raw.headers["x-cb-provider"], raw.headers["x-cb-fallback"] == "true", outage)
            )
            if until_closed and breaker.state is State.CLOSED:
                return


@asynccontextmanager
async def outage_rig(tmp_path: Path) -> AsyncIterator[Outage]:
    async with (
        running_mock("openai", name="primary") as primary,
        running_mock("openai", name="backup") as backup,
    ):
        path = write_rules(
            tmp_path,
            RULES.format(
                primary=primary.url,
                backup=backup.url,
                threshold=FAILURE_THRESHOLD,
                probes=HALF_OPEN_PROBES,
            ),
        )
        async with (
            running_proxy(path) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            transitions: list[Transition] = []
            # A 503 is the model's failure: MODEL@primary's deployment breaker moves.
            registry = proxy.state.deployment_breakers
            forward = registry.on_transition

            def spy(name: str, source: State, target: State) -> None:
                transitions.append(
                    Transition(name, source.value, target.value, primary.state.stats.requests)
                )
                if forward is not None:
                    forward(name, source, target)

            registry.on_transition = spy
            try:
                yield Outage(proxy, primary, sdk, transitions, [])
            finally:
                registry.on_transition = forward


async def test_primary_outage_under_steady_traffic(tmp_path: Path) -> None:
    async with outage_rig(tmp_path) as o:
        await o.primary.set_fault(kind="status", status=503)
        await o.traffic(OUTAGE_SECONDS * TRAFFIC_RPS, outage=True)
        outage_requests = o.primary.stats()["requests"]
        o.primary.clear_faults()
        await o.traffic(MAX_RECOVERY_REQUESTS, outage=False, until_closed=True)
        assert o.proxy.model_breaker("primary", MODEL).state is State.CLOSED, "never recovered"
        await o.traffic(AFTER_CLOSE_REQUESTS, outage=False)
        assert o.proxy.model_breaker("primary", MODEL).state is State.CLOSED
        # The provider's transport answered throughout: its breaker never counted a failure.
        provider = o.proxy.state.breaker("primary").get_metrics()
        assert (provider["state"], provider["reports"]["failure"]) == ("closed", 0)
        scrape = Scrape(await o.proxy.metrics_text())
        total_primary = o.primary.stats()["requests"]

    # Every client request succeeded (traffic() raises otherwise); during the outage
    # every one was served by the backup, and after the close by the primary again.
    assert all(s.provider == "backup" and s.fallback for s in o.served if s.outage)
    assert all(s.provider == "primary" for s in o.served[-AFTER_CLOSE_REQUESTS:])

    # The transitions form one path: closed -> open, then rounds of
    # open -> half_open -> (open | closed), ending closed; only the primary moves.
    assert {t.upstream for t in o.transitions} == {f"{MODEL}@primary"}
    path = [(t.source, t.target) for t in o.transitions]
    assert path[0] == ("closed", "open")
    assert path[-1] == ("half_open", "closed")
    for before, after in pairwise(path):
        assert before[1] == after[0], f"not a path: {path}"
    failed_rounds = path.count(("half_open", "open"))
    assert failed_rounds >= 2, f"the outage should outlast two open periods: {path}"
    assert path.count(("open", "half_open")) == failed_rounds + 1

    # Budgets, from the primary's request count at each transition.
    counts = [0] + [t.primary_requests for t in o.transitions]
    spent = [b - a for a, b in pairwise(counts)]
    for (source, target), used in zip(path, spent, strict=True):
        if source == "closed":  # the streak that trips, retries included
            assert used == FAILURE_THRESHOLD, (path, spent)
        elif source == "open":  # open: zero upstream I/O
            assert used == 0, (path, spent)
        elif target == "open":  # failed probes (a probe's retry takes a slot of its own)
            assert 1 <= used <= HALF_OPEN_PROBES, (path, spent)
        else:  # every probe passed
            assert used == HALF_OPEN_PROBES, (path, spent)
    # The bound, per open period: from one entry into open to the next (or the close).
    opened_at = [c for c, (_, target) in zip(counts[1:], path, strict=True) if target == "open"]
    ends = [*opened_at[1:], counts[-1]]
    prior = [0, *opened_at[:-1]]
    for start, end in zip(prior, ends, strict=True):
        assert end - start <= FAILURE_THRESHOLD + HALF_OPEN_PROBES, (path, spent)
    assert outage_requests <= FAILURE_THRESHOLD + failed_rounds * HALF_OPEN_PROBES
    assert total_primary == counts[-1] + AFTER_CLOSE_REQUESTS  # closed: the primary serves all

    # /metrics agrees with what happened, and shows nothing else.
    transitions = scrape.counts(
        "circuit_breaker_deployment_transitions_total",
        "upstream",
        "model",
        "from_state",
        "to_state",
    )
    assert transitions == Counter(("primary", MODEL, source, target) for source, target in path)
    assert scrape.total("circuit_breaker_transitions_total") == 0  # no provider breaker moved
