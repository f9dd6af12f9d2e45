"""Regression tests for the review's findings on keys, failover and retry accounting.

Each test stands for one finding of the hardening review and fails on the code
before it (except the quick-close resend, which pins the side of the resend
rule that must not change): keys from the environment (whitespace, CR/LF, echoes of the key,
``Settings`` repr), malformed 2xx replies from translated upstreams, the
keep-alive resend rule (Go's: only a replayable request), the retry budget held
through the retried attempt, redirects as failures, the request-wide deadline and
the rounding of a relayed Retry-After. The stream findings are in ``test_hardening_streams.py``.

Everything runs on 127.0.0.1 port 0 in the test's event loop: the proxy through
``tests.harness``, upstreams from ``tests.fakes.upstream`` (or a per-connection
script on the shared raw server, ``tests.fakes.raw``, where the test must control
the connection). Nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import aiohttp
import openai
import orjson
import pytest
from aiohttp import web
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

import proxy.server.forward as forward
from proxy.config.check import load_rules
from proxy.config.settings import Settings
from proxy.core.breaker import State
from proxy.core.candidates import Candidate
from proxy.core.errors import UpstreamError
from proxy.core.outcome import Outcome
from proxy.core.prefs import NO_PREFS
from proxy.core.router import plan_route
from proxy.providers.base import Endpoint
from proxy.server.metrics import Metrics
from proxy.server.state import ProxyState, provider_keys
from proxy.upstream.client import UpstreamPool, _request_head
from proxy.upstream.errors import Disconnected
from tests.fakes.raw import Handler, Peer, RawUpstream, ok
from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.harness import PRIMARY_BACKUP_MODELS, ProxyHandle, running_proxy, write_rules

KEY = "sk-hardening-SECRET-0123456789"
CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
THRESHOLD = 3  # consecutive failures that open the primary's breaker
JSON_HEADERS = {"Content-Type": "application/json"}
WAIT = 10.0  # bound on anything a test awaits that should come at once
CHAT_PATH = "/v1/chat/completions"

RULES = (
    """
version: 1
providers:
  primary:
    type: {ptype}
    base_url: {primary}
    api_key_env: PRIMARY_KEY
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
    breaker: {{failure_threshold: {threshold}, min_throughput: 1000, open_seconds: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 1000, open_seconds: 30}}
"""
    + PRIMARY_BACKUP_MODELS
)


@dataclass
class Rig:
    proxy: ProxyHandle
    backup: RunningMock
    sdk: AsyncOpenAI


@asynccontextmanager
async def rig(
    tmp_path: Path,
    primary_url: str,
    *,
    ptype: str = "openai",
    environ: Mapping[str, str] | None = None,
) -> AsyncIterator[Rig]:
    """The proxy in front of ``primary_url`` (of format ``ptype``) and a healthy OpenAI backup."""
    async with running_mock("openai", name="backup") as backup:
        base = primary_url + "/v1" if ptype == "openai" else primary_url
        text = RULES.format(ptype=ptype, primary=base, backup=backup.url, threshold=THRESHOLD)
        path = write_rules(tmp_path, text)
        env = {"PRIMARY_KEY": KEY} if environ is None else dict(environ)
        async with (
            running_proxy(path, environ=env) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0) as sdk,
        ):
            yield Rig(proxy, backup, sdk)


def json_reply(status: int, body: Any, headers: Mapping[str, str] | None = None) -> RawReply:
    return RawReply(
        status=status, headers={**JSON_HEADERS, **(headers or {})}, chunks=[orjson.dumps(body)]
    )


def reports(proxy: ProxyHandle, provider: str) -> dict[str, int]:
    result: dict[str, int] = proxy.state.breaker(provider).get_metrics()["reports"]
    return result


def model_reports(proxy: ProxyHandle, provider: str, model: str) -> dict[str, int]:
    """The reports of ``model@provider``'s deployment breaker (docs/breaker.md, 'Keys')."""
    result: dict[str, int] = proxy.model_breaker(provider, model).get_metrics()["reports"]
    return result


# -- 1. provider keys from the environment ---------------------------------------------------


