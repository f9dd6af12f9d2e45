"""The founding guides' product examples run against the demo: rules/demo.yaml, mock upstreams.

The smart-routing guide and the breaker-integration guide (../shared/seeds) are what users
copy. Each of their Python and curl examples that concerns the product is reproduced here
as the same call (our own code, not the guides' text), with only the host and port adapted:
plain requests with the guides' model names, virtual models, strategies, constraints,
fallbacks, streaming, /v1/models, the OpenAI SDK with ``extra_body``, the breaker library
calls and the admin endpoints. JavaScript examples are run by the Node suite; the GraphQL
API (port 4000) is another issue; the application wrappers of the breaker guide
(``OpenAICircuitBreaker``, ``execAsync``, ``sys.path`` inserts) are context, not product.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import openai
import pytest

from proxy import CircuitBreaker, CircuitBreakerConfig, CircuitOpenError, registry
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy

ROOT = Path(__file__).resolve().parents[2]
DEMO_MOCKS = (
    ("mock-openai", "openai", 18081),
    ("mock-openai-backup", "openai", 18082),
    ("mock-anthropic", "anthropic", 18083),
    ("mock-gemini", "gemini", 18084),
)
CURL = shutil.which("curl")


@dataclass
class Demo:
    proxy: ProxyHandle
    mocks: dict[str, RunningMock]

    @property
    def base(self) -> str:
        """The guides' ``http://localhost:3000`` (and 8000 for the admin API), adapted."""
        return self.proxy.api_url


@contextlib.asynccontextmanager
async def demo(tmp_path: Path) -> AsyncIterator[Demo]:
    text = (ROOT / "rules" / "demo.yaml").read_text()
    mocks: dict[str, RunningMock] = {}
    async with contextlib.AsyncExitStack() as stack:
        for name, fmt, port in DEMO_MOCKS:
            mock = await stack.enter_async_context(running_mock(fmt, name=name))  # type: ignore[arg-type]
            mocks[name] = mock
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{mock.port}")
        rules = tmp_path / "demo.yaml"
        rules.write_text(text)
        yield Demo(await stack.enter_async_context(running_proxy(rules)), mocks)


@dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: str

    def json(self) -> Any:
        return json.loads(self.body)


async def curl(*args: str) -> Reply:
    """Run curl as the guides do (plus -sS -i to read the status and headers)."""
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL, "-sS", "-i", *args, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    head, _, body = out.decode().partition("\r\n\r\n")
    lines = head.split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return Reply(int(lines[0].split()[1]), headers, body)


async def curl_chat(d: Demo, body: dict[str, Any]) -> Reply:
    return await curl(
        "-X",
        "POST",
        f"{d.base}/v1/chat/completions",
        "-H",
        "Content-Type: application/json",
        "-d",
        json.dumps(body),
    )


def hello(content: str = "Hello!") -> list[dict[str, str]]:
    return [{"role": "user", "content": content}]


needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


# -- the smart-routing guide: curl ---------------------------------------------------------

CURL_BODIES: list[tuple[str, dict[str, Any]]] = [
    ("basic", {"model": "claude-3-haiku-20240307", "messages": hello()}),
    ("auto", {"model": "auto", "messages": hello("Hello!")}),
    ("cost-optimal", {"model": "cb:cost-optimal", "messages": hello("Hello!")}),
    ("coding", {"model": "cb:coding", "messages": hello("Write a function")}),
    (
        "basic smart routing",
        {
            "model": "claude-3-haiku-20240307",
            "messages": hello(),
            "circuit_breaker": {"routing_strategy": "cost_optimized"},
        },
    ),
    (
        "with constraints",
        {
            "model": "auto",
            "messages": hello("Write a business plan"),
            "circuit_breaker": {
                "routing_strategy": "cost_optimized",
                "max_cost_per_1k_tokens": 0.002,
                "max_latency_ms": 3000,
                "fallback_models": ["claude-3-haiku-20240307", "gpt-3.5-turbo"],
            },
        },
    ),
    ("code generation", {"model": "cb:coding", "messages": hello("Create a REST API in Python")}),
    ("data analysis", {"model": "cb:analysis", "messages": hello("Analyze [1000, 1200, 900]")}),
    ("creative writing", {"model": "cb:creative", "messages": hello("A story about time")}),
    (
        "budget limit",
        {
            "model": "auto",
            "messages": hello("Explain machine learning"),
            "circuit_breaker": {
                "routing_strategy": "cost_optimized",
                "max_cost_per_1k_tokens": 0.001,
            },
        },
    ),
    (
        "performance vs cost",
        {
            "model": "auto",
            "messages": hello("Quick question: What is 2+2?"),
            "circuit_breaker": {
                "routing_strategy": "balanced",
                "max_cost_per_1k_tokens": 0.005,
                "max_latency_ms": 2000,
            },
        },
    ),
    (
        "troubleshooting: looser cost cap and a fallback",
        {
            "model": "auto",
            "messages": hello(),
            "circuit_breaker": {
                "max_cost_per_1k_tokens": 0.01,
                "fallback_models": ["claude-3-haiku-20240307"],
            },
        },
    ),
    # The Rust and Go examples make these two plain HTTP requests.
    (
        "rust",
        {
            "model": "auto",
            "messages": hello("Explain Rust ownership"),
            "circuit_breaker": {
                "routing_strategy": "task_specific",
                "task_type": "coding",
                "max_cost_per_1k_tokens": 0.01,
            },
        },
    ),
    (
        "go",
        {
            "model": "auto",
            "messages": hello("Write a Go function"),
            "circuit_breaker": {"routing_strategy": "task_specific", "task_type": "coding"},
        },
    ),
]


