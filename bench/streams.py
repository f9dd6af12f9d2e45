"""Memory per open stream and latency under many open streams.

``hold_streams`` opens N long-lived streaming requests (model ``bench-hold``:
the fake upstream holds each one open, sending a small event every
``HOLD_INTERVAL`` s) through a target (the proxy or the pass-through), waits
until every stream has received its first event and then one periodic event
(so each stream is relayed end to end and in its steady state), and reads the
target's RSS (/proc/PID/status VmRSS) before and with the streams open:

    memory per stream = (RSS with N streams open - RSS before) / N

With ``probe`` it then measures the latency of small non-streaming requests
while the N streams stay open: one keep-alive connection to the target and
one straight to the fake upstream, a request on each in turn (the side that
goes first alternates), ``requests`` of each at a modest pace:

    added latency pXX = pXX(via the target) - pXX(straight to the fake upstream)

(the same requests at the same moments under the same load, so what remains
is what the target adds; both are measured from the request's first byte
written to the response's last byte read, on raw asyncio streams).

Everything is bounded in time (``asyncio.timeout``): the function returns or
raises on its own, and closes every connection it opened (with a reset, so
no socket lingers in TIME_WAIT).
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from urllib.parse import urlsplit

import orjson

from bench.fake_upstream import HOLD_MODEL

CHAT_PATH = "/v1/chat/completions"
# Streams being opened at once: below the targets' listen backlogs (1024), so no SYN is
# dropped, and high enough that thousands open in seconds although a stream may wait up to
# one event interval for its first relayed event (the proxy sends its head with that event).
OPEN_CONCURRENCY = 512
WANT_EVENTS = 2  # the role chunk, then one periodic event
DEFAULT_TIMEOUT = 120.0
PROBE_REQUESTS = 200
PROBE_GAP = 0.01  # seconds between two probe pairs: ~100 pairs/s, well below capacity
PROBE_MODEL = "bench-model"
HEADER_END = b"\r\n\r\n"
EVENT_END = b"\n\n"  # SSE events end with a blank line; chunked framing uses CRLF


class StreamsError(RuntimeError):
    """Streams could not be opened or a probe request failed."""


def http_request(host: str, port: int, body: bytes, path: str = CHAT_PATH) -> bytes:
    return (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body


def hold_body() -> bytes:
    return orjson.dumps(
        {
            "model": HOLD_MODEL,
            "messages": [{"role": "user", "content": "Hold this stream open."}],
            "stream": True,
        }
    )


def probe_body() -> bytes:
    return orjson.dumps(
        {
            "model": PROBE_MODEL,
            "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
            "max_tokens": 32,
        }
    )


def _host_port(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    if parts.hostname is None or parts.port is None:
        raise StreamsError(f"need http://host:port, got {url!r}")
    return parts.hostname, parts.port


class HeldStream(asyncio.Protocol):
    """One streaming request held open: counts SSE events as they arrive, drops the bytes."""

    def __init__(self, request: bytes) -> None:
        loop = asyncio.get_running_loop()
        self._request = request
        self.transport: asyncio.Transport | None = None
        self.events = 0
        self.head_ok: bool | None = None
        self._last_newline = False
        self.first: asyncio.Future[None] = loop.create_future()  # >= 1 event
        self.steady: asyncio.Future[None] = loop.create_future()  # >= WANT_EVENTS events

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        transport.write(self._request)  # type: ignore[attr-defined]

    def data_received(self, data: bytes) -> None:
        if self.head_ok is None:
            self.head_ok = data.startswith((b"HTTP/1.1 200", b"HTTP/1.0 200"))
            if not self.head_ok:
                self._fail(f"not a 200 stream: {data[:200]!r}")
                return
        self.events += data.count(EVENT_END) + (self._last_newline and data[:1] == b"\n")
        self._last_newline = data[-1:] == b"\n"
        if self.events >= 1 and not self.first.done():
            self.first.set_result(None)
        if self.events >= WANT_EVENTS and not self.steady.done():
            self.steady.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        self._fail(f"connection closed after {self.events} events ({exc!r})")

    def _fail(self, why: str) -> None:
        for fut in (self.first, self.steady):
            if not fut.done():
                fut.set_exception(StreamsError(why))
        if self.transport is not None:
            self.transport.abort()

    def close(self) -> None:
        for fut in (self.first, self.steady):
            if not fut.done():
                fut.cancel()
            elif not fut.cancelled():
                fut.exception()  # retrieved: no "exception never retrieved" noise
        if self.transport is not None:
            self.transport.abort()  # a reset: nothing left in TIME_WAIT
            self.transport = None


async def open_streams(
    url: str, count: int, *, concurrency: int = OPEN_CONCURRENCY
) -> list[HeldStream]:
    """``count`` held streams through ``url``, each having received its first event."""
    host, port = _host_port(url)
    request = http_request(host, port, hold_body())
    loop = asyncio.get_running_loop()
    gate = asyncio.Semaphore(concurrency)
    streams: list[HeldStream] = []

    async def one() -> None:
        async with gate:
            _, proto = await loop.create_connection(lambda: HeldStream(request), host, port)
            streams.append(proto)
            await proto.first

    try:
        await asyncio.gather(*(one() for _ in range(count)))
    except BaseException:
        close_streams(streams)
        raise
    return streams


def close_streams(streams: Sequence[HeldStream]) -> None:
    for stream in streams:
        stream.close()


# ------------------------------------------------------------------ probe client


class ProbeConnection:
    """One keep-alive HTTP/1.1 connection sending small requests one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, request: bytes):
        self._reader = reader
        self._writer = writer
        self._request = request

    @classmethod
    async def open(cls, url: str, body: bytes) -> ProbeConnection:
        host, port = _host_port(url)
        reader, writer = await asyncio.open_connection(host, port)
        return cls(reader, writer, http_request(host, port, body))

    async def timed_request(self) -> int:
        """Nanoseconds from writing the request to reading the last byte of a 200 reply."""
        start = time.perf_counter_ns()
        self._writer.write(self._request)
        head = await self._reader.readuntil(HEADER_END)
        if not head.startswith(b"HTTP/1.1 200"):
            raise StreamsError(f"probe got {head[:200]!r}")
        length: int | None = None
        chunked = False
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        if chunked:
            while True:
                size = int((await self._reader.readuntil(b"\r\n")).split(b";")[0], 16)
                await self._reader.readexactly(size + 2)
                if size == 0:
                    break
        elif length is not None:
            await self._reader.readexactly(length)
        else:
            raise StreamsError("probe reply has neither Content-Length nor chunked framing")
        return time.perf_counter_ns() - start

    def close(self) -> None:
        self._writer.transport.abort()


