"""Regression tests for the review's findings on streams, through the proxy on real sockets.

A slow client is not an upstream stall; a CRLF-framed stream split between its
CR and LF reads the same as an LF-framed one (no usage chunk leaks, no stray
CR); refusal, reasoning and legacy function-call deltas are the commit point;
a stream that ends cleanly in the middle of an event after its finish_reason
drops the fragment and ends with [DONE]. Upstreams are ``RawStreamServer``s
(exact bytes, chunk by chunk, held at a chunk until ``release``), so every
split and pause is where the test puts it; nothing sleeps to wait.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohappyeyeballs import AddrInfoType
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.upstream import RawReply, RawStreamServer, RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

CHAT: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello"}]
WAIT = 10.0  # bound on anything a test awaits that should come at once

RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 2, first_token: {first_token}, idle: {idle}, total: 30}}
  backup:
    type: openai
    base_url: {backup}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
models:
  pair:
    deployments:
      - {{provider: primary}}
      - {{provider: backup}}
defaults:
  strategy: cost_optimized  # equal prices: the declared order, primary first
  retry: {{max_attempts: 4, same_deployment_retries: 0}}
"""


@dataclass
class Rig:
    proxy: ProxyHandle
    backup: RunningMock
    sdk: AsyncOpenAI

    async def post_stream(
        self, session: aiohttp.ClientSession, extra: Mapping[str, Any] | None = None
    ) -> aiohttp.ClientResponse:
        body = {"model": "pair", "messages": CHAT, "stream": True, **(extra or {})}
        return await session.post(self.proxy.base_url + "/chat/completions", json=body)

    def calls(self, provider: str) -> dict[str, int]:
        reports: dict[str, int] = self.proxy.state.breaker(provider).get_metrics()["reports"]
        return reports

    def model_calls(self, provider: str) -> dict[str, int]:
        """pair@provider's reports: a truncated stream is the model's failure (docs/breaker.md)."""
        breaker = self.proxy.model_breaker(provider, "pair")
        reports: dict[str, int] = breaker.get_metrics()["reports"]
        return reports


@asynccontextmanager
async def rig(
    tmp_path: Path, primary_url: str, *, first_token: float = 5.0, idle: float = 5.0
) -> AsyncIterator[Rig]:
    async with running_mock("openai", name="backup") as backup:
        text = RULES.format(
            primary=primary_url, backup=backup.url, first_token=first_token, idle=idle
        )
        async with (
            # One event here may be as large as the slow-client tests need (over the default).
            running_proxy(
                write_rules(tmp_path, text), upstream_max_event_bytes=2 * STREAM_CAP
            ) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="client-key", max_retries=0) as sdk,
        ):
            yield Rig(proxy, backup, sdk)


def chunk(delta: Mapping[str, Any], finish: str | None = None, *, sep: bytes = b"\n\n") -> bytes:
    obj = {
        "id": "chatcmpl-hardening",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": dict(delta), "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + sep


def usage_chunk(*, sep: bytes = b"\n\n") -> bytes:
    obj = {
        "id": "chatcmpl-hardening",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    return b"data: " + orjson.dumps(obj) + sep


ROLE = chunk({"role": "assistant", "content": ""})
HELLO = chunk({"content": "Hello"})
WORLD = chunk({"content": " world"})
STOP = chunk({}, "stop")
USAGE = usage_chunk()
DONE = b"data: [DONE]\n\n"


def payloads(body: bytes) -> list[str]:
    """The ``data:`` payloads of a whole SSE body, checking each event is one complete line."""
    text = body.decode()
    events = text.split("\n\n")
    assert events[-1] == "", "the stream must end with a complete event"
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert "\n" not in event, event
        assert "\r" not in event, event
    return [event.removeprefix("data: ") for event in events[:-1]]


async def read_until(resp: aiohttp.ClientResponse, marker: bytes) -> bytes:
    """Events up to and including the one holding ``marker``."""
    seen = b""
    async with asyncio.timeout(WAIT):
        while marker not in seen:
            seen += await resp.content.readuntil(b"\n\n")
    return seen


# -- 3. a slow client is not an upstream stall -------------------------------------------------

IDLE = 0.3  # the primary's idle timeout: the client pauses for several of these
PAUSE = 4 * IDLE
CLIENT_RCVBUF = 4096
PIECE_CHARS = 16 * 1024
DEFAULT_SEND_BUFFER_MAX = 4 * 1024 * 1024
STREAM_CAP = 64 * 1024 * 1024


def stream_bytes() -> int:
    """Enough data that the proxy must wait on the paused client, whatever the kernel buffers.

    Between the proxy and a paused client sit the proxy's socket send buffer (at most the
    kernel's tcp_wmem maximum), a little of the proxy's own, and the client's small receive
    buffer: twice the send maximum plus a MiB outruns them all.
    """
    try:
        send_max = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        send_max = DEFAULT_SEND_BUFFER_MAX
    return min(2 * send_max + 1024 * 1024, STREAM_CAP)


def small_receive_buffer(addr: AddrInfoType) -> socket.socket:
    """The client's socket, with a small receive window so a pause backs up quickly."""
    family, kind, proto, _, _ = addr
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, CLIENT_RCVBUF)
    return sock


async def slow_client_stream(tmp_path: Path, reply: RawReply) -> tuple[list[str], dict[str, int]]:
    """Stream ``reply`` to a client that reads the first content, then pauses for PAUSE.

    Returns the client's payloads and the primary's breaker reports.
    """
    async with (
        RawStreamServer(reply) as primary,
        rig(tmp_path, primary.url, idle=IDLE) as r,
        aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(socket_factory=small_receive_buffer)
        ) as session,
    ):
        resp = await r.post_stream(session)
        async with resp:
            assert resp.status == 200
            assert resp.headers["x-cb-provider"] == "primary"
            first = await read_until(resp, b'"Hello"')
            # The client stops reading for several idle timeouts: the pause is the stimulus,
            # not a wait for a result. Meanwhile the proxy is stuck writing to the client.
            resume = asyncio.Event()
            asyncio.get_running_loop().call_later(PAUSE, resume.set)
            await resume.wait()
            async with asyncio.timeout(WAIT):
                rest = await resp.content.read()
        assert r.backup.stats()["requests"] == 0
        return payloads(first + rest), r.calls("primary")


