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

One deadline context is rescheduled per phase (first token, then idle gaps,
capped by the total), so a request pays for one timer, not one per chunk.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web
from multidict import CIMultiDict

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
    DONE,
    Endpoint,
    ErrorInfo,
    JSONDict,
    StreamError,
    StreamTranslator,
    Usage,
)
from proxy.providers.openai import OpenAIStreamRelay, parse_usage
from proxy.router import Candidate, RoutePlan
from proxy.rules import RuleSet
from proxy.state import ProxyState

LOG = logging.getLogger("cb_proxy.forward")

ERROR_BODY_LIMIT = 256 * 1024  # an upstream error body larger than this is cut
READ_CHUNK = 64 * 1024
# Upstream response headers worth relaying: clients read rate-limit and timing headers.
RELAYED_PREFIXES = ("x-ratelimit-", "openai-processing-ms", "openai-version")
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
    response_headers: CIMultiDict[str] = field(default_factory=CIMultiDict)


@dataclass(slots=True)
class AttemptFailed(Exception):
    """An attempt that ended before anything reached the client."""

    error: ProxyError
    outcome: Outcome
    info: ErrorInfo | None = None


def _client_error(info: ErrorInfo) -> ProxyError:
    headers: dict[str, str] = {}
    if info.retry_after is not None:
        headers["retry-after"] = str(max(1, round(info.retry_after)))
    return UpstreamHTTPError(info.status, info.body, headers=headers)


def _base_headers(ex: Exchange, cand: Candidate, index: int) -> dict[str, str]:
    dep = cand.deployment
    return {
        "x-request-id": ex.request_id,
        "x-cb-provider": cand.provider.name,
        "x-cb-model": dep.upstream_model,
        "x-cb-upstream": dep.key,
        "x-cb-attempts": str(ex.attempts),
        "x-cb-fallback": "true" if index > 0 else "false",
        "x-cb-breaker-state": "closed",
        "x-cb-route": ex.plan.header(),
    }


def _metadata(ex: Exchange, cand: Candidate, index: int, cost: float | None) -> JSONDict:
    return {
        "provider": cand.provider.name,
        "model": cand.deployment.upstream_model,
        "upstream": cand.deployment.key,
        "fallback_used": index > 0,
        "attempts": ex.attempts,
        "cost_usd": cost,
        "route": ex.plan.header(),
    }


def _relayed(upstream: Mapping[str, str]) -> dict[str, str]:
    return {k: v for k, v in upstream.items() if k.lower().startswith(RELAYED_PREFIXES)}


async def serve(ex: Exchange) -> web.StreamResponse:
    """Walk the plan; return the response (a stream is already written when returned)."""
    plan = ex.plan
    if not plan.candidates:
        raise _nothing_to_try(ex)
    errors: list[AttemptFailed] = []
    for index, cand in enumerate(plan.candidates):
        if errors and errors[-1].info is not None and errors[-1].info.context_window:
            last_window = plan.candidates[index - 1].context_window or 0
            if (cand.context_window or 0) <= last_window:
                continue
        try:
            return await _attempt(ex, cand, index)
        except AttemptFailed as failed:
            LOG.info(
                "attempt %d on %s failed: %s (%s)",
                ex.attempts,
                cand.deployment.key,
                failed.error.message,
                failed.outcome.value,
            )
            if failed.outcome is Outcome.IGNORED and not (
                failed.info is not None and failed.info.context_window
            ):
                raise failed.error from None
            errors.append(failed)
    raise _final_error(errors)


def _nothing_to_try(ex: Exchange) -> ProxyError:
    plan = ex.plan
    reasons = "; ".join(f"{r.deployment}: {r.reason}" for r in plan.rejected) or "no deployments"
    if plan.blocked and len(plan.blocked) == len(plan.rejected):
        return ServiceUnavailable(
            f"every upstream for '{plan.requested}' is unavailable: {reasons}"
        )
    return InvalidRequest(
        f"no upstream can serve '{plan.requested}': {reasons}", param="model", code="no_candidates"
    )


