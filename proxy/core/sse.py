"""Incremental Server-Sent Events parsing and the one event shape the proxy writes.

Parser invariants (WHATWG HTML, 'Server-sent events', §9.2.6 parsing):
- ``feed`` accepts bytes split anywhere, including inside a CRLF pair and
  inside a multi-byte UTF-8 sequence, and returns every event completed by a
  blank line, in order; the same byte stream yields the same events whatever
  the split points;
- lines end with LF, CRLF or a lone CR; ``data`` lines of one event are joined
  with LF; comment lines (leading ``:``) and ``id``/``retry``/unknown fields
  are dropped, so a keep-alive comment can never be re-emitted as data;
- an event without any ``data`` line is not dispatched (spec);
- one leading UTF-8 byte-order mark is ignored (spec); invalid UTF-8 becomes
  U+FFFD (spec).

UTF-8 safety comes from splitting bytes at line ends before decoding: LF and CR
never occur inside a multi-byte UTF-8 sequence, so a complete line always holds
complete characters and needs no incremental decoder; bytes after the last line
end are simply kept until more arrive.

Cost: bytes that end no line are only appended to a list of pieces; they are
joined once, when a line end arrives, so a long line (or a stream with no
newline at all) costs linear time, never a re-copy per read. How long a line
or an event may grow is ``EventSizeGuard``'s to bound, before the bytes get here.

Deliberate deviation: the spec discards an event still open at end of stream.
``close`` dispatches it instead (its last line too, even without a newline),
because upstreams that omit the final blank line would otherwise lose their
last, often terminal, event. Callers parse the payload as JSON, so a truly cut
event fails loudly there instead of being dropped silently.
"""

from __future__ import annotations

from dataclasses import dataclass

BOM = b"\xef\xbb\xbf"
# Two line ends in a row end an event. Lines end with LF, CRLF or CR, so a blank line is
# always one of these pairs: LF LF, CR CR, or LF CR (which LF CRLF and CRLF CRLF contain).
BLANK_LINES = (b"\n\n", b"\r\r", b"\n\r")
DATA_PREFIX = b"data: "
EVENT_END = b"\n\n"


@dataclass(frozen=True, slots=True)
class SSEEvent:
    event: str | None  # the ``event:`` field, None when absent
    data: str


class EventTooLarge(ValueError):
    """One SSE event grew past the configured bound without ending."""


class EventSizeGuard:
    """Raises ``EventTooLarge`` once the bytes since the last event end exceed ``limit``.

    Fed every chunk of a stream before its parser sees it, so no parser ever
    holds more than ``limit`` bytes of an unfinished event. Finding the last
    blank line is a few C-level ``rfind`` calls per chunk; a blank line split
    across two chunks is seen through the previous chunk's last byte.
    """

    __slots__ = ("_last", "_since", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._since = 0  # bytes since the end of the last complete event
        self._last = b""  # the previous chunk's last byte

    def feed(self, chunk: bytes) -> None:
        if not chunk:
            return
        if b"\r" in chunk:
            end = max(chunk.rfind(pair) for pair in BLANK_LINES)
        else:
            end = chunk.rfind(b"\n\n")
        if end >= 0:
            self._since = len(chunk) - end - 2
        elif (
            self._last in (b"\n", b"\r")
            and chunk[:1] in (b"\n", b"\r")
            and (self._last + chunk[:1] != b"\r\n")
        ):
            self._since = len(chunk) - 1
        else:
            self._since += len(chunk)
        self._last = chunk[-1:]
        if self._since > self.limit:
            raise EventTooLarge(
                f"one server-sent event is over {self.limit} bytes (CB_UPSTREAM_MAX_EVENT_BYTES)"
            )


class SSEParser:
    __slots__ = ("_buf", "_data", "_event", "_pending", "_skip_lf", "_started")

    def __init__(self) -> None:
        self._buf = b""  # bytes after the last complete line
        self._pending: list[bytes] = []  # later reads that ended no line yet (joined lazily)
        self._data: list[str] = []
        self._event: str | None = None
        self._skip_lf = False  # the previous read ended in CR: a leading LF completes CRLF
        self._started = False  # a first line was seen (BOM handling)

    def feed(self, data: bytes) -> list[SSEEvent]:
        if not data:
            return []
        if self._skip_lf:
            self._skip_lf = False
            if data[:1] == b"\n":
                data = data[1:]
                if not data:
                    return []
        if b"\n" not in data and b"\r" not in data:
            # No line ends here: keep the piece; joining now would re-copy the line per read.
            if self._buf or self._pending:
                self._pending.append(data)
            else:
                self._buf = data
            return []
        if self._pending:
            self._buf = b"".join([self._buf, *self._pending])
            self._pending = []
        buf = self._buf + data if self._buf else data
        if b"\r" in buf:
            # A trailing CR already ends its line; remember it so the LF of a
            # CRLF split across reads does not count as a second, blank line.
            self._skip_lf = buf.endswith(b"\r")
            buf = buf.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        lines = buf.split(b"\n")
        self._buf = lines.pop()
        events: list[SSEEvent] = []
        for line in lines:
            self._line(line, events)
        return events

    def close(self) -> list[SSEEvent]:
        """End of stream: the event still open, if it has data (see module docstring)."""
        events: list[SSEEvent] = []
        if self._pending:
            self._buf = b"".join([self._buf, *self._pending])
            self._pending = []
        if self._buf:
            line, self._buf = self._buf, b""
            self._line(line, events)
        self._line(b"", events)
        return events

    def _line(self, line: bytes, events: list[SSEEvent]) -> None:
        if not self._started:
            self._started = True
            if line.startswith(BOM):
                line = line[len(BOM) :]
        if not line:
            if self._data:
                events.append(SSEEvent(self._event, "\n".join(self._data)))
                self._data = []
            self._event = None
            return
        if line.startswith(DATA_PREFIX):  # the common case, checked first
            self._data.append(line[len(DATA_PREFIX) :].decode("utf-8", "replace"))
            return
        if line[:1] == b":":
            return
        name, colon, value = line.partition(b":")
        if colon and value[:1] == b" ":
            value = value[1:]
        if name == b"data":
            self._data.append(value.decode("utf-8", "replace"))
        elif name == b"event":
            self._event = value.decode("utf-8", "replace")


def format_event(payload: str) -> bytes:
    """One OpenAI stream event; ``payload`` must be a single line (orjson output is)."""
    return DATA_PREFIX + payload.encode() + EVENT_END
