"""No provider key reaches a client, a log line or the admin API, whatever an upstream echoes.

Three fake upstreams (OpenAI, Anthropic, Gemini formats, each with its own
recognisable key) echo their key whole, in parts, masked the way OpenAI's 401
does and upper-cased: in relayed headers, error bodies (passed through and
wrapped), in-band stream error events (before and after the commit point) and
success bodies (plain and streamed; a success body is checked for a whole key,
then scanned in full: docs/architecture.md, "Secrets"). Every response body
and header, the log output at DEBUG and the admin endpoints are then searched
for any run of 8 characters of any key, in any case.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from proxy.core.secrets import MIN_RUN, REDACTED, Redactor
from proxy.server.logs import guard_secrets
from tests.fakes.upstream import RawReply, RawStreamServer
from tests.harness import ProxyHandle, running_proxy, write_rules

OPENAI_KEY = "sk-proj-OpenAIsecretKEY0123456789abcdefXYZ"
ANTHROPIC_KEY = "sk-ant-api03-Xq7SECRETant9876543210zyxwv"
GEMINI_KEY = "AIzaSyGeminiSECRET-1122334455667788aabb"
KEYS = (OPENAI_KEY, ANTHROPIC_KEY, GEMINI_KEY)
JSON = {"Content-Type": "application/json"}
SSE = {"Content-Type": "text/event-stream"}
ADMIN_GETS = (
    "/api/circuit-breaker/status",
    "/api/circuit-breaker/metrics",
    "/api/circuit-breaker/health",
    "/api/usage",
    "/metrics",
    "/readyz",
)

RULES = """
version: 1
providers:
  oa:
    type: openai
    base_url: {oa}/v1
    api_key_env: OA_KEY
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
  an:
    type: anthropic
    base_url: {an}
    api_key_env: AN_KEY
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
  ge:
    type: gemini
    base_url: {ge}
    api_key_env: GE_KEY
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
models:
  oa-model: {{provider: oa}}
  an-model: {{provider: an}}
  ge-model: {{provider: ge}}
defaults:
  retry: {{max_attempts: 1, same_deployment_retries: 0}}
"""


def runs(key: str) -> list[str]:
    return [key[i : i + MIN_RUN].lower() for i in range(len(key) - MIN_RUN + 1)]


def leaked(text: str) -> list[str]:
    """Every run of MIN_RUN characters of any key that ``text`` holds, in any case."""
    low = text.lower()
    return [run for key in KEYS for run in runs(key) if run in low]


def masked(key: str) -> str:
    """OpenAI's 401 form: a few characters of the head, stars, the last four."""
    return key[:6] + "*" * 20 + key[-4:]


def json_reply(status: int, body: Any, headers: dict[str, str] | None = None) -> RawReply:
    return RawReply(status=status, headers={**JSON, **(headers or {})}, chunks=[orjson.dumps(body)])


def sse(*events: Any, sep: bytes = b"\n\n") -> RawReply:
    return RawReply(headers=SSE, chunks=[b"data: " + orjson.dumps(e) + sep for e in events])


def anthropic_sse(*events: dict[str, Any]) -> RawReply:
    chunks = [
        b"event: " + str(e["type"]).encode() + b"\ndata: " + orjson.dumps(e) + b"\n\n"
        for e in events
    ]
    return RawReply(headers=SSE, chunks=chunks)


def echo_headers(key: str) -> dict[str, str]:
    return {
        "x-ratelimit-limit-requests": key,
        "x-ratelimit-remaining-tokens": key[4:20].upper(),
        "x-ratelimit-reset-requests": masked(key),
        "openai-processing-ms": f"12 {key[-12:]}",
        "x-ratelimit-" + key[:12].lower(): "1",  # a header name holding a key: dropped
    }


def echo_text(key: str) -> str:
    return f"echo {key} / {key.upper()} / {key[3:19]} / {masked(key)}"


def openai_chat(content: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": content},
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    }


def openai_chunk(content: str | None, finish: str | None = None) -> dict[str, Any]:
    delta = {} if content is None else {"content": content}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }


def anthropic_error(key: str, kind: str = "invalid_request_error") -> dict[str, Any]:
    return {"type": "error", "error": {"type": kind, "message": echo_text(key)}}


