"""The attempt loop: plan -> gate -> call -> relay -> record.

For each candidate of the RoutePlan, in order: build the upstream request with
the candidate's adapter, send it under per-phase deadlines, classify the
outcome, and either answer the client or move on. Invariants:

- Nothing reaches the client before the answer is chosen: a plain response is
  read whole; a stream is held until its first content event (the commit
  point), so every failure before that can still fail over.
- After the commit point there is no retry: an upstream failure becomes one
  in-band ``data: {"error": ...}`` event and the stream ends (never a silent,
  truncated 200).
- Caller faults (4xx other than auth, rate limits and quota) end the chain:
  the upstream's error goes back as is. A context-window error moves on only
  to a candidate with a larger context window.
- When every candidate failed, the client gets the first candidate's error;
  when every candidate was rate-limited, a 429 with the smallest Retry-After.

Deadlines are ``proxy.deadline`` guards moved forward per phase (first token,
then idle gaps, capped by the total): an attribute write, not a timer per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from proxy.breaker import CircuitBreaker, Permit
from proxy.deadline import Guard
from proxy.errors import (
    InvalidRequest,
    ProxyError,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamHTTPError,
    UpstreamTimeout,
)
from proxy.outcome import Outcome
from proxy.providers.base import (
    Endpoint,
    ErrorInfo,
    JSONDict,
    RequestAdapter,
    StreamError,
    StreamTranslator,
    UpstreamRequest,
    Usage,
)
from proxy.providers.openai import OpenAIStreamRelay, parse_usage
from proxy.ratelimit import gate_seconds
from proxy.router import Candidate, RoutePlan
from proxy.rules import RetryPolicy, RuleSet
from proxy.state import ProxyState
from proxy.upstream_http import (
    ConnectFailed,
    ConnectTimeout,
    Disconnected,
    PayloadError,
    Response,
    UpstreamPool,
)
from proxy.usage import estimate_tokens

LOG = logging.getLogger("cb_proxy.forward")

ERROR_BODY_LIMIT = 256 * 1024  # an upstream error body larger than this is cut
READ_CHUNK = 64 * 1024
# Upstream response headers worth relaying: clients read rate-limit and timing headers.
RELAYED_PREFIXES = ("x-ratelimit-", "openai-processing-ms", "openai-version")
RETRY_BUDGET_FLOOR = 3
# An OpenAI stream chunk carries ~150 bytes of JSON around a few characters of text;
# used only to estimate tokens when an upstream streams without reporting usage.
OPENAI_CHUNK_OVERHEAD_RATIO = 30
DEFAULT_RETRY_AFTER = 1.0
FORCED_OPEN_RETRY_AFTER = 60.0
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}


class _Phase:
    CONNECT = "connect"
    FIRST_TOKEN = "first_token"
    IDLE = "idle"
    TOTAL = "total"


@dataclass(slots=True)
class Exchange:
    """One client request being served."""

    request: web.Request
    state: ProxyState
    rules: RuleSet
    endpoint: Endpoint
    body: JSONDict
    stream: bool
    plan: RoutePlan
    request_id: str
    started: float
    include_usage: bool = False
    attempts: int = 0
    upstream_seconds: float = 0.0
    usage_estimated: bool = False
    _route_header: str = ""

    def route_header(self) -> str:
        """``x-cb-route``, built once per request (the header and the body both carry it)."""
        if not self._route_header:
            self._route_header = self.plan.header()
        return self._route_header


class AttemptFailed(Exception):
    """An attempt that ended before anything reached the client."""

    def __init__(
        self,
        error: ProxyError,
        outcome: Outcome,
        info: ErrorInfo | None = None,
        *,
        transient: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome
        self.info = info
        self.transient = transient
        self.context_window: int | None = None  # of the candidate that failed


class _Attempt:
    """One upstream call: its candidate, breaker permit and timings."""

    __slots__ = ("_done", "breaker", "cand", "index", "permit", "started", "ttft")

    def __init__(
        self, cand: Candidate, index: int, breaker: CircuitBreaker, permit: Permit, started: float
    ) -> None:
        self.cand = cand
        self.index = index
        self.breaker = breaker
        self.permit = permit
        self.started = started
        self.ttft: float | None = None
        self._done = False

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.monotonic() - self.started

    def seconds(self, ex: Exchange) -> float:
        elapsed = time.monotonic() - self.started
        if not self._done:
            self._done = True
            ex.upstream_seconds += elapsed
        return elapsed

    def finish(self, ex: Exchange, outcome: Outcome, retry_after: float | None = None) -> None:
        """Record the outcome once: breaker, metrics, time spent upstream."""
        if self._done:
            return
        elapsed = self.seconds(ex)
        latency = self.ttft if self.ttft is not None else elapsed
        self.breaker.record(self.permit, outcome, latency * 1000.0, retry_after)
        state = ex.state
        state.record_attempt(
            self.cand.provider, self.cand.deployment.model, outcome.value, elapsed, self.ttft
        )
        if self.index > 0 and outcome is Outcome.SUCCESS:
            primary = ex.plan.candidates[0].provider.name
            state.metrics.fallbacks.labels(primary, self.cand.provider.name).inc()


def _client_error(info: ErrorInfo) -> ProxyError:
    headers: dict[str, str] = {}
    if info.retry_after is not None:
        # Rounded up: a client told to come back sooner than the upstream asked just fails again.
        headers.update(_retry_headers(info.retry_after))
    return UpstreamHTTPError(info.status, info.body, headers=headers)


def _base_headers(ex: Exchange, attempt: _Attempt) -> dict[str, str]:
    cand = attempt.cand
    dep = cand.deployment
    return {
        "x-request-id": ex.request_id,
        "x-cb-provider": cand.provider.name,
        "x-cb-model": dep.upstream_model,
        "x-cb-upstream": dep.key,
        "x-cb-attempts": str(ex.attempts),
        "x-cb-fallback": "true" if attempt.index > 0 else "false",
        "x-cb-breaker-state": attempt.breaker.state.value,
        "x-cb-route": ex.route_header(),
    }


def _metadata(ex: Exchange, attempt: _Attempt, cost: float) -> JSONDict:
    cand = attempt.cand
    return {
        "provider": cand.provider.name,
        "model": cand.deployment.upstream_model,
        "upstream": cand.deployment.key,
        "fallback_used": attempt.index > 0,
        "attempts": ex.attempts,
        "breaker_state": attempt.breaker.state.value,
        "cost_usd": cost,
        "usage_estimated": ex.usage_estimated,
        "route": ex.route_header(),
    }


def _relayed(upstream: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower().startswith(RELAYED_PREFIXES)}


async def serve(ex: Exchange) -> web.StreamResponse:
    """Walk the plan; return the response (a stream is already written when returned)."""
    plan = ex.plan
    if not plan.candidates:
        raise _nothing_to_try(ex)
    state = ex.state
    policy = ex.rules.defaults.retry
    loop = asyncio.get_running_loop()
    deadline = loop.time() + plan.candidates[0].provider.timeouts.total
    errors: list[AttemptFailed] = []
    open_waits: list[float] = []  # candidates skipped because their breaker is open
    gate_waits: list[float] = []  # candidates skipped because their rate-limit gate is closed
    for index, cand in enumerate(plan.candidates):
        if ex.attempts >= policy.max_attempts or loop.time() >= deadline:
            break
        if _too_small_after(errors, cand):
            continue
        gate_key = (cand.provider.name, cand.deployment.upstream_model)
        if not state.gates.is_open(gate_key):
            gate_waits.append(state.gates.retry_after(gate_key))
            state.metrics.rejections.labels(cand.provider.name, "rate_limited").inc()
            continue
        breaker = state.breaker(cand.provider.name)
        retries = 0
        retried: AttemptFailed | None = None  # the failure whose retry is pending
        holding = False  # this request holds a retry-budget slot: from the backoff to the end
        try:
            while True:
                permit = breaker.permit()
                if permit is None:
                    if holding:
                        state.retries_in_flight -= 1
                        holding = False
                    state.metrics.rejections.labels(cand.provider.name, "breaker_open").inc()
                    if retried is not None:
                        errors.append(retried)  # it was tried and failed: its error still counts
                        break
                    wait = breaker.retry_after_seconds()
                    # A forced-open breaker never reopens by itself: do not invite quick retries.
                    open_waits.append(FORCED_OPEN_RETRY_AFTER if wait is None else wait)
                    break
                try:
                    return await _attempt(ex, cand, index, breaker, permit, deadline)
                except AttemptFailed as failed:
                    if holding:  # the retried attempt is over: its budget slot returns
                        state.retries_in_flight -= 1
                        holding = False
                    failed.context_window = cand.context_window
                    LOG.info(
                        "request %s attempt %d on %s failed (%s): %s",
                        ex.request_id,
                        ex.attempts,
                        cand.deployment.key,
                        failed.outcome.value,
                        failed.error.message,
                    )
                    if failed.outcome is Outcome.IGNORED and not (
                        failed.info is not None and failed.info.context_window
                    ):
                        raise failed.error from None
                    if failed.outcome is Outcome.RATE_LIMITED:
                        retry_after = failed.info.retry_after if failed.info else None
                        state.gates.close(gate_key, gate_seconds(retry_after))
                    # A failed probe is not retried: the breaker has just learnt the upstream is
                    # still down, and the client's time is better spent on the next candidate.
                    wait = None if permit.probe else _retry_wait(failed, policy, state)
                    if (
                        wait is not None
                        and retries < policy.same_deployment_retries
                        and ex.attempts < policy.max_attempts
                        and loop.time() + wait < deadline
                        and state.retries_in_flight < _retry_budget(state, policy)
                    ):
                        retries += 1
                        retried = failed
                        state.metrics.retries.labels(cand.provider.name).inc()
                        state.retries_in_flight += 1
                        holding = True
                        await asyncio.sleep(wait)  # backoff before the retry, not a test wait
                        continue
                    errors.append(failed)
                    break
        finally:
            if holding:  # a retry that succeeded, or a request cancelled meanwhile
                state.retries_in_flight -= 1
    raise _final_error(errors, open_waits, gate_waits)


def _too_small_after(errors: list[AttemptFailed], cand: Candidate) -> bool:
    """After a context-window error, only a candidate with a larger window can help."""
    if not errors or errors[-1].info is None or not errors[-1].info.context_window:
        return False
    return (cand.context_window or 0) <= (errors[-1].context_window or 0)


def _retry_budget(state: ProxyState, policy: RetryPolicy) -> float:
    """Retries in flight never exceed max(3, budget_ratio of active requests) (breaker.md)."""
    return max(RETRY_BUDGET_FLOOR, policy.budget_ratio * state.in_flight)


def _retry_wait(failed: AttemptFailed, policy: RetryPolicy, state: ProxyState) -> float | None:
    """Seconds to wait before retrying the same deployment, or None for no retry."""
    retry_after = failed.info.retry_after if failed.info is not None else None
    if failed.outcome is Outcome.RATE_LIMITED:
        # breaker.md: a 429 asking for at most max_retry_wait is retried once on the same
        # deployment, keeping the model the client asked for; otherwise fail over at once.
        if retry_after is not None and retry_after <= policy.max_retry_wait:
            return retry_after
        return None
    if not failed.transient:
        return None  # timeouts and non-transient failures move on to the next candidate
    if retry_after is not None:
        return retry_after if retry_after <= policy.max_retry_wait else None
    # Full jitter (AWS architecture blog, "Exponential Backoff And Jitter").
    return state.rng.uniform(policy.backoff_ms, policy.max_backoff_ms) / 1000.0


def _nothing_to_try(ex: Exchange) -> ProxyError:
    plan = ex.plan
    reasons = "; ".join(f"{r.deployment}: {r.reason}" for r in plan.rejected) or "no deployments"
    if plan.rejected and all(r.reason.startswith("no key") for r in plan.rejected):
        return ServiceUnavailable(f"no upstream for '{plan.requested}' is configured: {reasons}")
    return InvalidRequest(
        f"no upstream can serve '{plan.requested}': {reasons}", param="model", code="no_candidates"
    )


def _final_error(
    errors: list[AttemptFailed], open_waits: list[float], gate_waits: list[float]
) -> ProxyError:
    if errors and not all(e.outcome is Outcome.RATE_LIMITED for e in errors):
        return errors[0].error
    if errors or gate_waits:
        waits = [e.info.retry_after for e in errors if e.info and e.info.retry_after is not None]
        waits.extend(gate_waits)
        if not open_waits:
            wait = min(waits) if waits else DEFAULT_RETRY_AFTER
            return RateLimited(
                "every upstream for this model is rate-limited; retry later",
                headers=_retry_headers(wait),
            )
    if open_waits or gate_waits:
        wait = min(open_waits + gate_waits)
        return ServiceUnavailable(
            "every upstream for this model is unavailable (circuit breaker open); retry later",
            code="circuit_open",
            headers=_retry_headers(wait),
        )
    return UpstreamError("no candidate could be tried")


def _retry_headers(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


async def _attempt(
    ex: Exchange,
    cand: Candidate,
    index: int,
    breaker: CircuitBreaker,
    permit: Permit,
    request_deadline: float,
) -> web.StreamResponse:
    state = ex.state
    pool = state.upstream
    if pool is None:
        raise RuntimeError("upstream client not started")
    adapter = state.adapters[cand.provider.type]
    try:
        req = adapter.build_request(
            ex.endpoint,
            ex.body,
            cand.provider,
            cand.deployment,
            state.keys.get(cand.provider.name),
            ex.stream,
        )
    except ProxyError as exc:
        # This candidate cannot express the request (e.g. n > 1 for Anthropic). Nothing was
        # sent, so the breaker learns nothing; a candidate of another format may still serve.
        breaker.release(permit)
        raise AttemptFailed(exc, Outcome.FAILURE) from None
    except BaseException:
        breaker.release(permit)  # a bug in a translator must not hold a probe slot forever
        raise
    ex.attempts += 1
    attempt = _Attempt(cand, index, breaker, permit, time.monotonic())
    try:
        return await _send(ex, attempt, pool, req, adapter, request_deadline)
    except AttemptFailed as failed:
        retry_after = failed.info.retry_after if failed.info else None
        attempt.finish(ex, failed.outcome, retry_after)
        raise
    except asyncio.CancelledError:
        # The client went away (breaker.md: ignored): a probe slot returns, nothing counts.
        attempt.finish(ex, Outcome.IGNORED)
        raise
    except BaseException:
        # A bug in the proxy: the upstream is not to blame.
        breaker.release(permit)
        attempt.seconds(ex)
        raise


async def _send(
    ex: Exchange,
    attempt: _Attempt,
    pool: UpstreamPool,
    req: UpstreamRequest,
    adapter: RequestAdapter,
    request_deadline: float,
) -> web.StreamResponse:
    cand = attempt.cand
    timeouts = cand.provider.timeouts
    loop = asyncio.get_running_loop()
    sent = loop.time()
    # The request's total deadline (breaker.md: the outermost layer) bounds every attempt.
    total_deadline = min(sent + timeouts.total, request_deadline)
    phase = _Phase.CONNECT
    try:
        with ex.state.watchdog.guard(min(sent + timeouts.first_token, total_deadline)) as deadline:
            resp = await pool.request(
                req.method, req.url, req.headers, req.body, connect_timeout=timeouts.connect
            )
            async with resp:
                phase = _Phase.FIRST_TOKEN
                if resp.status >= 300:
                    raw = await resp.read(limit=ERROR_BODY_LIMIT)
                    if resp.status < 400:
                        # Redirects are not followed (a key must not travel to another host);
                        # an upstream answering one is misconfigured: its failure, not the
                        # caller's fault, so fail over instead of relaying a bare 3xx.
                        raise AttemptFailed(
                            UpstreamError(
                                f"upstream {cand.deployment.key} answered HTTP {resp.status} "
                                "(a redirect: check its base_url)"
                            ),
                            Outcome.FAILURE,
                        )
                    key = ex.state.keys.get(cand.provider.name)
                    if key:  # upstreams echo bad credentials back: never relay our key
                        raw = raw.replace(key.encode(), b"[redacted]")
                    info = adapter.classify_error(resp.status, resp.headers, raw)
                    if resp.status in (401, 403) and info.outcome is Outcome.FAILURE:
                        # The proxy's own key was refused: a configuration fault of the proxy,
                        # not the client's credentials (which the client never sent upstream).
                        raise AttemptFailed(
                            UpstreamError(
                                f"upstream {cand.deployment.key} refused the proxy's credentials "
                                f"(HTTP {resp.status})",
                                code="upstream_auth_failed",
                            ),
                            info.outcome,
                            info,
                        )
                    raise AttemptFailed(
                        _client_error(info), info.outcome, info, transient=info.transient
                    )
                if not ex.stream:
                    attempt.first_token()
                    phase = _Phase.IDLE
                    raw = await _read_body(resp, deadline, timeouts.idle, total_deadline)
                    obj = _reply_object(ex, attempt, raw)
                    attempt.finish(ex, Outcome.SUCCESS)  # before the headers read its state
                    return _plain_response(ex, attempt, resp.headers, raw, obj)
                return await _stream(ex, attempt, resp, deadline, total_deadline)
    except TimeoutError:
        what = {
            _Phase.CONNECT: "waiting for the response headers",
            _Phase.FIRST_TOKEN: "waiting for the first token",
            _Phase.IDLE: "waiting for the rest of the body",
        }[phase]
        if loop.time() >= total_deadline:
            what = "at the total deadline"
        raise AttemptFailed(
            UpstreamTimeout(f"upstream {cand.deployment.key} timed out {what}"), Outcome.FAILURE
        ) from None
    except ConnectTimeout as exc:
        raise AttemptFailed(
            UpstreamTimeout(f"upstream {cand.deployment.key} timed out connecting ({exc})"),
            Outcome.FAILURE,
        ) from None
    except (ConnectFailed, Disconnected) as exc:
        # Refused, reset or closed before any reply: quick and transient, worth one retry.
        raise AttemptFailed(
            UpstreamError(f"upstream {cand.deployment.key} unreachable: {exc}"),
            Outcome.FAILURE,
            transient=True,
        ) from None
    except (PayloadError, OSError) as exc:
        raise AttemptFailed(
            UpstreamError(f"upstream {cand.deployment.key} failed: {type(exc).__name__}: {exc}"),
            Outcome.FAILURE,
        ) from None


async def _read_body(resp: Response, deadline: Guard, idle: float, total_deadline: float) -> bytes:
    """The whole body, with the idle deadline pushed forward at every piece that arrives."""
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    while True:
        deadline.reschedule(min(loop.time() + idle, total_deadline))
        piece = await resp.read_chunk()
        if not piece:
            return b"".join(parts)
        parts.append(piece)


def _reply_object(ex: Exchange, attempt: _Attempt, raw: bytes) -> JSONDict:
    """The upstream's 2xx body as an OpenAI response object; AttemptFailed if unusable."""
    cand = attempt.cand
    if cand.provider.type != "openai":
        try:
            return ex.state.translators[cand.provider.type].parse_response(
                ex.endpoint,
                raw,
                cand.deployment,
                cand.deployment.upstream_model,
                request_body=ex.body,
            )
        except StreamError as exc:  # a 2xx that is an error after all (blocked, malformed)
            raise AttemptFailed(_client_error(exc.info), exc.info.outcome, exc.info) from None
        except ProxyError as exc:
            raise AttemptFailed(exc, Outcome.FAILURE) from None
        except Exception as exc:  # a reply shape the translator did not expect
            info = _unreadable(exc).info
            raise AttemptFailed(_client_error(info), Outcome.FAILURE, info) from None
    try:
        obj: Any = orjson.loads(raw)
    except orjson.JSONDecodeError:
        obj = None
    if not isinstance(obj, dict):
        raise AttemptFailed(
            UpstreamError(f"upstream {cand.deployment.key} sent a reply that is not a JSON object"),
            Outcome.FAILURE,
        )
    return obj


