"""Slow first tokens: hedging and the adaptive first-token deadline, end to end.

docs/breaker.md, 'Hedging' and 'Adaptive first-token deadline'. The official SDK
streams through the proxy to two mock upstreams; the primary is made slow to its
first token (20 s) with the mock's ``slow_first_token`` fault. Nothing sleeps: a
slow primary is released by clearing its faults when the test ends, and the
timings asserted are upper bounds measured around the request itself.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from proxy.mock.common import reply_text
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hedge me"}]
PRIMARY_WORDS = 9
BACKUP_WORDS = 5
SLOW_MS = 20_000  # the primary's first token, when slow
ANSWER_WITHIN = 5.0  # the bound for the answer from the fallback
HISTORY = 6  # fast streams that give the primary a history (min_samples below)

RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 1, first_token: 30, idle: 30, total: 60}}
    breaker: {{failure_threshold: 3, min_throughput: 1000}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 1, first_token: 30, idle: 30, total: 60}}
models:
  m:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
routes:
  - match: {{model: hedged}}
    rewrite: {{model: m}}
    hedge_after_ms: {hedge}
defaults:
  strategy: cost_optimized  # equal prices: primary first
  retry: {{same_deployment_retries: 0}}
  hedge: {{factor: 2, min_ms: 50, min_samples: {samples}}}
  first_token_deadline: {{factor: {factor}, quantile: 0.99, floor_ms: 500, min_samples: {samples}}}
"""


@dataclass
class Rig:
    proxy: ProxyHandle
    primary: RunningMock
    backup: RunningMock
    sdk: AsyncOpenAI

    async def stream(self, model: str) -> tuple[str, str, float]:
        """Stream one answer: (provider header, text, seconds it took)."""
        started = time.monotonic()
        async with self.sdk.chat.completions.with_streaming_response.create(
            model=model, messages=CHAT, stream=True
        ) as raw:
            provider = raw.headers["x-cb-provider"]
            text = ""
            async for chunk in await raw.parse():
                for choice in chunk.choices:
                    text += choice.delta.content or ""
        return provider, text, time.monotonic() - started

    async def scrape(self) -> Scrape:
        return Scrape(await self.proxy.metrics_text())