@pytest.mark.parametrize("value", [f"{KEY}\n", f"  {KEY}\r\n"], ids=["lf", "spaces-crlf"])
async def test_a_key_with_a_trailing_newline_is_stripped_and_accepted(
    tmp_path: Path, value: str
) -> None:
    """A Secret made with ``echo`` ends in a newline: the key must still work as is."""
    async with running_mock("openai", name="primary", require_key=KEY) as primary:
        async with rig(tmp_path, primary.url, environ={"PRIMARY_KEY": value}) as r:
            raw = await r.sdk.chat.completions.with_raw_response.create(model="solo", messages=CHAT)
            assert raw.parse().choices[0].message.content
            assert raw.headers["x-cb-provider"] == "primary"
            assert r.proxy.state.keys["primary"] == KEY
        [seen] = primary.state.stats.history
        assert seen["credential"] == f"Bearer {KEY}"


@pytest.mark.parametrize(
    "bad", [f"{KEY}\r\nX-Evil: 1", f"sk-a\nb-{KEY}", f"{KEY}\x00z"], ids=["crlf", "lf", "nul"]
)
async def test_a_key_with_control_characters_inside_is_refused_and_never_logged(
    tmp_path: Path, bad: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    async with RawStreamServer(json_reply(500, {"never": "asked"})) as primary:
        async with rig(tmp_path, primary.url, environ={"PRIMARY_KEY": bad}) as r:
            # Treated as no key at all: the keyed primary is skipped, the backup serves.
            assert r.proxy.state.keys["primary"] is None
            raw = await r.sdk.chat.completions.with_raw_response.create(model="pair", messages=CHAT)
            assert raw.headers["x-cb-provider"] == "backup"
            assert raw.headers["x-cb-attempts"] == "1"
            with pytest.raises(openai.APIStatusError) as caught:
                await r.sdk.chat.completions.create(model="solo", messages=CHAT)
            assert caught.value.status_code == 503  # no upstream configured, not a 500
        assert primary.requests == []  # nothing went out with the injected header
    refusals = [
        rec
        for rec in caplog.records
        if rec.levelno >= logging.ERROR and "PRIMARY_KEY" in rec.getMessage()
    ]
    assert refusals, "an error in the log must name the variable that was refused"
    for secret in (KEY, "sk-a", "X-Evil"):
        assert secret not in caplog.text


def test_provider_keys_strip_whitespace_and_refuse_what_a_header_cannot_carry(
    tmp_path: Path,
) -> None:
    rules = load_rules(
        write_rules(
            tmp_path,
            """
version: 1
providers:
  a: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: A}
  b: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: B}
  c: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: C}
  d: {type: openai, base_url: "http://127.0.0.1:9/v1", api_key_env: D}
  e: {type: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  m: {deployments: [{provider: a}, {provider: b}, {provider: c}, {provider: d}, {provider: e}]}
""",
        )
    )
    environ = {"A": "\tsk-a \n", "B": "sk-\r\nb", "C": "sk-cé", "D": " \n "}
    assert provider_keys(rules, environ) == {
        "a": "sk-a",
        "b": None,
        "c": None,
        "d": None,
        "e": None,
    }


def test_a_header_value_with_cr_lf_or_nul_is_refused_without_echoing_it() -> None:
    for value in (f"Bearer {KEY}\r\nX-Evil: 1", f"Bearer {KEY}\n", f"Bearer {KEY}\x00"):
        with pytest.raises(ValueError, match="authorization") as caught:
            _request_head("POST", "/v1/x", "up.test", {"authorization": value}, b"{}")
        assert KEY not in str(caught.value)


def test_framing_headers_from_the_caller_are_not_sent_twice() -> None:
    headers = {"Host": "evil.test", "content-length": "999", "Transfer-Encoding": "chunked"}
    head = _request_head("POST", "/v1/x", "up.test", {**headers, "x-ok": "1"}, b"{}").decode()
    lines = head.split("\r\n")
    assert lines[0] == "POST /v1/x HTTP/1.1"
    assert [line for line in lines if line.lower().startswith("host:")] == ["Host: up.test"]
    assert [line for line in lines if line.lower().startswith("content-length")] == [
        "Content-Length: 2"
    ]
    assert not any(line.lower().startswith("transfer-encoding") for line in lines)
    assert "x-ok: 1" in lines


@pytest.mark.parametrize("status", [401, 403])
async def test_upstream_refusing_the_proxy_key_is_not_blamed_on_the_client(
    tmp_path: Path, status: int, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {
        "error": {
            "message": f"Incorrect API key provided: {KEY}.",
            "type": "invalid_request_error",
            "param": None,
            "code": "invalid_api_key",
        }
    }
    async with RawStreamServer(json_reply(status, echo)) as primary:
        async with rig(tmp_path, primary.url) as r:
            with pytest.raises(openai.APIStatusError) as caught:
                await r.sdk.chat.completions.create(model="solo", messages=CHAT)
            # With a backup, the proxy's bad key on one upstream is just that upstream's failure.
            raw = await r.sdk.chat.completions.with_raw_response.create(model="pair", messages=CHAT)
            assert raw.headers["x-cb-provider"] == "backup"
            assert reports(r.proxy, "primary")["failure"] == 2
        assert [req.headers["authorization"] for req in primary.requests] == [f"Bearer {KEY}"] * 2
    err = caught.value
    assert err.status_code == 502  # the proxy's configuration fault, not the client's 401/403
    body = err.response.json()
    assert body["error"]["code"] == "upstream_auth_failed"
    assert "refused the proxy's credentials" in body["error"]["message"]
    assert KEY not in err.response.text
    assert KEY not in str(dict(err.response.headers))
    assert KEY not in caplog.text


async def test_an_upstream_error_echoing_the_proxy_key_is_relayed_redacted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    echo = {
        "error": {
            "message": f"Malformed header 'Authorization: Bearer {KEY}'",
            "type": "invalid_request_error",
            "param": None,
            "code": None,
        }
    }
    async with RawStreamServer(json_reply(400, echo)) as primary, rig(tmp_path, primary.url) as r:
        with pytest.raises(openai.BadRequestError) as caught:
            await r.sdk.chat.completions.create(model="pair", messages=CHAT)
        assert r.backup.stats()["requests"] == 0  # a caller fault still ends the chain
    assert KEY not in caught.value.response.text
    assert caught.value.response.json()["error"]["message"] == (
        "Malformed header 'Authorization: Bearer [redacted]'"
    )
    assert KEY not in caplog.text


def test_settings_repr_holds_neither_the_admin_token_nor_the_environment() -> None:
    settings = Settings(admin_token="admin-TOKEN-42", environ={"OPENAI_API_KEY": KEY})
    for text in (repr(settings), str(settings)):
        assert "admin-TOKEN-42" not in text
        assert KEY not in text
        assert "OPENAI_API_KEY" not in text
    assert "rules_path=" in repr(settings)  # still a useful repr


# -- 2. malformed 2xx replies from translated upstreams ---------------------------------------


def anthropic_event(event: dict[str, Any]) -> bytes:
    return b"event: " + str(event["type"]).encode() + b"\ndata: " + orjson.dumps(event) + b"\n\n"


def gemini_event(event: dict[str, Any]) -> bytes:
    return b"data: " + orjson.dumps(event) + b"\r\n\r\n"


ANTHROPIC_START = anthropic_event(
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "m",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    }
) + anthropic_event(
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}}
)
ANTHROPIC_TEXT = anthropic_event(
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "hi"}}
)
ANTHROPIC_BAD = anthropic_event({"type": "message_delta", "delta": 5, "usage": 5})
GEMINI_TEXT = gemini_event(
    {"candidates": [{"content": {"parts": [{"text": "hi"}], "role": "model"}}]}
)
GEMINI_BAD = gemini_event({"candidates": 5})

