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

The committed part of a stream lives in ``proxy.server.streaming``; the request and
attempt records in ``proxy.server.exchange``. Deadlines are ``proxy.upstream.deadline``
guards moved forward per phase (first token, then idle gaps, capped by the
total): an attribute write, not a timer per chunk.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.config.model import RetryPolicy
from proxy.core.breaker import CircuitBreaker, Permit
from proxy.core.candidates import Candidate
from proxy.core.errors import (
    InvalidRequest,
    ProxyError,
    ProxyOverloaded,
    RateLimited,
    ServiceUnavailable,
    UpstreamError,
    UpstreamTimeout,
)
from proxy.core.outcome import Outcome
from proxy.core.ratelimit import gate_seconds
from proxy.providers import registry as providers
from proxy.providers.base import (
    JSONDict,
    NativeAdapter,
    RequestAdapter,
    StreamError,
    UpstreamRequest,
    Usage,
)
from proxy.providers.openai import parse_usage
from proxy.server.exchange import (
    Attempt,
    AttemptFailed,
    Exchange,
    account,
    base_headers,
    client_error,
    metadata,
    redact_error,
    relayed_headers,
    reply_chars,
    retry_headers,
)
from proxy.server.hedge import hedge_setting, run_hedged
from proxy.server.state import ProxyState
from proxy.server.streaming import ClientGone, stream, unreadable
from proxy.upstream.client import Progress, Response, UpstreamPool
from proxy.upstream.deadline import Guard
from proxy.upstream.errors import (
    UPSTREAM_ERRORS,
    BodyTooLarge,
    Disconnected,
    Failure,
    failure,
    local_failure,
)

LOG = logging.getLogger("cb_proxy.forward")

ERROR_BODY_LIMIT = 256 * 1024  # an upstream error body larger than this is cut
DEFAULT_RETRY_AFTER = 1.0
FORCED_OPEN_RETRY_AFTER = 60.0
# Failures with these statuses are the account's (402 payment, 429 quota), not one model's.
QUOTA_STATUSES = frozenset({402, 429})


# The breakers of one try and their permits: provider's, then the deployment's.
Permits = tuple[CircuitBreaker, Permit, CircuitBreaker, Permit]
# One upstream try: (exchange, candidate, index, permits, request deadline) -> response.
AttemptFn = Callable[[Exchange, Candidate, int, Permits, float], Awaitable[web.StreamResponse]]


class _Phase:
    CONNECT = "connect"
    FIRST_TOKEN = "first_token"
    IDLE = "idle"
    TOTAL = "total"


async def serve(ex: Exchange, *, attempt: AttemptFn | None = None) -> web.StreamResponse:
    """Walk the plan; return the response (a stream is already written when returned).

    ``attempt`` replaces the upstream call (``_attempt``): tests script it to drive the loop.
    A stream whose route or virtual model sets ``hedge_after_ms`` is walked by two walkers
    once its first candidate is slow to its first token (``proxy.server.hedge``).
    """
    if not ex.plan.candidates:
        raise _nothing_to_try(ex)
    walk = Walk(ex, _attempt if attempt is None else attempt)
    setting = hedge_setting(ex.plan) if ex.stream else None
    if setting is not None and len(ex.plan.candidates) > 1:
        delay = ex.state.first_tokens.hedge_after(ex.plan.candidates[0].deployment.key, setting)
        if delay is not None:
            return await run_hedged(ex, walk, delay)
    response = await walk.walk()
    if response is None:
        raise walk.final_error()
    return response


