"""Mid-stream continuation, the shell part (docs/breaker.md, "Mid-stream continuation").

A committed ``/v1/chat/completions`` stream whose upstream fails is finished by
the next candidates, instead of ending with the in-band error: by prefill when
the candidate supports it, else (or when it refuses the prefill with a 4xx) by
restart-and-match. The pure pieces (transcript, bodies, splicer) are in
proxy/core/continuation.py; this module keeps the copy, walks the candidates
and splices a continuing stream into the client's response.

Invariants:
- Healthy path: a request eligible up front (stream, n=1, no logprobs,
  continuation on) keeps a copy of the OpenAI bytes written to the client, at
  most ``CB_CONTINUATION_MAX_BYTES``; past that the copy is dropped and the
  stream is not continuable. Nothing is parsed unless the stream fails.
- Every continuation attempt is an ordinary attempt (``forward._attempt``):
  rate-limit gate, both breaker permits, the first-token deadline, its own
  outcome; it is a retry, so it needs a slot of the retry budget, and it runs
  within the failed attempt's total deadline and the request's ``max_attempts``.
- The failed attempt keeps its FAILURE outcome; its usage (reported, or the
  estimate) is added to the continuation's in the client's usage chunk.
- When no candidate continues the stream, the client gets the one in-band
  error of the ORIGINAL failure, then the end, never a truncated success.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import aiohttp
from aiohttp import web

from proxy.config.model import Provider, RuleSet
from proxy.core.candidates import Candidate
from proxy.core.continuation import (
    DONE,
    Method,
    Mismatch,
    Result,
    Splicer,
    Transcript,
    eligible_request,
    metadata_chunk,
    prefill_body,
    read_transcript,
    restart_body,
)
from proxy.core.errors import ProxyError, UpstreamError
from proxy.core.outcome import Outcome
from proxy.core.ratelimit import gate_seconds
from proxy.core.usage import Usage, estimate_tokens
from proxy.providers.base import Endpoint, JSONDict, StreamError
from proxy.server.exchange import Attempt, AttemptFailed, Exchange, account, metadata
from proxy.server.forward import _attempt, _permits
from proxy.server.streaming import ClientGone, StreamRelay, write
from proxy.upstream.client import Response
from proxy.upstream.errors import UPSTREAM_ERRORS, failure

LOG = logging.getLogger("cb_proxy.route")
DONE_FRAME = b"data: " + DONE.encode() + b"\n\n"


def continuation_on(rules: RuleSet, route_setting: bool | None) -> bool:
    """The rules' switch for a request: its route's ``continuation``, else ``defaults``."""
    return rules.defaults.continuation if route_setting is None else route_setting


def model_allows(rules: RuleSet, cand: Candidate) -> bool:
    model = rules.models.get(cand.deployment.model)
    return model is None or model.continuation is not False


def prefill_supported(provider: Provider) -> bool:
    """Anthropic continues an assistant prefill natively; others only with the rules' flag."""
    return provider.type == "anthropic" if provider.prefill is None else provider.prefill


def for_request(ex: Exchange) -> StreamContinuation | None:
    """The continuation of a request, when it is eligible up front; None otherwise."""
    limit = ex.state.settings.continuation_max_bytes
    if not ex.stream or ex.endpoint is not Endpoint.CHAT or ex.native is not None or limit <= 0:
        return None
    rules = ex.rules
    route = rules.match_route(ex.plan.requested, ex.request.headers) if rules.routes else None
    if not continuation_on(rules, route.continuation if route is not None else None):
        return None
    if not eligible_request(ex.body):
        return None
    return StreamContinuation(ex.body, limit)


class _Splicing:
    """A continuation in progress: where the next candidate's stream goes."""

    __slots__ = ("method", "out", "splicer", "transcript")

    def __init__(
        self, out: web.StreamResponse, transcript: Transcript, method: Method, prior: Usage
    ) -> None:
        self.out = out
        self.transcript = transcript
        self.method = method
        self.splicer = Splicer(transcript, method, prior)


class _Mismatched(AttemptFailed):
    """A restart that did not repeat the text already sent: nothing of it was sent."""