# (upstream format, stream, the malformed 2xx reply it sends)
MALFORMED = {
    "anthropic-stream": ("anthropic", True, RawReply(chunks=[ANTHROPIC_START + ANTHROPIC_BAD])),
    "anthropic-plain": (
        "anthropic",
        False,
        json_reply(200, {"id": "msg_1", "type": "message", "role": "assistant", "content": 5}),
    ),
    "gemini-stream": ("gemini", True, RawReply(chunks=[GEMINI_BAD])),
    "gemini-plain": ("gemini", False, json_reply(200, {"candidates": 5})),
}


@pytest.mark.parametrize("case", list(MALFORMED))
async def test_a_malformed_reply_before_commit_fails_over_and_counts_as_a_failure(
    tmp_path: Path, case: str
) -> None:
    ptype, stream, reply = MALFORMED[case]
    async with RawStreamServer(reply) as primary, rig(tmp_path, primary.url, ptype=ptype) as r:
        if stream:
            streamed = await r.sdk.chat.completions.with_raw_response.create(
                model="pair", messages=CHAT, stream=True
            )
            headers = streamed.headers
            pieces = [c.choices[0].delta.content or "" async for c in streamed.parse() if c.choices]
            text = "".join(pieces)
        else:
            plain = await r.sdk.chat.completions.with_raw_response.create(
                model="pair", messages=CHAT
            )
            headers = plain.headers
            text = plain.parse().choices[0].message.content or ""
        assert headers["x-cb-provider"] == "backup"
        assert headers["x-cb-attempts"] == "2"
        assert text  # the backup's whole answer
        assert len(primary.requests) == 1
        # A malformed body is the model's failure; the provider's transport answered.
        assert model_reports(r.proxy, "primary", "pair")["failure"] == 1
        assert model_reports(r.proxy, "primary", "pair")["success"] == 0
        assert reports(r.proxy, "primary")["failure"] == 0
        assert reports(r.proxy, "primary")["success"] == 1


