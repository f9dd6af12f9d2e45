"""The `make bench` harness pieces, in-process and fast: no wrk, no subprocesses.

The fake upstream and the pass-through run on 127.0.0.1 port 0; the real proxy
(tests.harness) runs with the bench's own rules file in front of the fake, so
a broken fake reply, rules file or sanity check shows up here and not as a
confusing benchmark failure.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from bench.fake_upstream import (
    CONTENT_CHUNKS,
    TOKEN_TEXT,
    choose_reply,
    server_url,
    start_fake_upstream,
)
from bench.passthrough import create_passthrough_app
from bench.routing import CATALOG_SIZE, VIRTUAL_MODEL, build_catalog, time_plan_route
from bench.run import (
    ANTHROPIC_MODEL,
    OPENAI_MODEL,
    Measurements,
    _chat_body,
    build_report,
    check_reply,
    count_failed_requests,
    render_rules,
)
from bench.wrk import WrkError, WrkResult, check_usable, parse_wrk_output
from proxy.core.candidates import StaticView
from proxy.core.prefs import RequestPrefs
from proxy.core.router import plan_route
from tests.harness import running_proxy, write_rules

# Captured from `wrk -t1 -c32 -d2s -s bench/chat.lua` against the fake upstream.
WRK_SAMPLE = """\
Running 2s test @ http://127.0.0.1:41187
  1 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     2.34ms    2.42ms  19.95ms   86.61%
    Req/Sec    16.50k     8.17k   38.73k    75.00%
  33115 requests in 2.02s, 12.16MB read
