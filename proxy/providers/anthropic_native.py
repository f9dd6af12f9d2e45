"""Anthropic Messages clients on Anthropic upstreams: a byte relay, no translation.

A ``/v1/messages`` request tried on an Anthropic-format candidate goes out as the
client sent it: only ``model`` is rewritten to the deployment's upstream model and
the routing extension ``circuit_breaker`` is dropped; the headers are the Anthropic
adapter's (``anthropic-version``, the proxy's ``x-api-key``, the provider's own), never
the client's. The reply comes back as it came: a plain body byte for byte, a stream
event by event as bytes. Fields the OpenAI form has no room for (``thinking`` and its
signature deltas, ``top_k``, the ``stop_sequence`` stop reason) survive.

Stream invariants (``AnthropicEventRelay``), on the model of ``OpenAIStreamRelay``:
- ``feed`` returns only whole events (up to the last blank line read), unchanged;
  nothing until the commit point (the first ``content_block_delta``, a
  ``content_block_start`` with content, a ``message_delta`` with a stop reason or
  ``message_stop``), then everything held so far and every event after it;
- before the commit point an ``error`` event, or an event that cannot be read,
  raises ``StreamError`` (the request fails over); after it the upstream's ``error``
  event is relayed as it came, and the next ``feed``/``finish`` raises so the
  attempt counts as failed (``error_relayed`` tells the caller not to add its own);
- usage is read from ``message_start`` and ``message_delta``; after the commit point
  only events that can carry usage, the end or an error are parsed;
- ``finish`` at upstream EOF returns what is left, or raises ``StreamError`` when
  ``message_stop`` never came, so a truncated stream is never a silent 200.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from proxy.config.model import Deployment, Provider
from proxy.core.prefs import EXTENSION_KEY
from proxy.core.sse import BLANK_LINES, SSEEvent, SSEParser
from proxy.providers import openai_shapes as shapes
from proxy.providers.anthropic import (
    ERROR_TYPE_STATUS,
    MESSAGES_PATH,
    classify,
    prompt_tokens,
    upstream_headers,
)
from proxy.providers.anthropic_inbound import error_event, openai_error_to_anthropic
from proxy.providers.base import JSONDict, StreamError, UpstreamRequest, Usage
from proxy.providers.openai import exact_bytes

# Event names worth parsing after the commit point (usage, the end, an error).
AFTER_COMMIT_MARKS = (b"message_delta", b"message_stop", b"error")
# Block types whose ``content_block_start`` carries no content while their text is empty.
TEXT_BLOCKS = frozenset({"text", "thinking"})


def _malformed(what: str) -> StreamError:
    return shapes.upstream_failure(f"Anthropic API returned a malformed {what}")


def _usage(usage: Any, into: Usage | None) -> Usage:
    """``into`` updated from an Anthropic usage object (output tokens are a running total)."""
    prompt = into.prompt_tokens if into is not None else 0
    completion = into.completion_tokens if into is not None else 0
    if isinstance(usage, dict):
        if "input_tokens" in usage:
            prompt = prompt_tokens(usage)
        if usage.get("output_tokens") is not None:
            completion = int(usage["output_tokens"])
    return Usage(prompt, completion)


def _boundary(data: bytes) -> int:
    """The end of the last whole event in ``data`` (0 when none has ended)."""
    cut = max(data.rfind(blank) for blank in BLANK_LINES)
    if cut < 0:
        return 0
    end = cut + 2
    if data[end - 1 : end] == b"\r" and data[end : end + 1] == b"\n":
        end += 1  # CRLF CRLF: the blank line's LF belongs to it
    return end


class AnthropicEventRelay:
    """Watches an Anthropic Messages SSE byte stream and says what to forward (see module)."""

    __slots__ = (
        "_error",
        "_held",
        "_parser",
        "_tail",
        "error_relayed",
        "finished",
        "has_content",
        "relayed_bytes",
        "usage",
    )

    def __init__(self) -> None:
        self.has_content = False
        self.finished = False  # message_stop seen
        self.usage: Usage | None = None
        self.relayed_bytes = 0  # after the commit point; sizes a token estimate
        self.error_relayed = False  # the upstream's own error event went to the client
        self._error: StreamError | None = None
        self._held: list[bytes] = []  # whole events before the commit point
        self._tail = b""  # the unfinished event
        self._parser = SSEParser()

    def feed(self, data: bytes) -> bytes:
        if self._error is not None:
            raise self._error
        data = self._tail + data if self._tail else data
        end = _boundary(data)
        if end < len(data):
            self._tail = data[end:]
            data = data[:end]
        else:
            self._tail = b""
        if not data:
            return b""
        return self._whole(data)

    def finish(self) -> bytes:
        if self._error is not None:
            raise self._error
        tail, self._tail = self._tail, b""
        out = self._whole(tail) if tail else b""
        for event in self._parser.close():
            self._event(event)
        if self._error is not None:
            raise self._error
        if not self.finished:
            raise shapes.upstream_failure(
                "Anthropic stream ended before message_stop", code="upstream_stream_truncated"
            )
        if self._held:  # a stream that ended without content: what was held goes out now
            out = b"".join((*self._held, out))
            self._held = []
        return out

    def _whole(self, data: bytes) -> bytes:
        """Whole events: held before the commit point, forwarded as they are after it."""
        if self.has_content:
            self.relayed_bytes += len(data)
            if any(mark in data for mark in AFTER_COMMIT_MARKS):
                for event in self._parser.feed(data):
                    self._event(event)
            return data
        for event in self._parser.feed(data):
            self._event(event)
            if self._error is not None and not self.has_content:
                raise self._error  # before the commit point: fail over
        if not self.has_content:
            self._held.append(data)
            return b""
        held, self._held = self._held, []
        held.append(data)
        return b"".join(held)

    def _event(self, event: SSEEvent) -> None:
        if self._error is not None:
            return
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            obj = None
        if not isinstance(obj, dict):
            if not self.has_content:
                self._error = _malformed("stream event")
            return  # after the commit point it is the client's to read, as it came
        kind = obj.get("type") or event.event
        if kind == "message_start":
            msg = obj.get("message")
            self.usage = _usage(msg.get("usage") if isinstance(msg, dict) else None, self.usage)
        elif kind == "content_block_delta":
            self.has_content = True
        elif kind == "content_block_start":
            block = obj.get("content_block")
            if isinstance(block, dict) and (
                block.get("type") not in TEXT_BLOCKS or block.get(block["type"])
            ):
                self.has_content = True
        elif kind == "message_delta":
            self.usage = _usage(obj.get("usage"), self.usage)
            delta = obj.get("delta")
            if isinstance(delta, dict) and delta.get("stop_reason"):
                self.has_content = True
        elif kind == "message_stop":
            self.finished = True
            self.has_content = True
        elif kind == "error":
            err = obj.get("error")
            err = err if isinstance(err, dict) else {}
            error_type = str(err.get("type") or "api_error")
            message = str(err.get("message") or "stream error")
            self._error = StreamError(
                classify(ERROR_TYPE_STATUS.get(error_type, 500), error_type, message)
            )
            self.error_relayed = self.has_content


class AnthropicPassthrough:
    """``NativeAdapter`` for Anthropic Messages clients on Anthropic upstreams."""

    def build_request(
        self,
        body: JSONDict,
        provider: Provider,
        deployment: Deployment,
        api_key: str | None,
    ) -> UpstreamRequest:
        """The client's Messages body as it came, for ``deployment`` (``body`` not mutated)."""
        payload = {k: v for k, v in body.items() if k != EXTENSION_KEY}
        payload["model"] = deployment.upstream_model
        headers = {"content-type": "application/json", **upstream_headers(provider, api_key)}
        return UpstreamRequest(
            "POST", provider.base_url + MESSAGES_PATH, headers, exact_bytes(orjson.dumps(payload))
        )

    def reply_usage(self, body: bytes) -> Usage | None:
        """The usage of a 2xx Messages body; ``StreamError`` when it is not a Messages object."""
        try:
            msg = orjson.loads(body)
        except orjson.JSONDecodeError:
            raise _malformed("response body") from None
        if not isinstance(msg, dict):
            raise _malformed("response body")
        usage = msg.get("usage")
        return _usage(usage, None) if isinstance(usage, dict) else None

    def stream_relay(self) -> AnthropicEventRelay:
        return AnthropicEventRelay()

    def error_frame(self, error: Mapping[str, Any]) -> bytes:
        """The proxy's in-band error (OpenAI's shape) as an Anthropic ``event: error``."""
        return error_event(openai_error_to_anthropic(error))