@pytest.mark.parametrize(
    ("ptype", "good", "bad"),
    [
        ("anthropic", ANTHROPIC_START + ANTHROPIC_TEXT, ANTHROPIC_BAD),
        ("gemini", GEMINI_TEXT, GEMINI_BAD),
    ],
    ids=["anthropic", "gemini"],
)
async def test_a_malformed_event_after_commit_ends_with_one_error_event(
    tmp_path: Path, ptype: str, good: bytes, bad: bytes
) -> None:
    reply = RawReply(chunks=[good, bad], hold_before=1)
    async with RawStreamServer(reply) as primary, rig(tmp_path, primary.url, ptype=ptype) as r:
        body = {"model": "pair", "messages": CHAT, "stream": True}
        async with (
            aiohttp.ClientSession() as session,
            session.post(r.proxy.base_url + "/chat/completions", json=body) as resp,
        ):
            assert resp.status == 200
            assert resp.headers["x-cb-provider"] == "primary"
            seen = b""
            async with asyncio.timeout(WAIT):
                while b'"hi"' not in seen:  # committed: the first content reached the client
                    seen += await resp.content.readuntil(b"\n\n")
                primary.release()  # now the malformed event
                seen += await resp.content.read()  # the end of the body, not a hang
        # Committed: the backup is only asked to continue (docs/breaker.md, "Mid-stream
        # continuation"); its answer does not begin with "hi", so nothing of it is sent.
        assert r.backup.stats()["requests"] == 1
        # A malformed event is the model's failure (its deployment breaker); the provider's
        # transport answered (docs/breaker.md, "Keys").
        assert model_reports(r.proxy, "primary", "pair")["failure"] == 1
        assert model_reports(r.proxy, "primary", "pair")["success"] == 0
        assert reports(r.proxy, "primary")["failure"] == 0
        assert reports(r.proxy, "primary")["success"] == 1
    events = seen.decode().split("\n\n")
    assert events[-1] == ""
    payloads = [e.removeprefix("data: ") for e in events[:-1]]
    *chunks, last = payloads
    assert set(orjson.loads(last)) == {"error"}
    assert orjson.loads(last)["error"]["message"]
    assert "[DONE]" not in payloads
    assert not any("error" in orjson.loads(p) for p in chunks)


# -- 5. the keep-alive resend window ------------------------------------------------------------


COMPLETION = ok(
    b'{"id":"c","object":"chat.completion","choices":[]}', "Content-Type: application/json"
)