class Walk:
    """The candidates of one request, taken in order by one walker or two (hedging).

    The cursor ``next`` is shared, so two walkers never try the same candidate; the
    failures, open breakers and closed gates they meet are gathered for the final error.
    """

    __slots__ = ("deadline", "errors", "ex", "gate_waits", "next", "open_waits", "try_upstream")

    def __init__(self, ex: Exchange, try_upstream: AttemptFn) -> None:
        self.ex = ex
        self.try_upstream = try_upstream
        self.deadline = (
            asyncio.get_running_loop().time() + ex.plan.candidates[0].provider.timeouts.total
        )
        self.next = 0
        self.errors: list[AttemptFailed] = []
        self.open_waits: list[float] = []  # candidates skipped because their breaker is open
        self.gate_waits: list[float] = []  # skipped because their rate-limit gate is closed

    def can_go_on(self) -> bool:
        """Is there a candidate left, within the attempts and the request's deadline?"""
        ex = self.ex
        return (
            self.next < len(ex.plan.candidates)
            and ex.attempts < ex.rules.defaults.retry.max_attempts
            and asyncio.get_running_loop().time() < self.deadline
        )

    async def walk(self) -> web.StreamResponse | None:
        """Try the candidates from the cursor on; the response, or None when none served."""
        candidates = self.ex.plan.candidates
        while self.can_go_on():
            index = self.next
            self.next += 1
            response = await self.candidate(candidates[index], index)
            if response is not None:
                return response
        return None

    def final_error(self) -> ProxyError:
        return _final_error(self.errors, self.open_waits, self.gate_waits)

    async def candidate(self, cand: Candidate, index: int) -> web.StreamResponse | None:
        """One candidate: gate, breakers, the attempt and its quick retries (docs/breaker.md)."""
        ex = self.ex
        state = ex.state
        policy = ex.rules.defaults.retry
        loop = asyncio.get_running_loop()
        errors = self.errors
        if _too_small_after(errors, cand):
            return None
        gate_key = (cand.provider.name, cand.deployment.upstream_model)
        if not state.gates.is_open(gate_key):
            self.gate_waits.append(state.gates.retry_after(gate_key))
            state.metrics.rejections.labels(cand.provider.name, "rate_limited").inc()
            return None
        breaker = state.breaker(cand.provider.name)
        model_breaker = state.deployment_breaker(cand.deployment)
        retries = 0
        retried: AttemptFailed | None = None  # the failure whose retry is pending
        holding = False  # this request holds a retry-budget slot: from the backoff to the end
        try:
            while True:
                permits = _permits(breaker, model_breaker)
                if permits is None:
                    if holding:
                        state.retries_in_flight -= 1
                        holding = False
                    state.metrics.rejections.labels(cand.provider.name, "breaker_open").inc()
                    if retried is not None:
                        errors.append(retried)  # it was tried and failed: its error still counts
                        return None
                    self.open_waits.append(_open_wait(breaker, model_breaker))
                    return None
                permit, model_permit = permits
                try:
                    return await self.try_upstream(
                        ex,
                        cand,
                        index,
                        (breaker, permit, model_breaker, model_permit),
                        self.deadline,
                    )
                except AttemptFailed as failed:
                    if holding:  # the retried attempt is over: its budget slot returns
                        state.retries_in_flight -= 1
                        holding = False
                    failed.context_window = cand.context_window
                    LOG.info(
                        "request %s attempt %d on %s failed (%s) after %.3f s: %s",
                        ex.request_id,
                        ex.attempts,
                        cand.deployment.key,
                        failed.outcome.value,
                        failed.elapsed,
                        failed.error.message,
                    )
                    if (
                        failed.outcome is Outcome.IGNORED
                        and not failed.local
                        and not (failed.info is not None and failed.info.context_window)
                    ):
                        raise failed.error from None
                    if failed.outcome is Outcome.RATE_LIMITED:
                        retry_after = failed.info.retry_after if failed.info else None
                        state.gates.close(gate_key, gate_seconds(retry_after))
                    # A failed probe is not retried: the breaker has just learnt the upstream is
                    # still down, and the client's time is better spent on the next candidate.
                    probe = permit.probe or model_permit.probe
                    wait = None if probe else _retry_wait(failed, policy, state)
                    if (
                        wait is not None
                        and retries < policy.same_deployment_retries
                        and ex.attempts < policy.max_attempts
                        and loop.time() + wait < self.deadline
                        and state.retries_in_flight < state.retry_budget(policy)
                    ):
                        retries += 1
                        retried = failed
                        state.metrics.retries.labels(cand.provider.name).inc()
                        state.retries_in_flight += 1
                        holding = True
                        await asyncio.sleep(wait)  # backoff before the retry, not a test wait
                        continue
                    errors.append(failed)
                    return None
        finally:
            if holding:  # a retry that succeeded, or a request cancelled meanwhile
                state.retries_in_flight -= 1