Requests/sec:  16368.99
Transfer/sec:      6.01MB
BENCH_JSON {"requests":33115,"duration_us":2023033,"bytes":12749275,"p50_us":1058,\
"p90_us":5769,"p99_us":10336,"mean_us":2344.6,"max_us":19951,"errors_connect":0,\
"errors_read":0,"errors_write":0,"errors_status":0,"errors_timeout":0}
"""


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    server = await start_fake_upstream("127.0.0.1", 0)
    try:
        yield server_url(server)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def passthrough_url(fake_url: str) -> AsyncIterator[str]:
    runner = web.AppRunner(create_passthrough_app(fake_url), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


async def _post(base: str, model: str, stream: bool) -> tuple[int, bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.post(
            base + "/v1/chat/completions",
            data=_chat_body(model, stream),
            headers={"Content-Type": "application/json"},
        ) as resp,
    ):
        return resp.status, await resp.read()


@pytest.mark.parametrize("stream", [False, True])
async def test_passthrough_relays_the_fake_reply(passthrough_url: str, stream: bool) -> None:
    status, body = await _post(passthrough_url, OPENAI_MODEL, stream)
    assert check_reply(status, body, stream) is None


async def test_fake_stream_is_chunked_events_and_keeps_the_connection(fake_url: str) -> None:
    created: list[object] = []

    async def on_create(
        session: aiohttp.ClientSession, ctx: object, params: aiohttp.TraceConnectionCreateEndParams
    ) -> None:
        created.append(params)

    trace = aiohttp.TraceConfig()
    trace.on_connection_create_end.append(on_create)
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector, trace_configs=[trace]) as session:
        for stream in (True, False, True):
            async with session.post(
                fake_url + "/v1/chat/completions", data=_chat_body(OPENAI_MODEL, stream)
            ) as resp:
                body = await resp.read()
                assert check_reply(resp.status, body, stream) is None
                if stream:
                    assert resp.headers["Transfer-Encoding"] == "chunked"
                    assert body.count(b"\n\n") == CONTENT_CHUNKS + 4  # role, finish, usage, DONE
    # One kept-alive connection carried all three requests.
    assert len(created) == 1


async def test_fake_rejects_a_chunked_request_body(fake_url: str) -> None:
    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"model":"x"}'

    async with (
        aiohttp.ClientSession() as session,
        session.post(fake_url + "/v1/chat/completions", data=chunks()) as resp,
    ):
        assert resp.status == 400


def test_fake_chooses_reply_by_path_and_flags() -> None:
    plain = choose_reply(b"POST", b"/v1/chat/completions", b'{"stream": false}')
    assert isinstance(plain, bytes)
    no_usage = choose_reply(b"POST", b"/v1/chat/completions", b'{"stream":true}')
    usage = choose_reply(
        b"POST",
        b"/v1/chat/completions",
        b'{"stream": true,"stream_options":{"include_usage":true}}',
    )
    assert isinstance(no_usage, tuple)
    assert isinstance(usage, tuple)
    assert len(usage) == len(no_usage) + 1
    anthropic = choose_reply(b"POST", b"/v1/messages", b'{"stream":true}')
    assert isinstance(anthropic, tuple)
    assert b"message_stop" in anthropic[-1]
    missing = choose_reply(b"POST", b"/nowhere", b"{}")
    assert isinstance(missing, bytes)
    assert missing.startswith(b"HTTP/1.1 404")


@pytest.mark.parametrize(("model", "stream"), [(OPENAI_MODEL, True), (ANTHROPIC_MODEL, True)])
async def test_proxy_with_bench_rules_serves_both_fake_formats(
    tmp_path: Path, fake_url: str, model: str, stream: bool
) -> None:
    rules = write_rules(tmp_path, render_rules(fake_url))
    async with running_proxy(rules) as proxy:
        for want_stream in (False, stream):
            status, body = await _post(proxy.api_url, model, want_stream)
            assert check_reply(status, body, want_stream) is None


def test_check_reply_catches_wrong_answers() -> None:
    good = orjson.dumps({"choices": [{"message": {"content": TOKEN_TEXT * CONTENT_CHUNKS}}]})
    assert check_reply(200, good, False) is None
    assert check_reply(503, good, False) is not None
    assert check_reply(200, b"{}", False) is not None
    short = orjson.dumps({"choices": [{"message": {"content": TOKEN_TEXT}}]})
    assert check_reply(200, short, False) is not None
    token = b'data: {"choices":[{"delta":{"content":"tok "}}]}\n\n'
    usage = b'data: {"choices":[],"usage":{"prompt_tokens":1}}\n\n'
    done = b"data: [DONE]\n\n"
    assert check_reply(200, token * CONTENT_CHUNKS + usage + done, True) is None
    assert check_reply(200, token * CONTENT_CHUNKS + usage, True) is not None
    assert check_reply(200, token * (CONTENT_CHUNKS - 1) + usage + done, True) is not None
    assert check_reply(200, token * CONTENT_CHUNKS + done, True) is not None


def test_parse_wrk_output_reads_the_lua_report() -> None:
    result = parse_wrk_output(WRK_SAMPLE)
    assert result.requests == 33115
    assert result.p50_us == 1058
    assert result.p99_us == 10336
    assert result.rps == pytest.approx(16369, rel=1e-3)
    assert result.socket_errors == 0
    check_usable(result, "sample")


def test_parse_wrk_output_refuses_missing_or_broken_reports() -> None:
    with pytest.raises(WrkError, match="no BENCH_JSON"):
        parse_wrk_output(WRK_SAMPLE.split("BENCH_JSON")[0])
    with pytest.raises(WrkError, match="malformed"):
        parse_wrk_output('BENCH_JSON {"requests": 1}\n')


def _result(requests: int, p50: int = 500, status_errors: int = 0, socket: int = 0) -> WrkResult:
    return WrkResult(
        requests=requests,
        duration_us=1_000_000,
        p50_us=p50,
        p90_us=p50 * 2,
        p99_us=p50 * 3,
        mean_us=float(p50),
        max_us=p50 * 4,
        socket_errors=socket,
        status_errors=status_errors,
    )


def test_check_usable_rejects_error_runs() -> None:
    with pytest.raises(WrkError, match="non-2xx"):
        check_usable(_result(100, status_errors=1), "x")
    with pytest.raises(WrkError, match="socket errors"):
        check_usable(_result(100, socket=5), "x")
    with pytest.raises(WrkError, match="no request"):
        check_usable(_result(0), "x")
    check_usable(_result(1000, socket=5), "x")  # a few cut at the end of the run are fine


def test_report_ratios_and_verdicts() -> None:
    m = Measurements()
    for rnd in range(3):
        m.add("rps_plain", "passthrough", _result(1000 + rnd), 200.0)
        m.add("rps_plain", "proxy", _result(900), 250.0 + rnd)
        m.add("rps_plain", "proxy_info", _result(450), 100.0)
        m.add("rps_stream", "passthrough", _result(1000), 100.0)
        m.add("rps_stream", "proxy", _result(800), 100.0)
        m.add("rps_stream", "proxy_info", _result(800), 100.0)
        m.add("rps_translate_stream", "proxy", _result(650), 100.0)
        for key in ("latency_plain", "latency_stream"):
            m.add(key, "passthrough", _result(10, p50=300), 100.0)
        m.add("latency_plain", "proxy", _result(10, p50=600), 100.0)
        m.add("latency_stream", "proxy", _result(10, p50=750 + rnd), 100.0)
    lines, checks, summary = build_report(
        m,
        {"plain": 9e4, "stream": 9e3},
        {"proxy": 90.0, "proxy_info": 50.0, "passthrough": 40.0},
        12.0,
        {"proxy": 0, "proxy_info": 2},
    )
    verdicts = {c.name: c.passed for c in checks}
    assert verdicts["rps ratio, plain"] is True  # 900 / median(1000, 1001, 1002)
    assert verdicts["rps ratio, stream"] is False
    assert verdicts["translation rps ratio (Anthropic stream)"] is True
    assert verdicts["added p50 latency @1 conn, plain"] is True  # +300 us
    assert verdicts["added p50 latency @1 conn, stream"] is False  # +451 us median
    assert verdicts["proxy RSS after the run"] is False
    assert summary["rps_plain"]["ratio"] == pytest.approx(900 / 1001)
    assert summary["rps_plain"]["cpu_ratio"] == pytest.approx(200 / 251)
    assert summary["rps_translate_stream"]["ratio"] == pytest.approx(0.65)
    assert summary["latency_stream"]["added_p50_us"] == pytest.approx(451)
    assert summary["info_logging"]["rps_plain_info_vs_warning"] == pytest.approx(0.5)
    assert any("50.0% of warning" in line for line in lines)


def test_count_failed_requests_reads_warning_lines(tmp_path: Path) -> None:
    log = tmp_path / "proxy.log"
    log.write_text(
        "cb-proxy ready api=http://127.0.0.1:1 metrics=http://127.0.0.1:2\n"
        "2026-01-01 00:00:00,000 WARNING cb_proxy request req_1 failed: upstream x failed\n"
        "2026-01-01 00:00:00,001 INFO cb_proxy.forward request req_2: the client went away\n"
        "2026-01-01 00:00:00,002 WARNING cb_proxy request req_3 failed: breaker open\n"
    )
    assert count_failed_requests(log) == 2


def test_routing_catalog_has_fifty_models_behind_auto() -> None:
    rules = build_catalog()
    assert len(rules.models) == CATALOG_SIZE
    plan = plan_route(rules, VIRTUAL_MODEL, {}, RequestPrefs(), StaticView())
    deployments = sum(len(m.deployments) for m in rules.models.values())
    assert len(plan.candidates) == deployments
    timing = time_plan_route(rules, VIRTUAL_MODEL, calls=400)
    assert timing.calls == 400
    assert timing.median_us > 0


async def test_fake_answers_health_checks(fake_url: str) -> None:
    async with aiohttp.ClientSession() as session, session.get(fake_url + "/v1/models") as resp:
        assert resp.status == 200
        assert (await resp.json()) == {"object": "list", "data": []}