def keep_alive_then(second: str, drop: asyncio.Event | None = None) -> Handler:
    """Answers the first request with keep-alive; what it does with the second is ``second``.

    ``"race"``: on ``drop``, close the connection without reading the request in flight (the
    keep-alive race); ``"crash"``: read the whole request, then close without replying (it
    died working on it). Later connections answer one request each. The server records every
    request read in full, so a resend shows as a second copy.
    """
    dropped = asyncio.Event() if drop is None else drop  # "race" without one: never dropped

    async def handle(peer: Peer) -> None:
        if await peer.receive() is None:
            return
        await peer.send(COMPLETION)
        if peer.index == 0 and second == "crash":
            await peer.receive()  # the POST arrives whole and is worked on, then ...
        elif peer.index == 0:
            await dropped.wait()  # ... or is never read: either way, closed unanswered

    return handle


def bodies(up: RawUpstream) -> list[bytes]:
    return [request.body for request in up.requests]


async def test_a_quick_close_of_an_idle_connection_resends_only_a_replayable_request() -> None:
    """Go's rule (proxy.upstream.client.may_resend): the race is resent with an Idempotency-Key."""
    pool = UpstreamPool()
    try:
        drop = asyncio.Event()
        async with RawUpstream(keep_alive_then("race", drop)) as up:
            url = f"{up.url}{CHAT_PATH}"
            async with await pool.request("POST", url, {}, b"one", connect_timeout=2) as resp:
                assert resp.status == 200
                await resp.read()
            # Set, and in the same step send: the pooled connection still looks alive when
            # taken, and the server closes it unread. The request carries an Idempotency-Key,
            # so the pool sends it again, once, on a fresh connection.
            drop.set()
            key = {"Idempotency-Key": "req-2"}
            async with await pool.request("POST", url, key, b"two", connect_timeout=2) as resp:
                assert resp.status == 200
                await resp.read()
            assert bodies(up) == [b"one", b"two"]
            assert up.connections == 2
    finally:
        await pool.close()


async def test_a_quick_close_of_an_idle_connection_is_not_resent_without_a_key() -> None:
    """The bytes of a plain POST may have reached the upstream: a failure, never a second copy."""
    pool = UpstreamPool()
    try:
        drop = asyncio.Event()
        async with RawUpstream(keep_alive_then("race", drop)) as up:
            url = f"{up.url}{CHAT_PATH}"
            async with await pool.request("POST", url, {}, b"one", connect_timeout=2) as resp:
                await resp.read()
            drop.set()
            with pytest.raises(Disconnected):
                await pool.request("POST", url, {}, b"two", connect_timeout=2)
            assert up.connections == 1
    finally:
        await pool.close()


async def test_an_upstream_that_read_the_post_and_died_later_never_gets_it_twice() -> None:
    pool = UpstreamPool()
    try:
        async with RawUpstream(keep_alive_then("crash")) as up:
            url = f"{up.url}{CHAT_PATH}"
            async with await pool.request("POST", url, {}, b"one", connect_timeout=2) as resp:
                await resp.read()
            with pytest.raises(Disconnected):
                await pool.request("POST", url, {}, b"charge me once", connect_timeout=2)
            assert bodies(up) == [b"one", b"charge me once"]  # once, not resent
            assert up.connections == 1
    finally:
        await pool.close()


async def test_a_late_close_through_the_proxy_fails_over_without_a_resend(tmp_path: Path) -> None:
    async with RawUpstream(keep_alive_then("crash")) as up, rig(tmp_path, up.url) as r:
        # The first request leaves a keep-alive connection to the primary in the pool.
        first = await r.sdk.chat.completions.with_raw_response.create(model="solo", messages=CHAT)
        assert first.headers["x-cb-provider"] == "primary"
        raw = await r.sdk.chat.completions.with_raw_response.create(model="pair", messages=CHAT)
        assert raw.headers["x-cb-provider"] == "backup"
        assert len(up.requests) == 2  # the crashed POST reached the primary once
        assert up.connections == 1
        assert r.backup.stats()["requests"] == 1


# -- 6. the retry budget holds through the retried attempt ---------------------------------------

