"""Mid-stream continuation end to end: the official SDK -> proxy -> mock upstreams.

The primary (an OpenAI-format mock) streams a 60-word answer and is cut after 40
words; the backup (OpenAI, Anthropic or Gemini format) gives the same answer for
the same prompt, so the client must receive exactly that answer as ONE valid
OpenAI stream (docs/breaker.md, "Mid-stream continuation").
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson
import pytest
from openai import AsyncOpenAI

from proxy.mock.app import FormatName
from proxy.mock.common import reply_text
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules
from tests.metrics import Scrape
from tests.openapi import validate

PROMPT = "tell me a long story about the sea"
WORDS = 60
SENT_WORDS = 40
MODEL = "story"
ANSWER = reply_text(PROMPT, WORDS)
# The primary's stream: the role chunk, then one chunk per word; cut after 40 words.
CUT = {"kind": "cut_stream", "after_events": 1 + SENT_WORDS}

RULES = """
version: 1
providers:
  primary:
    type: openai
    base_url: {primary}/v1
    timeouts: {{connect: 1, first_token: 5, idle: {idle}, total: 20}}
  backup:
    type: {backup_type}
    base_url: {backup}{suffix}
    prefill: {prefill}
    timeouts: {{connect: 1, first_token: 5, idle: 5, total: 20}}
models:
  story:
{model_extra}    deployments:
      - {{provider: primary, upstream_model: gpt-4o-mini}}
      - {{provider: backup, upstream_model: {backup_model}}}
{extra}
defaults:
  strategy: cost_optimized
  retry: {{max_attempts: 4, same_deployment_retries: 0}}
{defaults_extra}"""
BACKUP_MODELS = {"openai": "gpt-4o", "anthropic": "claude-sonnet-4-5", "gemini": "gemini-2.0-flash"}


@dataclass
class Rig:
    proxy: ProxyHandle
    primary: RunningMock
    backup: RunningMock
    sdk: AsyncOpenAI


@asynccontextmanager
async def rig(
    tmp_path: Path,
    backup_type: FormatName,
    extra: str = "",
    backup_words: int = WORDS,
    model_extra: str = "",
    idle: float = 5.0,
    prefill: str = "null",
    defaults_extra: str = "",
    **settings: Any,
) -> AsyncIterator[Rig]:
    async with (
        running_mock("openai", name="primary", words=WORDS) as primary,
        running_mock(backup_type, name="backup", words=backup_words) as backup,
    ):
        rules = RULES.format(
            primary=primary.url,
            backup=backup.url,
            backup_type=backup_type,
            suffix="/v1" if backup_type == "openai" else "",
            backup_model=BACKUP_MODELS[backup_type],
            extra=extra,
            model_extra=model_extra,
            idle=idle,
            prefill=prefill,
            defaults_extra=defaults_extra,
        )
        async with (
            running_proxy(write_rules(tmp_path, rules), **settings) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            yield Rig(proxy, primary, backup, sdk)


async def stream_bytes(r: Rig, **extra: Any) -> bytes:
    """The bytes of one streamed chat request, read through the SDK's own HTTP client."""
    async with r.sdk.chat.completions.with_streaming_response.create(
        model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True, **extra
    ) as response:
        assert response.http_response.status_code == 200
        return b"".join([piece async for piece in response.iter_bytes()])


@dataclass
class Stream:
    chunks: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    done: bool

    @property
    def text(self) -> str:
        return "".join(
            c["delta"].get("content") or "" for chunk in self.chunks for c in chunk["choices"]
        )


def parse(raw: bytes) -> Stream:
    """One OpenAI stream, checked event by event: every chunk valid, ``[DONE]`` only last."""
    events = raw.decode().split("\n\n")
    assert events[-1] == "", "the stream must end with a complete event"
    chunks: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    done = False
    for event in events[:-1]:
        assert event.startswith("data: "), event
        assert not done, "nothing may follow [DONE]"
        payload = event[len("data: ") :]
        if payload == "[DONE]":
            done = True
            continue
        obj = orjson.loads(payload)
        if "error" in obj:
            validate("ErrorResponse", obj)
            errors.append(obj)
        else:
            validate("CreateChatCompletionStreamResponse", obj)
            chunks.append(obj)
    return Stream(chunks, errors, done)


def assert_one_stream(s: Stream) -> None:
    assert s.done, "a complete stream ends with data: [DONE]"
    assert not s.errors
    assert len({(c["id"], c["created"], c["model"]) for c in s.chunks}) == 1
    choices = [choice for c in s.chunks for choice in c["choices"]]
    assert {choice["index"] for choice in choices} == {0}
    assert sum(1 for choice in choices if "role" in choice["delta"]) == 1
    assert sum(1 for choice in choices if choice["finish_reason"]) == 1
    assert s.text == ANSWER
    assert s.text.split() == ANSWER.split()  # no word twice, none lost


