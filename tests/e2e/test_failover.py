"""Breaker, retries and failover end to end: the official SDK -> proxy -> mock upstreams.

docs/breaker.md cases 20-24 and the retry rules, on real sockets: the proxy runs in
the test's event loop in front of two mock upstreams (``primary`` first,
``backup`` second) with short timeouts. The mocks' texts differ in length
(PRIMARY_WORDS vs BACKUP_WORDS) so a test can tell whose content reached the
client. Nothing sleeps to wait: the tests wait on the mocks' change events, on
the responses themselves, or on a bounded loop of requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import time
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from proxy.core.breaker import State
from proxy.mock.common import reply_text
from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape
from tests.openapi import validate, validate_payloads

PROMPT = "hello there"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": PROMPT}]
MODEL = "gpt-4o-mini"
PRIMARY_WORDS = 12
BACKUP_WORDS = 6
THRESHOLD = 3  # consecutive failures that open either breaker (rules below)
SETTLE_SCRAPES = 50  # bound on scrapes while a cancelled request finishes unwinding

RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 1, first_token: {first_token}, idle: {idle}, total: 20}}
    breaker: {{failure_threshold: {threshold}, min_throughput: 1000, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 1, first_token: 5, idle: 5, total: 20}}
    breaker: {{failure_threshold: 3, min_throughput: 1000, open_seconds: {backup_open}}}
models:
  gpt-4o-mini:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
defaults:
  # Equal prices: declaration order, whatever the live stats say (primary first).
  strategy: cost_optimized
  # The committed-stream tests here are of the in-band error; tests/e2e/test_continuation.py
  # covers a failed stream finished by the next candidate.
  continuation: false
  retry:
    max_attempts: 4
    same_deployment_retries: 1
    max_retry_wait: 3
    backoff_ms: 1
    max_backoff_ms: 2
"""


@dataclass
class Rig:
    proxy: ProxyHandle
    primary: RunningMock
    backup: RunningMock
    sdk: AsyncOpenAI

    async def scrape(self) -> Scrape:
        return Scrape(await self.proxy.metrics_text())