def percentile(values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile (pct in 0..100) of a non-empty sequence."""
    ordered = sorted(values)
    rank = max(1, math.ceil(pct / 100 * len(ordered)))
    return float(ordered[rank - 1])


@dataclass(frozen=True, slots=True)
class LoadedLatency:
    requests: int  # per side
    direct_p50_us: float
    direct_p99_us: float
    via_p50_us: float
    via_p99_us: float

    @property
    def added_p50_us(self) -> float:
        return self.via_p50_us - self.direct_p50_us

    @property
    def added_p99_us(self) -> float:
        return self.via_p99_us - self.direct_p99_us


async def probe_latency(
    via_url: str, direct_url: str, requests: int = PROBE_REQUESTS, gap: float = PROBE_GAP
) -> LoadedLatency:
    """Small plain requests, alternating via the target and straight to the upstream."""
    body = probe_body()
    via = await ProbeConnection.open(via_url, body)
    direct = await ProbeConnection.open(direct_url, body)
    try:
        for conn in (via, direct):  # first requests on a connection are not measured
            await conn.timed_request()
        times: dict[str, list[float]] = {"via": [], "direct": []}
        for i in range(requests):
            order = (("via", via), ("direct", direct))
            for side, conn in order if i % 2 == 0 else order[::-1]:
                times[side].append((await conn.timed_request()) / 1000)
            if gap > 0:
                await asyncio.sleep(gap)  # pacing: a modest, steady request rate
    finally:
        via.close()
        direct.close()
    return LoadedLatency(
        requests=requests,
        direct_p50_us=percentile(times["direct"], 50),
        direct_p99_us=percentile(times["direct"], 99),
        via_p50_us=percentile(times["via"], 50),
        via_p99_us=percentile(times["via"], 99),
    )


# ------------------------------------------------------------------ the measurement


@dataclass(frozen=True, slots=True)
class StreamMemory:
    streams: int
    rss_before_kib: int
    rss_with_kib: int
    open_seconds: float  # opening all streams, each up to its first event

    @property
    def per_stream_kib(self) -> float:
        return (self.rss_with_kib - self.rss_before_kib) / self.streams


@dataclass(frozen=True, slots=True)
class HoldResult:
    memory: StreamMemory
    latency: LoadedLatency | None


async def hold_streams(
    url: str,
    rss_of: Callable[[], int],
    count: int,
    *,
    probe_direct_url: str | None = None,
    probe_requests: int = PROBE_REQUESTS,
    probe_gap: float = PROBE_GAP,
    warm_streams: int = 2,
    settle: float = 0.0,
    time_limit: float = DEFAULT_TIMEOUT,
) -> HoldResult:
    """Open ``count`` held streams through ``url``; RSS before and with them (and a probe).

    ``rss_of`` reads the target's RSS in KiB. ``warm_streams`` held streams are
    opened and closed first, so code paths that run once (imports, caches) are
    in the "before" figure and not spread over the streams; ``settle`` seconds
    then let the target finish with them before "before" is read.
    """
    async with asyncio.timeout(time_limit):
        if warm_streams:
            close_streams(await open_streams(url, warm_streams))
            if settle > 0:
                await asyncio.sleep(settle)  # the target tears the warm-up streams down
        before = rss_of()
        started = time.monotonic()
        streams = await open_streams(url, count)
        try:
            opened = time.monotonic() - started
            await asyncio.gather(*(s.steady for s in streams))
            with_streams = rss_of()
            latency = None
            if probe_direct_url is not None:
                latency = await probe_latency(url, probe_direct_url, probe_requests, probe_gap)
            lost = sum(1 for s in streams if s.transport is None)
            if lost:
                raise StreamsError(f"{lost} of {count} streams closed while held")
        finally:
            close_streams(streams)
    memory = StreamMemory(count, before, with_streams, opened)
    return HoldResult(memory, latency)