def _plain_response(
    ex: Exchange,
    attempt: _Attempt,
    upstream_headers: Mapping[str, str],
    raw: bytes,
    obj: JSONDict,
) -> web.Response:
    cand = attempt.cand
    usage = parse_usage(obj)
    cost = _account(ex, cand, usage, 0 if usage is not None else _reply_chars(obj))
    headers = _base_headers(ex, attempt)
    headers.update(_relayed(upstream_headers))
    headers["x-cb-cost-usd"] = f"{cost:.8f}"
    if ex.usage_estimated:
        headers["x-cb-usage-estimated"] = "true"
    if ex.rules.defaults.response_metadata:
        obj["circuit_breaker"] = _metadata(ex, attempt, cost)
        body = orjson.dumps(obj)
    else:
        body = raw if cand.provider.type == "openai" else orjson.dumps(obj)
    return web.Response(body=body, content_type="application/json", headers=headers)


def _account(
    ex: Exchange, cand: Candidate, usage: Usage | None, completion_chars: int = 0
) -> float:
    """Account the request's tokens and cost; estimate them when the upstream reported none."""
    if usage is not None:
        return ex.state.account(cand.deployment, usage)
    ex.usage_estimated = True
    estimate = Usage(ex.plan.prompt_tokens, estimate_tokens(completion_chars))
    return ex.state.account(cand.deployment, estimate, estimated=True)