def _permits(provider: CircuitBreaker, model: CircuitBreaker) -> tuple[Permit, Permit] | None:
    """Both breakers' permits, or None (and neither held) when either rejects."""
    permit = provider.permit()
    if permit is None:
        return None
    model_permit = model.permit()
    if model_permit is None:
        provider.release(permit)  # a probe slot of the provider must not be held for nothing
        return None
    return permit, model_permit


def _open_wait(provider: CircuitBreaker, model: CircuitBreaker) -> float:
    """Seconds until the candidate may be tried again: the later of its open breakers."""
    waits = [b.retry_after_seconds() for b in (provider, model) if not b.can_permit()]
    if any(w is None for w in waits):
        # A forced-open breaker never reopens by itself: do not invite quick retries.
        return FORCED_OPEN_RETRY_AFTER
    return max([w for w in waits if w is not None], default=DEFAULT_RETRY_AFTER)


def _too_small_after(errors: list[AttemptFailed], cand: Candidate) -> bool:
    """After a context-window error, only a candidate with a larger window can help."""
    if not errors or errors[-1].info is None or not errors[-1].info.context_window:
        return False
    return (cand.context_window or 0) <= (errors[-1].context_window or 0)


def _retry_wait(failed: AttemptFailed, policy: RetryPolicy, state: ProxyState) -> float | None:
    """Seconds to wait before retrying the same deployment, or None for no retry."""
    retry_after = failed.info.retry_after if failed.info is not None else None
    if failed.outcome is Outcome.RATE_LIMITED:
        # docs/breaker.md: a 429 asking for at most max_retry_wait is retried once on the same
        # deployment, keeping the model the client asked for; otherwise fail over at once.
        if retry_after is not None and retry_after <= policy.max_retry_wait:
            return retry_after
        return None
    if failed.elapsed * 1000.0 > policy.quick_failure_ms:
        # A slow failure is no quick transient: retrying it would hold the client as long
        # again on a deployment that has just been slow (docs/breaker.md, 'Retries').
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
                headers=retry_headers(wait),
            )
    if open_waits or gate_waits:
        wait = min(open_waits + gate_waits)
        return ServiceUnavailable(
            "every upstream for this model is unavailable (circuit breaker open); retry later",
            code="circuit_open",
            headers=retry_headers(wait),
        )
    return UpstreamError("no candidate could be tried")