ANTHROPIC_START = (
    {
        "type": "message_start",
        "message": {
            "id": "msg_1",
            "type": "message",
            "role": "assistant",
            "content": [],
            "model": "m",
            "usage": {"input_tokens": 3, "output_tokens": 1},
        },
    },
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
)


def anthropic_text(text: str) -> dict[str, Any]:
    return {
        "type": "content_block_delta",
        "index": 0,
        "delta": {"type": "text_delta", "text": text},
    }


def anthropic_message(text: str) -> dict[str, Any]:
    return {
        "id": "msg_1",
        "type": "message",
        "role": "assistant",
        "model": "m",
        "content": [{"type": "text", "text": text}],
        "stop_reason": "end_turn",
        "usage": {"input_tokens": 3, "output_tokens": 2},
    }


def gemini_chunk(text: str, finish: str | None = None) -> dict[str, Any]:
    candidate: dict[str, Any] = {"content": {"parts": [{"text": text}], "role": "model"}}
    if finish:
        candidate["finishReason"] = finish
    return {"candidates": [candidate]}


def gemini_error(key: str, code: int = 500, status: str = "INTERNAL") -> dict[str, Any]:
    return {"error": {"code": code, "message": echo_text(key), "status": status}}


# Each upstream answers these, in order: one request of the list below per reply.
OPENAI_REPLIES = (
    json_reply(200, openai_chat(echo_text(OPENAI_KEY)), echo_headers(OPENAI_KEY)),
    json_reply(401, {"error": {"message": f"Incorrect API key provided: {masked(OPENAI_KEY)}."}}),
    json_reply(400, {"error": {"message": echo_text(OPENAI_KEY), "type": "invalid_request_error"}}),
    json_reply(500, {"error": {"message": echo_text(OPENAI_KEY), "type": "server_error"}}),
    RawReply(
        status=503, headers={"Content-Type": "text/plain"}, chunks=[echo_text(OPENAI_KEY).encode()]
    ),
    sse({"error": {"message": echo_text(OPENAI_KEY), "type": "server_error"}}),  # before commit
    RawReply(
        headers={**SSE, **echo_headers(OPENAI_KEY)},
        chunks=[
            b"data: " + orjson.dumps(openai_chunk(echo_text(OPENAI_KEY))) + b"\n\n",
            b"data: " + orjson.dumps({"error": {"message": echo_text(OPENAI_KEY)}}) + b"\n\n",
        ],
    ),
)
ANTHROPIC_REPLIES = (
    json_reply(200, anthropic_message(echo_text(ANTHROPIC_KEY)), echo_headers(ANTHROPIC_KEY)),
    json_reply(400, anthropic_error(ANTHROPIC_KEY)),
    json_reply(401, anthropic_error(ANTHROPIC_KEY, "authentication_error")),
    json_reply(529, anthropic_error(ANTHROPIC_KEY, "overloaded_error")),
    anthropic_sse(anthropic_error(ANTHROPIC_KEY, "api_error")),  # before commit
    anthropic_sse(
        *ANTHROPIC_START,
        anthropic_text(echo_text(ANTHROPIC_KEY)),
        anthropic_error(ANTHROPIC_KEY, "overloaded_error"),
    ),
)
GEMINI_REPLIES = (
    json_reply(200, gemini_chunk(echo_text(GEMINI_KEY), "STOP"), echo_headers(GEMINI_KEY)),
    json_reply(400, gemini_error(GEMINI_KEY, 400, "INVALID_ARGUMENT")),
    json_reply(
        400, {"error": {"code": 400, "message": "API key not valid. " + echo_text(GEMINI_KEY)}}
    ),
    json_reply(500, gemini_error(GEMINI_KEY)),
    sse(gemini_error(GEMINI_KEY), sep=b"\r\n\r\n"),  # before commit
    sse(gemini_chunk(echo_text(GEMINI_KEY)), gemini_error(GEMINI_KEY), sep=b"\r\n\r\n"),
)
# (model, stream) per reply, in the same order.
REQUESTS = {
    "oa-model": (False, False, False, False, False, True, True),
    "an-model": (False, False, False, False, True, True),
    "ge-model": (False, False, False, False, True, True),
}


@dataclass
class Seen:
    """Everything a client and an operator got back."""

    texts: list[str] = field(default_factory=list)
    statuses: list[int] = field(default_factory=list)

    async def add(self, resp: aiohttp.ClientResponse) -> str:
        body = await resp.text()
        self.statuses.append(resp.status)
        self.texts.append(body)
        self.texts.extend(f"{k}: {v}" for k, v in resp.headers.items())
        return body


