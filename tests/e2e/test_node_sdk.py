"""A second client ecosystem: the official ``openai`` npm package on Node, through the proxy.

``tests/e2e/node/tour.mjs`` runs against the proxy in front of the demo's mock upstreams
(rules/demo.yaml) with ``OPENAI_BASE_URL`` set, and prints one JSON object: a plain chat, a
stream assembled by hand and by the SDK's helper, a tool call round trip, the smart-routing
guide's JavaScript usage (the ``circuit_breaker`` body extension, each strategy, a virtual
model, streaming) and an error. ``make tools`` installs Node, npm and the package
(``npm ci`` into tests/e2e/node). Without them the test fails when ``CI`` is set and is
skipped, saying why, only when it is not.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.e2e.test_readme_examples import demo_stack

NODE_DIR = Path(__file__).resolve().parent / "node"
SCRIPT = NODE_DIR / "tour.mjs"
MIN_NODE_MAJOR = 18
RUN_TIMEOUT = 60.0
STRATEGIES = ("cost_optimized", "performance_first", "balanced", "reliability_first")


def _missing_node() -> str | None:
    node = shutil.which("node")
    if node is None:
        return "node is not on PATH (run `make tools`: it installs Debian's nodejs and npm)"
    version = subprocess.run(
        [node, "--version"], capture_output=True, text=True, check=False
    ).stdout.strip()
    major = int(version.lstrip("v").split(".")[0] or 0) if version else 0
    if major < MIN_NODE_MAJOR:
        return f"node {version or '?'} is older than {MIN_NODE_MAJOR}"
    if not (NODE_DIR / "node_modules" / "openai" / "package.json").is_file():
        return f"the openai npm package is not installed in {NODE_DIR} (run `make tools`)"
    return None


def _in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def node() -> str:
    reason = _missing_node()
    if reason is not None:
        if _in_ci():
            pytest.fail(f"CI is set, so the Node SDK test must run: {reason}")
        pytest.skip(reason)
    path = shutil.which("node")
    assert path is not None
    return path


async def run_tour(node: str, base_url: str) -> dict[str, Any]:
    env = {**os.environ, "OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "not-needed"}
    proc = await asyncio.create_subprocess_exec(
        node,
        str(SCRIPT),
        cwd=NODE_DIR,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        stdout, stderr = await asyncio.wait_for(proc.communicate(), RUN_TIMEOUT)
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    lines = stdout.decode().strip().splitlines()
    assert lines, f"no output (exit {proc.returncode}): {stderr.decode()}"
    result: dict[str, Any] = json.loads(lines[-1])
    assert proc.returncode == 0, json.dumps(result, indent=2) + stderr.decode()
    assert "error" not in result, result
    return result


async def test_the_openai_npm_package_through_the_proxy(node: str, tmp_path: Path) -> None:
    async with demo_stack(tmp_path) as proxy:
        out = await run_tour(node, proxy.base_url)

    plain = out["plain"]
    assert plain["object"] == "chat.completion"
    assert plain["content"].startswith("mock reply")
    assert plain["finish"] == "stop"
    assert plain["usage"]["total_tokens"] > 0

    stream = out["stream"]
    assert stream["content"] == plain["content"]
    assert stream["chunks"] > 3
    assert stream["finish"] == "stop"
    assert stream["usage"]["completion_tokens"] == plain["usage"]["completion_tokens"]
    assert stream["helper"] == plain["content"]

    tools = out["tools"]
    assert tools["first_finish"] == "tool_calls"
    assert tools["name"] == "get_weather"
    assert tools["args"] == {"city": "Weather"}
    assert tools["second_finish"] == "stop"
    assert tools["second_content"].startswith("mock reply")
    assert tools["streamed_name"] == "get_weather"
    assert tools["streamed_args"] == tools["args"]

    basic = out["guide_basic"]
    assert basic["content"].startswith("mock reply")
    assert basic["provider"] == "mock-anthropic"

    routed = out["guide_strategies"]
    for strategy in STRATEGIES:
        assert routed[strategy]["route"].startswith(f"strategy={strategy};"), routed[strategy]
        assert routed[strategy]["content"].startswith("mock reply")
    assert routed["task_specific"]["route"].startswith("strategy=task_specific;")
    assert "task=coding" in routed["coding"]["route"]
    # The cap leaves the models whose prices per 1k are at most 0.002: not gpt-4o or Claude.
    assert routed["capped"]["model"] in ("gpt-4o-mini", "gemini-2.0-flash")
    assert routed["virtual"]["route"].startswith("strategy=task_specific; task=coding;")

    streamed = out["guide_stream"]
    assert streamed["content"].startswith("mock reply")
    assert streamed["finish"] == "stop"
    assert streamed["route"].startswith("strategy=performance_first;")

    assert out["bad_request"] == {"status": 400, "param": "n"}