async def _attempt(
    ex: Exchange,
    cand: Candidate,
    index: int,
    permits: Permits,
    request_deadline: float,
) -> web.StreamResponse:
    breaker, permit, model_breaker, model_permit = permits
    state = ex.state
    pool = state.upstream
    if pool is None:
        raise RuntimeError("upstream client not started")
    adapter = providers.adapter(cand.provider.type)
    # A client whose own format this upstream speaks gets a byte relay both ways.
    native = providers.native(ex.native.wire, cand.provider.type) if ex.native else None
    try:
        key = state.keys.get(cand.provider.name)
        if native is not None and ex.native is not None:
            req = native.build_request(ex.native.body, cand.provider, cand.deployment, key)
        else:
            req = adapter.build_request(
                ex.endpoint, ex.body, cand.provider, cand.deployment, key, ex.stream
            )
    except ProxyError as exc:
        # This candidate cannot express the request (e.g. n > 1 for Anthropic). Nothing was
        # sent, so the breakers learn nothing; a candidate of another format may still serve.
        breaker.release(permit)
        model_breaker.release(model_permit)
        raise AttemptFailed(exc, Outcome.FAILURE) from None
    except BaseException:
        breaker.release(permit)  # a bug in a translator must not hold a probe slot forever
        model_breaker.release(model_permit)
        raise
    ex.attempts += 1
    attempt = Attempt(
        cand,
        index,
        breaker,
        permit,
        time.monotonic(),
        model_breaker,
        model_permit,
        # A stream's first-token time feeds its deployment's adaptive deadline.
        state.first_tokens if ex.stream else None,
    )
    # The coroutine holds the request from here; _send lets go of it once it is sent, so the
    # upstream body is not kept for the life of a stream.
    sending = _send(ex, attempt, pool, req, adapter, native, request_deadline)
    del req
    try:
        return await sending
    except AttemptFailed as failed:
        # Error text can quote the upstream (a stream error event, a bad header): no key in it.
        redact_error(failed.error, state.redactor)
        failed.elapsed = time.monotonic() - attempt.started
        if failed.local:
            attempt.finish_local(ex)  # the proxy's own failure: the upstream is not to blame
            raise
        retry_after = failed.info.retry_after if failed.info else None
        attempt.finish(ex, failed.outcome, retry_after, provider_level=failed.provider_level)
        raise
    except asyncio.CancelledError:
        # The client went away (docs/breaker.md: ignored): a probe slot returns, nothing counts.
        # A hedge race lost by an attempt that had the head start is its slow first token.
        lost = ex.race is not None and ex.race.lost_by(attempt)
        attempt.finish(ex, Outcome.FAILURE if lost else Outcome.IGNORED)
        raise
    except BaseException:
        # A bug in the proxy: the upstream is not to blame.
        attempt.release()
        attempt.seconds(ex)
        raise


