"""The seam between the forwarding loop and a wire format.

An adapter turns an OpenAI-format request into an upstream HTTP request, turns
the upstream's reply back into OpenAI format, and classifies upstream errors
into breaker outcomes. Everything here is synchronous and I/O-free: the
forwarding loop (``forward``) does the sending, the adapter only translates.

Stream invariants every ``StreamTranslator`` keeps (docs/wire-formats.md):
- ``feed`` accepts upstream bytes split anywhere (inside an event, inside a
  UTF-8 sequence) and returns complete OpenAI ``data:`` payloads in order;
- ``has_content`` turns True with the first payload that carries content
  (text, a tool call, a finish reason): before it, nothing has been shown to
  the client and the request can still fail over;
- an upstream error event raises ``StreamError`` (before or after content:
  the caller decides between failover and an in-band error);
- ``finish`` at upstream EOF returns the closing payloads (usage chunk if
  asked, then ``[DONE]``) or raises ``StreamError`` if the terminal marker
  never arrived, so a truncated stream is never a silent 200.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from proxy.config.model import Deployment, Provider
from proxy.core.outcome import Outcome
from proxy.core.usage import Usage as Usage  # part of the adapter seam

JSONDict = dict[str, Any]

DONE = "[DONE]"


class Endpoint(enum.Enum):
    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True, slots=True)
class UpstreamRequest:
    method: str
    url: str
    headers: Mapping[str, str]
    body: bytes | None = None


@dataclass(frozen=True, slots=True)
class ErrorInfo:
    """An upstream failure, classified.

    ``status`` and ``body`` are what the client gets if this error is final
    (``body`` already in OpenAI's error shape). ``retry_after`` is in seconds.
    ``transient`` marks a quick failure worth one retry on the same deployment.
    ``context_window`` marks a 'prompt too long' error, which may move on to a
    candidate with a larger context window.
    """

    outcome: Outcome
    status: int
    body: JSONDict
    retry_after: float | None = None
    transient: bool = False
    context_window: bool = False


class StreamError(Exception):
    def __init__(self, info: ErrorInfo) -> None:
        super().__init__(str(info.body.get("error", {}).get("message", "stream error")))
        self.info = info


class StreamTranslator(Protocol):
    has_content: bool
    finished: bool  # the upstream's terminal marker was seen
    usage: Usage | None

    def feed(self, data: bytes) -> list[str]:
        """Upstream bytes in; OpenAI SSE ``data:`` payloads (JSON text or ``[DONE]``) out."""
        ...

    def finish(self) -> list[str]:
        """At upstream EOF: the closing payloads, or StreamError if the stream was cut."""
        ...


class RequestAdapter(Protocol):
    """What every upstream format provides: requests out, errors classified."""

    def build_request(
        self,
        endpoint: Endpoint,
        body: JSONDict,
        provider: Provider,
        deployment: Deployment,
        api_key: str | None,
        stream: bool,
    ) -> UpstreamRequest:
        """The upstream request; raises proxy.errors.InvalidRequest for untranslatable fields.

        ``body`` is the client's OpenAI request (the ``circuit_breaker`` extension
        already removed); it must not be mutated.
        """
        ...

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorInfo:
        """A non-2xx upstream reply -> its outcome and the OpenAI error the client would get."""
        ...

    def health_request(self, provider: Provider, api_key: str | None) -> UpstreamRequest:
        """A cheap request that tells whether the upstream is up (its models endpoint)."""
        ...


class ProviderAdapter(RequestAdapter, Protocol):
    """A format other than OpenAI's: replies and streams are translated back."""

    def parse_response(
        self,
        endpoint: Endpoint,
        body: bytes,
        deployment: Deployment,
        client_model: str,
        *,
        request_body: JSONDict | None = None,
    ) -> JSONDict:
        """A 2xx upstream body -> the OpenAI response object (``model`` = client_model).

        ``request_body`` is the client's request (e.g. its embeddings ``encoding_format``).
        Raises StreamError when the 2xx body is an error after all (a blocked prompt).
        """
        ...

    def stream_translator(
        self, endpoint: Endpoint, deployment: Deployment, client_model: str, include_usage: bool
    ) -> StreamTranslator: ...


@dataclass(slots=True)
class NativeBody:
    """A client's request in its own wire format (e.g. ``"anthropic"`` for ``/v1/messages``).

    Kept beside the translated OpenAI body so that a candidate speaking the client's
    format gets the request as the client sent it (``NativeAdapter``).
    """

    wire: str
    body: JSONDict


class NativeRelay(Protocol):
    """Bytes in, the same bytes out, held until the commit point (``has_content``)."""

    has_content: bool
    finished: bool  # the upstream's terminal marker was seen
    usage: Usage | None
    relayed_bytes: int
    error_relayed: bool  # the upstream's own error event reached the client

    def feed(self, data: bytes) -> bytes: ...

    def finish(self) -> bytes: ...


class NativeAdapter(Protocol):
    """A client's wire format spoken by the upstream too: a byte relay both ways.

    Errors are classified by the upstream format's ``RequestAdapter``, as for translated
    requests; only the request and the 2xx reply skip the translation.
    """

    def build_request(
        self, body: JSONDict, provider: Provider, deployment: Deployment, api_key: str | None
    ) -> UpstreamRequest:
        """The upstream request from the client's own body (not mutated)."""
        ...

    def reply_usage(self, body: bytes) -> Usage | None:
        """The usage of a 2xx reply; StreamError when the body is unusable."""
        ...

    def stream_relay(self) -> NativeRelay: ...

    def error_frame(self, error: Mapping[str, Any]) -> bytes:
        """The proxy's in-band error (OpenAI's shape) as an event of the client's format."""
        ...