def _reply_chars(obj: JSONDict) -> int:
    """Characters of generated text in a reply, for a token estimate when usage is missing."""
    total = 0
    choices = obj.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        message = choice.get("message")
        text = message.get("content") if isinstance(message, dict) else choice.get("text")
        if isinstance(text, str):
            total += len(text)
    return total


def _error_frame(error: JSONDict) -> bytes:
    return b"data: " + orjson.dumps(error) + b"\n\n"


def _frames(payloads: list[str]) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


def _unreadable(exc: Exception) -> StreamError:
    """A malformed upstream reply, as a failure of that upstream (never a proxy 500)."""
    LOG.warning("unreadable upstream reply: %s: %s", type(exc).__name__, exc)
    message = f"the upstream sent a reply the proxy cannot read ({type(exc).__name__})"
    return StreamError(
        ErrorInfo(outcome=Outcome.FAILURE, status=502, body=UpstreamError(message).to_dict())
    )


class ClientGone(Exception):
    """The client went away mid-stream: nothing to fail over to, nobody to answer."""


class _Relay:
    """One interface over the OpenAI byte relay and the translating stream adapters."""

    __slots__ = ("_relay", "_translator")

    def __init__(
        self, relay: OpenAIStreamRelay | None, translator: StreamTranslator | None
    ) -> None:
        self._relay = relay
        self._translator = translator

    def feed(self, chunk: bytes) -> bytes:
        try:
            if self._relay is not None:
                return self._relay.feed(chunk)
            if self._translator is not None:
                return _frames(self._translator.feed(chunk))
        except StreamError:
            raise
        except Exception as exc:  # an event the translator cannot read: the upstream's fault
            raise _unreadable(exc) from exc
        return b""

    def finish(self) -> bytes:
        try:
            if self._relay is not None:
                return self._relay.finish()
            if self._translator is not None:
                return _frames(self._translator.finish())
        except StreamError:
            raise
        except Exception as exc:
            raise _unreadable(exc) from exc
        return b""

    @property
    def has_content(self) -> bool:
        if self._relay is not None:
            return self._relay.has_content or self._relay.finished
        return self._translator is not None and (
            self._translator.has_content or self._translator.finished
        )

    @property
    def content_chars(self) -> int:
        """Bytes relayed after the commit point: a rough size of the generated text."""
        if self._relay is not None:
            return self._relay.relayed_bytes // OPENAI_CHUNK_OVERHEAD_RATIO
        return 0

    @property
    def usage(self) -> Usage | None:
        if self._relay is not None:
            return self._relay.usage
        return self._translator.usage if self._translator is not None else None