def assert_whole_answer(got: list[str], text: str) -> None:
    assert got[-1] == "[DONE]"
    objs = [orjson.loads(p) for p in got[:-1]]
    errors = [o for o in objs if "error" in o]
    assert not errors, f"the slow client was blamed on the upstream: {errors}"
    relayed = "".join(c["delta"].get("content") or "" for o in objs for c in o["choices"])
    assert relayed == text  # everything relayed, in order, once


async def test_a_client_slower_than_the_idle_timeout_is_not_an_upstream_stall(
    tmp_path: Path,
) -> None:
    pieces = [f"<{i:05d}>" + "x" * (PIECE_CHARS - 7) for i in range(stream_bytes() // PIECE_CHARS)]
    # The upstream has everything ready at once: it is never idle, only the client is slow.
    reply = RawReply(chunks=[ROLE + HELLO, *(chunk({"content": p}) for p in pieces), STOP + DONE])
    got, calls = await slow_client_stream(tmp_path, reply)
    assert_whole_answer(got, "Hello" + "".join(pieces))
    assert calls["success"] == 1
    assert calls["failure"] == 0


async def test_a_client_too_slow_for_the_last_event_is_not_an_upstream_stall(
    tmp_path: Path,
) -> None:
    """The bytes written at the upstream's end of stream are subject to the same rule.

    The last event is large and has no blank line after it, and no [DONE] follows: the
    proxy completes it at EOF and writes it, with the [DONE] it adds, to a client that
    is not reading. That write waits on the client, not on the upstream, which is done.
    """
    text = "y" * stream_bytes()
    last = chunk({"content": text}, "stop").removesuffix(b"\n\n")
    got, calls = await slow_client_stream(tmp_path, RawReply(chunks=[ROLE + HELLO, last]))
    assert_whole_answer(got, "Hello" + text)
    assert calls["success"] == 1
    assert calls["failure"] == 0


# -- 4. CRLF framing split between CR and LF ------------------------------------------------------


def crlf(*events: bytes) -> bytes:
    return b"".join(e.replace(b"\n\n", b"\r\n\r\n") for e in events)


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
async def test_a_crlf_stream_split_between_cr_and_lf_reads_like_an_lf_stream(
    tmp_path: Path, include_usage: bool
) -> None:
    finish = crlf(STOP)
    # The split falls between the last CR and LF after the finish chunk; the hold makes sure
    # the proxy reads the first half before the second is even sent.
    split = RawReply(
        chunks=[crlf(ROLE, HELLO), crlf(WORLD) + finish[:-1], b"\n" + crlf(USAGE) + crlf(DONE)],
        hold_before=2,
    )
    plain = RawReply(chunks=[ROLE + HELLO + WORLD + STOP + USAGE + DONE])
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with (
        RawStreamServer(split, plain) as primary,
        rig(tmp_path, primary.url) as r,
        aiohttp.ClientSession() as session,
    ):
        resp = await r.post_stream(session, extra)
        async with resp:
            assert resp.headers["x-cb-provider"] == "primary"
            head = await read_until(resp, b'" world"')  # the proxy has read the CR half
            primary.release()
            async with asyncio.timeout(WAIT):
                split_body = head + await resp.content.read()
        resp = await r.post_stream(session, extra)
        async with resp:
            plain_body = await resp.read()
        assert len(primary.requests) == 2
        assert r.calls("primary")["success"] == 2
    expected = ROLE + HELLO + WORLD + STOP + (USAGE if include_usage else b"") + DONE
    assert plain_body == expected
    assert split_body == expected  # no stray CR, no usage chunk the client did not ask for
    got = payloads(split_body)
    assert got.count("[DONE]") == 1
    usage_chunks = [p for p in got[:-1] if orjson.loads(p).get("choices") == []]
    assert len(usage_chunks) == (1 if include_usage else 0)


# -- 7. non-content deltas are the commit point ----------------------------------------------------

FIRST_TOKEN = 1.0  # the primary's first-token timeout: holding the delta would fail over
GENERATED_DELTAS: dict[str, dict[str, Any]] = {
    "refusal": {"refusal": "I can't help with that."},
    "reasoning_content": {"reasoning_content": "Let me think."},
    "reasoning": {"reasoning": "Thinking it over."},
    "function_call": {"function_call": {"name": "get_weather", "arguments": ""}},
    "audio": {"audio": {"id": "audio_1", "transcript": "Hi"}},
}


@pytest.mark.parametrize("field", list(GENERATED_DELTAS))
async def test_a_stream_starting_with_a_non_content_delta_commits_at_once(
    tmp_path: Path, field: str
) -> None:
    delta = GENERATED_DELTAS[field]
    # The upstream sends the role and the first generated delta, then nothing until released:
    # only a proxy that commits on that delta lets the client see it before the first-token
    # timeout (a held stream would time out and fail over to the backup).
    reply = RawReply(chunks=[ROLE + chunk(delta), STOP + DONE], hold_before=1)
    async with (
        RawStreamServer(reply) as primary,
        rig(tmp_path, primary.url, first_token=FIRST_TOKEN) as r,
    ):
        raw = await r.sdk.chat.completions.with_raw_response.create(
            model="pair", messages=CHAT, stream=True
        )
        assert raw.headers["x-cb-provider"] == "primary"
        seen: list[dict[str, Any]] = []
        finish: list[str | None] = []
        async with asyncio.timeout(WAIT):
            async for event in raw.parse():
                for choice in event.choices:
                    part = choice.delta.to_dict()
                    seen.append(part)
                    finish.append(choice.finish_reason)
                    if field in part:
                        primary.release()  # the client has the delta: let the stream end
        assert r.backup.stats()["requests"] == 0
        assert r.calls("primary")["success"] == 1
    [got] = [part[field] for part in seen if field in part]
    assert got == delta[field]
    assert finish[-1] == "stop"


# -- 9. a clean end in the middle of an event after the finish_reason --------------------------

CUT = b'data: {"id":"chatcmpl-hardening","object":"chat.completion.chunk","choices":[],"usage":{"pr'


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "usage"])
async def test_a_cut_last_event_after_the_finish_is_dropped_and_done_follows(
    tmp_path: Path, include_usage: bool
) -> None:
    reply = RawReply(chunks=[ROLE + HELLO, STOP + CUT])  # then a clean end of the body
    extra = {"stream_options": {"include_usage": True}} if include_usage else {}
    async with (
        RawStreamServer(reply) as primary,
        rig(tmp_path, primary.url) as r,
        aiohttp.ClientSession() as session,
    ):
        resp = await r.post_stream(session, extra)
        async with resp:
            body = await resp.read()
        # The official SDK reads the same stream to its end without a parse error.
        stream = await r.sdk.chat.completions.create(
            model="pair",
            messages=CHAT,
            stream=True,
            stream_options={"include_usage": include_usage},
        )
        events = [event async for event in stream]
        assert r.calls("primary")["success"] == 2
        assert r.backup.stats()["requests"] == 0
        assert len(primary.requests) == 2
    assert body == ROLE + HELLO + STOP + DONE
    text = "".join(c.delta.content or "" for e in events for c in e.choices)
    assert text == "Hello"
    assert [c.finish_reason for e in events for c in e.choices][-1] == "stop"
    assert all(e.usage is None for e in events)


async def test_a_cut_last_event_before_any_finish_is_dropped_and_reported(
    tmp_path: Path,
) -> None:
    """The other side of the same check: without a finish_reason the cut is a truncation."""
    cut = b'data: {"id":"chatcmpl-hardening","object":"chat.completion.chunk","choices":[{"ind'
    reply = RawReply(chunks=[ROLE + HELLO, WORLD + cut])
    async with (
        RawStreamServer(reply) as primary,
        rig(tmp_path, primary.url) as r,
        aiohttp.ClientSession() as session,
    ):
        resp = await r.post_stream(session)
        async with resp:
            body = await resp.read()
        # Truncated: the deployment's failure; the provider's transport answered.
        assert r.model_calls("primary")["failure"] == 1
        assert r.model_calls("primary")["success"] == 0
        assert r.calls("primary")["failure"] == 0
        assert r.calls("primary")["success"] == 1
        assert len(primary.requests) == 1
    *chunks, last = payloads(body)
    assert [orjson.loads(p) for p in chunks] == [
        orjson.loads(e.removeprefix(b"data: ")) for e in (ROLE, HELLO, WORLD)
    ]
    assert set(orjson.loads(last)) == {"error"}  # truncated: one in-band error, no fragment
