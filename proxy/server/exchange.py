"""One client request being served, and one upstream attempt of it.

``Exchange`` carries the request through the candidate loop; ``Attempt``
records a single upstream call's outcome exactly once (breaker, metrics,
time upstream). The response headers and the ``circuit_breaker`` body object
are built here, from the same facts, so they always agree.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from aiohttp import web

from proxy.config.model import RuleSet
from proxy.core.breaker import CircuitBreaker, Permit
from proxy.core.candidates import Candidate
from proxy.core.deadlines import FirstTokenTimes
from proxy.core.errors import ProxyError, UpstreamHTTPError
from proxy.core.outcome import Outcome, breaker_outcomes
from proxy.core.router import RoutePlan
from proxy.core.secrets import Redactor
from proxy.core.usage import estimate_tokens
from proxy.providers.base import Endpoint, ErrorInfo, JSONDict, NativeBody, Usage
from proxy.server.state import ProxyState
from proxy.upstream.client import Response

# The attempt metric's outcome label for a local failure (beside the breaker's outcomes).
LOCAL_FAILURE = "local_failure"
# Upstream response headers worth relaying: clients read rate-limit and timing headers.
RELAYED_PREFIXES = ("x-ratelimit-", "openai-processing-ms", "openai-version")


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
    # The client's own request when it is not in OpenAI's format: a candidate speaking that
    # format gets it as it came (proxy.providers.registry.native), the others ``body``.
    native: NativeBody | None = None
    relayed_native: bool = False  # the answer is the upstream's own, in the client's format
    attempts: int = 0
    upstream_seconds: float = 0.0
    usage_estimated: bool = False
    race: Race | None = None  # a hedged stream's walkers (proxy.server.hedge)
    # Set when a failed committed stream may be continued (proxy.server.continuation).
    continuation: Continuation | None = None
    _route_header: str = ""

    def route_header(self) -> str:
        """``x-cb-route``, built once per request (the header and the body both carry it)."""
        if not self._route_header:
            self._route_header = self.plan.header()
        return self._route_header


class Continuation(Protocol):
    """What the committed stream asks of a continuation (proxy.server.continuation).

    ``relay`` is the stream's ``proxy.server.streaming.StreamRelay``.
    """

    failure: JSONDict | None  # the committed stream's failure, left to the continuation

    @property
    def resuming(self) -> bool:
        """A continuation is walking the candidates: a stream now is a continuing one."""
        ...

    def keep(self, data: bytes) -> None: ...

    async def resume(
        self,
        ex: Exchange,
        failed: Attempt,
        relay: Any,
        out: web.StreamResponse,
        cost: float,
        total_deadline: float,
    ) -> bool: ...

    async def splice(
        self,
        ex: Exchange,
        attempt: Attempt,
        relay: Any,
        resp: Response,
        pending: bytes,
        total_deadline: float,
    ) -> web.StreamResponse: ...


class AttemptFailed(Exception):
    """An attempt that ended before anything reached the client."""

    def __init__(
        self,
        error: ProxyError,
        outcome: Outcome,
        info: ErrorInfo | None = None,
        *,
        transient: bool = False,
        local: bool = False,
        provider_level: bool = False,
    ) -> None:
        super().__init__(error.message)
        self.error = error
        self.outcome = outcome
        self.info = info
        self.transient = transient
        self.local = local  # the proxy's own failure (proxy.upstream.errors.LocalFailure)
        # The provider's failure (transport, its key, quota), not the model's (docs/breaker.md).
        self.provider_level = provider_level
        self.context_window: int | None = None  # of the candidate that failed
        self.elapsed = 0.0  # seconds the attempt took (the quick-retry rule reads it)


class Attempt:
    """One upstream call: its candidate, its two breaker permits and timings.

    ``breaker``/``permit`` are the provider's, ``model_breaker``/``model_permit`` the
    deployment's (docs/breaker.md, 'Keys'); ``finish`` reports to each the outcome of
    its level (``proxy.core.outcome.breaker_outcomes``).
    """

    __slots__ = (
        "_done",
        "breaker",
        "cand",
        "index",
        "model_breaker",
        "model_permit",
        "permit",
        "started",
        "times",
        "ttft",
    )

    def __init__(
        self,
        cand: Candidate,
        index: int,
        breaker: CircuitBreaker,
        permit: Permit,
        started: float,
        model_breaker: CircuitBreaker,
        model_permit: Permit,
        times: FirstTokenTimes | None = None,
    ) -> None:
        self.cand = cand
        # Where a stream's first-token time goes (adaptive deadlines); None for a plain
        # request, whose "first token" is the whole generation.
        self.times = times
        self.index = index
        self.breaker = breaker
        self.permit = permit
        self.model_breaker = model_breaker
        self.model_permit = model_permit
        self.started = started
        self.ttft: float | None = None
        self._done = False

    def sent(self) -> None:
        """The request left the proxy: the breakers may judge it stalled from now on."""
        self.model_breaker.sent(self.model_permit)  # stalls are the model's (docs/breaker.md)

    def first_token(self) -> None:
        if self.ttft is None:
            self.ttft = time.monotonic() - self.started
            self.model_breaker.first_token(self.model_permit)  # answering: not stalled
            if self.times is not None:
                self.times.observe(self.cand.deployment.key, self.ttft)

    def seconds(self, ex: Exchange) -> float:
        elapsed = time.monotonic() - self.started
        if not self._done:
            self._done = True
            ex.upstream_seconds += elapsed
        return elapsed

    def release(self) -> None:
        """No outcome for either breaker (nothing was sent, or the proxy's own fault)."""
        self.breaker.release(self.permit)
        self.model_breaker.release(self.model_permit)

    def finish_local(self, ex: Exchange) -> None:
        """A local failure (docs/upstream.md): no breaker outcome, counted as ``local_failure``."""
        if self._done:
            return
        elapsed = self.seconds(ex)
        self.release()
        ex.state.record_attempt(
            self.cand.provider, self.cand.deployment.model, LOCAL_FAILURE, elapsed, None
        )

    def finish(
        self,
        ex: Exchange,
        outcome: Outcome,
        retry_after: float | None = None,
        *,
        provider_level: bool = False,
    ) -> None:
        """Record the outcome once: both breakers, metrics, time spent upstream.

        ``provider_level``: a failure of the provider itself (transport, its key, quota)
        rather than of this model (docs/breaker.md, 'Keys').
        """
        if self._done:
            return
        elapsed = self.seconds(ex)
        latency = (self.ttft if self.ttft is not None else elapsed) * 1000.0
        if outcome is Outcome.SUCCESS:  # the common case, without the split
            self.breaker.record(self.permit, outcome, latency)
            self.model_breaker.record(self.model_permit, outcome, latency)
        else:
            on_provider, on_model = breaker_outcomes(outcome, provider_level)
            self.breaker.record(self.permit, on_provider, latency, retry_after)
            self.model_breaker.record(self.model_permit, on_model, latency, retry_after)
        state = ex.state
        state.record_attempt(
            self.cand.provider, self.cand.deployment.model, outcome.value, elapsed, self.ttft
        )
        if self.index > 0 and outcome is Outcome.SUCCESS:
            primary = ex.plan.candidates[0].provider.name
            state.metrics.fallbacks.labels(primary, self.cand.provider.name).inc()


class Race:
    """The walkers of one hedged stream and which attempt committed first (proxy.server.hedge).

    At most one attempt commits: ``claim`` is synchronous and the first caller wins.
    """

    __slots__ = ("hedge", "on_decided", "on_result", "tasks", "winner", "winner_started")

    def __init__(self, on_result: Callable[[str], None]) -> None:
        self.tasks: list[asyncio.Task[web.StreamResponse | None]] = []
        self.hedge: asyncio.Task[web.StreamResponse | None] | None = None  # the second walker
        self.winner: asyncio.Task[object] | None = None
        self.winner_started = 0.0
        # Counts the race's end (won, lost, failed) once, at the commit: before the client
        # has a byte, so a reader of the metric never races the stream.
        self.on_result = on_result
        self.on_decided: Callable[[], None] = lambda: None  # set by the hedging runner

    def claim(self, attempt: Attempt) -> bool:
        """``attempt`` reached its commit point: True if it is the first (the others stop)."""
        task = asyncio.current_task()
        if self.winner is not None:
            return self.winner is task
        self.winner = task
        self.winner_started = attempt.started
        if self.hedge is not None:
            self.on_result("won" if task is self.hedge else "lost")
        self.on_decided()
        for other in self.tasks:
            if other is not task:
                other.cancel()
        return True

    def lost_by(self, attempt: Attempt) -> bool:
        """Was ``attempt`` cancelled by a later-sent attempt's first token (a slow start)?"""
        return (
            self.winner is not None
            and self.winner is not asyncio.current_task()
            and attempt.ttft is None
            and attempt.started < self.winner_started
        )


def client_error(info: ErrorInfo) -> ProxyError:
    headers: dict[str, str] = {}
    if info.retry_after is not None:
        # Rounded up: a client told to come back sooner than the upstream asked just fails again.
        headers.update(retry_headers(info.retry_after))
    return UpstreamHTTPError(info.status, info.body, headers=headers)


def header_value(text: str) -> str:
    """A response header value made from rules or request data: printable ASCII only.

    CR or LF would end the header early (response splitting; aiohttp refuses the whole
    response instead), and non-ASCII goes out as raw UTF-8, which clients read as Latin-1
    or reject (RFC 9110 section 5.5: field values are ASCII in practice). Any other
    character becomes '?', as in ``x-cb-route`` (proxy.core.router).
    """
    if text.isascii() and text.isprintable():
        return text
    return "".join(c if " " <= c <= "~" else "?" for c in text)


def base_headers(ex: Exchange, attempt: Attempt) -> dict[str, str]:
    """The ``x-cb-*`` headers of a proxied reply: the one place they are built."""
    cand = attempt.cand
    dep = cand.deployment
    headers = {
        "x-request-id": ex.request_id,
        "x-cb-provider": header_value(cand.provider.name),
        "x-cb-model": header_value(dep.upstream_model),
        "x-cb-upstream": header_value(dep.key),
        "x-cb-attempts": str(ex.attempts),
        "x-cb-fallback": "true" if attempt.index > 0 else "false",
        "x-cb-breaker-state": attempt.breaker.state.value,
        "x-cb-deployment-breaker-state": attempt.model_breaker.state.value,
        "x-cb-route": header_value(ex.route_header()),
    }
    if ex.plan.warnings:  # request fallbacks that were skipped (proxy.core.router)
        headers["x-cb-warning"] = header_value("; ".join(ex.plan.warnings))
    return headers


def metadata(ex: Exchange, attempt: Attempt, cost: float) -> JSONDict:
    cand = attempt.cand
    return {
        "provider": cand.provider.name,
        "model": cand.deployment.upstream_model,
        "upstream": cand.deployment.key,
        "fallback_used": attempt.index > 0,
        "attempts": ex.attempts,
        "breaker_state": attempt.breaker.state.value,
        "deployment_breaker_state": attempt.model_breaker.state.value,
        "cost_usd": cost,
        "usage_estimated": ex.usage_estimated,
        "route": ex.route_header(),
    }


def relayed_headers(upstream: Response, redactor: Redactor) -> dict[str, str]:
    """The upstream headers clients read, with any provider key in them redacted.

    Picked from the response's raw head (``headers_with_prefix``): no mapping of all of
    its headers is built for the few that are relayed.
    """
    relayed = upstream.headers_with_prefix(RELAYED_PREFIXES)
    return redactor.redact_headers(relayed) if relayed and redactor else relayed


def redact_error(err: ProxyError, redactor: Redactor) -> ProxyError:
    """``err`` with any provider key in its message and body redacted (in place)."""
    if redactor:
        err.message = redactor.redact_text(err.message)
        if isinstance(err, UpstreamHTTPError):
            err.body = redactor.redact_json(err.body)
    return err


def retry_headers(seconds: float) -> dict[str, str]:
    return {
        "retry-after": str(max(1, math.ceil(seconds))),
        "retry-after-ms": str(max(1, math.ceil(seconds * 1000))),
    }


def account(ex: Exchange, cand: Candidate, usage: Usage | None, completion_chars: int = 0) -> float:
    """Account the request's tokens and cost; estimate them when the upstream reported none."""
    if usage is not None:
        return ex.state.account(cand.deployment, usage)
    ex.usage_estimated = True
    estimate = Usage(ex.plan.prompt_tokens, estimate_tokens(completion_chars))
    return ex.state.account(cand.deployment, estimate, estimated=True)


def reply_chars(obj: JSONDict) -> int:
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
