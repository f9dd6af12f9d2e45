"""The proxy and three mock upstreams (OpenAI, Anthropic, Gemini) on a loop of their own.

Hypothesis drives synchronous test functions, so the stack runs on an event
loop in a background thread and each example sends its request there with
``Stack.call`` (one request at a time: the stack is shared by the examples).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiohttp

from proxy.mock.app import FormatName
from tests.fakes.upstream import RunningMock, running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

T = TypeVar("T")
CALL_SECONDS = 30.0  # bound on one request: the proxy's own total deadline is lower

RULES = """
version: 1
providers:
  oa: {{type: openai, base_url: "{oa}/v1", api_key_env: OA_KEY,
        timeouts: {{connect: 2, first_token: 5, idle: 5, total: 10}}}}
  an: {{type: anthropic, base_url: "{an}", api_key_env: AN_KEY,
        timeouts: {{connect: 2, first_token: 5, idle: 5, total: 10}}}}
  ge: {{type: gemini, base_url: "{ge}", api_key_env: GE_KEY,
        timeouts: {{connect: 2, first_token: 5, idle: 5, total: 10}}}}
models:
  gpt-4o-mini: {{provider: oa, context_window: 128000}}
  claude-3-5-haiku: {{provider: an, context_window: 200000}}
  gemini-2.0-flash: {{provider: ge, context_window: 1000000}}
  text-embedding-3-small: {{provider: oa}}
  text-embedding-004: {{provider: ge}}
  gpt-3.5-turbo-instruct: {{provider: oa}}
virtual_models:
  auto: {{strategy: balanced, candidates: [gpt-4o-mini, claude-3-5-haiku, gemini-2.0-flash]}}
defaults:
  strategy: cost_optimized
  retry: {{max_attempts: 3, same_deployment_retries: 0}}
"""
ENVIRON = {"OA_KEY": "sk-Qx7fz0a1", "AN_KEY": "sk-ant-Qx7fz0a2", "GE_KEY": "AIzaQx7fz0a3"}
FORMATS: tuple[tuple[str, FormatName], ...] = (
    ("oa", "openai"),
    ("an", "anthropic"),
    ("ge", "gemini"),
)
CHAT_MODELS = ("gpt-4o-mini", "claude-3-5-haiku", "gemini-2.0-flash", "auto")
EMBEDDING_MODELS = ("text-embedding-3-small", "text-embedding-004")
COMPLETION_MODELS = ("gpt-3.5-turbo-instruct", "claude-3-5-haiku", "gemini-2.0-flash")


@dataclass(frozen=True)
class Reply:
    status: int
    headers: Mapping[str, str]
    body: bytes


@dataclass
class Stack:
    loop: asyncio.AbstractEventLoop
    proxy: ProxyHandle
    mocks: dict[str, RunningMock]
    session: aiohttp.ClientSession
    faults_set: bool = False

    def call(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(CALL_SECONDS)

    def request(
        self,
        method: str,
        path: str,
        *,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        admin: bool = False,
    ) -> Reply:
        base = self.proxy.metrics_url if admin else self.proxy.api_url

        async def send() -> Reply:
            async with self.session.request(
                method, base + path, data=body, headers=headers
            ) as resp:
                return Reply(resp.status, dict(resp.headers), await resp.read())

        return self.call(send())

    def failing(self) -> bool:
        """Was any upstream told to fail (then a 5xx is the upstream's, not the request's)?"""
        return self.faults_set

    def fail_upstreams(self, spec: Mapping[str, Any]) -> None:
        """Every upstream answers with the fault ``spec`` (the mock's control API) until heal()."""
        self.faults_set = True
        for mock in self.mocks.values():
            self.call(mock.set_fault(dict(spec)))

    def heal(self) -> None:
        """Faults cleared and every breaker closed again: the next request is a normal one."""
        for mock in self.mocks.values():
            mock.control.clear_faults()  # a plain method: nothing of the loop's to wait on
        reply = self.request("POST", "/api/circuit-breaker/reset-all", admin=True)
        if reply.status != 200:
            raise RuntimeError(f"reset-all answered {reply.status}: {reply.body!r}")
        self.faults_set = False


@contextmanager
def running_stack(tmp_path: Path) -> Iterator[Stack]:
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="fuzz-stack", daemon=True)
    thread.start()
    exits = AsyncExitStack()

    async def start() -> Stack:
        mocks = {
            name: await exits.enter_async_context(running_mock(fmt, name=name))
            for name, fmt in FORMATS
        }
        rules = write_rules(tmp_path, RULES.format(**{n: m.url for n, m in mocks.items()}))
        proxy = await exits.enter_async_context(running_proxy(rules, environ=ENVIRON))
        session = await exits.enter_async_context(aiohttp.ClientSession())
        return Stack(loop, proxy, mocks, session)

    try:
        stack = asyncio.run_coroutine_threadsafe(start(), loop).result(CALL_SECONDS)
        yield stack
    finally:
        asyncio.run_coroutine_threadsafe(exits.aclose(), loop).result(CALL_SECONDS)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(CALL_SECONDS)
        loop.close()