async def _send(
    ex: Exchange,
    attempt: Attempt,
    pool: UpstreamPool,
    req: UpstreamRequest,
    adapter: RequestAdapter,
    native: NativeAdapter | None,
    request_deadline: float,
) -> web.StreamResponse:
    cand = attempt.cand
    timeouts = cand.provider.timeouts
    loop = asyncio.get_running_loop()
    sent = loop.time()
    # The request's total deadline (docs/breaker.md: the outermost layer) bounds every attempt.
    total_deadline = min(sent + timeouts.total, request_deadline)
    # A stream waits for its first token as long as its deployment's history says is
    # plenty (docs/breaker.md, 'Adaptive first-token deadline'), never past the configured one.
    first_token = (
        ex.state.first_token_deadline(cand.deployment, timeouts.first_token)
        if ex.stream
        else timeouts.first_token
    )
    phase = _Phase.CONNECT
    progress = Progress(attempt.sent)
    try:
        with ex.state.watchdog.guard(min(sent + first_token, total_deadline)) as deadline:
            resp = await pool.request(
                req.method,
                req.url,
                req.headers,
                req.body,
                connect_timeout=timeouts.connect,
                progress=progress,
            )
            del req  # sent: its body is not needed again (no resend once a reply came)
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
                    # Upstreams echo bad credentials back, whole or masked: never relay a key.
                    raw = ex.state.redactor.redact_bytes(raw)
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
                            provider_level=True,
                        )
                    raise AttemptFailed(
                        client_error(info),
                        info.outcome,
                        info,
                        transient=info.transient,
                        # An account out of money fails every model of the provider alike.
                        provider_level=info.outcome is Outcome.FAILURE
                        and resp.status in QUOTA_STATUSES,
                    )
                if not ex.stream:
                    attempt.first_token()
                    phase = _Phase.IDLE
                    raw = await _read_body(
                        resp,
                        deadline,
                        timeouts.idle,
                        total_deadline,
                        ex.state.settings.upstream_max_body_bytes,
                    )
                    if native is not None:
                        usage = _native_usage(native, raw)
                        attempt.finish(ex, Outcome.SUCCESS)
                        return _native_response(ex, attempt, resp, raw, usage)
                    obj = _reply_object(ex, attempt, raw)
                    attempt.finish(ex, Outcome.SUCCESS)  # before the headers read its state
                    return _plain_response(ex, attempt, resp, raw, obj)
                return await stream(ex, attempt, resp, deadline, total_deadline, native)
    except UPSTREAM_ERRORS as exc:
        # Transport failures become outcomes and client errors in one place (proxy.upstream.errors).
        doing = {
            _Phase.CONNECT: "waiting for the response headers",
            _Phase.FIRST_TOKEN: "waiting for the first token",
            _Phase.IDLE: "waiting for the rest of the body",
        }[phase]
        if isinstance(exc, TimeoutError) and loop.time() >= total_deadline:
            doing = "at the total deadline"
        if (
            isinstance(exc, TimeoutError)
            and phase != _Phase.IDLE
            and first_token < timeouts.first_token
            and loop.time() < total_deadline
        ):
            # The adaptive deadline cut this stream: its wait is a (censored) sample, so a
            # deployment whose traffic got slower earns a longer deadline instead of failing
            # every stream at the old one (docs/breaker.md, 'Adaptive first-token deadline').
            doing = f"waiting for the first token (adaptive deadline {first_token:.3g} s)"
            ex.state.first_tokens.observe(cand.deployment.key, first_token)
        found = None
        if isinstance(exc, TimeoutError) and not progress.written:
            found = _unsent(progress, cand.deployment.key, sent + first_token, total_deadline)
        if found is None:
            found = failure(exc, cand.deployment.key, doing=doing)
        raise AttemptFailed(
            found.error,
            found.outcome,
            transient=found.transient,
            local=found.local,
            # Only before the request reached the model: once it was written, a drop (even
            # before the reply head, a plain request's whole generation) is the model's.
            provider_level=found.transport
            and phase == _Phase.CONNECT
            and not (isinstance(exc, Disconnected) and exc.request_written),
        ) from None


def _unsent(progress: Progress, upstream: str, own_deadline: float, cut: float) -> Failure | None:
    """A deadline fired before the request reached ``upstream``: whose failure is it?

    Waiting for a pooled connection slot is the proxy's own limit; so is connecting when the
    request's deadline (time spent on earlier attempts) cut this attempt short of its own
    first-token deadline. Connecting within the attempt's own time is the upstream's failure.
    None = the upstream's (the usual map applies).
    """
    if not progress.connecting:
        return local_failure(
            ProxyOverloaded(
                f"no connection to {upstream} came free before the deadline "
                "(CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST)"
            )
        )
    if cut < own_deadline:
        return local_failure(
            UpstreamTimeout(f"the request's deadline passed while connecting to {upstream}")
        )
    return None


async def _read_body(
    resp: Response, deadline: Guard, idle: float, total_deadline: float, limit: int
) -> bytes:
    """The whole body, with the idle deadline pushed forward at every piece that arrives.

    At most ``limit`` bytes (CB_UPSTREAM_MAX_BODY_BYTES): a declared length over it fails
    before any is read, a chunked or close-delimited body as soon as it passes it.
    """
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise BodyTooLarge(f"the reply declares {declared} bytes, over {limit}")
    loop = asyncio.get_running_loop()
    parts: list[bytes] = []
    size = 0
    while True:
        deadline.reschedule(min(loop.time() + idle, total_deadline))
        piece = await resp.read_chunk()
        if not piece:
            return b"".join(parts)
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(f"the reply body is over {limit} bytes (CB_UPSTREAM_MAX_BODY_BYTES)")
        parts.append(piece)