class StreamContinuation:
    """The bounded copy of a committed stream, and its continuation when it fails."""

    __slots__ = ("_body", "_cost", "_limit", "_parts", "_size", "failure", "splicing")

    def __init__(self, body: JSONDict, limit: int) -> None:
        self._body = body  # the client's request: a continuation sends it again
        self._limit = limit
        self._parts: list[bytes] | None = []
        self._size = 0
        self.splicing: _Splicing | None = None
        self.failure: JSONDict | None = None  # the committed stream's failure, to continue
        self._cost = 0.0  # what the attempts before the continuing one cost

    def keep(self, data: bytes) -> None:
        """Copy bytes written to the client; past the limit the copy is dropped for good."""
        parts = self._parts
        if parts is None:
            return
        self._size += len(data)
        if self._size > self._limit:
            self._parts = None
            return
        parts.append(data)

    @property
    def resuming(self) -> bool:
        return self.splicing is not None

    # -- the failed stream --------------------------------------------------------------

    async def resume(
        self,
        ex: Exchange,
        failed: Attempt,
        relay: StreamRelay,
        out: web.StreamResponse,
        cost: float,
        total_deadline: float,
    ) -> bool:
        """Continue the failed stream on the next candidates; True when the stream ended well.

        False: nothing more was written, and the caller ends the stream with the original
        failure's in-band error.
        """
        parts = self._parts
        upstream = failed.cand.provider.name
        if parts is None:
            self._count(ex, upstream, None, Result.INELIGIBLE)
            return False
        transcript = read_transcript(b"".join(parts))
        self._parts = None  # parsed once; the copy is not needed again
        if not transcript.continuable or not model_allows(ex.rules, failed.cand):
            self._count(ex, upstream, None, Result.INELIGIBLE)
            LOG.info(
                "request %s: stream of %s not continued (%s)",
                ex.request_id,
                failed.cand.deployment.key,
                transcript.ineligible or "continuation off for its model",
            )
            return False
        usage = relay.usage or Usage(ex.plan.prompt_tokens, estimate_tokens(len(transcript.text)))
        state = ex.state
        if state.retries_in_flight >= _retry_budget(ex):
            self._count(ex, upstream, None, Result.FAILED)
            LOG.info("request %s: stream not continued (retry budget spent)", ex.request_id)
            return False
        self._cost = cost
        state.retries_in_flight += 1
        try:
            return await self._walk(ex, failed, out, transcript, usage, total_deadline)
        finally:
            state.retries_in_flight -= 1
            self.splicing = None

    async def _walk(
        self,
        ex: Exchange,
        failed: Attempt,
        out: web.StreamResponse,
        transcript: Transcript,
        prior: Usage,
        deadline: float,
    ) -> bool:
        loop = asyncio.get_running_loop()
        upstream = failed.cand.provider.name
        candidates = ex.plan.candidates
        max_attempts = ex.rules.defaults.retry.max_attempts
        for index in range(failed.index + 1, len(candidates)):
            if ex.attempts >= max_attempts or loop.time() >= deadline:
                break
            cand = candidates[index]
            if not model_allows(ex.rules, cand):
                continue
            methods = [Method.RESTART]
            if prefill_supported(cand.provider):
                methods.insert(0, Method.PREFILL)
            for method in methods:
                self.splicing = _Splicing(out, transcript, method, prior)
                if method is Method.PREFILL:
                    prefix = cand.provider.type == "openai"
                    ex.body = prefill_body(self._body, transcript.text, prefix_flag=prefix)
                else:
                    ex.body = restart_body(self._body)
                try:
                    response = await _try(ex, cand, index, deadline)
                except _Mismatched:
                    self._count(ex, upstream, method, Result.MISMATCH)
                    LOG.info(
                        "request %s: restart on %s did not repeat the text sent; ending with "
                        "the original failure",
                        ex.request_id,
                        cand.deployment.key,
                    )
                    return False
                except ProxyError as exc:
                    # A caller-fault reply (4xx): a prefill refused; a restart sent the
                    # client's own request, so the next candidate will not do better.
                    LOG.info(
                        "request %s: %s on %s refused: %s",
                        ex.request_id,
                        method.value,
                        cand.deployment.key,
                        exc.message,
                    )
                    if method is Method.PREFILL:
                        continue
                    self._count(ex, upstream, method, Result.FAILED)
                    return False
                finally:
                    ex.body = {}
                if response is not None:
                    self._count(ex, upstream, method, Result.CONTINUED)
                    LOG.info(
                        "request %s: stream of %s continued on %s by %s",
                        ex.request_id,
                        failed.cand.deployment.key,
                        cand.deployment.key,
                        method.value,
                    )
                    return True
                break  # this candidate failed: the next one
        self._count(ex, upstream, None, Result.FAILED)
        return False

    @staticmethod
    def _count(ex: Exchange, upstream: str, method: Method | None, result: Result) -> None:
        label = "none" if method is None else method.value
        ex.state.metrics.continuations.labels(upstream, label, result.value).inc()

    # -- the continuing stream (called by streaming.stream at its commit point) ---------

    async def splice(
        self,
        ex: Exchange,
        attempt: Attempt,
        relay: StreamRelay,
        resp: Response,
        pending: bytes,
        total_deadline: float,
    ) -> web.StreamResponse:
        """Relay a continuing candidate's stream into the client's, through the splicer.

        Until the splice has written something, a failure is this attempt's
        ``AttemptFailed`` (the walk goes on to the next candidate); a mismatch is
        ``_Mismatched``; once text went out, a failure ends the stream with its error.
        """
        splicing = self.splicing
        if splicing is None:
            raise RuntimeError("splice without a continuation in progress")
        splicer = splicing.splicer
        out = splicing.out
        redact = ex.state.redactor.redact_success
        loop = asyncio.get_running_loop()
        idle = attempt.cand.provider.timeouts.idle
        failed: JSONDict | None = None
        try:
            with ex.state.watchdog.guard(min(loop.time() + idle, total_deadline)) as gap:
                data = pending
                while True:
                    spliced = splicer.feed(data) if data else b""
                    if spliced:
                        gap.reschedule(total_deadline)
                        await write(out, redact(spliced))
                    if splicer.done:
                        break
                    gap.reschedule(min(loop.time() + idle, total_deadline))
                    chunk = await resp.read_chunk()
                    if not chunk:
                        data = relay.finish()
                        spliced = splicer.feed(data) + splicer.close() if data else b""
                        if spliced:
                            await write(out, redact(spliced))
                        break
                    data = relay.feed(chunk)
        except Mismatch as exc:
            raise _Mismatched(_proxy_error(str(exc)), Outcome.IGNORED) from None
        except ClientGone:
            # The client left mid-splice: nobody to answer; what the upstream billed counts.
            LOG.info("request %s: the client went away during a continuation", ex.request_id)
            attempt.finish(ex, Outcome.IGNORED)
            account(ex, attempt.cand, relay.usage, splicer.sent_chars)
            return out
        except StreamError as exc:
            failed = exc.info.body
        except UPSTREAM_ERRORS as exc:
            found = failure(exc, attempt.cand.deployment.key, doing="continuing a stream")
            failed = found.error.to_dict()
        if failed is not None and not splicer.sent_chars and not splicer.finished:
            # Nothing of this attempt reached the client: an ordinary failed attempt.
            raise AttemptFailed(_proxy_error(_message(failed)), Outcome.FAILURE)
        if not splicer.finished and failed is None:
            failed = _proxy_error("the continuing stream ended before it was complete").to_dict()
        outcome = Outcome.FAILURE if failed is not None else Outcome.SUCCESS
        attempt.finish(ex, outcome)
        cost = account(ex, attempt.cand, relay.usage, splicer.sent_chars)
        try:
            if failed is not None:
                await write(out, redact(relay.error_frame(ex.state.redactor.redact_json(failed))))
            else:
                if ex.rules.defaults.response_metadata:
                    meta = metadata(ex, attempt, cost + self._cost)
                    meta["continuation"] = {
                        "method": splicing.method.value,
                        "continued_on": attempt.cand.deployment.key,
                        "sent_chars_before": len(splicing.transcript.text),
                    }
                    await write(out, metadata_chunk(splicing.transcript, meta))
                await write(out, DONE_FRAME)
            await out.write_eof()
        except (ConnectionError, aiohttp.ClientConnectionResetError, ClientGone):
            LOG.info("request %s: the client went away during a continuation", ex.request_id)
        return out


