"""Process lifecycle: SIGTERM drain, hot reload under traffic, bad rules kept out, `check`, demo."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import aiohttp
import orjson
import pytest

from proxy.cli import main
from tests.fakes.upstream import running_mock
from tests.harness import running_proxy, write_rules

RULES = """
version: 1
providers:
  a: {{type: openai, base_url: "{a}/v1"}}
  b: {{type: openai, base_url: "{b}/v1"}}
models:
  m: {{provider: {target}}}
  other: {{provider: a}}
"""
BODY = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


async def chat(session: aiohttp.ClientSession, url: str, **extra: object) -> tuple[int, str]:
    async with session.post(url + "/v1/chat/completions", json={**BODY, **extra}) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-cb-provider", "")


async def _ready_line(proc: asyncio.subprocess.Process) -> tuple[str, str]:
    assert proc.stdout is not None
    while True:
        line = (await proc.stdout.readline()).decode()
        if not line:
            raise RuntimeError("proxy exited before it was ready")
        if line.startswith("cb-proxy ready"):
            fields = dict(part.split("=", 1) for part in line.split()[2:])
            return fields["api"], fields["metrics"]


async def test_sigterm_drains_in_flight_stream_then_exits_zero(tmp_path: Path) -> None:
    # 12 words at 20 tokens per second: the stream lasts about 0.6 s, long enough to be in flight.
    async with (
        running_mock("openai", name="a", tokens_per_second=20) as a,
        running_mock("openai", name="b") as b,
    ):
        path = write_rules(tmp_path, RULES.format(a=a.url, b=b.url, target="a"))
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "proxy",
            "serve",
            "--rules",
            str(path),
            "--listen",
            "127.0.0.1:0",
            "--metrics-listen",
            "127.0.0.1:0",
            "--grace-period",
            "10",
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HEALTH_CHECK_INTERVAL": "0"},
        )
        try:
            api, metrics = await asyncio.wait_for(_ready_line(proc), 20)
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    api + "/v1/chat/completions", json={**BODY, "stream": True}
                ) as resp:
                    assert resp.status == 200
                    first = await resp.content.readline()
                    assert first.startswith(b"data: ")
                    proc.send_signal(signal.SIGTERM)
                    rest = await resp.content.read()
                body = first + rest
                assert body.endswith(b"data: [DONE]\n\n")
                assert b'"error"' not in body
                # The listener is closed: a new request cannot get in.
                with pytest.raises(aiohttp.ClientConnectionError):
                    await chat(session, api)
            assert await asyncio.wait_for(proc.wait(), 20) == 0
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
        assert proc.stderr is not None
        log = (await proc.stderr.read()).decode()
        assert "draining: 1 request(s) in flight" in log
        del metrics


async def test_reload_under_traffic_swaps_atomically_and_keeps_in_flight_rules(
    tmp_path: Path,
) -> None:
    async with (
        running_mock("openai", name="a", tokens_per_second=40) as a,
        running_mock("openai", name="b") as b,
    ):
        path = write_rules(tmp_path, RULES.format(a=a.url, b=b.url, target="a"))
        async with (
            running_proxy(path, reload_interval=0.02) as proxy,
            aiohttp.ClientSession() as session,
        ):
            url = proxy.api_url
            # A slow stream that starts under the old rules ...
            stream = await session.post(url + "/v1/chat/completions", json={**BODY, "stream": True})
            assert stream.headers["x-cb-provider"] == "a"
            # ... while plain traffic keeps flowing across the swap.
            stop = asyncio.Event()
            results: list[tuple[int, str]] = []

            async def traffic() -> None:
                while not stop.is_set():
                    results.append(await chat(session, url))

            runner = asyncio.create_task(traffic())
            # The new file is written beside and renamed over: what editors and tools do.
            new = tmp_path / "next.yaml"
            new.write_text(
                RULES.format(a=a.url, b=b.url, target="b").replace("  other:", "  gone:")
            )
            new.replace(path)
            assert await proxy.state.wait_reloads(1) == [True]
            after = await chat(session, url)
            stop.set()
            await runner
            body = await stream.read()
            stream.release()
        assert after == (200, "b")
        assert all(status == 200 for status, _ in results), results
        assert {p for _, p in results} <= {"a", "b"}
        assert body.endswith(b"data: [DONE]\n\n")  # the in-flight stream finished on 'a'


async def test_configmap_symlink_swap_is_noticed(tmp_path: Path) -> None:
    async with running_mock("openai", name="a") as a, running_mock("openai", name="b") as b:
        # The layout kubelet makes: rules.yaml -> ..data/rules.yaml, ..data -> ..<timestamp>
        first = tmp_path / "..2026_01"
        first.mkdir()
        (first / "rules.yaml").write_text(RULES.format(a=a.url, b=b.url, target="a"))
        (tmp_path / "..data").symlink_to(first.name)
        path = tmp_path / "rules.yaml"
        path.symlink_to("..data/rules.yaml")
        async with (
            running_proxy(path, reload_interval=0.02) as proxy,
            aiohttp.ClientSession() as session,
        ):
            assert await chat(session, proxy.api_url) == (200, "a")
            second = tmp_path / "..2026_02"
            second.mkdir()
            (second / "rules.yaml").write_text(RULES.format(a=a.url, b=b.url, target="b"))
            (tmp_path / "..data_tmp").symlink_to(second.name)
            os.replace(tmp_path / "..data_tmp", tmp_path / "..data")
            assert await proxy.state.wait_reloads(1) == [True]
            assert await chat(session, proxy.api_url) == (200, "b")


async def test_bad_rules_never_replace_good_ones(tmp_path: Path) -> None:
    async with running_mock("openai", name="a") as a, running_mock("openai", name="b") as b:
        path = write_rules(tmp_path, RULES.format(a=a.url, b=b.url, target="a"))
        async with (
            running_proxy(path, reload_interval=0.02) as proxy,
            aiohttp.ClientSession() as session,
        ):
            path.write_text("version: 1\nproviders: {a: {type: openai, base_url: nope}}\n")
            assert await proxy.state.wait_reloads(1) == [False]
            path.write_text("{{{ not yaml")
            assert await proxy.state.wait_reloads(2) == [False, False]
            assert await chat(session, proxy.api_url) == (200, "a")
            metrics = await proxy.metrics_text()
            assert 'cb_proxy_rules_reloads_total{result="error"} 2.0' in metrics


def test_check_reports_every_problem_with_its_path(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        """
version: 1
providers:
  openai: {type: openai, base_url: "https://api.openai.com/v1", prvider: x}
