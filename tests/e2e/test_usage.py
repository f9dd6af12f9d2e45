"""Tokens and cost end to end: reported usage, estimates when an upstream reports none, totals."""

from __future__ import annotations

from pathlib import Path

import aiohttp
import orjson
import pytest
from openai import AsyncOpenAI

from tests.fakes.upstream import RawReply, RawStreamServer, running_mock
from tests.harness import running_proxy, write_rules

RULES = """
version: 1
providers:
  mock: {{type: openai, base_url: "{mock}/v1"}}
  raw: {{type: openai, base_url: "{raw}/v1"}}
models:
  priced:
    provider: mock
    input_cost_per_1k: 0.5
    output_cost_per_1k: 1.5
  quiet:
    provider: raw
    input_cost_per_1k: 1.0
    output_cost_per_1k: 2.0
"""
PROMPT = "count my tokens please"  # 22 characters


def completion(text: str) -> bytes:
    return orjson.dumps(
        {
            "id": "chatcmpl-q",
            "object": "chat.completion",
            "created": 1,
            "model": "quiet",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": "stop",
                    "logprobs": None,
                }
            ],
        }
    )


async def test_reported_usage_is_priced_from_the_rules_and_totalled(tmp_path: Path) -> None:
    async with running_mock("openai", name="mock") as mock, RawStreamServer() as raw:
        path = write_rules(tmp_path, RULES.format(mock=mock.url, raw=raw.url))
        async with (
            running_proxy(path) as proxy,
            AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0) as sdk,
        ):
            raw_reply = await sdk.chat.completions.with_raw_response.create(
                model="priced", messages=[{"role": "user", "content": PROMPT}]
            )
            done = raw_reply.parse()
            assert done.usage is not None
            expected = (done.usage.prompt_tokens * 0.5 + done.usage.completion_tokens * 1.5) / 1000
            assert float(raw_reply.headers["x-cb-cost-usd"]) == pytest.approx(expected, abs=1e-8)
            assert "x-cb-usage-estimated" not in raw_reply.headers
            stream = await sdk.chat.completions.create(
                model="priced", messages=[{"role": "user", "content": PROMPT}], stream=True
            )
            async for _ in stream:
                pass
            async with (
                aiohttp.ClientSession() as session,
                session.get(proxy.metrics_url + "/api/usage") as resp,
            ):
                totals = await resp.json()
            metrics = await proxy.metrics_text()
        row = totals["by_model"][0]
        assert (row["provider"], row["model"], row["requests"]) == ("mock", "priced", 2)
        assert row["prompt_tokens"] == 2 * done.usage.prompt_tokens
        assert row["completion_tokens"] == 2 * done.usage.completion_tokens
        assert row["cost_usd"] == pytest.approx(2 * expected)
        assert row["estimated_requests"] == 0
        assert (
            f'cb_proxy_tokens_total{{kind="completion",model="priced",provider="mock"}} '
            f"{float(2 * done.usage.completion_tokens)}"
        ) in metrics
        assert 'cb_proxy_cost_usd_total{model="priced",provider="mock"}' in metrics


async def test_missing_usage_is_estimated_and_said_so(tmp_path: Path) -> None:
    text = "x" * 40  # about 10 tokens at four characters a token
    plain = RawReply(
        headers={"Content-Type": "application/json"}, chunks=[completion(text)], chunked=False
    )
    async with running_mock("openai", name="mock") as mock, RawStreamServer(plain) as raw:
        path = write_rules(tmp_path, RULES.format(mock=mock.url, raw=raw.url))
        async with (
            running_proxy(path) as proxy,
            aiohttp.ClientSession() as session,
            session.post(
                proxy.base_url + "/chat/completions",
                json={"model": "quiet", "messages": [{"role": "user", "content": PROMPT}]},
            ) as resp,
        ):
            body = await resp.json()
            assert resp.status == 200
            assert resp.headers["x-cb-usage-estimated"] == "true"
            meta = body["circuit_breaker"]
            assert meta["usage_estimated"] is True
            prompt_estimate = proxy.state.usage.by_model[("raw", "quiet")].prompt_tokens
            assert prompt_estimate > 0
            assert meta["cost_usd"] == pytest.approx((prompt_estimate * 1.0 + 10 * 2.0) / 1000)
            assert proxy.state.usage.by_model[("raw", "quiet")].estimated_requests == 1