BUDGET_RULES = """
version: 1
providers:
  a: {type: openai, base_url: "http://127.0.0.1:9/v1",
      breaker: {failure_threshold: 100000, min_throughput: 100000}}
  b: {type: openai, base_url: "http://127.0.0.1:9/v1",
      breaker: {failure_threshold: 100000, min_throughput: 100000}}
models:
  m: {deployments: [{provider: a}, {provider: b}]}
defaults:
  strategy: cost_optimized
  retry: {max_attempts: 4, same_deployment_retries: 1, max_retry_wait: 3,
          backoff_ms: 1, max_backoff_ms: 2, budget_ratio: 0.2}
"""
WAVES = 10
WAVE_SIZE = 10
BUDGET_RATIO = 0.2
BUDGET_FLOOR = 3


class FakeAttempts:
    """The upstream call given to ``forward.serve(ex, attempt=...)``: each request's first try
    fails fast and transiently; its retry (or fallback) then runs upstream until ``release``.

    ``starts`` records, for each retry as it starts, the retries then running upstream and
    the budget in force (max(3, ratio * active requests)).
    """

    def __init__(self, state: ProxyState) -> None:
        self.state = state
        self.calls: dict[str, int] = {}
        self.running_retries = 0
        self.starts: list[tuple[int, float]] = []
        self.parked = 0
        self.release = asyncio.Event()
        self._changed = asyncio.Event()

    async def attempt(
        self,
        ex: forward.Exchange,
        cand: Candidate,
        index: int,
        permits: forward.Permits,
        *_: object,
    ) -> web.StreamResponse:
        ex.attempts += 1
        calls = self.calls[ex.request_id] = self.calls.get(ex.request_id, 0) + 1
        breaker, permit, model_breaker, model_permit = permits
        if calls == 1:
            breaker.record(permit, Outcome.SUCCESS)
            model_breaker.record(model_permit, Outcome.FAILURE)
            raise forward.AttemptFailed(UpstreamError("reset"), Outcome.FAILURE, transient=True)
        retry = index == 0
        if retry:
            self.running_retries += 1
            budget = max(BUDGET_FLOOR, BUDGET_RATIO * self.state.in_flight)
            self.starts.append((self.running_retries, budget))
        self.parked += 1
        self._changed.set()
        try:
            await self.release.wait()  # e.g. the retry now waits for its first token
        finally:
            if retry:
                self.running_retries -= 1
        breaker.record(permit, Outcome.SUCCESS)
        model_breaker.record(model_permit, Outcome.SUCCESS)
        return web.Response(status=200)

    async def wait_parked(self, n: int) -> None:
        async with asyncio.timeout(WAIT):
            while self.parked < n:
                self._changed.clear()
                await self._changed.wait()


@pytest.mark.parametrize("end", ["complete", "cancel"])
async def test_retries_running_upstream_never_exceed_the_budget(tmp_path: Path, end: str) -> None:
    rules = load_rules(write_rules(tmp_path, BUDGET_RULES))
    state = ProxyState(settings=Settings(rules_path=tmp_path), rules=rules, metrics=Metrics())
    fake = FakeAttempts(state)

    async def one(i: int) -> web.StreamResponse:
        state.in_flight += 1
        try:
            plan = plan_route(rules, "m", {}, NO_PREFS, state)
            ex = forward.Exchange(
                request=cast(web.Request, None),  # never read: the fake attempt answers
                state=state,
                rules=rules,
                endpoint=Endpoint.CHAT,
                body={"model": "m", "messages": CHAT},
                stream=False,
                plan=plan,
                request_id=str(i),
                started=0.0,
            )
            return await forward.serve(ex, attempt=fake.attempt)
        finally:
            state.in_flight -= 1

    tasks: list[asyncio.Task[web.StreamResponse]] = []
    try:
        # Waves of requests, each started once the previous wave's attempts are all running
        # upstream: a budget slot given back early would let every wave add more retries.
        for wave in range(WAVES):
            tasks += [asyncio.create_task(one(wave * WAVE_SIZE + i)) for i in range(WAVE_SIZE)]
            await fake.wait_parked((wave + 1) * WAVE_SIZE)
        assert fake.starts, "no request was retried: the test proves nothing"
        over = [(running, budget) for running, budget in fake.starts if running > budget]
        assert not over, f"retries running upstream exceeded the budget: {over}"
        assert max(running for running, _ in fake.starts) >= BUDGET_FLOOR  # the budget was used
        assert state.retries_in_flight == fake.running_retries
        if end == "complete":
            fake.release.set()
            responses = await asyncio.gather(*tasks)
            assert all(resp.status == 200 for resp in responses)
        else:  # clients gone while their retries run: every slot must come back
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    assert state.retries_in_flight == 0
    assert state.in_flight == 0