def _retry_budget(ex: Exchange) -> float:
    """Retries in flight never exceed max(3, budget_ratio of active requests) (docs/breaker.md)."""
    return ex.state.retry_budget(ex.rules.defaults.retry)


async def _try(
    ex: Exchange, cand: Candidate, index: int, deadline: float
) -> web.StreamResponse | None:
    """One continuation attempt on ``cand``: gate, both breakers, the attempt itself.

    The response once the stream was continued; None when the candidate was skipped or
    failed (the next one may serve). A caller-fault reply raises its ``ProxyError``, a
    mismatch ``_Mismatched``.
    """
    state = ex.state
    name = cand.provider.name
    gate_key = (name, cand.deployment.upstream_model)
    if not state.gates.is_open(gate_key):
        state.metrics.rejections.labels(name, "rate_limited").inc()
        return None
    breaker = state.breaker(name)
    model_breaker = state.deployment_breaker(cand.deployment)
    permits = _permits(breaker, model_breaker)
    if permits is None:
        state.metrics.rejections.labels(name, "breaker_open").inc()
        return None
    permit, model_permit = permits
    try:
        return await _attempt(
            ex, cand, index, (breaker, permit, model_breaker, model_permit), deadline
        )
    except _Mismatched:
        raise
    except AttemptFailed as failed:
        LOG.info(
            "request %s: continuation attempt on %s failed (%s): %s",
            ex.request_id,
            cand.deployment.key,
            failed.outcome.value,
            failed.error.message,
        )
        if failed.outcome is Outcome.RATE_LIMITED:
            retry_after = failed.info.retry_after if failed.info else None
            state.gates.close(gate_key, gate_seconds(retry_after))
        if failed.outcome is Outcome.IGNORED and not failed.local:
            raise failed.error from None
        return None


def _proxy_error(message: str) -> ProxyError:
    return UpstreamError(message)


def _message(body: JSONDict) -> str:
    err: Any = body.get("error")
    return str(err.get("message")) if isinstance(err, dict) else "upstream failure"