@asynccontextmanager
async def rig(
    tmp_path: Path,
    *,
    primary_url: str | None = None,
    first_token: float = 1.0,
    idle: float = 0.5,
    threshold: int = THRESHOLD,
    backup_open: float = 30.0,
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Rig]:
    async with (
        running_mock("openai", name="primary", words=PRIMARY_WORDS) as primary,
        running_mock("openai", name="backup", words=BACKUP_WORDS) as backup,
    ):
        rules = RULES.format(
            primary=primary_url or primary.url,
            backup=backup.url,
            first_token=first_token,
            idle=idle,
            threshold=threshold,
            backup_open=backup_open,
        )
        path = write_rules(tmp_path, rules)
        async with (
            running_proxy(path, environ=environ) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            yield Rig(proxy, primary, backup, sdk)


async def chat(r: Rig) -> tuple[Mapping[str, str], dict[str, Any]]:
    """One plain chat request through the SDK: the response headers and the raw JSON body."""
    raw = await r.sdk.chat.completions.with_raw_response.create(model=MODEL, messages=CHAT)
    completion = raw.parse()
    assert completion.choices[0].message.content
    body: dict[str, Any] = orjson.loads(raw.http_response.content)
    return raw.headers, body


async def failing_chat(r: Rig) -> openai.APIStatusError:
    with pytest.raises(openai.APIStatusError) as caught:
        await r.sdk.chat.completions.create(model=MODEL, messages=CHAT)
    return caught.value


async def raw_stream(r: Rig) -> tuple[int, Mapping[str, str], list[str]]:
    """A streamed chat request as bytes: status, headers and the ``data:`` payloads in order."""
    body = {"model": MODEL, "messages": CHAT, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(r.proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        text = (await resp.read()).decode()
        headers = dict(resp.headers)
        status = resp.status
    events = text.split("\n\n")
    assert events[-1] == "", "the stream must end with a complete event"
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert "\n" not in event, event
    return status, headers, [event[len("data: ") :] for event in events[:-1]]


def content_of(payloads: list[str]) -> str:
    pieces = []
    for payload in payloads:
        if payload == "[DONE]":
            continue
        obj = orjson.loads(payload)
        for choice in obj.get("choices") or ():
            pieces.append(choice["delta"].get("content") or "")
    return "".join(pieces)


async def trip(r: Rig, provider: str, *, within: int = 5) -> None:
    """Send requests (the upstream answers 5xx) until MODEL@``provider`` is open; bounded.

    A 5xx is the model's failure: its deployment breaker opens, never the provider's.
    """
    breaker = r.proxy.model_breaker(provider, MODEL)
    for _ in range(within):
        if breaker.state is State.OPEN:
            break
        # When every upstream fails, the failures are the point.
        with contextlib.suppress(openai.APIStatusError):
            await r.sdk.chat.completions.create(model=MODEL, messages=CHAT)
    assert breaker.state is State.OPEN
    assert r.proxy.state.breaker(provider).state is State.CLOSED  # the transport answered


async def settle(r: Rig, done: Callable[[], bool]) -> None:
    """A bounded loop of scrapes until ``done()``: lets a cancelled request finish unwinding."""
    for _ in range(SETTLE_SCRAPES):
        if done():
            return
        await r.proxy.metrics_text()
    assert done()


# -- case 20: an open primary gets zero requests ----------------------------------------------


async def test_open_primary_gets_no_requests_and_the_backup_serves(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="status", status=503)
        await trip(r, "primary")
        tripped_at = r.primary.stats()["requests"]
        assert tripped_at == THRESHOLD  # a retry counts: each failure is one toward the streak
        before = await r.scrape()
        served = 4
        for _ in range(served):
            headers, body = await chat(r)
            assert headers["x-cb-provider"] == "backup"
            assert headers["x-cb-fallback"] == "true"
            assert headers["x-cb-attempts"] == "1"  # the open primary cost no attempt
            assert headers["x-cb-breaker-state"] == "closed"  # the serving upstream's
            assert headers["x-cb-deployment-breaker-state"] == "closed"  # and its deployment's
            meta = body["circuit_breaker"]
            assert meta["fallback_used"] is True
            assert meta["attempts"] == 1
            assert meta["provider"] == "backup"
            assert body["choices"][0]["message"]["content"] == reply_text(PROMPT, BACKUP_WORDS)
        assert r.primary.stats()["requests"] == tripped_at
        after = await r.scrape()

    def delta(name: str, **labels: str) -> float:
        return after.total(name, **labels) - before.total(name, **labels)

    calls = "cb_proxy_upstream_calls_total"
    assert delta(calls, upstream="backup", outcome="success") == served
    assert delta(calls, upstream="primary") == 0
    assert delta("cb_proxy_rejections_total", upstream="primary", reason="breaker_open") == served
    assert delta("cb_proxy_fallbacks_total", primary="primary", served_by="backup") == served, (
        "cb_proxy_fallbacks_total never moves (see the report)"
    )
    transitions = "circuit_breaker_deployment_transitions_total"
    assert (
        after.total(
            transitions, upstream="primary", model=MODEL, from_state="closed", to_state="open"
        )
        == 1
    )
    assert after.total(transitions) == 1
    assert after.total("circuit_breaker_transitions_total") == 0  # no provider breaker moved
    deployment_state = "circuit_breaker_deployment_state"
    assert after.total(deployment_state, upstream="primary", model=MODEL) == 2
    assert after.total(deployment_state, upstream="backup", model=MODEL) == 0
    assert after.total("circuit_breaker_state", upstream="primary") == 0
    assert after.total("circuit_breaker_state", upstream="backup") == 0


# -- case 21: a caller fault ends the chain ------------------------------------------------------


async def test_caller_fault_from_the_primary_ends_the_chain(tmp_path: Path) -> None:
    upstream_error = {
        "error": {
            "message": "Invalid 'messages[0]': bad",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "invalid_value",
        }
    }
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="status", status=400, body=upstream_error)
        floods = THRESHOLD + 2
        for _ in range(floods):
            err = await failing_chat(r)
            assert isinstance(err, openai.BadRequestError)
            assert err.response.json() == upstream_error  # the upstream's error, as is
        assert r.primary.stats()["requests"] == floods  # no retry on the same deployment
        assert r.backup.stats()["requests"] == 0  # and no fallback
        breaker = r.proxy.state.breaker("primary")
        assert breaker.state is State.CLOSED  # caller faults never count against the upstream
        assert breaker.get_metrics()["reports"]["ignored"] == floods
        scrape = await r.scrape()
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="ignored") == (
        floods
    )
    assert scrape.total("cb_proxy_retries_total") == 0


# -- case 22: every breaker open -----------------------------------------------------------------


async def test_all_breakers_open_gives_503_with_the_soonest_half_open_time(tmp_path: Path) -> None:
    async with rig(tmp_path, backup_open=20) as r:
        await r.primary.set_fault(kind="status", status=503)
        await r.backup.set_fault(kind="status", status=502)
        await trip(r, "primary")
        before_backup_trip = time.monotonic()
        await trip(r, "backup")
        breakers = [r.proxy.model_breaker(n, MODEL) for n in ("primary", "backup")]
        assert [b.state for b in breakers] == [State.OPEN, State.OPEN]
        sent = (r.primary.stats()["requests"], r.backup.stats()["requests"])
        soonest = min(b.retry_at() for b in breakers)
        started = time.monotonic()
        err = await failing_chat(r)
        finished = time.monotonic()
        assert (r.primary.stats()["requests"], r.backup.stats()["requests"]) == sent
    assert isinstance(err, openai.InternalServerError)
    assert err.status_code == 503
    body = err.response.json()
    validate("ErrorResponse", body)
    assert body["error"]["code"] == "circuit_open"
    wait_ms = int(err.response.headers["retry-after-ms"])
    # The soonest is the backup's (20 s +- 10 %), not the primary's (30 s +- 10 %).
    assert (soonest - finished) * 1000 <= wait_ms <= (soonest - started) * 1000 + 1
    # Its open period ran from the trip, which came shortly before the request: 20 s +- 10 %
    # less the time since the trip.
    since_trip_ms = (finished - before_backup_trip) * 1000
    assert 18_000 - since_trip_ms - 1 <= wait_ms <= 22_000
    assert int(err.response.headers["retry-after"]) == math.ceil(wait_ms / 1000)


async def test_first_candidates_error_is_kept_when_its_retry_is_refused(tmp_path: Path) -> None:
    """docs/breaker.md: 'When everything fails: the first candidate's error'.

    The primary trips on its first failure (threshold 1), so the breaker refuses
    the same-deployment retry; the primary was still tried and failed, so its
    error, not the backup's nor a 'circuit open', is the one the client gets.
    """
    primary_error = {
        "error": {
            "message": "primary exploded",
            "type": "server_error",
            "param": None,
            "code": None,
        }
    }
    async with rig(tmp_path, threshold=1) as r:
        await r.primary.set_fault(kind="status", status=500, body=primary_error)
        await r.backup.set_fault(kind="status", status=502)
        err = await failing_chat(r)
        assert r.primary.stats()["requests"] == 1
        assert r.backup.stats()["requests"] == 2  # tried, retried once, failed
    assert err.status_code == 500, f"got the wrong error: {err.status_code} {err.response.text}"
    assert err.response.json() == primary_error


# -- case 23: an in-band error before content fails over cleanly ----------------------------------


async def test_in_band_error_before_content_fails_over_to_one_clean_stream(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="error_event", after_events=0, count=1)
        status, headers, payloads = await raw_stream(r)
        assert r.primary.stats()["requests"] == 1
        assert r.backup.stats()["requests"] == 1
        scrape = await r.scrape()
    assert status == 200
    assert headers["x-cb-provider"] == "backup"
    assert headers["x-cb-fallback"] == "true"
    assert headers["x-cb-attempts"] == "2"
    validate_payloads(payloads)
    assert payloads[-1] == "[DONE]"
    assert payloads.count("[DONE]") == 1
    objs = [orjson.loads(p) for p in payloads[:-1]]
    assert not any("error" in o for o in objs)
    assert {o["id"] for o in objs} == {objs[0]["id"]}  # one stream, not two spliced
    roles = [c["delta"]["role"] for o in objs for c in o["choices"] if "role" in c["delta"]]
    assert roles == ["assistant"]
    assert content_of(payloads) == reply_text(PROMPT, BACKUP_WORDS)
    calls = "cb_proxy_upstream_calls_total"
    assert scrape.total(calls, upstream="primary", outcome="failure") == 1
    assert scrape.total(calls, upstream="backup", outcome="success") == 1


# -- case 24: a committed stream that fails ---------------------------------------------------

ROLE_EVENT = (
    b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"role":"assistant","content":""},'
    b'"finish_reason":null}]}\n\n'
)
PARTIAL_EVENT = (
    b'data: {"id":"chatcmpl-raw","object":"chat.completion.chunk","created":1,'
    b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"partial answer"},'
    b'"finish_reason":null}]}\n\n'
)