def _final_error(errors: list[AttemptFailed]) -> ProxyError:
    if not errors:
        return UpstreamError("no candidate could be tried")
    if all(e.outcome is Outcome.RATE_LIMITED for e in errors):
        waits = [e.info.retry_after for e in errors if e.info and e.info.retry_after is not None]
        wait = min(waits) if waits else 1.0
        return RateLimited(
            "every upstream for this model is rate-limited; retry later",
            headers={
                "retry-after": str(max(1, round(wait))),
                "retry-after-ms": str(int(wait * 1000)),
            },
        )
    return errors[0].error


async def _attempt(ex: Exchange, cand: Candidate, index: int) -> web.StreamResponse:
    state = ex.state
    session = state.session
    if session is None:
        raise RuntimeError("client session not started")
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
        # This candidate cannot express the request (e.g. n > 1 for Anthropic): a caller
        # fault for it, but a later candidate of another format may still serve.
        raise AttemptFailed(exc, Outcome.FAILURE) from None
    ex.attempts += 1
    timeouts = cand.provider.timeouts
    loop = asyncio.get_running_loop()
    sent = loop.time()
    total_deadline = sent + timeouts.total
    phase = _Phase.CONNECT
    try:
        async with asyncio.timeout(min(sent + timeouts.first_token, total_deadline)) as deadline:
            async with session.request(
                req.method,
                req.url,
                headers=req.headers,
                data=req.body,
                timeout=aiohttp.ClientTimeout(total=None, sock_connect=timeouts.connect),
                allow_redirects=False,
            ) as resp:
                phase = _Phase.FIRST_TOKEN
                if resp.status >= 300:
                    raw = await resp.content.read(ERROR_BODY_LIMIT)
                    info = adapter.classify_error(resp.status, resp.headers, raw)
                    raise AttemptFailed(_client_error(info), info.outcome, info)
                if not ex.stream:
                    deadline.reschedule(min(loop.time() + timeouts.idle, total_deadline))
                    phase = _Phase.IDLE
                    raw = await resp.read()
                    ex.upstream_seconds += loop.time() - sent
                    return _plain_response(ex, cand, index, resp.headers, raw)
                return await _stream(ex, cand, index, resp, deadline, total_deadline, sent)
    except AttemptFailed:
        ex.upstream_seconds += loop.time() - sent
        raise
    except TimeoutError:
        ex.upstream_seconds += loop.time() - sent
        what = {
            _Phase.CONNECT: "waiting for the response headers",
            _Phase.FIRST_TOKEN: "waiting for the first token",
            _Phase.IDLE: "waiting for more data",
        }[phase]
        if loop.time() >= total_deadline:
            what = "the total deadline passed"
        raise AttemptFailed(
            UpstreamTimeout(f"upstream {cand.deployment.key} timed out {what}"), Outcome.FAILURE
        ) from None
    except (aiohttp.ServerTimeoutError, aiohttp.ConnectionTimeoutError) as exc:
        ex.upstream_seconds += loop.time() - sent
        raise AttemptFailed(
            UpstreamTimeout(f"upstream {cand.deployment.key} timed out connecting: {exc}"),
            Outcome.FAILURE,
        ) from None
    except (aiohttp.ClientError, OSError) as exc:
        ex.upstream_seconds += loop.time() - sent
        raise AttemptFailed(
            UpstreamError(
                f"upstream {cand.deployment.key} failed: {type(exc).__name__}: {exc}".rstrip(": ")
            ),
            Outcome.FAILURE,
        ) from None


def _plain_response(
    ex: Exchange, cand: Candidate, index: int, upstream_headers: Mapping[str, str], raw: bytes
) -> web.Response:
    state = ex.state
    if cand.provider.type == "openai":
        try:
            obj: Any = orjson.loads(raw)
        except orjson.JSONDecodeError:
            raise AttemptFailed(
                UpstreamError(f"upstream {cand.deployment.key} sent invalid JSON"), Outcome.FAILURE
            ) from None
        if not isinstance(obj, dict):
            raise AttemptFailed(
                UpstreamError(f"upstream {cand.deployment.key} sent a non-object reply"),
                Outcome.FAILURE,
            )
    else:
        try:
            obj = state.translators[cand.provider.type].parse_response(
                ex.endpoint, raw, cand.deployment, cand.deployment.upstream_model
            )
        except ProxyError as exc:
            raise AttemptFailed(exc, Outcome.FAILURE) from None
    usage = parse_usage(obj)
    cost = _account(ex, cand, usage)
    headers = _base_headers(ex, cand, index)
    headers.update(_relayed(upstream_headers))
    if cost is not None:
        headers["x-cb-cost-usd"] = f"{cost:.8f}"
    if ex.rules.defaults.response_metadata:
        obj["circuit_breaker"] = _metadata(ex, cand, index, cost)
        body = orjson.dumps(obj)
    else:
        body = raw if cand.provider.type == "openai" else orjson.dumps(obj)
    return web.Response(body=body, content_type="application/json", headers=headers)