@needs_curl
async def test_the_routing_guide_curl_examples_answer(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        for label, body in CURL_BODIES:
            reply = await curl_chat(d, body)
            assert reply.status == 200, (label, reply.body)
            data = reply.json()
            assert data["choices"][0]["message"]["content"], label
            assert "x-cb-warning" not in reply.headers, (label, reply.headers)
            assert reply.headers["x-cb-route"].startswith("strategy="), label


@needs_curl
async def test_a_legacy_name_is_served_and_the_rewrite_is_reported(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        reply = await curl_chat(d, CURL_BODIES[0][1])
        assert reply.status == 200
        assert reply.headers["x-cb-provider"] == "mock-anthropic"
        assert "rewrote=claude-3-haiku-20240307->claude-3-5-haiku" in reply.headers["x-cb-route"]


@needs_curl
async def test_the_streaming_example_streams(tmp_path: Path) -> None:
    body = {
        "model": "cb:smart-chat",
        "messages": hello("Write a poem about AI"),
        "stream": True,
        "circuit_breaker": {"routing_strategy": "performance_first"},
    }
    async with demo(tmp_path) as d:
        reply = await curl_chat(d, body)
    assert reply.status == 200
    assert reply.headers["content-type"].startswith("text/event-stream")
    events = [line[6:] for line in reply.body.splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks if c["choices"])
    assert text
    assert "strategy=performance_first" in reply.headers["x-cb-route"]


@needs_curl
async def test_the_models_list_has_the_virtual_models_and_the_guides_names(
    tmp_path: Path,
) -> None:
    async with demo(tmp_path) as d:
        reply = await curl(f"{d.base}/v1/models")
    assert reply.status == 200
    ids = {m["id"] for m in reply.json()["data"]}
    assert {"auto", "cb:smart-chat", "cb:cost-optimal", "cb:fastest", "cb:coding"} <= ids
    assert {"claude-3-haiku-20240307", "gpt-3.5-turbo", "gpt-4o-mini"} <= ids


@needs_curl
async def test_an_unknown_fallback_is_skipped_with_a_warning(tmp_path: Path) -> None:
    body = {
        "model": "gpt-4o-mini",
        "messages": hello(),
        "circuit_breaker": {"fallback_models": ["no-such-model", "gemini-pro"]},
    }
    async with demo(tmp_path) as d:
        reply = await curl_chat(d, body)
    assert reply.status == 200
    assert "fallback model 'no-such-model' does not exist" in reply.headers["x-cb-warning"]


@needs_curl
async def test_a_chat_model_does_not_serve_completions(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        for model, status in (("gpt-3.5-turbo", 400), ("gpt-3.5-turbo-instruct", 200)):
            reply = await curl(
                "-X",
                "POST",
                f"{d.base}/v1/completions",
                "-H",
                "Content-Type: application/json",
                "-d",
                json.dumps({"model": model, "prompt": "say this"}),
            )
            assert reply.status == status, (model, reply.body)
            if status == 400:
                assert "does not serve /v1/completions" in reply.body


# -- the smart-routing guide: Python with the OpenAI SDK -------------------------------------


async def test_the_routing_guide_python_examples_run(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        base_url = d.proxy.base_url

        def run() -> list[str]:
            client = openai.OpenAI(base_url=base_url, api_key="not-needed")
            first = client.chat.completions.create(
                model="claude-3-haiku-20240307", messages=[{"role": "user", "content": "Hello!"}]
            )

            def smart_completion(
                content: str,
                strategy: str = "balanced",
                task_type: str | None = None,
                max_cost: float | None = None,
            ) -> str | None:
                config: dict[str, Any] = {"routing_strategy": strategy}
                if task_type:
                    config["task_type"] = task_type
                if max_cost:
                    config["max_cost_per_1k_tokens"] = max_cost
                response = client.chat.completions.create(
                    model="auto",
                    messages=[{"role": "user", "content": content}],
                    extra_body={"circuit_breaker": config},
                )
                return response.choices[0].message.content

            return [
                first.choices[0].message.content or "",
                smart_completion("Hello!", "cost_optimized") or "",
                smart_completion("Write a function", "task_specific", "coding") or "",
                smart_completion("Explain AI", "cost_optimized", max_cost=0.002) or "",
            ]

        answers = await asyncio.to_thread(run)
    assert all(answers), answers


# -- the breaker guide: the library ----------------------------------------------------------


async def test_the_breaker_guide_circuit_open_script() -> None:
    breaker = CircuitBreaker(
        "test", config=CircuitBreakerConfig(failure_threshold=3, min_throughput=1)
    )

    async def failing_call() -> None:
        raise RuntimeError("Service down")

    seen = []
    for _ in range(5):
        try:
            await breaker.call(failing_call)
        except Exception as exc:  # the script prints every error
            seen.append((breaker.state.value, type(exc)))
    assert (
        seen
        == [("closed", RuntimeError)] * 2
        + [("open", RuntimeError)]
        + [("open", CircuitOpenError)] * 2
    )
    assert breaker.state.value == "open"
    assert json.loads(json.dumps(breaker.get_metrics()))["failures"] == 3


def test_the_breaker_guide_registry_lookups() -> None:
    # "is the breaker open?" on a name nobody created: None, so the guard reads CLOSED.
    breaker = registry.get("openai_api")
    assert not (breaker and breaker.is_open)
    created = registry.get_or_create("openai_api")
    try:
        assert registry.get("openai_api") is created
        assert created.is_closed
        assert "openai_api" in list(registry.get_all().keys())
    finally:
        registry.reset_all()


# -- the breaker guide: the admin endpoints ---------------------------------------------------


@needs_curl
async def test_the_breaker_guide_admin_endpoints(tmp_path: Path) -> None:
    async with demo(tmp_path) as d:
        for path in ("metrics", "health", "status"):
            reply = await curl(f"{d.base}/api/circuit-breaker/{path}")
            assert reply.status == 200, (path, reply.body)
            assert reply.json(), path
        d.proxy.state.breaker("mock-openai").force_open()
        # The guide's breaker is 'openai_api'; the demo's breakers are its providers.
        unknown = await curl("-X", "POST", f"{d.base}/api/circuit-breaker/reset/openai_api")
        assert unknown.status == 404
        assert "mock-openai" in unknown.body
        reset = await curl("-X", "POST", f"{d.base}/api/circuit-breaker/reset/mock-openai")
        assert reset.status == 200, reset.body
        assert d.proxy.state.breaker("mock-openai").is_closed
        everything = await curl("-X", "POST", f"{d.base}/api/circuit-breaker/reset-all")
        assert everything.status == 200, everything.body


async def test_the_failover_example_is_served_by_another_provider(tmp_path: Path) -> None:
    """The guide's failover test: OpenAI down, the same request still answered."""
    async with demo(tmp_path) as d:
        d.proxy.state.breaker("mock-openai").force_open()
        d.proxy.state.breaker("mock-openai-backup").force_open()
        base_url = d.proxy.base_url

        def run() -> Any:
            client = openai.OpenAI(base_url=base_url, api_key="not-needed")
            return client.chat.completions.with_raw_response.create(
                model="gpt-4o",
                messages=[{"role": "user", "content": "test"}],
            )

        raw = await asyncio.to_thread(run)
    assert raw.headers["x-cb-fallback"] == "true"
    assert raw.headers["x-cb-provider"] in {"mock-anthropic", "mock-gemini"}
    assert raw.parse().choices[0].message.content
