"""Smart routing end to end: the official SDK -> proxy -> three mock upstreams.

The rules weigh only quality for ``balanced`` so that which model ``auto``
picks depends on the detected task alone (live latency of local mocks varies
from run to run); the strategies' arithmetic is covered in tests/core/test_router.py.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import orjson
import pytest
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

RULES = """
version: 1
providers:
  alpha:
    type: openai
    base_url: {alpha}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 100, open_seconds: 30}}
  beta:
    type: openai
    base_url: {beta}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 100, open_seconds: 30}}
  gamma:
    type: openai
    base_url: {gamma}/v1
    timeouts: {{connect: 2, first_token: 5, idle: 5, total: 30}}
    breaker: {{failure_threshold: 3, min_throughput: 100, open_seconds: 30}}
models:
  budget:
    provider: alpha
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0002
    latency_ms: 300
    quality: {{chat: 6, coding: 4, analysis: 5, creative: 6}}
  coder:
    provider: beta
    input_cost_per_1k: 0.002
    output_cost_per_1k: 0.008
    latency_ms: 500
    quality: {{chat: 7, coding: 10, analysis: 8, creative: 5}}
  premium:
    provider: gamma
    input_cost_per_1k: 0.005
    output_cost_per_1k: 0.015
    latency_ms: 400
    quality: {{chat: 9, coding: 8, analysis: 9, creative: 9}}
virtual_models:
  auto: {{strategy: balanced}}
  cb:coding: {{strategy: task_specific, task_type: coding}}
  cb:cheapest: {{strategy: cost_optimized}}
defaults:
  weights: {{quality: 1}}
  retry: {{max_attempts: 4, same_deployment_retries: 0, backoff_ms: 1, max_backoff_ms: 2}}