# -- 8. redirects are the upstream's failure ---------------------------------------------------


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_fails_over_and_opens_the_breaker_when_repeated(
    tmp_path: Path, status: int
) -> None:
    moved = RawReply(
        status=status,
        headers={"Location": "http://127.0.0.1:9/v1/chat/completions", "Content-Type": "text/html"},
        chunks=[b"<html>Moved</html>"],
    )
    requests = THRESHOLD + 2
    async with RawStreamServer(moved) as primary, rig(tmp_path, primary.url) as r:
        async with aiohttp.ClientSession() as session:
            for _ in range(requests):
                body = {"model": "pair", "messages": CHAT}
                async with session.post(
                    r.proxy.base_url + "/chat/completions", json=body, allow_redirects=False
                ) as resp:
                    assert resp.status == 200, await resp.text()
                    assert resp.headers["x-cb-provider"] == "backup"
                    assert "Location" not in resp.headers
            async with session.post(
                r.proxy.base_url + "/chat/completions",
                json={"model": "solo", "messages": CHAT},
                allow_redirects=False,
            ) as resp:
                solo_status = resp.status
                solo_body = await resp.json()
        # A redirect is the model's failure (the provider answered): pair@primary opens, the
        # primary's provider breaker counts each reply as a success and stays closed.
        assert r.proxy.model_breaker("primary", "pair").state is State.OPEN
        assert r.proxy.state.breaker("primary").state is State.CLOSED
        # A redirect is not retried, and once open the deployment is not contacted at all.
        assert len(primary.requests) == THRESHOLD + 1  # the pair requests, then solo's one
        assert model_reports(r.proxy, "primary", "pair")["failure"] == THRESHOLD
        assert model_reports(r.proxy, "primary", "solo")["failure"] == 1
        assert r.proxy.model_breaker("primary", "solo").state is State.CLOSED
        assert reports(r.proxy, "primary")["failure"] == 0
        assert reports(r.proxy, "primary")["success"] == THRESHOLD + 1
        assert r.backup.stats()["requests"] == requests
    # Alone, solo's own deployment (still closed: one model's outage never blocks the
    # provider's others) answers an upstream error: never a bare 3xx relayed as a caller fault.
    assert solo_status == 502
    assert "redirect" in solo_body["error"]["message"]


async def test_a_lone_redirecting_upstream_is_an_upstream_error(tmp_path: Path) -> None:
    moved = RawReply(
        status=302, headers={"Location": "http://127.0.0.1:9/elsewhere"}, chunks=[b"moved"]
    )
    async with RawStreamServer(moved) as primary, rig(tmp_path, primary.url) as r:
        with pytest.raises(openai.APIStatusError) as caught:
            await r.sdk.chat.completions.create(model="solo", messages=CHAT)
        assert model_reports(r.proxy, "primary", "solo")["failure"] == 1
        assert model_reports(r.proxy, "primary", "solo")["ignored"] == 0
        assert reports(r.proxy, "primary")["failure"] == 0  # the transport answered
    assert caught.value.status_code == 502
    assert "redirect" in caught.value.response.json()["error"]["message"]


# -- 10. the request-wide deadline bounds the sum of attempts -------------------------------------