def first_words(text: str, n: int) -> str:
    return " ".join(text.split(" ")[:n])


@asynccontextmanager
async def committed_failure(
    tmp_path: Path, how: str
) -> AsyncIterator[tuple[Rig, str, Callable[[], int]]]:
    """A rig whose primary commits a stream, then fails ``how``.

    Yields the rig, the content the primary sent before failing, and a count of
    the requests the primary received.
    """
    if how == "no_terminal_marker":
        # A well-formed body that simply ends: no finish_reason, no [DONE].
        reply = RawReply(chunks=[ROLE_EVENT, PARTIAL_EVENT])
        async with RawStreamServer(reply) as raw, rig(tmp_path, primary_url=raw.url) as r:
            yield r, "partial answer", lambda: len(raw.requests)
        return
    async with rig(tmp_path) as r:
        kind = {"drop": "cut_stream", "stall": "stall_stream"}[how]
        # Events 0-2: the role chunk, then two content words; the fault hits before event 3.
        await r.primary.set_fault(kind=kind, after_events=3, count=1)
        sent = first_words(reply_text(PROMPT, PRIMARY_WORDS), 2)
        yield r, sent, lambda: int(r.primary.stats()["requests"])


@pytest.mark.parametrize("how", ["drop", "stall", "no_terminal_marker"])
async def test_committed_stream_failure_ends_with_one_error_event(tmp_path: Path, how: str) -> None:
    async with committed_failure(tmp_path, how) as (r, sent, primary_requests):
        before = await r.scrape()
        status, headers, payloads = await raw_stream(r)
        assert primary_requests() == 1  # committed: no retry ...
        assert r.backup.stats()["requests"] == 0  # ... and no failover
        after = await r.scrape()
    assert status == 200
    assert headers["x-cb-provider"] == "primary"
    validate_payloads(payloads)
    *chunks, last = payloads
    error = orjson.loads(last)
    assert set(error) == {"error"}, "the stream must end with exactly one in-band error"
    assert error["error"]["message"]
    assert "[DONE]" not in payloads  # never a silent, complete-looking end
    assert not any("error" in orjson.loads(p) for p in chunks)
    assert content_of(chunks) == sent  # what arrived before the failure, once
    calls = "cb_proxy_upstream_calls_total"
    for outcome, expected in (("failure", 1), ("success", 0)):
        delta = after.total(calls, upstream="primary", outcome=outcome) - before.total(
            calls, upstream="primary", outcome=outcome
        )
        assert delta == expected, outcome
    assert after.total("cb_proxy_retries_total") == 0


