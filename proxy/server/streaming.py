"""A committed stream: relayed from the upstream to the client until its end.

Before the commit point ``forward`` holds everything, so a failing stream can
still fail over; from the first content event on, this module owns the
client's response: every chunk is relayed as it comes, the idle deadline
moves forward with the upstream's pace (never the client's), and an upstream
failure becomes one in-band ``data: {"error": ...}`` event and the end of the
body, never a silent, truncated 200.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import aiohttp
import orjson
from aiohttp import web

from proxy.core.errors import UpstreamError
from proxy.core.outcome import Outcome
from proxy.core.sse import EventSizeGuard
from proxy.providers import registry as providers
from proxy.providers.base import (
    ErrorInfo,
    JSONDict,
    NativeAdapter,
    NativeRelay,
    StreamError,
    StreamTranslator,
    Usage,
)
from proxy.providers.openai import OpenAIStreamRelay
from proxy.server.drain import DRAIN, shutting_down
from proxy.server.exchange import (
    Attempt,
    AttemptFailed,
    Continuation,
    Exchange,
    account,
    base_headers,
    client_error,
    relayed_headers,
)
from proxy.upstream.client import Response
from proxy.upstream.deadline import Guard
from proxy.upstream.errors import UPSTREAM_ERRORS, BodyTooLarge, failure

LOG = logging.getLogger("cb_proxy.forward")
SSE_HEADERS = {
    "Content-Type": "text/event-stream",
    "Cache-Control": "no-cache",
    "X-Accel-Buffering": "no",
}
# An OpenAI stream chunk carries ~150 bytes of JSON around a few characters of text;
# used only to estimate tokens when an upstream streams without reporting usage.
OPENAI_CHUNK_OVERHEAD_RATIO = 30


def error_frame(error: JSONDict) -> bytes:
    return b"data: " + orjson.dumps(error) + b"\n\n"


def frames(payloads: list[str]) -> bytes:
    return b"".join(b"data: " + p.encode() + b"\n\n" for p in payloads)


def unreadable(exc: Exception) -> StreamError:
    """A malformed upstream reply, as a failure of that upstream (never a proxy 500)."""
    LOG.warning("unreadable upstream reply: %s: %s", type(exc).__name__, exc)
    message = f"the upstream sent a reply the proxy cannot read ({type(exc).__name__})"
    return StreamError(
        ErrorInfo(outcome=Outcome.FAILURE, status=502, body=UpstreamError(message).to_dict())
    )


class ClientGone(Exception):
    """The client went away mid-stream: nothing to fail over to, nobody to answer."""


class StreamRelay:
    """One interface over the OpenAI byte relay and the translating stream adapters.

    Every chunk passes the event-size guard first (CB_UPSTREAM_MAX_EVENT_BYTES), so
    no parser behind it ever holds more than one bounded, unfinished event.
    """

    __slots__ = ("_guard", "_relay", "_translator")

    def __init__(
        self,
        relay: OpenAIStreamRelay | None,
        translator: StreamTranslator | None,
        max_event_bytes: int,
    ) -> None:
        self._relay = relay
        self._translator = translator
        self._guard = EventSizeGuard(max_event_bytes)

    def feed(self, chunk: bytes) -> bytes:
        self._guard.feed(chunk)  # EventTooLarge: mapped with the transport errors
        try:
            if self._relay is not None:
                return self._relay.feed(chunk)
            if self._translator is not None:
                return frames(self._translator.feed(chunk))
        except StreamError:
            raise
        except Exception as exc:  # an event the translator cannot read: the upstream's fault
            raise unreadable(exc) from exc
        return b""

    def finish(self) -> bytes:
        try:
            if self._relay is not None:
                return self._relay.finish()
            if self._translator is not None:
                return frames(self._translator.finish())
        except StreamError:
            raise
        except Exception as exc:
            raise unreadable(exc) from exc
        return b""

    def error_frame(self, error: JSONDict) -> bytes:
        """The in-band error event that ends a committed stream."""
        return error_frame(error)

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


class NativeStreamRelay(StreamRelay):
    """The byte relay of a client's own format on an upstream that speaks it (no translation).

    Its in-band error is an event of that format; none is added when the upstream's own
    error event has already been relayed.
    """

    __slots__ = ("_adapter", "_native")

    def __init__(self, native: NativeRelay, adapter: NativeAdapter, max_event_bytes: int) -> None:
        super().__init__(None, None, max_event_bytes)
        self._native = native
        self._adapter = adapter

    def feed(self, chunk: bytes) -> bytes:
        self._guard.feed(chunk)
        try:
            return self._native.feed(chunk)
        except StreamError:
            raise
        except Exception as exc:
            raise unreadable(exc) from exc

    def finish(self) -> bytes:
        try:
            return self._native.finish()
        except StreamError:
            raise
        except Exception as exc:
            raise unreadable(exc) from exc

    def error_frame(self, error: JSONDict) -> bytes:
        return b"" if self._native.error_relayed else self._adapter.error_frame(error)

    @property
    def has_content(self) -> bool:
        return self._native.has_content or self._native.finished

    @property
    def content_chars(self) -> int:
        return self._native.relayed_bytes // OPENAI_CHUNK_OVERHEAD_RATIO

    @property
    def usage(self) -> Usage | None:
        return self._native.usage


# A client of another wire format (proxy.server.messages, Anthropic SDK apps) re-encodes what
# the relay writes: set on the request, it wraps the stream's relay.
REFRAME: web.RequestKey[Callable[[StreamRelay], StreamRelay]] = web.RequestKey("cb_reframe")


async def write(out: web.StreamResponse, data: bytes) -> None:
    try:
        await out.write(data)
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc


async def stream(
    ex: Exchange,
    attempt: Attempt,
    resp: Response,
    deadline: Guard,
    total_deadline: float,
    native: NativeAdapter | None = None,
) -> web.StreamResponse:
    cand = attempt.cand
    adapter = providers.translator(cand.provider.type)
    max_event = ex.state.settings.upstream_max_event_bytes
    if native is not None:  # the client's own format: relayed as it comes, never reframed
        relay: StreamRelay = NativeStreamRelay(native.stream_relay(), native, max_event)
    elif adapter is None:
        relay = StreamRelay(OpenAIStreamRelay(strip_usage=not ex.include_usage), None, max_event)
    else:
        relay = StreamRelay(
            None,
            adapter.stream_translator(
                ex.endpoint, cand.deployment, cand.deployment.upstream_model, ex.include_usage
            ),
            max_event,
        )
    reframe = ex.request.get(REFRAME) if native is None else None
    if reframe is not None:
        relay = reframe(relay)

    # Phase 1: hold everything until the first content event; failures here fail over.
    # The caller's deadline (first token) applies; its TimeoutError is handled there, and so
    # are the transport errors (proxy.upstream.errors), which reach it from here unchanged.
    # What is held before the commit point is bounded like a plain reply: an upstream that
    # streams preamble (role-only deltas, comments) without end is a failure, not a leak.
    held: list[bytes] = []
    held_bytes = 0
    limit = ex.state.settings.upstream_max_body_bytes
    try:
        while not relay.has_content:
            chunk = await resp.read_chunk()
            if not chunk:
                held.append(relay.finish())
                break
            # Counted as read: the relay may keep pre-commit bytes itself rather than return them.
            held_bytes += len(chunk)
            if held_bytes > limit:
                raise BodyTooLarge(
                    f"{held_bytes} bytes of stream before its first content event; the limit "
                    f"is {limit} (CB_UPSTREAM_MAX_BODY_BYTES)"
                )
            held.append(relay.feed(chunk))
    except StreamError as exc:
        raise AttemptFailed(
            client_error(exc.info), exc.info.outcome, exc.info, transient=exc.info.transient
        ) from None
    pending = b"".join(held)
    del held  # the pre-commit chunks: only their join is written
    attempt.first_token()  # before the claim: a near-tie loser did start in time
    if ex.race is not None and not ex.race.claim(attempt):
        # A hedged attempt committed first (proxy.server.hedge): this one writes nothing.
        raise asyncio.CancelledError
    cont = ex.continuation if native is None and reframe is None else None
    if cont is not None and cont.resuming:
        # A continuation of a stream already committed (proxy.server.continuation).
        deadline.reschedule(None)
        ex.body = {}
        return await cont.splice(ex, attempt, relay, resp, pending, total_deadline)

    # Commit: the client gets a 200 and there is no failover from here on.
    deadline.reschedule(None)
    # The request body is not read again (usage estimates use plan.prompt_tokens): a long
    # stream does not keep the parsed prompt alive.
    ex.body = {}
    ex.native = None
    ex.relayed_native = native is not None
    # One header mapping, the response's own; nothing else holds a copy for the stream's life.
    out = web.StreamResponse(status=200, headers=SSE_HEADERS)
    out.headers.update(base_headers(ex, attempt))
    out.headers.update(relayed_headers(resp, ex.state.redactor))
    try:
        try:
            await out.prepare(ex.request)
            if pending:
                # Only whole events reach here (docs/architecture.md, "Secrets").
                pending = ex.state.redactor.redact_success(pending)
                await out.write(pending)
                if cont is not None:
                    cont.keep(pending)
        except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
            raise ClientGone(str(exc)) from exc
        pending = b""  # written: not held for the rest of the stream
        outcome = await relay_rest(ex, attempt, relay, resp, out, total_deadline, cont)
    except ClientGone:
        LOG.info("request %s: the client went away mid-stream", ex.request_id)
        outcome = Outcome.IGNORED
    except asyncio.CancelledError:
        if not ex.request.app[DRAIN].claim():
            raise  # the client went away (handler cancellation): nobody to answer
        outcome = await end_at_shutdown(ex, out, relay)
    attempt.finish(ex, outcome)
    cost = account(ex, cand, relay.usage, relay.content_chars)
    if cont is not None and cont.failure is not None:
        await continue_or_fail(ex, attempt, relay, out, cont, cost, total_deadline)
    return out


async def continue_or_fail(
    ex: Exchange,
    attempt: Attempt,
    relay: StreamRelay,
    out: web.StreamResponse,
    cont: Continuation,
    cost: float,
    total_deadline: float,
) -> None:
    """A failed committed stream: continued on the next candidates, or its in-band error."""
    failed = cont.failure
    try:
        if failed is None or await cont.resume(ex, attempt, relay, out, cost, total_deadline):
            return
    except asyncio.CancelledError:
        if not ex.request.app[DRAIN].claim():
            raise  # the client went away: nobody to answer
        await end_at_shutdown(ex, out, relay)
        return
    try:
        await write(out, relay.error_frame(ex.state.redactor.redact_json(failed)))
        await out.write_eof()
    except (ClientGone, ConnectionError, aiohttp.ClientConnectionResetError):
        LOG.info("request %s: the client went away mid-stream", ex.request_id)


async def end_at_shutdown(ex: Exchange, out: web.StreamResponse, relay: StreamRelay) -> Outcome:
    """The grace period ended mid-stream (server/drain.py): an in-band error, then the end.

    The client sees one error event with the code ``proxy_shutting_down``, in its API's
    shape (the relay's ``error_frame``: OpenAI's ``data: {"error": ...}``, Anthropic's
    ``event: error``), and the final chunk of the chunked body, a clean end its SDK reports
    as an API error instead of a connection error. The upstream did nothing wrong: the
    outcome is ignored.
    """
    LOG.info("request %s: stream ended by the shutdown", ex.request_id)
    try:
        if not out.prepared:
            await out.prepare(ex.request)
        frame = relay.error_frame(shutting_down().to_dict())
        if frame:  # empty when a native relay already passed the upstream's own error on
            await out.write(frame)
        await out.write_eof()
    except (ConnectionError, RuntimeError, aiohttp.ClientConnectionResetError):
        pass  # the client went away, or the body had just ended: nothing more to send
    return Outcome.IGNORED


async def relay_rest(
    ex: Exchange,
    attempt: Attempt,
    relay: StreamRelay,
    resp: Response,
    out: web.StreamResponse,
    total_deadline: float,
    cont: Continuation | None = None,
) -> Outcome:
    """Relay the committed stream to its end; the outcome is the upstream's.

    With ``cont`` (a continuable request), what is written is also copied, and a failure
    is left to the caller (``cont.failure``): no error event, no end of the body yet.
    """
    keep = cont.keep if cont is not None else None
    loop = asyncio.get_running_loop()
    cand = attempt.cand
    idle = cand.provider.timeouts.idle
    # Only whole events reach here, so a key an upstream echoes inside one is in one write
    # (docs/architecture.md, "Secrets": a find per key; the full scan only on a hit).
    redact = ex.state.redactor.redact_success
    failed: JSONDict | None = None
    try:
        # One timer for the rest of the stream, pushed forward at every chunk (idle gap).
        with ex.state.watchdog.guard(min(loop.time() + idle, total_deadline)) as gap:
            while True:
                chunk = await resp.read_chunk()
                if not chunk:
                    tail = relay.finish()
                    if tail:
                        gap.reschedule(total_deadline)  # the client's pace, not the upstream's
                        tail = redact(tail)
                        await write(out, tail)
                        if keep is not None:
                            keep(tail)
                    break
                data = relay.feed(chunk)
                if data:
                    # A client slow to take the data is not an upstream stall: only the total
                    # deadline runs while writing (the upstream is paused by backpressure).
                    gap.when = total_deadline
                    data = redact(data)
                    await write(out, data)
                    if keep is not None:
                        keep(data)
                # The idle gap from now (Guard.reschedule inlined: this runs per chunk). Later
                # than before: an attribute write; earlier than its wheel slot (the sweep filed
                # it at the total deadline during a write): filed again.
                when = loop.time() + idle
                if when > total_deadline:
                    when = total_deadline
                gap.when = when
                if when < gap.filed_at:
                    gap.refile()
    except StreamError as exc:
        failed = exc.info.body
    except UPSTREAM_ERRORS as exc:
        # A timeout, a drop, an event over the limit: mapped in one place (proxy.upstream.errors).
        doing = (
            f"mid-stream (no data for {idle:g} s)"
            if loop.time() < total_deadline
            else "at the total deadline"
        )
        failed = failure(exc, cand.deployment.key, doing=doing).error.to_dict()
    if failed is not None and cont is not None and not cont.resuming:
        cont.failure = failed  # the caller continues the stream or ends it with this error
        return Outcome.FAILURE
    if failed is not None:
        # Never a silent truncated 200: one in-band error event (no key in it), then the end.
        frame = relay.error_frame(ex.state.redactor.redact_json(failed))
        if frame:  # none when the upstream's own error event was relayed already
            await write(out, frame)
    try:
        await out.write_eof()
    except (ConnectionError, aiohttp.ClientConnectionResetError) as exc:
        raise ClientGone(str(exc)) from exc
    return Outcome.FAILURE if failed is not None else Outcome.SUCCESS
