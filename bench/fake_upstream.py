"""A minimal, fast fake LLM upstream on raw asyncio, for benchmarks only.

It speaks just enough HTTP/1.1 (keep-alive, Content-Length request bodies) to
answer, with precomputed bytes:

- ``POST /v1/chat/completions``: an OpenAI ``chat.completion``, or when the body
  asks for ``"stream": true`` an SSE stream (role chunk, ``CONTENT_CHUNKS``
  content chunks, finish chunk, a usage chunk when ``include_usage`` is true,
  ``[DONE]``);
- ``POST /v1/messages``: the Anthropic Messages equivalents;
- any ``GET``: an empty model list (health checks);
- a streaming chat request for the model ``bench-hold``: a long-lived stream
  that sends its role chunk at once, then one small content event every
  ``hold_interval`` seconds (the first after a fraction of it that differs
  from stream to stream, so thousands of streams do not tick together), and
  ends after ``HOLD_MAX_SECONDS`` or when the client closes the connection.
  ``make bench`` holds thousands of these open to measure memory per stream.

Invariants: a stream is written one SSE event per event-loop turn (as HTTP
chunks), not in one burst, so relays see events arrive separately the way real
token streams do; responses never depend on anything but the path and the two
flags, so both sides of a comparison get byte-identical upstream traffic.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import re
import sys
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import orjson

CONTENT_CHUNKS = 10
TOKEN_TEXT = "tok "
CREATED = 1_700_000_000
OPENAI_MODEL = "bench-upstream"
ANTHROPIC_MODEL = "claude-bench"
PROMPT_TOKENS = 12
HEADER_END = b"\r\n\r\n"
MAX_HEAD_BYTES = 64 * 1024
STREAM_RE = re.compile(rb'"stream"\s*:\s*true')
USAGE_RE = re.compile(rb'"include_usage"\s*:\s*true')
READY_PREFIX = "fake-upstream ready"
HOLD_MODEL = "bench-hold"
HOLD_RE = re.compile(rb'"model"\s*:\s*"' + HOLD_MODEL.encode() + rb'"')
HOLD_INTERVAL = 1.0  # seconds between two events of a held stream
HOLD_MAX_SECONDS = 120.0  # a held stream ends by itself after this
GOLDEN = 0.6180339887498949  # spreads the first ticks of successive streams evenly


def _json_response(status: str, body: bytes, close: bool = False) -> bytes:
    head = (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n" + ("Connection: close\r\n" if close else "") + "\r\n"
    )
    return head.encode() + body


def _chunk(data: bytes) -> bytes:
    return b"%x\r\n%s\r\n" % (len(data), data)


STREAM_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


def _stream_pieces(events: Sequence[bytes]) -> tuple[bytes, ...]:
    """One write per SSE event; the head goes with the first, the last chunk with the last."""
    pieces = [_chunk(e) for e in events]
    pieces[0] = STREAM_HEAD + pieces[0]
    pieces[-1] += b"0\r\n\r\n"
    return tuple(pieces)


def _openai_chunk(delta: Mapping[str, object], finish: str | None = None) -> bytes:
    obj = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": CREATED,
        "model": OPENAI_MODEL,
        "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def openai_stream_events(include_usage: bool) -> list[bytes]:
    events = [_openai_chunk({"role": "assistant", "content": ""})]
    events += [_openai_chunk({"content": TOKEN_TEXT}) for _ in range(CONTENT_CHUNKS)]
    events.append(_openai_chunk({}, "stop"))
    if include_usage:
        usage = {
            "id": "chatcmpl-bench",
            "object": "chat.completion.chunk",
            "created": CREATED,
            "model": OPENAI_MODEL,
            "choices": [],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": CONTENT_CHUNKS,
                "total_tokens": PROMPT_TOKENS + CONTENT_CHUNKS,
            },
        }
        events.append(b"data: " + orjson.dumps(usage) + b"\n\n")
    events.append(b"data: [DONE]\n\n")
    return events


def openai_completion() -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-bench",
            "object": "chat.completion",
            "created": CREATED,
            "model": OPENAI_MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": TOKEN_TEXT * CONTENT_CHUNKS},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {
                "prompt_tokens": PROMPT_TOKENS,
                "completion_tokens": CONTENT_CHUNKS,
                "total_tokens": PROMPT_TOKENS + CONTENT_CHUNKS,
            },
        }
    )


def _anthropic_event(name: str, obj: Mapping[str, object]) -> bytes:
    return b"event: " + name.encode() + b"\ndata: " + orjson.dumps(obj) + b"\n\n"


def anthropic_stream_events() -> list[bytes]:
    start = {
        "type": "message_start",
        "message": {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": 1},
        },
    }
    events = [
        _anthropic_event("message_start", start),
        _anthropic_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
        _anthropic_event("ping", {"type": "ping"}),
    ]
    delta = {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": TOKEN_TEXT},
    }
    events += [_anthropic_event("content_block_delta", delta) for _ in range(CONTENT_CHUNKS)]
    events += [
        _anthropic_event("content_block_stop", {"type": "content_block_stop", "index": 0}),
        _anthropic_event(
            "message_delta",
            {
                "type": "message_delta",
                "delta": {"stop_reason": "end_turn", "stop_sequence": None},
                "usage": {"output_tokens": CONTENT_CHUNKS},
            },
        ),
        _anthropic_event("message_stop", {"type": "message_stop"}),
    ]
    return events


def anthropic_message() -> bytes:
    return orjson.dumps(
        {
            "id": "msg_bench",
            "type": "message",
            "role": "assistant",
            "model": ANTHROPIC_MODEL,
            "content": [{"type": "text", "text": TOKEN_TEXT * CONTENT_CHUNKS}],
            "stop_reason": "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": PROMPT_TOKENS, "output_tokens": CONTENT_CHUNKS},
        }
    )


@dataclass(frozen=True, slots=True)
class Replies:
    """Every reply the fake can give, serialized once."""

    openai_json: bytes = _json_response("200 OK", openai_completion())
    openai_stream: tuple[bytes, ...] = _stream_pieces(openai_stream_events(include_usage=False))
    openai_stream_usage: tuple[bytes, ...] = _stream_pieces(
        openai_stream_events(include_usage=True)
    )
    anthropic_json: bytes = _json_response("200 OK", anthropic_message())
    anthropic_stream: tuple[bytes, ...] = _stream_pieces(anthropic_stream_events())
    models: bytes = _json_response("200 OK", b'{"object":"list","data":[]}')
    not_found: bytes = _json_response(
        "404 Not Found", b'{"error":{"message":"no such path","type":"not_found"}}'
    )
    bad_request: bytes = _json_response(
        "400 Bad Request",
        b'{"error":{"message":"unsupported request framing","type":"invalid_request"}}',
        close=True,
    )


REPLIES = Replies()
HOLD_EVENTS = openai_stream_events(include_usage=True)
HOLD_HEAD = STREAM_HEAD + _chunk(HOLD_EVENTS[0])  # the role chunk comes at once
HOLD_TICK = _chunk(_openai_chunk({"content": TOKEN_TEXT}))
HOLD_END = b"".join(_chunk(e) for e in HOLD_EVENTS[-3:]) + b"0\r\n\r\n"  # finish, usage, DONE


def wants_hold(path: bytes, body: bytes) -> bool:
    """A streaming chat request for ``HOLD_MODEL``."""
    return (
        path.split(b"?", 1)[0] == b"/v1/chat/completions"
        and STREAM_RE.search(body) is not None
        and HOLD_RE.search(body) is not None
    )


def choose_reply(method: bytes, path: bytes, body: bytes) -> bytes | tuple[bytes, ...]:
    """The precomputed reply for a request: bytes (one write) or stream pieces."""
    if method == b"GET":
        return REPLIES.models
    path = path.split(b"?", 1)[0]
    stream = STREAM_RE.search(body) is not None
    if path == b"/v1/chat/completions":
        if not stream:
            return REPLIES.openai_json
        if USAGE_RE.search(body) is not None:
            return REPLIES.openai_stream_usage
        return REPLIES.openai_stream
    if path == b"/v1/messages":
        return REPLIES.anthropic_stream if stream else REPLIES.anthropic_json
    return REPLIES.not_found


class _Connection(asyncio.Protocol):
    """One client connection: parse requests in order, answer each before the next."""

    def __init__(self, hold_interval: float, phases: Iterator[float]) -> None:
        self._buf = bytearray()
        self._transport: asyncio.Transport | None = None
        self._pending: tuple[bytes, ...] = ()  # stream pieces still to write
        self._close_after = False
        self._loop = asyncio.get_running_loop()
        self._hold_interval = hold_interval
        self._phases = phases
        self._hold: asyncio.TimerHandle | None = None  # the next tick of a held stream
        self._ticks_left = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # TCP servers make only these

    def connection_lost(self, exc: Exception | None) -> None:
        self._transport = None
        self._pending = ()
        if self._hold is not None:
            self._hold.cancel()
            self._hold = None

    def data_received(self, data: bytes) -> None:
        self._buf += data
        if not self._pending and self._hold is None:
            self._serve_buffered()

    def _serve_buffered(self) -> None:
        while self._transport is not None and not self._pending and self._hold is None:
            end = self._buf.find(HEADER_END)
            if end < 0:
                if len(self._buf) > MAX_HEAD_BYTES:
                    self._reply_and_close(REPLIES.bad_request)
                return
            head = bytes(self._buf[:end])
            lines = head.split(b"\r\n")
            parts = lines[0].split(b" ")
            length = 0
            self._close_after = False
            framing_ok = len(parts) == 3
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value.strip() or b"0")
                elif name == b"transfer-encoding":
                    framing_ok = False  # chunked request bodies: not needed by any client here
                elif name == b"connection" and value.strip().lower() == b"close":
                    self._close_after = True
            if not framing_ok:
                self._reply_and_close(REPLIES.bad_request)
                return
            total = end + len(HEADER_END) + length
            if len(self._buf) < total:
                return
            body = bytes(self._buf[end + len(HEADER_END) : total])
            del self._buf[:total]
            if parts[0] == b"POST" and wants_hold(parts[1], body):
                self._start_hold()
                return
            reply = choose_reply(parts[0], parts[1], body)
            if isinstance(reply, bytes):
                self._transport.write(reply)
                self._finish_one()
            else:
                self._transport.write(reply[0])
                self._pending = reply[1:]
                self._loop.call_soon(self._write_next)

    def _write_next(self) -> None:
        if self._transport is None or not self._pending:
            return
        self._transport.write(self._pending[0])
        self._pending = self._pending[1:]
        if self._pending:
            self._loop.call_soon(self._write_next)
            return
        self._finish_one()
        self._serve_buffered()

    def _start_hold(self) -> None:
        if self._transport is None:
            return
        self._transport.write(HOLD_HEAD)
        self._ticks_left = max(1, round(HOLD_MAX_SECONDS / self._hold_interval))
        first = self._hold_interval * next(self._phases)
        self._hold = self._loop.call_later(first, self._tick)

    def _tick(self) -> None:
        if self._transport is None:
            self._hold = None
            return
        self._ticks_left -= 1
        if self._ticks_left > 0:
            self._transport.write(HOLD_TICK)
            self._hold = self._loop.call_later(self._hold_interval, self._tick)
            return
        self._transport.write(HOLD_TICK + HOLD_END)
        self._hold = None
        self._finish_one()
        self._serve_buffered()

    def _finish_one(self) -> None:
        if self._close_after and self._transport is not None:
            self._transport.close()
            self._transport = None

    def _reply_and_close(self, reply: bytes) -> None:
        if self._transport is not None:
            self._transport.write(reply)
            self._transport.close()
            self._transport = None


def _phases() -> Iterator[float]:
    """Fractions in [0, 1), evenly spread whatever how many are taken (golden-ratio steps)."""
    return ((k * GOLDEN) % 1.0 for k in itertools.count())


async def start_fake_upstream(
    host: str = "127.0.0.1", port: int = 0, *, hold_interval: float = HOLD_INTERVAL
) -> asyncio.Server:
    """Listen on host:port (0 = any free port); the caller closes the returned server."""
    if hold_interval <= 0:
        raise ValueError("hold_interval must be positive")
    loop = asyncio.get_running_loop()
    phases = _phases()
    factory: Callable[[], _Connection] = lambda: _Connection(hold_interval, phases)  # noqa: E731
    return await loop.create_server(factory, host, port, backlog=4096)


def server_url(server: asyncio.Server) -> str:
    host, port = server.sockets[0].getsockname()[:2]
    return f"http://{host}:{port}"


async def _serve_forever(host: str, port: int, hold_interval: float) -> None:
    server = await start_fake_upstream(host, port, hold_interval=hold_interval)
    print(f"{READY_PREFIX} {server_url(server)}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.fake_upstream", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, port 0 = any")
    parser.add_argument(
        "--hold-interval",
        type=float,
        default=HOLD_INTERVAL,
        help=f"seconds between events of a {HOLD_MODEL} stream",
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    coro = _serve_forever(host or "127.0.0.1", int(port), args.hold_interval)
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
