"""`cb-proxy demo`: mock upstreams + the proxy + a scripted tour, no keys, no network.

The tour uses the official OpenAI SDK, exactly as an app would, and prints
what the proxy did from its response headers: which provider and model served,
whether a fallback stood in, the breaker state and the cost.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.config.check import load_rules
from proxy.config.settings import HostPort, Settings
from proxy.mock.app import MockControl, create_mock_app
from proxy.server.lifecycle import serve
from proxy.server.state import ProxyState

DEMO_RULES = Path(__file__).parent.parent / "data" / "demo.yaml"
MOCKS = (
    ("mock-openai", "openai", 18081),
    ("mock-openai-backup", "openai", 18082),
    ("mock-anthropic", "anthropic", 18083),
    ("mock-gemini", "gemini", 18084),
)
BOLD, DIM, GREEN, RED, YELLOW, RESET = (
    "\033[1m",
    "\033[2m",
    "\033[32m",
    "\033[31m",
    "\033[33m",
    "\033[0m",
)


def _free_port(preferred: int) -> int:
    """The preferred port when it is free, otherwise any free one."""
    for port in (preferred, 0):
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return int(sock.getsockname()[1])
    raise OSError("no free port")


@dataclass
class Printer:
    color: bool

    def __call__(self, text: str = "", style: str = "") -> None:
        if self.color and style:
            text = f"{style}{text}{RESET}"
        print(text, flush=True)


def _summary(headers: Any) -> str:
    parts = [
        f"provider={headers.get('x-cb-provider')}",
        f"model={headers.get('x-cb-model')}",
        f"fallback={headers.get('x-cb-fallback')}",
        f"attempts={headers.get('x-cb-attempts')}",
        f"breaker={headers.get('x-cb-breaker-state')}",
    ]
    cost = headers.get("x-cb-cost-usd")
    if cost:
        parts.append(f"cost=${float(cost):.6f}")
    return " ".join(parts)


async def _tour(
    base_url: str, mocks: dict[str, MockControl], state: ProxyState, say: Printer
) -> None:
    from openai import AsyncOpenAI  # the demo's client is the official SDK

    client = AsyncOpenAI(base_url=base_url, api_key="not-needed", max_retries=0)
    try:
        say("1. A plain chat completion", BOLD)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "Say hello to the demo"}]
        )
        reply = raw.parse()
        say(f"   reply: {reply.choices[0].message.content}")
        say(f"   {_summary(raw.headers)}", DIM)

        say("2. The same model, streamed", BOLD)
        stream = await client.chat.completions.create(
            model="gpt-4o-mini",
            messages=[{"role": "user", "content": "Stream a short answer"}],
            stream=True,
            stream_options={"include_usage": True},
        )
        pieces: list[str] = []
        usage = None
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                pieces.append(chunk.choices[0].delta.content)
            if chunk.usage is not None:
                usage = chunk.usage
        say(f"   streamed {len(pieces)} pieces: {''.join(pieces)}")
        if usage is not None:
            say(
                f"   usage: {usage.prompt_tokens} prompt + "
                f"{usage.completion_tokens} completion tokens",
                DIM,
            )

        say("3. A model the app asks for by an old name, rewritten by a route", BOLD)
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-3.5-turbo", messages=[{"role": "user", "content": "Which model are you?"}]
        )
        say(f"   asked for gpt-3.5-turbo, served by {raw.headers.get('x-cb-model')}")
        say(f"   route: {raw.headers.get('x-cb-route')}", DIM)

        say("4. Claude and Gemini, answered in OpenAI's format", BOLD)
        for model in ("claude-3-5-haiku", "gemini-2.0-flash"):
            raw = await client.chat.completions.with_raw_response.create(
                model=model, messages=[{"role": "user", "content": f"Hello {model}"}]
            )
            say(f"   {model}: {raw.parse().choices[0].message.content}")
            say(f"   {_summary(raw.headers)}", DIM)

        say("5. Embeddings", BOLD)
        emb = await client.embeddings.create(model="text-embedding-3-small", input=["one", "two"])
        say(f"   {len(emb.data)} vectors of {len(emb.data[0].embedding)} dimensions")

        await _outage(client, mocks, state, say)
    finally:
        await client.close()


async def _outage(
    client: Any, mocks: dict[str, MockControl], state: ProxyState, say: Printer
) -> None:
    say("6. Outage: the primary OpenAI mock starts answering 503", BOLD)
    primary = mocks["mock-openai"]
    primary.set_faults([{"kind": "status", "status": 503}])
    started = time.monotonic()
    for i in range(6):
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": f"request {i}"}]
        )
        mark = YELLOW if raw.headers.get("x-cb-fallback") == "true" else GREEN
        say(f"   t+{time.monotonic() - started:4.1f}s request {i}: {_summary(raw.headers)}", mark)
    say(f"   the primary received {primary.request_count()} requests in all so far", DIM)
    say("7. The primary recovers; the breaker lets probes through once its open period ends", BOLD)
    primary.clear_faults()
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        raw = await client.chat.completions.with_raw_response.create(
            model="gpt-4o-mini", messages=[{"role": "user", "content": "are you back?"}]
        )
        mark = YELLOW if raw.headers.get("x-cb-fallback") == "true" else GREEN
        say(f"   t+{time.monotonic() - started:4.1f}s {_summary(raw.headers)}", mark)
        if (
            raw.headers.get("x-cb-fallback") == "false"
            and raw.headers.get("x-cb-breaker-state") == "closed"
        ):
            say("   the primary serves again: breaker closed", GREEN)
            break
        await asyncio.sleep(1.0)  # the demo paces itself in real time for people to watch


async def _main(port: int, exit_after_tour: bool, color: bool) -> int:
    say = Printer(color)
    runners: list[web.AppRunner] = []
    mocks: dict[str, MockControl] = {}
    text = DEMO_RULES.read_text()
    for name, fmt, preferred in MOCKS:
        actual = _free_port(preferred)
        app = create_mock_app(fmt, name=name)  # type: ignore[arg-type]
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", actual).start()
        runners.append(runner)
        mocks[name] = MockControl.of(app)
        text = re.sub(rf"127\.0\.0\.1:{preferred}\b", f"127.0.0.1:{actual}", text)
        say(f"mock {fmt:9} upstream '{name}' on http://127.0.0.1:{actual}", DIM)
    tmp = tempfile.TemporaryDirectory(prefix="cb-proxy-demo-")
    rules_path = Path(tmp.name) / "demo.yaml"
    rules_path.write_text(text)
    settings = replace(
        Settings(),
        rules_path=rules_path,
        listen=HostPort("127.0.0.1", _free_port(port)),
        metrics_listen=HostPort("127.0.0.1", _free_port(9464)),
        health_check_interval=0,
        grace_period=2,
        shutdown_delay=0,  # nothing routes to the demo by readiness
    )
    loop = asyncio.get_running_loop()
    ready: asyncio.Future[tuple[ProxyState, str, str]] = loop.create_future()
    stop = asyncio.Event()
    task = asyncio.create_task(
        serve(
            settings,
            load_rules(rules_path),
            on_ready=lambda s, a, m: ready.set_result((s, a, m)),
            stop=stop,
        )
    )
    try:
        state, api, metrics = await ready
        say(f"cb-proxy on {api} (metrics {metrics})", BOLD)
        await _tour(api + "/v1", mocks, state, say)
        if not exit_after_tour:
            say()
            say("The proxy keeps running. Try:", BOLD)
            say(
                f"  curl -s {api}/v1/chat/completions -H 'content-type: application/json' "
                '-d \'{"model": "auto", "messages": [{"role": "user", "content": "hi"}]}\''
            )
            say(f"  curl -s {metrics}/metrics | grep circuit_breaker", DIM)
            say("Ctrl-C to stop.", DIM)
            await stop.wait()
        return 0
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await task
        for runner in runners:
            await runner.cleanup()
        tmp.cleanup()


def run_demo(*, port: int = 3000, exit_after_tour: bool = False) -> int:
    from proxy.server.lifecycle import run

    color = sys.stdout.isatty()
    try:
        result = run(lambda: _main(port, exit_after_tour, color))
    except KeyboardInterrupt:
        return 0
    return result if isinstance(result, int) else 1


__all__ = ["Awaitable", "Callable", "run_demo"]