def _account(ex: Exchange, cand: Candidate, usage: Usage | None) -> float | None:
    if usage is None:
        return None
    state = ex.state
    dep = cand.deployment
    cost = state.usage.add(dep, usage)
    m = state.metrics
    m.tokens.labels(dep.provider, dep.model, "prompt").inc(usage.prompt_tokens)
    m.tokens.labels(dep.provider, dep.model, "completion").inc(usage.completion_tokens)
    m.cost.labels(dep.provider, dep.model).inc(cost)
    return cost


def _error_frame(error: JSONDict) -> bytes:
    return b"data: " + orjson.dumps(error) + b"\n\n"


def _frames(payloads: list[str]) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


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
        if self._relay is not None:
            return self._relay.feed(chunk)
        if self._translator is not None:
            return _frames(self._translator.feed(chunk))
        return b""

    def finish(self) -> bytes:
        if self._relay is not None:
            return self._relay.finish()
        if self._translator is not None:
            return _frames(self._translator.finish())
        return b""

    @property
    def has_content(self) -> bool:
        if self._relay is not None:
            return self._relay.has_content or self._relay.finished
        return self._translator is not None and (
            self._translator.has_content or self._translator.finished
        )

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
    cand: Candidate,
    index: int,
    resp: aiohttp.ClientResponse,
    deadline: asyncio.Timeout,
    total_deadline: float,
    sent: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
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
    content = resp.content
    try:
        while not relay.has_content:
            chunk = await content.readany()
            if not chunk:
                pending += relay.finish()
                break
            pending += relay.feed(chunk)
    except StreamError as exc:
        raise AttemptFailed(_client_error(exc.info), exc.info.outcome, exc.info) from None

    # Commit: the client gets a 200 and there is no failover from here on.
    deadline.reschedule(None)
    headers = _base_headers(ex, cand, index)
    headers.update(_relayed(resp.headers))
    out = web.StreamResponse(status=200, headers={**SSE_HEADERS, **headers})
    try:
        await out.prepare(ex.request)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
    try:
        return await _relay_rest(ex, cand, relay, content, out, pending, total_deadline, sent)
    except ClientGone:
        LOG.info("client went away during the stream from %s", cand.deployment.key)
        ex.upstream_seconds += loop.time() - sent
        return out


async def _relay_rest(
    ex: Exchange,
    cand: Candidate,
    relay: _Relay,
    content: aiohttp.StreamReader,
    out: web.StreamResponse,
    pending: bytes,
    total_deadline: float,
    sent: float,
) -> web.StreamResponse:
    loop = asyncio.get_running_loop()
    idle = cand.provider.timeouts.idle
    if pending:
        await _write(out, pending)
    failure: JSONDict | None = None
    try:
        # One timer for the rest of the stream, pushed forward at every chunk (idle gap).
        async with asyncio.timeout(min(loop.time() + idle, total_deadline)) as gap:
            while True:
                chunk = await content.readany()
                if not chunk:
                    tail = relay.finish()
                    if tail:
                        await _write(out, tail)
                    break
                data = relay.feed(chunk)
                if data:
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
    except (aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError) as exc:
        failure = UpstreamError(
            f"upstream {cand.deployment.key} dropped the stream ({type(exc).__name__})"
        ).to_dict()
    ex.upstream_seconds += loop.time() - sent
    if failure is not None:
        await _write(out, _error_frame(failure))
    _account(ex, cand, relay.usage)
    try:
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
    return out


__all__ = ["DONE", "AttemptFailed", "ClientGone", "Exchange", "serve"]