def continuations(scrape: Scrape, method: str, result: str) -> float:
    return scrape.total(
        "cb_proxy_stream_continuations_total", upstream="primary", method=method, result=result
    )


async def test_a_cut_stream_is_finished_by_prefill_on_anthropic(tmp_path: Path) -> None:
    async with rig(tmp_path, "anthropic") as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        assert_one_stream(s)
        sent = r.backup.stats()["last_body"]
        # The prefill holds exactly the text already sent, its trailing whitespace stripped.
        assert sent["messages"][-1]["role"] == "assistant"
        prefill = " ".join(ANSWER.split()[:SENT_WORDS])
        assert sent["messages"][-1]["content"] == [{"type": "text", "text": prefill}]
        scrape = Scrape(await r.proxy.metrics_text())
    assert continuations(scrape, "prefill", "continued") == 1
    meta = [c["circuit_breaker"] for c in s.chunks if "circuit_breaker" in c]
    assert len(meta) == 1
    assert meta[0]["continuation"]["method"] == "prefill"
    assert s.chunks[-1]["choices"] == []  # the metadata chunk is the last before [DONE]


@pytest.mark.parametrize("backup", ["openai", "gemini"])
async def test_a_cut_stream_is_finished_by_restart_and_match(
    tmp_path: Path, backup: FormatName
) -> None:
    async with rig(tmp_path, backup) as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        assert_one_stream(s)
        scrape = Scrape(await r.proxy.metrics_text())
    assert continuations(scrape, "restart", "continued") == 1
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="primary", outcome="failure") == 1


async def test_a_restart_that_differs_ends_with_the_original_failure(tmp_path: Path) -> None:
    # The backup's answer is 30 words: it ends before repeating the 40 already sent.
    async with rig(tmp_path, "openai", backup_words=30) as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        scrape = Scrape(await r.proxy.metrics_text())
    assert not s.done
    assert len(s.errors) == 1
    assert "story@primary" in s.errors[0]["error"]["message"]  # the primary's cut, named
    assert s.text == " ".join(ANSWER.split()[:SENT_WORDS])
    assert continuations(scrape, "restart", "mismatch") == 1


async def test_a_continuation_that_fails_too_ends_with_the_original_failure(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, "openai") as r:
        await r.primary.set_fault(CUT)
        await r.backup.set_fault({"kind": "error_event", "after_events": 3})
        s = parse(await stream_bytes(r))
        scrape = Scrape(await r.proxy.metrics_text())
    assert not s.done
    assert len(s.errors) == 1
    assert "story@primary" in s.errors[0]["error"]["message"]
    assert s.text == " ".join(ANSWER.split()[:SENT_WORDS])
    assert continuations(scrape, "none", "failed") == 1
    assert scrape.total("cb_proxy_upstream_calls_total", upstream="backup", outcome="failure") == 1


async def test_a_tool_call_in_flight_is_not_continued(tmp_path: Path) -> None:
    tools = [
        {
            "type": "function",
            "function": {
                "name": "lookup",
                "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
            },
        }
    ]
    async with rig(tmp_path, "openai") as r:
        await r.primary.set_fault({"kind": "cut_stream", "after_events": 2})
        s = parse(await stream_bytes(r, tools=tools))
        scrape = Scrape(await r.proxy.metrics_text())
        assert r.backup.stats()["requests"] == 0
    assert not s.done
    assert len(s.errors) == 1
    assert any(c["delta"].get("tool_calls") for chunk in s.chunks for c in chunk["choices"])
    assert continuations(scrape, "none", "ineligible") == 1


async def test_a_rejected_prefill_falls_back_to_restart(tmp_path: Path) -> None:
    async with rig(tmp_path, "anthropic") as r:
        await r.primary.set_fault(CUT)
        await r.backup.set_fault({"kind": "reject_prefill"})
        s = parse(await stream_bytes(r))
        assert_one_stream(s)
        scrape = Scrape(await r.proxy.metrics_text())
    assert continuations(scrape, "restart", "continued") == 1


async def test_continuation_off_in_the_rules_keeps_the_in_band_error(tmp_path: Path) -> None:
    extra = "routes:\n  - match: {model: story}\n    continuation: false"
    async with rig(tmp_path, "openai", extra) as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        assert r.backup.stats()["requests"] == 0
    assert not s.done
    assert len(s.errors) == 1
    assert s.text == " ".join(ANSWER.split()[:SENT_WORDS])


async def test_a_bare_done_is_a_cut_stream_and_is_continued(tmp_path: Path) -> None:
    async with rig(tmp_path, "openai") as r:
        await r.primary.set_fault({**CUT, "end_marker": True})
        assert_one_stream(parse(await stream_bytes(r)))


async def test_usage_is_the_sum_of_both_attempts(tmp_path: Path) -> None:
    async with rig(tmp_path, "anthropic") as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r, stream_options={"include_usage": True}))
    assert_one_stream(s)
    (usage,) = [c["usage"] for c in s.chunks if c.get("usage")]
    # The primary reported nothing before its cut: its part is estimated from the text sent.
    prefill = " ".join(ANSWER.split()[:SENT_WORDS])
    assert usage["completion_tokens"] == (len(prefill) + 3) // 4 + (WORDS - SENT_WORDS)


