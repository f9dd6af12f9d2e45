"""The README's routing examples run as written, against the demo rules and mock upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.fakes.upstream import running_mock
from tests.harness import ProxyHandle, running_proxy

ROOT = Path(__file__).resolve().parents[2]
DEMO_MOCKS = (
    ("mock-openai", "openai", 18081),
    ("mock-openai-backup", "openai", 18082),
    ("mock-anthropic", "anthropic", 18083),
    ("mock-gemini", "gemini", 18084),
)


def readme_examples() -> list[str]:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    return [b for b in blocks if "extra_body" in b and "with_raw_response" in b]


@contextlib.asynccontextmanager
async def demo_stack(tmp_path: Path) -> AsyncIterator[ProxyHandle]:
    text = (ROOT / "rules" / "demo.yaml").read_text()
    async with contextlib.AsyncExitStack() as stack:
        for name, fmt, port in DEMO_MOCKS:
            mock = await stack.enter_async_context(running_mock(fmt, name=name))  # type: ignore[arg-type]
            text = text.replace(f"127.0.0.1:{port}", f"127.0.0.1:{mock.port}")
        rules = tmp_path / "demo.yaml"
        rules.write_text(text)
        yield await stack.enter_async_context(running_proxy(rules))


def test_the_readme_has_the_routing_example() -> None:
    assert len(readme_examples()) == 1


async def test_routing_examples_run_as_written(tmp_path: Path) -> None:
    (code,) = readme_examples()
    async with demo_stack(tmp_path) as proxy:
        runnable = code.replace("http://127.0.0.1:3000/v1", proxy.base_url)
        out = io.StringIO()

        def run() -> None:
            with contextlib.redirect_stdout(out):
                exec(compile(runnable, "README.md", "exec"), {})

        await asyncio.to_thread(run)
    printed = out.getvalue().splitlines()
    assert printed[0].startswith("strategy=balanced; task=coding; chose=")
    assert float(printed[1]) > 0
    assert printed[2] == "gemini-2.0-flash"


@pytest.mark.parametrize(
    "command",
    [
        [
            "explain",
            "--rules",
            "rules/demo.yaml",
            "--model",
            "cb:cost-optimal",
            "--max-cost",
            "0.0005",
        ],
        ["explain", "--rules", "rules/default.yaml", "--model", "auto", "write a python function"],
    ],
)
def test_readme_explain_commands_work(
    command: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    from proxy.cli import main

    readme = (ROOT / "README.md").read_text()
    assert " ".join(command[:5]) in readme
    with contextlib.chdir(ROOT):
        assert main(command) == 0
    assert "candidates (in order" in capsys.readouterr().out