async def test_sdk_sees_a_mid_stream_drop_as_an_api_error_after_the_content(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="cut_stream", after_events=3, count=1)
        stream = await r.sdk.chat.completions.create(model=MODEL, messages=CHAT, stream=True)
        received: list[str] = []

        async def read_all() -> None:
            async for chunk in stream:
                received.extend(c.delta.content or "" for c in chunk.choices)

        with pytest.raises(openai.APIError) as caught:
            await read_all()
        assert r.backup.stats()["requests"] == 0
    assert "".join(received) == first_words(reply_text(PROMPT, PRIMARY_WORDS), 2)
    assert caught.value.message


# -- rate limits ------------------------------------------------------------------------------


async def test_rate_limit_storm_gates_the_primary_then_429_with_the_smallest_retry_after(
    tmp_path: Path,
) -> None:
    gate = ("primary", MODEL)
    async with rig(tmp_path) as r:
        gates = r.proxy.state.gates
        # Retry-After 5 s is above max_retry_wait (3 s): no retry, the gate closes, fail over.
        await r.primary.set_fault(kind="rate_limit", retry_after="5")
        headers, _ = await chat(r)
        assert headers["x-cb-provider"] == "backup"
        assert headers["x-cb-attempts"] == "2"
        assert r.primary.stats()["requests"] == 1
        assert not gates.is_open(gate)
        for _ in range(3):  # while the gate is closed the primary is skipped without I/O
            headers, body = await chat(r)
            assert headers["x-cb-provider"] == "backup"
            assert headers["x-cb-fallback"] == "true"
            assert body["circuit_breaker"]["attempts"] == 1
        assert r.primary.stats()["requests"] == 1
        # Now the backup is rate-limited too, for longer: every candidate is rate limited.
        await r.backup.set_fault(kind="rate_limit", retry_after="8")
        reopens = gates.reopens_at(gate)
        assert reopens is not None
        started = time.monotonic()
        err = await failing_chat(r)
        finished = time.monotonic()
        err_again = await failing_chat(r)  # both gates closed: no upstream I/O at all
        assert r.primary.stats()["requests"] == 1
        assert r.backup.stats()["requests"] == 5
        breaker = r.proxy.state.breaker("primary")
        assert breaker.state is State.CLOSED  # a 429 is not a failure
        scrape = await r.scrape()
    for e in (err, err_again):
        assert isinstance(e, openai.RateLimitError)
        validate("ErrorResponse", e.response.json())
        wait_ms = int(e.response.headers["retry-after-ms"])
        assert wait_ms <= (reopens - started) * 1000 + 1  # the primary's gate: the smallest
        assert int(e.response.headers["retry-after"]) == math.ceil(wait_ms / 1000)
    assert int(err.response.headers["retry-after-ms"]) >= (reopens - finished) * 1000
    calls = "cb_proxy_upstream_calls_total"
    assert scrape.total(calls, upstream="primary", outcome="rate_limited") == 1
    assert scrape.total(calls, upstream="primary", outcome="failure") == 0
    assert scrape.total(calls, upstream="backup", outcome="rate_limited") == 1
    rejections = "cb_proxy_rejections_total"
    assert scrape.total(rejections, upstream="primary", reason="rate_limited") == 5
    assert scrape.total(rejections, upstream="backup", reason="rate_limited") == 1
    assert scrape.total("circuit_breaker_transitions_total") == 0