"""

HELLO: list[ChatCompletionMessageParam] = [{"role": "user", "content": "hello, how are you today?"}]
CODE: list[ChatCompletionMessageParam] = [
    {
        "role": "user",
        "content": "Write a Python function that parses a JSON file; fix this TypeError traceback",
    }
]
POEM: list[ChatCompletionMessageParam] = [
    {"role": "user", "content": "Write a short poem about the sea at night"}
]


@dataclass
class Routed:
    proxy: ProxyHandle
    alpha: RunningMock
    beta: RunningMock
    gamma: RunningMock
    sdk: AsyncOpenAI

    def requests(self) -> tuple[int, int, int]:
        alpha, beta, gamma = (m.stats()["requests"] for m in (self.alpha, self.beta, self.gamma))
        return alpha, beta, gamma


@pytest.fixture
async def routed(tmp_path: Path) -> AsyncIterator[Routed]:
    async with (
        running_mock("openai", name="alpha") as alpha,
        running_mock("openai", name="beta") as beta,
        running_mock("openai", name="gamma") as gamma,
    ):
        text = RULES.format(alpha=alpha.url, beta=beta.url, gamma=gamma.url)
        async with (
            running_proxy(write_rules(tmp_path, text)) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="not-needed", max_retries=0) as sdk,
        ):
            yield Routed(proxy, alpha, beta, gamma, sdk)


async def chat(
    r: Routed, model: str, messages: list[ChatCompletionMessageParam], **extension: Any
) -> tuple[dict[str, str], dict[str, Any]]:
    extra = {"circuit_breaker": extension} if extension else None
    raw = await r.sdk.chat.completions.with_raw_response.create(
        model=model, messages=messages, extra_body=extra
    )
    assert raw.parse().choices[0].message.content
    return dict(raw.headers), orjson.loads(raw.http_response.content)


async def test_cost_optimized_picks_the_cheapest(routed: Routed) -> None:
    headers, body = await chat(routed, "auto", HELLO, routing_strategy="cost_optimized")
    assert headers["x-cb-upstream"] == "budget@alpha"
    assert headers["x-cb-provider"] == "alpha"
    assert (
        headers["x-cb-route"] == "strategy=cost_optimized; chose=budget@alpha; reason=cheapest of 3"
    )
    assert body["circuit_breaker"]["route"] == headers["x-cb-route"]
    headers, _ = await chat(routed, "cb:cheapest", CODE)
    assert headers["x-cb-upstream"] == "budget@alpha"
    assert routed.requests() == (2, 0, 0)


async def test_a_cost_cap_excludes_what_costs_more(routed: Routed) -> None:
    headers, _ = await chat(routed, "auto", HELLO)
    assert headers["x-cb-upstream"] == "premium@gamma"  # chat quality 9
    headers, _ = await chat(routed, "auto", HELLO, max_cost_per_1k_tokens={"input": 0.003})
    assert headers["x-cb-upstream"] == "coder@beta"  # premium's input price is over the cap
    assert routed.requests() == (0, 1, 1)


async def test_over_constrained_request_is_400_listing_every_reason(routed: Routed) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await routed.sdk.chat.completions.create(
            model="auto",
            messages=HELLO,
            extra_body={"circuit_breaker": {"max_cost_per_1k_tokens": 0.00001}},
        )
    body: Any = info.value.body
    assert body["code"] == "no_candidates"
    message = body["message"]
    assert "budget@alpha: input $0.0001/1k over cap $0.00001" in message
    assert "coder@beta: input $0.002/1k over cap $0.00001" in message
    assert "premium@gamma: input $0.005/1k over cap $0.00001" in message
    assert routed.requests() == (0, 0, 0)


async def test_request_fallback_models_serve_when_the_primary_fails(routed: Routed) -> None:
    await routed.alpha.set_fault(kind="status", status=503)
    headers, body = await chat(routed, "budget", HELLO, fallback_models=["coder"])
    assert headers["x-cb-upstream"] == "coder@beta"
    assert headers["x-cb-fallback"] == "true"
    assert headers["x-cb-attempts"] == "2"
    assert body["circuit_breaker"]["fallback_used"] is True
    assert routed.requests() == (1, 1, 0)


@pytest.mark.parametrize(
    ("model", "messages", "upstream", "task"),
    [
        ("auto", CODE, "coder@beta", "coding"),
        ("auto", HELLO, "premium@gamma", "chat"),
        ("auto", POEM, "premium@gamma", "creative"),
        ("cb:coding", HELLO, "coder@beta", "coding"),
    ],
)
async def test_auto_and_cb_coding_pick_per_task(
    routed: Routed,
    model: str,
    messages: list[ChatCompletionMessageParam],
    upstream: str,
    task: str,
) -> None:
    headers, _ = await chat(routed, model, messages)
    assert headers["x-cb-upstream"] == upstream
    route = headers["x-cb-route"]
    assert route.isascii()
    strategy = "balanced" if model == "auto" else "task_specific"
    assert route.startswith(f"strategy={strategy}; task={task}; chose={upstream}; reason=")


async def test_unknown_virtual_model_is_404_listing_the_virtual_models(routed: Routed) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        await routed.sdk.chat.completions.create(model="cb:nope", messages=HELLO)
    body: Any = info.value.body
    assert body["code"] == "model_not_found"
    assert "Virtual models: auto, cb:cheapest, cb:coding." in body["message"]
    assert "budget" not in body["message"]


async def test_an_open_breaker_keeps_the_first_choice_visible(routed: Routed) -> None:
    routed.proxy.state.breaker("alpha").force_open()
    headers, _ = await chat(routed, "cb:cheapest", HELLO)
    # budget@alpha stays first in the plan; the forwarding loop skips it without I/O.
    assert headers["x-cb-upstream"] == "coder@beta"
    assert headers["x-cb-fallback"] == "true"
    assert "chose=budget@alpha; reason=cheapest of 3, breaker open" in headers["x-cb-route"]
    assert routed.requests() == (0, 1, 0)


async def test_debug_log_has_the_whole_plan(
    routed: Routed, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.DEBUG, logger="cb_proxy.route"):
        headers, _ = await chat(routed, "auto", CODE, max_cost_per_1k_tokens={"output": 0.01})
    (record,) = [r for r in caplog.records if r.name == "cb_proxy.route"]
    fields: Any = record.__dict__["cb"]
    assert fields["request_id"] == headers["x-request-id"]
    assert fields["task_type"] == "coding"
    assert fields["task_source"] == "detected"
    assert [c["deployment"] for c in fields["candidates"]] == ["coder@beta", "budget@alpha"]
    assert fields["rejected"] == [
        {"deployment": "premium@gamma", "reason": "output $0.015/1k over cap $0.01"}
    ]