@asynccontextmanager
async def rig(
    tmp_path: Path, *, hedge: str = "200", factor: float = 0, samples: int = HISTORY
) -> AsyncIterator[Rig]:
    async with (
        running_mock("openai", name="primary", words=PRIMARY_WORDS) as primary,
        running_mock("openai", name="backup", words=BACKUP_WORDS) as backup,
    ):
        rules = RULES.format(
            primary=primary.url, backup=backup.url, hedge=hedge, factor=factor, samples=samples
        )
        async with (
            running_proxy(write_rules(tmp_path, rules)) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            try:
                yield Rig(proxy, primary, backup, sdk)
            finally:
                primary.clear_faults()  # releases nothing that waits: slow tokens end anyway


async def slow_primary(r: Rig) -> None:
    await r.primary.set_fault(kind="slow_first_token", ms=SLOW_MS)


async def test_a_slow_first_token_is_hedged_and_the_fallback_answers(tmp_path: Path) -> None:
    async with rig(tmp_path, hedge="200") as r:
        await slow_primary(r)
        provider, text, seconds = await r.stream("hedged")
        assert provider == "backup"
        assert text == reply_text("hedge me", BACKUP_WORDS)
        assert seconds < ANSWER_WITHIN
        # Both attempts happened and are counted; the primary lost with the head start.
        assert r.primary.stats()["requests"] == 1
        assert r.backup.stats()["requests"] == 1
        scrape = await r.scrape()
        assert scrape.total("cb_proxy_hedges_total", upstream="primary", result="won") == 1
        calls = "cb_proxy_upstream_calls_total"
        assert scrape.total(calls, upstream="primary", model="m", outcome="failure") == 1
        assert scrape.total(calls, upstream="backup", model="m", outcome="success") == 1
        assert r.proxy.model_breaker("primary").get_metrics()["failures"] == 1


async def test_a_fast_primary_is_never_hedged(tmp_path: Path) -> None:
    async with rig(tmp_path, hedge="5000") as r:
        provider, text, _ = await r.stream("hedged")
        assert (provider, text) == ("primary", reply_text("hedge me", PRIMARY_WORDS))
        assert r.backup.stats()["requests"] == 0
        scrape = await r.scrape()
        for result in ("won", "lost", "failed"):
            assert scrape.total("cb_proxy_hedges_total", upstream="primary", result=result) == 0


async def test_auto_hedging_waits_for_a_history(tmp_path: Path) -> None:
    async with rig(tmp_path, hedge="auto") as r:
        for _ in range(HISTORY):  # fast first tokens: the primary's history
            provider, _, _ = await r.stream("hedged")
            assert provider == "primary"
        snapshot = r.proxy.state.first_tokens.snapshot("m@primary", 30.0)
        assert snapshot.samples == HISTORY
        await slow_primary(r)
        provider, _, seconds = await r.stream("hedged")
        assert provider == "backup"
        assert seconds < ANSWER_WITHIN


async def test_without_history_auto_does_not_hedge(tmp_path: Path) -> None:
    async with rig(tmp_path, hedge="auto") as r:
        assert r.proxy.state.first_tokens.hedge_after("m@primary", "auto") is None
        provider, _, _ = await r.stream("hedged")
        assert provider == "primary"
        assert r.backup.stats()["requests"] == 0


@pytest.mark.parametrize("model", ["m", "hedged"])
async def test_the_adaptive_deadline_fails_over_a_primary_that_usually_starts_at_once(
    tmp_path: Path, model: str
) -> None:
    # Hedging after 10 s here, so the adaptive deadline (floor 500 ms) is what acts.
    async with rig(tmp_path, hedge="10000", factor=3) as r:
        for _ in range(HISTORY):
            await r.stream(model)
        facts = r.proxy.state.deployment_facts("m@primary")["first_token"]
        assert facts["adaptive"] is True
        assert 500 <= facts["deadline_ms"] < 30_000
        await slow_primary(r)
        provider, text, seconds = await r.stream(model)
        assert (provider, text) == ("backup", reply_text("hedge me", BACKUP_WORDS))
        assert seconds < ANSWER_WITHIN
        scrape = await r.scrape()
        calls = "cb_proxy_upstream_calls_total"
        assert scrape.total(calls, upstream="primary", model="m", outcome="failure") == 1
        assert scrape.total(calls, upstream="backup", model="m", outcome="success") == 1


async def test_no_history_keeps_the_configured_deadline(tmp_path: Path) -> None:
    async with rig(tmp_path, factor=3) as r:
        facts = r.proxy.state.deployment_facts("m@primary")["first_token"]
        assert facts == {
            "samples": 0,
            "p50_ms": None,
            "p95_ms": None,
            "quantile_ms": None,
            "configured_deadline_ms": 30_000.0,
            "deadline_ms": 30_000.0,
            "adaptive": False,
        }


async def test_a_hedge_winner_streaming_slowly_is_relayed_whole(tmp_path: Path) -> None:
    # The loser's cancellation must not reach the winner, however long it streams.
    async with (
        running_mock("openai", name="primary", words=PRIMARY_WORDS) as primary,
        running_mock("openai", name="backup", words=20, tokens_per_second=40) as backup,
    ):
        rules = RULES.format(
            primary=primary.url, backup=backup.url, hedge="100", factor=0, samples=HISTORY
        )
        async with (
            running_proxy(write_rules(tmp_path, rules)) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            r = Rig(proxy, primary, backup, sdk)
            await slow_primary(r)
            try:
                provider, text, _ = await r.stream("hedged")
            finally:
                primary.clear_faults()
            assert (provider, text) == ("backup", reply_text("hedge me", 20))
            assert proxy.state.retries_in_flight == 0  # the hedge's budget slot came back