async def test_short_rate_limit_is_retried_once_on_the_same_deployment(tmp_path: Path) -> None:
    """docs/breaker.md: a 429 whose Retry-After is at most max_retry_wait is retried once."""
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="rate_limit", retry_after="1", count=1)
        headers, body = await chat(r)
        assert r.backup.stats()["requests"] == 0, "the 429 failed over instead of a retry"
        assert r.primary.stats()["requests"] == 2
        scrape = await r.scrape()
    assert headers["x-cb-provider"] == "primary"
    assert headers["x-cb-attempts"] == "2"
    assert headers["x-cb-fallback"] == "false"
    assert body["circuit_breaker"]["attempts"] == 2
    assert scrape.total("cb_proxy_retries_total", upstream="primary") == 1


async def test_quota_exhausted_is_a_failure_and_fails_over(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="quota")
        for served in (1, 2):
            headers, _ = await chat(r)
            assert headers["x-cb-provider"] == "backup"
            assert headers["x-cb-attempts"] == "2"
            # Not a rate limit: no gate, so the next request tries the primary again.
            assert r.primary.stats()["requests"] == served
        assert r.proxy.state.gates.is_open(("primary", MODEL))
        assert r.proxy.state.breaker("primary").get_metrics()["consecutive_failures"] == 2
        scrape = await r.scrape()
    calls = "cb_proxy_upstream_calls_total"
    assert scrape.total(calls, upstream="primary", outcome="failure") == 2
    assert scrape.total(calls, upstream="primary", outcome="rate_limited") == 0
    assert scrape.total("cb_proxy_retries_total") == 0  # no waiting fixes an empty account