models:
  gpt-4o:
    provider: openai
    input_cost_per_1k: -1
    deployments: [{provider: nowhere}]
virtual_models:
  auto: {strategy: fastest}
"""
    )
    assert main(["check", str(bad)]) == 1
    out = capsys.readouterr().out
    assert "providers.openai.prvider: unknown key" in out
    assert "models.gpt-4o.input_cost_per_1k" in out
    assert "virtual_models.auto.strategy" in out
    assert all(line.startswith(str(bad)) for line in out.strip().splitlines())
    good = Path(__file__).resolve().parents[2] / "rules" / "default.yaml"
    assert main(["check", str(good)]) == 0


def test_explain_prints_the_plan(capsys: pytest.CaptureFixture[str]) -> None:
    rules = Path(__file__).resolve().parents[2] / "rules" / "demo.yaml"
    assert main(["explain", "--rules", str(rules), "--model", "gpt-3.5-turbo"]) == 0
    out = capsys.readouterr().out
    assert "gpt-4o-mini@mock-openai" in out
    assert out.index("gpt-4o-mini@mock-openai") < out.index("gpt-4o-mini@mock-openai-backup")


async def test_demo_runs_its_tour_and_exits(tmp_path: Path) -> None:
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "proxy",
        "demo",
        "--exit-after-tour",
        "--port",
        "0",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 55)
    text = out.decode()
    assert proc.returncode == 0, text
    for step in ("1. A plain chat completion", "4. Claude and Gemini", "6. Outage"):
        assert step in text
    assert "breaker mock-openai: closed -> open" in text
    assert "the primary serves again" in text
    assert orjson.dumps(text)  # printable


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CB_TIMEOUT_SECONDS", "abc"),
        ("CB_FAILURE_THRESHOLD", "-1"),
        ("CIRCUIT_BREAKER_ENABLED", "x"),
    ],
)
def test_a_bad_breaker_environment_value_stops_serve_with_its_name(
    name: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    code = main(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cb-proxy: {name}=")
    assert "Traceback" not in err
