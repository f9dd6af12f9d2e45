"""The error hold-back shared by the stream translators that parse upstream SSE.

A subclass turns one upstream event into zero or more OpenAI payloads
(``_handle``) and may set ``_error`` when the event is an error or cannot be
read; this base drives the SSE parser and decides when that error surfaces.

Invariants:
- Payloads produced before an error in the same ``feed`` are returned first,
  and the error is raised by the next call, so content the client has earned
  is never lost to an error that follows it in the same read.
- Once ``_error`` is set, every later ``feed`` and ``finish`` raises it.
- ``finish`` raises the error, or a truncation failure when the stream ended
  without its terminal marker (``finished`` still False); otherwise it returns
  the last events' payloads followed by ``_closing`` (usage chunk, ``[DONE]``).
"""

from __future__ import annotations

from proxy.core.sse import SSEEvent, SSEParser
from proxy.providers import openai_shapes as shapes
from proxy.providers.base import StreamError, Usage


class SSEStreamTranslator:
    """Base of a ``StreamTranslator`` over an SSE upstream; see the module docstring."""

    # The message of the failure raised when the stream ends before its terminal marker.
    truncated_message = "upstream stream ended before its end marker"

    def __init__(self) -> None:
        self.has_content = False
        self.finished = False
        self.usage: Usage | None = None
        self._parser = SSEParser()
        self._error: StreamError | None = None

    def feed(self, data: bytes) -> list[str]:
        if self._error is not None:
            raise self._error
        out: list[str] = []
        for event in self._parser.feed(data):
            self._handle(event, out)
            if self._error is not None:
                if out:
                    return out  # deliver what came first; the error is raised next call
                raise self._error
        return out

    def finish(self) -> list[str]:
        if self._error is not None:
            raise self._error
        out: list[str] = []
        for event in self._parser.close():
            self._handle(event, out)
        if self._error is not None:
            raise self._error
        if not self.finished:
            raise shapes.upstream_failure(self.truncated_message, code="upstream_stream_truncated")
        self._closing(out)
        return out

    def _handle(self, event: SSEEvent, out: list[str]) -> None:
        """One upstream event -> payloads appended to ``out``; may set ``_error``."""
        raise NotImplementedError

    def _closing(self, out: list[str]) -> None:
        """Payloads after the last event of a complete stream; none by default."""
