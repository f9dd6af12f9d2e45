"""OpenAI-compatible upstreams (OpenAI, vLLM, Ollama, ...): a byte relay.

The request body is re-serialized once to rewrite ``model`` (and to ask for
usage in streams); responses are not re-encoded except to add the proxy's
``circuit_breaker`` metadata to JSON bodies. A stream's bytes are forwarded as
they arrive: the relay only looks inside events until the first content event
(the commit point, so an early failure can still fail over) and afterwards
only at events that can carry usage, an error or the terminal marker.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.config.model import Deployment, Provider
from proxy.core.errors import error_body
from proxy.core.outcome import Outcome, classify_status, is_transient
from proxy.core.ratelimit import parse_retry_after
from proxy.providers.base import (
    Endpoint,
    ErrorInfo,
    JSONDict,
    StreamError,
    UpstreamRequest,
    Usage,
)

PATHS = {
    Endpoint.CHAT: "/chat/completions",
    Endpoint.COMPLETIONS: "/completions",
    Endpoint.EMBEDDINGS: "/embeddings",
}
CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
EVENT_SEP = b"\n\n"
DONE_EVENT = b"data: [DONE]"
DONE_FRAME = b"data: [DONE]\n\n"
# How a JSON data event ends: a batch ending otherwise is checked event by event.
JSON_EVENT_END = b"}\n\n"
# Markers that make an event worth parsing after the commit point.
USAGE_MARK = b'"usage":{'
USAGE_MARK_SPACED = b'"usage": {'
ERROR_MARK = b'"error"'
FINISH_MARK = b'"finish_reason":"'
FINISH_MARK_SPACED = b'"finish_reason": "'
# Delta fields that are generated output: the first one is the commit point. Legacy
# function calling, refusals, audio and the reasoning fields of vLLM/DeepSeek-style servers
# stream for a long time without ``content``; holding them would run the first-token timer.
CONTENT_DELTA_KEYS = (
    "content",
    "tool_calls",
    "function_call",
    "refusal",
    "audio",
    "reasoning_content",
    "reasoning",
)
# What makes an event the commit point (see _has_content), as bytes: a non-empty string
# in a content-like key, a tool or function call, an audio part, or a finish reason.
CONTENT_HINT = re.compile(
    rb'"(?:content|refusal|reasoning_content|reasoning|text|tool_calls|function_call|audio)":'
    rb'\s*(?:"[^"]|\[\s*[^\]\s]|\{\s*[^}\s])'  # a non-empty string, list or object
    rb'|"finish_reason":\s*"[^"]'
)
# Markers that send an event before the commit point down the parsing path.
BEFORE_COMMIT_MARKS = (ERROR_MARK, USAGE_MARK, USAGE_MARK_SPACED, DONE_EVENT)
# A run of blank lines: before the commit point the event-by-event path reframes it
# (drops empty events, frames a lone newline), so the one-scan path leaves it to that one.
BLANK_RUN = b"\n\n\n"
AFTER_COMMIT_MARKS = (
    USAGE_MARK,
    USAGE_MARK_SPACED,
    ERROR_MARK,
    DONE_EVENT,
    FINISH_MARK,
    FINISH_MARK_SPACED,
)


def exact_bytes(data: bytes) -> bytes:
    """``data`` in an allocation of its own size.

    orjson asks for a buffer of several times the output's size (4.8 KiB for a
    100-byte body, 7 MiB for a 1 MB one) and hands that buffer out as the bytes
    object, so the upstream body pins it for as long as it is referenced: for a
    stream, its whole life. The copy costs ~60 ns for a small body, ~30 us per MB.
    """
    return b"".join((data, b""))  # a new object: join copies two or more parts


def _headers(provider: Provider, api_key: str | None) -> dict[str, str]:
    headers = {"content-type": "application/json", **provider.headers}
    if api_key:
        headers["authorization"] = f"Bearer {api_key}"
    return headers


class OpenAIAdapter:
    """Builds requests and classifies errors; streams go through ``OpenAIStreamRelay``."""

    def build_request(
        self,
        endpoint: Endpoint,
        body: JSONDict,
        provider: Provider,
        deployment: Deployment,
        api_key: str | None,
        stream: bool,
    ) -> UpstreamRequest:
        upstream = dict(body)
        upstream["model"] = deployment.upstream_model
        if stream and endpoint is not Endpoint.EMBEDDINGS:
            options = body.get("stream_options")
            if not (isinstance(options, dict) and options.get("include_usage")):
                # Ask for usage so cost can be accounted; the relay drops the extra chunk.
                upstream["stream_options"] = {**(options or {}), "include_usage": True}
        return UpstreamRequest(
            "POST",
            provider.base_url + PATHS[endpoint],
            _headers(provider, api_key),
            exact_bytes(orjson.dumps(upstream)),
        )

    def health_request(self, provider: Provider, api_key: str | None) -> UpstreamRequest:
        path = provider.health_check.path or "/models"
        return UpstreamRequest("GET", provider.base_url + path, _headers(provider, api_key))

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorInfo:
        payload: Any = None
        try:
            payload = orjson.loads(body) if body else None
        except orjson.JSONDecodeError:
            payload = None
        err = payload.get("error") if isinstance(payload, dict) else None
        if isinstance(err, dict) and "message" in err:
            client_body: JSONDict = {
                "error": {
                    "message": err.get("message"),
                    "type": err.get("type"),
                    "param": err.get("param"),
                    "code": err.get("code"),
                }
            }
            code = err.get("code") if isinstance(err.get("code"), str) else None
        else:
            text = body[:500].decode("utf-8", "replace").strip() or f"HTTP {status}"
            client_body = error_body(status, f"upstream returned HTTP {status}: {text}")
            code = None
        return ErrorInfo(
            outcome=classify_status(status, code),
            status=status,
            body=client_body,
            retry_after=parse_retry_after(headers, time.time()),
            transient=is_transient(status),
            context_window=code in CONTEXT_CODES,
        )


def parse_usage(obj: Mapping[str, Any]) -> Usage | None:
    usage = obj.get("usage")
    if not isinstance(usage, dict):
        return None
    prompt = usage.get("prompt_tokens", 0)
    completion = usage.get("completion_tokens", 0)
    return Usage(
        prompt if isinstance(prompt, int) else 0,
        completion if isinstance(completion, int) else 0,
    )


def _event_json(event: bytes) -> Any:
    """The JSON of a ``data:`` event, or None for comments, [DONE] and junk."""
    for line in event.split(b"\n"):
        if line.startswith(b"data:"):
            data = line[5:].strip()
            if data and data != b"[DONE]":
                try:
                    return orjson.loads(data)
                except orjson.JSONDecodeError:
                    return None
    return None


def _whole_event(event: bytes) -> bool:
    """Is the text left at EOF a complete event: [DONE], comments, or parseable JSON data?"""
    text = event.replace(b"\r\n", b"\n").strip()
    if text.startswith(DONE_EVENT) or all(
        line.startswith(b":") for line in text.split(b"\n") if line
    ):
        return True
    return _event_json(text) is not None


def _has_content(chunk: Any) -> bool:
    choices = chunk.get("choices") if isinstance(chunk, dict) else None
    if not isinstance(choices, list):
        return False
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        if choice.get("finish_reason"):
            return True
        delta = choice.get("delta")
        if isinstance(delta, dict) and any(delta.get(key) for key in CONTENT_DELTA_KEYS):
            return True
        if choice.get("text"):  # legacy completions stream
            return True
    return False


def _stream_error(obj: Mapping[str, Any]) -> StreamError:
    err = obj.get("error")
    message = err.get("message", "upstream stream error") if isinstance(err, dict) else str(err)
    code = err.get("code") if isinstance(err, dict) else None
    return StreamError(
        ErrorInfo(
            outcome=Outcome.FAILURE,
            status=502,
            body={
                "error": {
                    "message": f"upstream stream error: {message}",
                    "type": "server_error",
                    "param": None,
                    "code": code if isinstance(code, str) else "upstream_stream_error",
                }
            },
        )
    )


def _truncated() -> StreamError:
    return StreamError(
        ErrorInfo(
            outcome=Outcome.FAILURE,
            status=502,
            body=error_body(
                502,
                "upstream stream ended before it was complete",
                code="upstream_stream_truncated",
            ),
        )
    )


def _malformed_event() -> StreamError:
    return StreamError(
        ErrorInfo(
            outcome=Outcome.FAILURE,
            status=502,
            body=error_body(
                502,
                "upstream sent a stream event that is not JSON",
                code="upstream_malformed_event",
            ),
        )
    )


def _unreadable(event: bytes) -> bool:
    """A ``data:`` event whose data is neither ``[DONE]`` nor JSON (comments are fine)."""
    data = [line[5:].strip() for line in event.split(b"\n") if line.startswith(b"data:")]
    if not data:
        return False
    joined = b"\n".join(data)
    if joined == b"[DONE]":
        return False
    try:
        orjson.loads(joined)
    except orjson.JSONDecodeError:
        return True
    return False


class OpenAIStreamRelay:
    """Watches an OpenAI-format SSE byte stream and says what to forward.

    ``feed`` returns the bytes to write to the client: nothing until the
    first content event (held so a failing stream can still fail over), then
    the held bytes, then every chunk as it came. ``strip_usage`` drops the
    usage-only chunk the proxy asked for on the client's behalf.
    """

    __slots__ = (
        "_cr",
        "_error",
        "_held",
        "_parts",
        "finished",
        "has_content",
        "relayed_bytes",
        "saw_finish",
        "strip_usage",
        "usage",
    )

    def __init__(self, *, strip_usage: bool) -> None:
        self.strip_usage = strip_usage
        self.has_content = False
        self.finished = False  # [DONE] seen
        self.saw_finish = False  # a finish_reason seen
        self.usage: Usage | None = None
        self._held: list[bytes] = []
        self._parts: list[bytes] = []  # the unfinished event's pieces, joined once it ends
        self._cr = False  # the last read ended in CR (see feed)
        self.relayed_bytes = 0  # after the commit point; sizes a token estimate
        # A failure found after content earlier in the same read: raised by the next call, so
        # that content still reaches the client (a [DONE] without a finish reason, junk).
        self._error: StreamError | None = None

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        if self._cr:
            # A CR ended the previous read: it may pair with an LF at the start of this one.
            data = b"\r" + data
            self._cr = False
        if b"\r" in data:
            # CRLF-framed upstreams (some proxies): normalise so splitting is uniform. A
            # trailing CR waits for the next read, so a CRLF split between reads is seen whole.
            if data.endswith(b"\r"):
                data = data[:-1]
                self._cr = True
            data = data.replace(b"\r\n", b"\n")
        parts = self._parts
        if not parts and data.endswith(EVENT_SEP):
            # Whole events in one read (the usual case): no slicing, no joining.
            if not self.has_content:
                return self._before_commit(data)
            self.relayed_bytes += len(data)
            return self._after_commit(data)
        cut = data.rfind(EVENT_SEP)
        if cut < 0:
            if not (parts and data[:1] == b"\n" and parts[-1].endswith(b"\n")):
                # Only whole events are forwarded: a client cannot use half an event anyway.
                # The piece is kept as is: joining per read would re-copy a long event each time.
                if data:
                    parts.append(data)
                return b""
            cut = -1  # the separator straddles the previous read and this one
        parts.append(data[: cut + 2])
        complete = parts[0] if len(parts) == 1 else b"".join(parts)
        rest = data[cut + 2 :]
        self._parts = [rest] if rest else []
        if not self.has_content:
            return self._before_commit(complete)
        self.relayed_bytes += len(complete)
        return self._after_commit(complete)

    def _before_commit(self, complete: bytes) -> bytes:
        """Whole events before the commit point: held, until the first content event.

        One scan of the batch: the content hint and the markers are searched over all
        of it, and the events before the first hit are held as they are, unparsed.
        A first hit that is a plain content event commits, and the rest of the batch
        takes the after-commit path; anything else (a marker, ``[DONE]``, blank-line
        runs, a hint spanning events) goes event by event (``_before_commit_events``).
        """
        if BLANK_RUN in complete or complete.startswith(EVENT_SEP):
            return self._before_commit_events(complete)
        size = len(complete)
        marked = size  # where the first marker is
        for mark in BEFORE_COMMIT_MARKS:
            at = complete.find(mark, 0, marked)
            if at >= 0:
                marked = at
        hint = CONTENT_HINT.search(complete, 0, marked)
        if hint is None and marked == size:
            # No content, no marker: every event is held (or flushed after a [DONE]).
            if not self.finished:
                self._held.append(complete)
                return b""
            held, self._held = self._held, []
            held.append(complete)
            return b"".join(held)
        first = marked if hint is None else hint.start()
        start = complete.rfind(EVENT_SEP, 0, first)
        start = 0 if start < 0 else start + 2
        end = complete.find(EVENT_SEP, first) + 2  # complete ends with EVENT_SEP
        if hint is None or marked < end or complete.find(EVENT_SEP, first, hint.end()) >= 0:
            # A marker in or before the first content event (or a hint running across
            # events): event by event from that event on.
            return self._before_commit_events(complete[start:], complete[:start])
        # A plain content event: the commit point.
        self.has_content = True
        out = [*self._held, complete[:end] if end < size else complete]
        if end < size:
            out.append(self._after_commit(complete[end:]))
        self._held = []
        return b"".join(out)

    def _before_commit_events(self, complete: bytes, plain: bytes = b"") -> bytes:
        """Event by event; ``plain``: whole events before these, with nothing to look at."""
        out: list[bytes] = [plain] if plain else []
        events = complete.split(EVENT_SEP)
        for i, event in enumerate(events):
            if not event:
                continue
            if self.has_content:
                # Committed within this batch: the rest takes the cheap path.
                rest = EVENT_SEP.join(events[i:])
                out.append(
                    self._after_commit(rest if rest.endswith(EVENT_SEP) else rest + EVENT_SEP)
                )
                break
            frame = event + EVENT_SEP
            if event.startswith(DONE_EVENT):
                if not self.saw_finish:
                    # An end without a finish reason is a cut stream (nothing shown yet: the
                    # attempt fails and the request may fail over).
                    self._error = _truncated()
                    break
                self.finished = True
                out.append(frame)
                continue
            if ERROR_MARK in event or USAGE_MARK in event or USAGE_MARK_SPACED in event:
                obj = _event_json(event)
                if isinstance(obj, dict):
                    if "error" in obj and "choices" not in obj:
                        raise _stream_error(obj)
                    self._note(obj)
                    if self.strip_usage and obj.get("choices") == [] and "usage" in obj:
                        continue
                    if _has_content(obj):
                        self.has_content = True
            elif CONTENT_HINT.search(event):
                # A non-empty content-bearing delta, found without parsing the event. Inside a
                # JSON string these keys would be escaped (\"content\":), so text cannot fake it.
                self.has_content = True
            out.append(frame)
        if not self.has_content and not self.finished:
            self._held.extend(out)
            return b""
        held, self._held = self._held, []
        return b"".join(held + out)

    def _after_commit(self, complete: bytes) -> bytes:
        """Pass whole events through; look only inside the few that carry a marker.

        Markers are found with ``bytes.find`` over the whole batch, so a batch of
        plain content deltas costs a handful of C-level scans and no parsing.
        """
        spans: list[tuple[int, int]] = []
        for mark in AFTER_COMMIT_MARKS:
            at = complete.find(mark)
            while at >= 0:
                start = complete.rfind(EVENT_SEP, 0, at)
                start = 0 if start < 0 else start + 2
                end = complete.find(EVENT_SEP, at) + 2  # complete ends with EVENT_SEP
                spans.append((start, end))
                at = complete.find(mark, end)
        if not spans:
            if complete[-3:] != JSON_EVENT_END:
                return self._check_events(complete)
            return complete
        spans = sorted(set(spans))
        out: list[bytes] = []
        pos = 0
        for start, end in spans:
            if start < pos:
                continue
            out.append(complete[pos:start])
            pos = end
            event = complete[start : end - 2]
            if event.startswith(DONE_EVENT):
                if not self.saw_finish:
                    self._error = _truncated()  # what came before it is still delivered
                    break
                self.finished = True
                out.append(complete[start:end])
                continue
            obj = _event_json(event)
            if isinstance(obj, dict):
                if "error" in obj and "choices" not in obj:
                    raise _stream_error(obj)
                self._note(obj)
                if self.strip_usage and obj.get("choices") == [] and "usage" in obj:
                    continue
            out.append(complete[start:end])
        else:
            out.append(complete[pos:])
        return b"".join(out)

    def _check_events(self, complete: bytes) -> bytes:
        """A batch whose last event does not end in ``}``: is each ``data:`` in it JSON?

        Reached only then (one slice compare per batch decides it: a cut-off event is the
        last thing a dying upstream sends), so a healthy stream is never parsed. The events
        before the first unreadable one are delivered; the failure is raised by the next call.
        """
        pos = 0
        while pos < len(complete):
            sep = complete.find(EVENT_SEP, pos)
            if sep < 0:
                break  # a stray newline after the last separator
            end = sep + 2
            event = complete[pos:sep]
            if not event.endswith(b"}") and _unreadable(event):
                self._error = _malformed_event()
                return complete[:pos]
            pos = end
        return complete

    def _note(self, obj: Mapping[str, Any]) -> None:
        usage = parse_usage(obj)
        if usage is not None:
            self.usage = usage
        choices = obj.get("choices")
        if isinstance(choices, list):
            for choice in choices:
                if isinstance(choice, dict) and choice.get("finish_reason"):
                    self.saw_finish = True

    def finish(self) -> bytes:
        """At upstream EOF: remaining bytes; StreamError when the stream was cut short.

        Cut short: no ``[DONE]`` and no finish reason, or a ``[DONE]`` that came without
        any finish reason (some servers end that way when their generation dies).
        """
        if self._error is not None:
            raise self._error
        rest = b"".join(self._parts) + (b"\r" if self._cr else b"")
        self._parts = []
        self._cr = False
        if rest.strip() and _whole_event(rest):
            # A server may omit the blank line after its last event; a cut-off event
            # (invalid JSON) is never forwarded: the client's SDK would fail parsing it.
            rest = self.feed(rest + EVENT_SEP) if not rest.endswith(EVENT_SEP) else self.feed(rest)
        else:
            rest = b""
        if self._error is not None:
            raise self._error  # the unterminated last event was a bare [DONE] or junk
        if self.finished:
            return rest
        if self.saw_finish:
            # The answer is complete; some servers omit [DONE]: the SDKs expect it.
            return rest + DONE_FRAME
        raise _truncated()

    @property
    def held(self) -> bool:
        return bool(self._held)