# -- same-deployment retries -----------------------------------------------------------------


async def test_transient_503_is_retried_on_the_same_deployment(tmp_path: Path) -> None:
    async with rig(tmp_path) as r:
        await r.primary.set_fault(kind="status", status=503, count=1)
        headers, body = await chat(r)
        assert r.primary.stats()["requests"] == 2
        assert r.backup.stats()["requests"] == 0
        scrape = await r.scrape()
    assert headers["x-cb-provider"] == "primary"
    assert headers["x-cb-attempts"] == "2"
    assert headers["x-cb-fallback"] == "false"
    assert body["circuit_breaker"]["fallback_used"] is False
    assert body["choices"][0]["message"]["content"] == reply_text(PROMPT, PRIMARY_WORDS)
    assert scrape.total("cb_proxy_retries_total", upstream="primary") == 1
    calls = "cb_proxy_upstream_calls_total"
    assert scrape.total(calls, upstream="primary", outcome="failure") == 1
    assert scrape.total(calls, upstream="primary", outcome="success") == 1


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_timeout_is_not_retried_on_the_same_deployment(tmp_path: Path, stream: bool) -> None:
    async with rig(tmp_path, first_token=0.5) as r:
        if stream:  # headers and the role chunk, then nothing: no first content event
            await r.primary.set_fault(kind="stall_stream", after_events=1, count=1)
            status, headers, payloads = await raw_stream(r)
            assert status == 200
            assert content_of(payloads) == reply_text(PROMPT, BACKUP_WORDS)
        else:
            await r.primary.set_fault(kind="stall", count=1)
            headers, _ = await chat(r)
        assert r.primary.stats()["requests"] == 1
        assert r.backup.stats()["requests"] == 1
        await r.primary.wait_cancelled(1)  # the timed-out call was abandoned upstream too
        scrape = await r.scrape()
    assert headers["x-cb-provider"] == "backup"
    assert headers["x-cb-attempts"] == "2"
    assert scrape.total("cb_proxy_retries_total") == 0
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="failure") == 1


# -- monitor-only mode ------------------------------------------------------------------------


async def test_monitor_only_passes_everything_and_counts_would_block(tmp_path: Path) -> None:
    requests = 5
    async with rig(tmp_path, environ={"CIRCUIT_BREAKER_ENABLED": "false"}) as r:
        await r.primary.set_fault(kind="status", status=503)
        for _ in range(requests):
            headers, _ = await chat(r)
            assert headers["x-cb-provider"] == "backup"  # failover still works per request
        # Never blocked: each request tried the primary and retried it once.
        assert r.primary.stats()["requests"] == 2 * requests
        scrape = await r.scrape()
        deployment = r.proxy.model_breaker("primary", MODEL).get_metrics()
    # The model's shadow breaker opened (a 503 is the model's failure), not the provider's.
    deployment_state = "circuit_breaker_deployment_state"
    assert scrape.total(deployment_state, upstream="primary", model=MODEL) == 2
    assert scrape.total("circuit_breaker_state", upstream="primary") == 0
    # The shadow opened on the 3rd failure (the 2nd request's first attempt); every later
    # attempt would have been blocked: the 2nd request's retry, then 2 per request.
    would_block = 1 + 2 * (requests - 2)
    assert deployment["would_block"] == would_block
    assert scrape.total("circuit_breaker_would_block_total", upstream="primary") == 0
    assert scrape.total("circuit_breaker_would_block_total", upstream="backup") == 0
    assert scrape.total("cb_proxy_rejections_total") == 0