async def _write(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc


async def _stream(
    ex: Exchange,
    attempt: _Attempt,
    resp: Response,
    deadline: Guard,
    total_deadline: float,
) -> web.StreamResponse:
    cand = attempt.cand
    if cand.provider.type == "openai":
        relay = _Relay(OpenAIStreamRelay(strip_usage=not ex.include_usage), None)
    else:
        adapter = ex.state.translators[cand.provider.type]
        relay = _Relay(
            None,
            adapter.stream_translator(
                ex.endpoint, cand.deployment, cand.deployment.upstream_model, ex.include_usage
            ),
        )

    # Phase 1: hold everything until the first content event; failures here fail over.
    # The caller's deadline (first token) applies; its TimeoutError is handled there.
    pending = b""
    try:
        while not relay.has_content:
            chunk = await resp.read_chunk()
            if not chunk:
                pending += relay.finish()
                break
            pending += relay.feed(chunk)
    except StreamError as exc:
        raise AttemptFailed(
            _client_error(exc.info), exc.info.outcome, exc.info, transient=exc.info.transient
        ) from None
    except PayloadError as exc:
        raise AttemptFailed(
            UpstreamError(f"upstream {cand.deployment.key} dropped the stream before content"),
            Outcome.FAILURE,
        ) from exc
    attempt.first_token()

    # Commit: the client gets a 200 and there is no failover from here on.
    deadline.reschedule(None)
    headers = _base_headers(ex, attempt)
    headers.update(_relayed(resp.headers))
    out = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        try:
            await out.prepare(ex.request)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone(str(exc)) from exc
        outcome = await _relay_rest(ex, attempt, relay, resp, out, pending, total_deadline)
    except ClientGone:
        LOG.info("request %s: the client went away mid-stream", ex.request_id)
        outcome = Outcome.IGNORED
    attempt.finish(ex, outcome)
    _account(ex, cand, relay.usage, relay.content_chars)
    return out


async def _relay_rest(
    ex: Exchange,
    attempt: _Attempt,
    relay: _Relay,
    resp: Response,
    out: web.StreamResponse,
    pending: bytes,
    total_deadline: float,
) -> Outcome:
    """Relay the committed stream to its end; the outcome is the upstream's."""
    loop = asyncio.get_running_loop()
    cand = attempt.cand
    idle = cand.provider.timeouts.idle
    if pending:
        await _write(out, pending)
    failure: JSONDict | None = None
    try:
        # One timer for the rest of the stream, pushed forward at every chunk (idle gap).
        with ex.state.watchdog.guard(min(loop.time() + idle, total_deadline)) as gap:
            while True:
                chunk = await resp.read_chunk()
                if not chunk:
                    tail = relay.finish()
                    if tail:
                        gap.reschedule(total_deadline)  # the client's pace, not the upstream's
                        await _write(out, tail)
                    break
                data = relay.feed(chunk)
                if data:
                    # A client slow to take the data is not an upstream stall: only the total
                    # deadline runs while writing (the upstream is paused by backpressure).
                    gap.reschedule(total_deadline)
                    await _write(out, data)
                gap.reschedule(min(loop.time() + idle, total_deadline))
    except StreamError as exc:
        failure = exc.info.body
    except TimeoutError:
        failure = UpstreamTimeout(
            f"upstream {cand.deployment.key} stalled mid-stream (no data for {idle:g} s)"
            if loop.time() < total_deadline
            else f"upstream {cand.deployment.key} exceeded the total deadline"
        ).to_dict()
    except PayloadError as exc:
        failure = UpstreamError(
            f"upstream {cand.deployment.key} dropped the stream ({type(exc).__name__})"
        ).to_dict()
    if failure is not None:
        # Never a silent truncated 200: one in-band error event, then the end.
        await _write(out, _error_frame(failure))
    try:
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
    return Outcome.FAILURE if failure is not None else Outcome.SUCCESS


__all__ = ["AttemptFailed", "ClientGone", "Exchange", "serve"]