@asynccontextmanager
async def rig(
    tmp_path: Path,
    openai: Sequence[RawReply],
    anthropic: Sequence[RawReply],
    gemini: Sequence[RawReply],
) -> AsyncIterator[ProxyHandle]:
    async with (
        RawStreamServer(*openai) as oa,
        RawStreamServer(*anthropic) as an,
        RawStreamServer(*gemini) as ge,
    ):
        path = write_rules(tmp_path, RULES.format(oa=oa.url, an=an.url, ge=ge.url))
        env = {"OA_KEY": OPENAI_KEY, "AN_KEY": ANTHROPIC_KEY, "GE_KEY": GEMINI_KEY}
        async with running_proxy(path, environ=env) as proxy:
            yield proxy


async def test_no_key_reaches_clients_logs_or_the_admin_api(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    seen = Seen()
    async with (
        rig(tmp_path, OPENAI_REPLIES, ANTHROPIC_REPLIES, GEMINI_REPLIES) as proxy,
        aiohttp.ClientSession() as http,
    ):
        for model, streams in REQUESTS.items():
            for stream in streams:
                body = {
                    "model": model,
                    "stream": stream,
                    "messages": [{"role": "user", "content": "hi"}],
                }
                async with http.post(proxy.base_url + "/chat/completions", json=body) as resp:
                    await seen.add(resp)
        for base in (proxy.api_url, proxy.metrics_url):
            for path in ADMIN_GETS:
                if path == "/metrics" and base == proxy.api_url:
                    continue
                async with http.get(base + path) as resp:
                    await seen.add(resp)
    everything = "\n".join([*seen.texts, caplog.text])
    assert leaked(everything) == []
    assert REDACTED in everything  # the echoes arrived, and were redacted
    # The success replies and committed streams still went out (a 200 each), with the rest.
    assert seen.statuses.count(200) >= 3 + 3 + len(ADMIN_GETS) * 2 - 2
    assert any(s >= 500 for s in seen.statuses)


async def test_whole_key_in_a_success_body_is_redacted_and_the_reply_is_still_valid(
    tmp_path: Path,
) -> None:
    reply = json_reply(200, openai_chat(f"the key is {OPENAI_KEY.upper()}!"))
    async with (
        rig(tmp_path, [reply], [reply], [reply]) as proxy,
        aiohttp.ClientSession() as http,
    ):
        body = {"model": "oa-model", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 200
            obj = await resp.json()
    assert obj["choices"][0]["message"]["content"] == f"the key is {REDACTED}!"
    assert obj["circuit_breaker"]["provider"] == "oa"


async def test_a_masked_key_in_a_relayed_error_is_redacted_with_the_rest_of_the_message(
    tmp_path: Path,
) -> None:
    message = {"error": {"message": f"Incorrect API key provided: {masked(OPENAI_KEY)}. See docs."}}
    reply = json_reply(400, message)
    async with (
        rig(tmp_path, [reply], [reply], [reply]) as proxy,
        aiohttp.ClientSession() as http,
    ):
        body = {"model": "oa-model", "messages": [{"role": "user", "content": "hi"}]}
        async with http.post(proxy.base_url + "/chat/completions", json=body) as resp:
            assert resp.status == 400
            obj = await resp.json()
    assert obj["error"]["message"] == f"Incorrect API key provided: {REDACTED}. See docs."


def test_the_log_filter_redacts_message_arguments_extras_and_tracebacks(
    caplog: pytest.LogCaptureFixture,
) -> None:
    @dataclass(eq=False)
    class Source:
        redactor: Redactor

    source = Source(Redactor(KEYS))
    guard_secrets(source)
    caplog.set_level(logging.DEBUG)
    log = logging.getLogger("cb_proxy.forward")
    log.info("attempt failed: %s", echo_text(OPENAI_KEY), extra={"cb": {"k": GEMINI_KEY}})
    try:
        raise ValueError(echo_text(ANTHROPIC_KEY))
    except ValueError:
        log.exception("boom")
    record = caplog.records[0]
    assert leaked(str(getattr(record, "cb", ""))) == []
    assert leaked(caplog.text) == []
    assert REDACTED in caplog.text
    del source  # the filter holds its sources weakly: nothing to undo
