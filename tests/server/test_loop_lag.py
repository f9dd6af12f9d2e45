"""No request under 1 KB holds the event loop over 50 ms.

The proxy runs in the test's event loop (tests/harness.py) in front of the
three mock formats, and a ticker task in the same loop records the largest gap
between its 5 ms ticks while the worst small request shapes we know of are
sent: JSON nested near the 128-level limit (and just over it), Gemini tool
schemas whose ``$ref``s fan out to the 5,000-node bound, many tiny messages,
many tools, long unicode, code-looking text for task detection.

The machine is shared and noisy, so each shape's figure is the smallest of
``REPEATS`` rounds' worst gaps: a real block of the loop is in every round, a
neighbour's burst is not. ``test_the_probe_sees_a_blocked_loop`` shows the
probe catches a 60 ms block, so the bound is able to fail.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from tests.fakes.upstream import running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

TICK = 0.005
MAX_LAG = 0.050
MAX_BODY = 1024
REPEATS = 3  # rounds per shape; the smallest round's worst gap counts
SENDS = 4  # requests per round
BLOCK = 0.060

RULES = """
version: 1
providers:
  oa: {{type: openai, base_url: "{oa}/v1"}}
  an: {{type: anthropic, base_url: "{an}"}}
  ge: {{type: gemini, base_url: "{ge}"}}
models:
  gpt-4o-mini: {{provider: oa}}
  claude-3-5-haiku: {{provider: an}}
  gemini-2.0-flash: {{provider: ge}}
virtual_models:
  auto: {{strategy: balanced, candidates: [gpt-4o-mini, claude-3-5-haiku, gemini-2.0-flash]}}
"""
MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "gemini-2.0-flash", "auto")


class LagProbe:
    """A task ticking every TICK seconds; ``worst`` is the largest lateness of a tick."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._task: asyncio.Task[None] | None = None

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        last = loop.time()
        while True:
            await asyncio.sleep(TICK)  # the measurement itself, not a wait for an event
            now = loop.time()
            self.worst = max(self.worst, now - last - TICK)
            last = now

    async def __aenter__(self) -> LagProbe:
        self._task = asyncio.create_task(self._tick())
        await asyncio.sleep(0)  # let the ticker take its first reading of the clock
        return self

    async def __aexit__(self, *exc: object) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)


def chat(model: str, messages: list[Any], **extra: Any) -> dict[str, Any]:
    return {"model": model, "messages": messages, **extra}


def nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


def ref_fan_out(width: int, levels: int) -> dict[str, Any]:
    """Definitions each of whose ``width`` branches is the next: width ** levels nodes inlined."""
    names = "abcdefghij"
    defs: dict[str, Any] = {
        names[i]: {"anyOf": [{"$ref": f"#/$defs/{names[i + 1]}"}] * width} for i in range(levels)
    }
    defs[names[levels]] = {"type": "string"}
    return {"properties": {"r": {"$ref": "#/$defs/a"}}, "$defs": defs}


def tool(name: str, parameters: dict[str, Any] | None = None) -> dict[str, Any]:
    fn: dict[str, Any] = {"name": name}
    if parameters is not None:
        fn["parameters"] = parameters
    return {"type": "function", "function": fn}


def user(text: str) -> dict[str, Any]:
    return {"role": "user", "content": text}


CODE_TEXT = "def f(x): return x.map(lambda y: y() == {}) ; `a_b` O(n) $5 && || :: => " * 10

# name -> model -> body (each under MAX_BODY bytes)
SHAPES: dict[str, Callable[[str], dict[str, Any]]] = {
    "deep json near the limit": lambda m: chat(m, [user("hi")], metadata={"k": nested(124)}),
    "deep json over the limit": lambda m: chat(m, [user("hi")], metadata={"k": nested(200)}),
    "ref fan-out 4x7 (over 5,000 nodes)": lambda m: chat(
        m, [user("hi")], tools=[tool("f", ref_fan_out(4, 7))]
    ),
    "ref fan-out 2x8": lambda m: chat(m, [user("hi")], tools=[tool("f", ref_fan_out(2, 8))]),
    "many tiny messages": lambda m: chat(
        m, [{"role": ("user", "assistant")[i % 2], "content": "a"} for i in range(30)]
    ),
    "many tools": lambda m: chat(m, [user("hi")], tools=[tool(f"f{i}") for i in range(20)]),
    "long unicode": lambda m: chat(m, [user("\U0001f9ea\u0301" * 150)]),
    "code-looking text": lambda m: chat(m, [user(CODE_TEXT[:850])]),
    "tool call ids to rewrite": lambda m: chat(
        m,
        [
            user("x"),
            {
                "role": "assistant",
                "tool_calls": [
                    {
                        "id": f"c{i}" * 4 + "/+=",
                        "type": "function",
                        "function": {"name": "f", "arguments": "{}"},
                    }
                    for i in range(6)
                ],
            },
            *[
                {"role": "tool", "tool_call_id": f"c{i}" * 4 + "/+=", "content": "r"}
                for i in range(6)
            ],
        ],
    ),
}


@asynccontextmanager
async def stack(tmp_path: Path) -> AsyncIterator[ProxyHandle]:
    async with (
        running_mock("openai") as oa,
        running_mock("anthropic") as an,
        running_mock("gemini") as ge,
    ):
        path = write_rules(tmp_path, RULES.format(oa=oa.url, an=an.url, ge=ge.url))
        async with running_proxy(path) as proxy:
            yield proxy


async def worst_gap(http: aiohttp.ClientSession, url: str, raw: bytes) -> tuple[float, int]:
    """The smallest, over REPEATS rounds, of a round's worst tick lateness; the last status."""
    best = float("inf")
    status = 0
    for _ in range(REPEATS):
        async with LagProbe() as probe:
            for _ in range(SENDS):
                async with http.post(
                    url, data=raw, headers={"content-type": "application/json"}
                ) as r:
                    await r.read()
                    status = r.status
        best = min(best, probe.worst)
    return best, status


@pytest.mark.parametrize("shape", list(SHAPES))
async def test_no_small_request_holds_the_loop(tmp_path: Path, shape: str) -> None:
    async with stack(tmp_path) as proxy, aiohttp.ClientSession() as http:
        url = proxy.base_url + "/chat/completions"
        for model in MODELS:
            raw = orjson.dumps(SHAPES[shape](model))
            assert len(raw) <= MAX_BODY, f"{shape}: {len(raw)} bytes"
            lag, status = await worst_gap(http, url, raw)
            assert status < 500, (shape, model, status)
            assert lag < MAX_LAG, f"{shape} on {model}: the loop was held {lag * 1000:.1f} ms"


async def test_the_probe_sees_a_blocked_loop() -> None:
    async with LagProbe() as probe:
        await asyncio.sleep(TICK * 2)  # let a tick or two pass first
        time.sleep(BLOCK)  # noqa: ASYNC251 - a deliberate block of the loop, to be caught
        await asyncio.sleep(TICK * 2)
    assert probe.worst >= BLOCK - TICK