DEADLINE_RULES = """
version: 1
providers:
  one:
    type: openai
    base_url: {one}/v1
    timeouts: {{connect: 1, first_token: 1, idle: 1, total: 1.5}}
  two:
    type: openai
    base_url: {two}/v1
    timeouts: {{connect: 1, first_token: 1, idle: 1, total: 1.5}}
models:
  m: {{deployments: [{{provider: one}}, {{provider: two}}]}}
defaults:
  strategy: cost_optimized
  retry: {{max_attempts: 4, same_deployment_retries: 1}}
"""
TOTAL = 1.5
FIRST_TOKEN = 1.0
# Two first-token timeouts back to back would take 2 s; the total deadline ends it at 1.5 s
# plus a watchdog tick. The margin absorbs a busy machine and never reaches 2 s.
DEADLINE_SLACK = 0.45


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "stream"])
async def test_the_total_deadline_bounds_all_attempts_together(
    tmp_path: Path, stream: bool
) -> None:
    async with (
        running_mock("openai", name="one") as one,
        running_mock("openai", name="two") as two,
    ):
        await one.set_fault(kind="stall")
        await two.set_fault(kind="stall")
        path = write_rules(tmp_path, DEADLINE_RULES.format(one=one.url, two=two.url))
        async with running_proxy(path) as proxy, aiohttp.ClientSession() as session:
            loop = asyncio.get_running_loop()
            body = {"model": "m", "messages": CHAT, "stream": stream}
            started = loop.time()
            async with session.post(proxy.base_url + "/chat/completions", json=body) as resp:
                status = resp.status
                error = await resp.json()
            elapsed = loop.time() - started
            # Both candidates were tried (the first timed out at its first-token limit).
            assert one.stats()["requests"] == 1
            assert two.stats()["requests"] == 1
            await two.wait_cancelled(1)
    assert status == 504
    assert error["error"]["code"] == "upstream_timeout"
    assert TOTAL <= elapsed < TOTAL + DEADLINE_SLACK < 2 * FIRST_TOKEN


# -- 11. a relayed Retry-After is rounded up ----------------------------------------------------


@pytest.mark.parametrize(
    ("header", "value", "seconds", "millis"),
    [
        ("retry-after-ms", "1400", "2", "1400"),
        ("retry-after-ms", "1001", "2", "1001"),
        ("retry-after-ms", "250", "1", "250"),
        ("retry-after", "1.2", "2", "1200"),
    ],
)
async def test_a_relayed_retry_after_is_rounded_up_with_the_milliseconds(
    tmp_path: Path, header: str, value: str, seconds: str, millis: str
) -> None:
    limited = {"error": {"message": "slow down", "type": "rate_limit_error", "code": None}}
    # No same-deployment retry (same_deployment_retries 0): the primary's 429 fails over; the
    # backup then fails too, not rate-limited, so the client gets the first candidate's error:
    # the primary's 429, relayed with its wait.
    async with (
        RawStreamServer(json_reply(429, limited, {header: value})) as primary,
        rig(tmp_path, primary.url) as r,
    ):
        await r.backup.set_fault(kind="status", status=500)
        with pytest.raises(openai.RateLimitError) as caught:
            await r.sdk.chat.completions.create(model="pair", messages=CHAT)
        assert len(primary.requests) == 1
        assert r.backup.stats()["requests"] == 1
    headers = caught.value.response.headers
    assert headers["retry-after"] == seconds
    assert headers["retry-after-ms"] == millis
    assert caught.value.response.json()["error"]["message"] == "slow down"


async def test_a_written_post_is_not_retried_on_the_same_deployment_either(
    tmp_path: Path,
) -> None:
    """The pool does not resend it, and the attempt loop's quick retry must not either."""
    retry_rules = """
version: 1
providers:
  primary: {{type: openai, base_url: "{primary}/v1",
            breaker: {{failure_threshold: 100, min_throughput: 1000}}}}
models:
  solo: {{provider: primary}}
defaults:
  retry: {{max_attempts: 4, same_deployment_retries: 2, max_retry_wait: 1,
           backoff_ms: 1, max_backoff_ms: 2}}
"""
    async with RawUpstream(keep_alive_then("crash")) as up:
        path = write_rules(tmp_path, retry_rules.format(primary=up.url))
        async with (
            running_proxy(path, environ={}) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="k", max_retries=0) as sdk,
        ):
            await sdk.chat.completions.create(model="solo", messages=CHAT)  # leaves a keep-alive
            with pytest.raises(openai.APIStatusError) as info:
                await sdk.chat.completions.create(model="solo", messages=CHAT)
            assert info.value.status_code == 502
            assert len(up.requests) == 2  # the crashed POST reached the upstream once
