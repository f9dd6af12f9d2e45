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
            "--shutdown-delay",
            "0",
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
    # A 503 outage is the model's: its deployment breaker opens, not the provider's.
    assert "deployment breaker gpt-4o-mini@mock-openai: closed -> open" in text
    assert "\nbreaker mock-openai: closed -> open" not in text
    assert "the primary serves again" in text
    assert orjson.dumps(text)  # printable


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CB_TIMEOUT_SECONDS", "abc"),
        ("CB_FAILURE_THRESHOLD", "-1"),
        ("CIRCUIT_BREAKER_ENABLED", "x"),
        ("HTTPS_PROXY", "https://tls-proxy.test"),
        ("SSL_CERT_FILE", "/nonexistent/ca.pem"),
    ],
)
def test_a_bad_environment_value_stops_serve_with_its_name(
    name: str, value: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(name, value)
    code = main(["serve", "--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith((f"cb-proxy: {name}=", f"cb-proxy: {name}:"))
    assert "Traceback" not in err


SHUTDOWN_RULES = """
version: 1
providers:
  slow: {{type: openai, base_url: "{slow}/v1"}}
  claude: {{type: anthropic, base_url: "{claude}", api_key_env: ANTHROPIC_API_KEY}}
  fast: {{type: openai, base_url: "{fast}/v1"}}
  stuck: {{type: openai, base_url: "{stuck}/v1"}}
models:
  long: {{provider: slow}}
  long-claude: {{provider: claude}}
  short: {{provider: fast}}
  waiting: {{provider: stuck}}
"""
GRACE = 2.0
DELAY = 1.0
LONG_STREAMS = 180  # OpenAI-compatible, relayed as bytes
LONG_TRANSLATED = 20  # Anthropic, translated
SHORT_STREAMS = 5


class StderrLines:
    """The proxy's log, read as it comes (so the pipe never fills), with a wait per line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        self._stderr = proc.stderr
        self.lines: list[str] = []
        self._changed = asyncio.Condition()
        self.task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        while line := await self._stderr.readline():
            async with self._changed:
                self.lines.append(line.decode())
                self._changed.notify_all()

    async def wait_for(self, text: str) -> str:
        async with self._changed:
            await self._changed.wait_for(lambda: any(text in line for line in self.lines))
        return next(line for line in self.lines if text in line)


async def _open_stream(
    session: aiohttp.ClientSession, api: str, model: str
) -> tuple[aiohttp.ClientResponse, bytes]:
    resp = await session.post(
        api + "/v1/chat/completions",
        json={"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": True},
    )
    assert resp.status == 200
    return resp, await resp.content.readline()  # the first event: the stream is committed


async def _rest(resp: aiohttp.ClientResponse) -> bytes:
    """The rest of the body; aiohttp raises ClientPayloadError on a cut chunked body."""
    try:
        return await resp.content.read()
    finally:
        resp.release()


def _events(body: bytes) -> list[bytes]:
    return [event for event in body.split(b"\n\n") if event.strip()]


async def test_sigterm_ends_every_open_stream_in_band_and_exits_within_the_grace_period(
    tmp_path: Path,
) -> None:
    async with (
        running_mock("openai", name="slow", tokens_per_second=4, words=200) as slow,
        running_mock("anthropic", name="claude", tokens_per_second=4, words=200) as claude,
        running_mock("openai", name="fast", tokens_per_second=50, words=12) as fast,
        running_mock("openai", name="stuck", latency_ms=60_000) as stuck,
    ):
        path = write_rules(
            tmp_path,
            SHUTDOWN_RULES.format(slow=slow.url, claude=claude.url, fast=fast.url, stuck=stuck.url),
        )
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
            str(GRACE),
            "--shutdown-delay",
            str(DELAY),
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={**os.environ, "HEALTH_CHECK_INTERVAL": "0", "ANTHROPIC_API_KEY": "k"},
        )
        log = StderrLines(proc)
        connector = aiohttp.TCPConnector(limit=0)  # 200+ streams at once, one connection each
        try:
            api, metrics = await asyncio.wait_for(_ready_line(proc), 20)
            async with aiohttp.ClientSession(connector=connector) as session:
                models = ["long"] * LONG_STREAMS + ["long-claude"] * LONG_TRANSLATED
                long = await asyncio.gather(*(_open_stream(session, api, m) for m in models))
                plain = [
                    asyncio.create_task(
                        session.post(
                            api + "/v1/chat/completions", json={**BODY, "model": "waiting"}
                        )
                    )
                    for _ in range(3)
                ]
                await stuck.wait_in_flight(3)
                short = await asyncio.gather(
                    *(_open_stream(session, api, "short") for _ in range(SHORT_STREAMS))
                )

                loop = asyncio.get_running_loop()
                signalled = loop.time()
                proc.send_signal(signal.SIGTERM)
                await log.wait_for("draining:")
                # At once: not ready; and yet new requests are served during the delay.
                async with session.get(metrics + "/readyz") as ready:
                    assert ready.status == 503
                    assert (await ready.json())["status"] == "draining"
                status, provider = await chat_model(session, api, "short")
                assert (status, provider) == (200, "fast")
                assert loop.time() - signalled < DELAY

                short_bodies = await asyncio.gather(*(_rest(resp) for resp, _ in short))
                long_bodies = await asyncio.gather(*(_rest(resp) for resp, _ in long))
                plain_replies = []
                for task in plain:
                    async with await task as resp:
                        plain_replies.append((resp.status, await resp.json()))
            code = await asyncio.wait_for(proc.wait(), GRACE + 5)
            exited = loop.time() - signalled
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()
            await log.task
        assert code == 0
        assert exited < GRACE + 1, exited
        # Short streams finished whole.
        for (_, first), rest in zip(short, short_bodies, strict=True):
            assert (first + rest).endswith(b"data: [DONE]\n\n")
            assert b'"error"' not in rest
        # Every long stream: content, then exactly one in-band error as its last event.
        for (_, first), rest in zip(long, long_bodies, strict=True):
            events = _events(first + rest)
            assert len(events) > 1
            last = orjson.loads(events[-1].removeprefix(b"data: "))
            assert last["error"]["code"] == "proxy_shutting_down"
            assert last["error"]["type"] == "server_error"
            assert sum(b'"error"' in event for event in events) == 1
        # Plain requests still waiting at the end: a 503 in OpenAI's shape.
        for status, body in plain_replies:
            assert status == 503
            assert body["error"]["code"] == "proxy_shutting_down"
        text = "".join(log.lines)
        assert "get a 503 or an in-band error" in text
        assert "Traceback" not in text


async def chat_model(session: aiohttp.ClientSession, url: str, model: str) -> tuple[int, str]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with session.post(url + "/v1/chat/completions", json=body) as resp:
        await resp.read()
        return resp.status, resp.headers.get("x-cb-provider", "")


async def test_a_shutdown_delay_longer_than_the_grace_period_is_cut_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with running_mock() as a:
        path = write_rules(tmp_path, RULES.format(a=a.url, b=a.url, target="a"))
        with caplog.at_level("WARNING", logger="cb_proxy"):
            async with running_proxy(path, grace_period=2.0, shutdown_delay=5.0):
                pass
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("shutdown delay 5.0 s is longer than the grace period 2.0 s" in w for w in warnings)