# -- the trip point under a race --------------------------------------------------------------


async def test_fifty_simultaneous_failures_open_the_breaker_exactly_once(tmp_path: Path) -> None:
    clients = 50
    # Every reply's headers go out at once, the bodies only on release(): all 50 calls
    # are in flight when their failures land together.
    reply = RawReply(
        status=503,
        headers={"Content-Type": "application/json"},
        chunks=[orjson.dumps({"error": {"message": "overloaded", "type": "server_error"}})],
        hold_before=0,
    )
    async with RawStreamServer(reply) as raw, rig(tmp_path, primary_url=raw.url) as r:
        calls = [asyncio.create_task(chat(r)) for _ in range(clients)]
        await raw.wait_requests(clients)
        raw.release()
        responses = await asyncio.gather(*calls)
        # Only the retries of the failures that came before the trip can reach the primary.
        assert clients <= len(raw.requests) <= clients + THRESHOLD - 1
        scrape = await r.scrape()
    assert all(headers["x-cb-provider"] == "backup" for headers, _ in responses)
    transitions = "circuit_breaker_deployment_transitions_total"
    opened = scrape.total(
        transitions, upstream="primary", model=MODEL, from_state="closed", to_state="open"
    )
    assert opened == 1
    assert scrape.total(transitions) == 1
    assert scrape.total("circuit_breaker_transitions_total") == 0  # the transport answered
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="failure") == (
        len(raw.requests)
    )


# -- client disconnects -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "fault",
    [
        {"kind": "stall"},
        {"kind": "slow_first_token", "ms": 30_000},
        {"kind": "stall_stream", "after_events": 3},
    ],
    ids=["before-headers", "before-first-token", "mid-stream"],
)
async def test_client_disconnect_cancels_the_upstream_call_and_is_not_a_failure(
    tmp_path: Path, fault: dict[str, Any]
) -> None:
    mid_stream = fault["kind"] == "stall_stream"
    async with rig(tmp_path, first_token=15, idle=15) as r:
        await r.primary.set_fault(fault)
        body = {"model": MODEL, "messages": CHAT, "stream": fault["kind"] != "stall"}
        async with aiohttp.ClientSession() as session:
            if mid_stream:
                resp = await session.post(r.proxy.base_url + "/chat/completions", json=body)
                assert resp.status == 200
                first = reply_text(PROMPT, PRIMARY_WORDS).split(" ")[0]
                # The proxy holds the stream until the first content event: wait for it.
                await resp.content.readuntil(f'"content":"{first}"'.encode())
                resp.close()  # hang up while the upstream is still streaming
            else:
                call = asyncio.create_task(
                    session.post(r.proxy.base_url + "/chat/completions", json=body)
                )
                await r.primary.wait_in_flight(1)
                call.cancel()  # hang up before any response
                with pytest.raises(asyncio.CancelledError):
                    await call
        await r.primary.wait_cancelled(1)
        breaker = r.proxy.state.breaker("primary")
        # docs/breaker.md: a client disconnect is an 'ignored' outcome, never a failure.
        await settle(r, lambda: breaker.get_metrics()["reports"]["ignored"] == 1)
        reports = breaker.get_metrics()["reports"]
        assert reports["failure"] == 0
        assert reports["success"] == 0
        assert r.backup.stats()["requests"] == 0  # nobody to fail over for
        scrape = await r.scrape()
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="failure") == 0
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="ignored") == 1