@pytest.mark.parametrize("backup", ["anthropic", "openai"])
async def test_the_sdk_reads_a_continued_stream_as_one_answer(
    tmp_path: Path, backup: FormatName
) -> None:
    async with rig(tmp_path, backup) as r:
        await r.primary.set_fault(CUT)
        stream = await r.sdk.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": PROMPT}], stream=True
        )
        text = ""
        finishes = []
        async for chunk in stream:
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    finishes.append(choice.finish_reason)
    assert text == ANSWER
    assert finishes == ["stop"]


async def test_a_stream_longer_than_the_copy_is_not_continued(tmp_path: Path) -> None:
    # The 40 words sent are ~6 KB of chunks: over a 1000-byte copy.
    async with rig(tmp_path, "openai", continuation_max_bytes=1000) as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        scrape = Scrape(await r.proxy.metrics_text())
        assert r.backup.stats()["requests"] == 0
    assert len(s.errors) == 1
    assert continuations(scrape, "none", "ineligible") == 1


@pytest.mark.parametrize("extra", [{"n": 2}, {"logprobs": True}])
async def test_n_above_one_or_logprobs_keep_the_in_band_error(
    tmp_path: Path, extra: dict[str, Any]
) -> None:
    async with rig(tmp_path, "openai") as r:
        await r.primary.set_fault({"kind": "cut_stream", "after_events": 5})
        s = parse(await stream_bytes(r, **extra))
        assert r.backup.stats()["requests"] == 0
    assert not s.done
    assert len(s.errors) == 1


async def test_a_model_with_continuation_off_is_not_continued(tmp_path: Path) -> None:
    async with rig(tmp_path, "openai", model_extra="    continuation: false\n") as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        scrape = Scrape(await r.proxy.metrics_text())
        assert r.backup.stats()["requests"] == 0
    assert len(s.errors) == 1
    assert continuations(scrape, "none", "ineligible") == 1


async def test_a_stall_past_the_idle_deadline_is_continued(tmp_path: Path) -> None:
    async with rig(tmp_path, "anthropic", idle=0.3) as r:
        await r.primary.set_fault({"kind": "stall_stream", "after_events": 1 + SENT_WORDS})
        s = parse(await stream_bytes(r))
        r.primary.control.clear_faults()  # releases the stalled upstream request
    assert_one_stream(s)


async def test_every_continuation_series_exists_at_zero(tmp_path: Path) -> None:
    async with rig(tmp_path, "openai") as r:
        scrape = Scrape(await r.proxy.metrics_text())
    name = "cb_proxy_stream_continuations_total"
    seen = {(s["upstream"], s["method"], s["result"]) for s in scrape.label_sets(name)}
    methods = ("prefill", "restart", "none")
    results = ("continued", "mismatch", "failed", "ineligible")
    for upstream in ("primary", "backup"):
        assert {(upstream, m, x) for m in methods for x in results} <= seen
    assert scrape.total(name) == 0


async def test_an_openai_upstream_with_the_prefill_flag_gets_a_prefix_message(
    tmp_path: Path,
) -> None:
    async with rig(tmp_path, "openai", prefill="true") as r:
        await r.primary.set_fault(CUT)
        s = parse(await stream_bytes(r))
        last = r.backup.stats()["last_body"]["messages"][-1]
        scrape = Scrape(await r.proxy.metrics_text())
    assert_one_stream(s)
    prefill = " ".join(ANSWER.split()[:SENT_WORDS])
    assert last == {"role": "assistant", "content": prefill, "prefix": True}
    assert continuations(scrape, "prefill", "continued") == 1


async def test_no_metadata_chunk_when_response_metadata_is_off(tmp_path: Path) -> None:
    async with rig(tmp_path, "anthropic", extra="") as r:
        text = r.proxy.rules_path.read_text()
        assert "response_metadata" not in text
        await r.primary.set_fault(CUT)
        with_meta = parse(await stream_bytes(r))
    async with rig(tmp_path, "anthropic", defaults_extra="  response_metadata: false\n") as r:
        await r.primary.set_fault(CUT)
        without = parse(await stream_bytes(r))
    assert_one_stream(without)
    assert any("circuit_breaker" in c for c in with_meta.chunks)
    assert not any("circuit_breaker" in c for c in without.chunks)


@pytest.mark.parametrize("kind", ["error_event", "malformed_event"])
async def test_an_in_band_error_or_a_malformed_event_is_continued(
    tmp_path: Path, kind: str
) -> None:
    async with rig(tmp_path, "gemini") as r:
        await r.primary.set_fault({"kind": kind, "after_events": 1 + SENT_WORDS})
        assert_one_stream(parse(await stream_bytes(r)))