def _reply_object(ex: Exchange, attempt: Attempt, raw: bytes) -> JSONDict:
    """The upstream's 2xx body as an OpenAI response object; AttemptFailed if unusable."""
    cand = attempt.cand
    translator = providers.translator(cand.provider.type)
    if translator is not None:
        try:
            return translator.parse_response(
                ex.endpoint,
                raw,
                cand.deployment,
                cand.deployment.upstream_model,
                request_body=ex.body,
            )
        except StreamError as exc:  # a 2xx that is an error after all (blocked, malformed)
            raise AttemptFailed(client_error(exc.info), exc.info.outcome, exc.info) from None
        except ProxyError as exc:
            raise AttemptFailed(exc, Outcome.FAILURE) from None
        except Exception as exc:  # a reply shape the translator did not expect
            info = unreadable(exc).info
            raise AttemptFailed(client_error(info), Outcome.FAILURE, info) from None
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


def _native_usage(native: NativeAdapter, raw: bytes) -> Usage | None:
    """The usage of a 2xx reply in the client's own format; AttemptFailed if unusable."""
    try:
        return native.reply_usage(raw)
    except StreamError as exc:
        raise AttemptFailed(client_error(exc.info), exc.info.outcome, exc.info) from None


def _native_response(
    ex: Exchange, attempt: Attempt, resp: Response, raw: bytes, usage: Usage | None
) -> web.Response:
    """The upstream's reply as it came (the client's format), with the proxy's headers."""
    cost = account(ex, attempt.cand, usage)
    headers = base_headers(ex, attempt)
    headers.update(relayed_headers(resp, ex.state.redactor))
    headers["x-cb-cost-usd"] = f"{cost:.8f}"
    if ex.usage_estimated:
        headers["x-cb-usage-estimated"] = "true"
    ex.relayed_native = True
    return web.Response(
        body=ex.state.redactor.redact_success(raw), content_type="application/json", headers=headers
    )


def _plain_response(
    ex: Exchange,
    attempt: Attempt,
    resp: Response,
    raw: bytes,
    obj: JSONDict,
) -> web.Response:
    cand = attempt.cand
    usage = parse_usage(obj)
    cost = account(ex, cand, usage, 0 if usage is not None else reply_chars(obj))
    headers = base_headers(ex, attempt)
    headers.update(relayed_headers(resp, ex.state.redactor))
    headers["x-cb-cost-usd"] = f"{cost:.8f}"
    if ex.usage_estimated:
        headers["x-cb-usage-estimated"] = "true"
    if ex.rules.defaults.response_metadata:
        meta = metadata(ex, attempt, cost)
        if providers.translator(cand.provider.type) is None:
            body = with_metadata(raw, obj, meta)
        else:
            obj["circuit_breaker"] = meta
            body = orjson.dumps(obj)
    else:
        body = raw if providers.translator(cand.provider.type) is None else orjson.dumps(obj)
    # A success body echoing a key is rare: one find per key, the full scan only on a hit
    # (docs/architecture.md, "Secrets"; bench/secrets.py: ~2 us for 1 KiB, the full scan 60).
    body = ex.state.redactor.redact_success(body)
    return web.Response(body=body, content_type="application/json", headers=headers)


def with_metadata(raw: bytes, obj: JSONDict, meta: JSONDict) -> bytes:
    """``raw`` (the JSON object ``obj`` was parsed from) with ``"circuit_breaker": meta`` added.

    Spliced in before the object's closing brace rather than re-dumping the whole reply: the
    upstream's bytes stay as they came and only the metadata is serialised. The result parses
    to ``obj`` plus the key. An empty object or one that already has the key is re-dumped.
    """
    end = len(raw.rstrip())
    if obj and "circuit_breaker" not in obj and end and raw[end - 1] == 0x7D:  # b"}"
        return b"".join((raw[: end - 1], b',"circuit_breaker":', orjson.dumps(meta), b"}"))
    return orjson.dumps({**obj, "circuit_breaker": meta})


__all__ = ["AttemptFailed", "ClientGone", "Exchange", "Permits", "serve"]
