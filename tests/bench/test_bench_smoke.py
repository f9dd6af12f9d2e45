"""The `make bench` harness pieces, in-process and fast: no wrk.

The fake upstream and the pass-through run on 127.0.0.1 port 0; the real proxy
(tests.harness) runs with the bench's own rules file in front of the fake, so
a broken fake reply, rules file or sanity check shows up here and not as a
confusing benchmark failure. nginx is the one subprocess, and only when it is
installed (the tests that need it say so when they skip). The stream harness
runs with a handful of streams and a fast event interval; nothing sleeps to
wait for anything.
"""

from __future__ import annotations

import math
import os
import resource
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

import bench.fake_upstream
from bench.fake_upstream import (
    CONTENT_CHUNKS,
    HOLD_MODEL,
    TOKEN_TEXT,
    choose_reply,
    server_url,
    start_fake_upstream,
    wants_hold,
)
from bench.nginx import check_nginx_conf, nginx_path, render_nginx_conf, start_nginx
from bench.passthrough import create_passthrough_app
from bench.procs import raise_fd_limit, rss_kib, stop_service_proc
from bench.routing import CATALOG_SIZE, VIRTUAL_MODEL, build_catalog, time_plan_route
from bench.run import (
    ANTHROPIC_MODEL,
    OPENAI_MODEL,
    Inputs,
    Measurements,
    StreamRuns,
    _chat_body,
    build_report,
    check_reply,
    count_failed_requests,
    format_table,
    render_rules,
    usable_counts,
)
from bench.streams import (
    LoadedLatency,
    StreamMemory,
    close_streams,
    hold_body,
    hold_streams,
    open_streams,
    percentile,
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


FAST_HOLD_INTERVAL = 0.02  # held streams tick fast in tests
HARNESS_LIMIT = 30.0  # seconds: a stuck harness fails the test instead of hanging it
NO_NGINX = "nginx is not installed (`make tools` installs the Debian package nginx)"


@pytest.fixture
async def fake_url() -> AsyncIterator[str]:
    server = await start_fake_upstream("127.0.0.1", 0, hold_interval=FAST_HOLD_INTERVAL)
    try:
        yield server_url(server)
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture(params=[True, False], ids=["limits", "no-limits"])
async def passthrough_url(fake_url: str, request: pytest.FixtureRequest) -> AsyncIterator[str]:
    app = create_passthrough_app(fake_url, connector_limit=request.param)
    runner = web.AppRunner(app, access_log=None)
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


def _measurements(nginx: bool = True) -> Measurements:
    m = Measurements()
    for rnd in range(3):
        m.add("rps_plain", "passthrough", _result(1000 + rnd), 200.0)
        m.add("rps_plain", "proxy", _result(900), 250.0 + rnd)
        m.add("rps_plain", "proxy_info", _result(450), 100.0)
        m.add("rps_stream", "passthrough", _result(1000), 100.0)
        m.add("rps_stream", "proxy", _result(1010), 100.0)
        m.add("rps_stream", "proxy_info", _result(800), 100.0)
        if nginx:
            m.add("rps_plain", "nginx", _result(5000), 20.0)
            m.add("rps_stream", "nginx", _result(4000), 25.0)
        m.add("rps_translate_stream", "proxy", _result(650), 100.0)
        for key in ("latency_plain", "latency_stream"):
            m.add(key, "passthrough", _result(10, p50=300), 100.0)
        m.add("latency_plain", "proxy", _result(10, p50=600), 100.0)
        m.add("latency_stream", "proxy", _result(10, p50=750 + rnd), 100.0)
    return m


def _stream_runs() -> StreamRuns:
    runs = StreamRuns((100, 3000))
    for target, kib in (("passthrough", 20.0), ("proxy", 15.0)):
        for n in runs.counts:
            before = 40_000
            runs.memory.setdefault(target, {})[n] = StreamMemory(
                n, before, before + int(kib * n * (1.2 if n == 3000 else 1.0)), 0.5
            )
    runs.latency["proxy"] = LoadedLatency(200, 80.0, 150.0, 500.0, 2_500.0)
    runs.latency["passthrough"] = LoadedLatency(200, 80.0, 150.0, 400.0, 1_000.0)
    return runs


def test_report_ratios_and_verdicts() -> None:
    inputs = Inputs(
        _measurements(),
        {"plain": 9e4, "stream": 9e3},
        {"proxy": 90.0, "proxy_info": 50.0, "passthrough": 40.0, "nginx": 5.0},
        12.0,
        {"proxy": 0, "proxy_info": 2},
        streams=_stream_runs(),
        sse={"aiohttp_sse_rps": 470.0, "direct_rps": 1000.0, "ratio": 0.47},
    )
    rows, checks, summary = build_report(inputs)
    verdicts = {c.name: c.passed for c in checks}
    assert verdicts["rps ratio, plain"] is False  # 900 / median(1000, 1001, 1002) < 1.0x
    assert verdicts["rps ratio, stream"] is True  # 1010 / 1000
    assert verdicts["translation rps ratio (Anthropic stream)"] is True
    assert verdicts["added p50 latency @1 conn, plain"] is True  # +300 us
    assert verdicts["added p50 latency @1 conn, stream"] is False  # +451 us median
    assert verdicts["proxy RSS after the run"] is False
    assert verdicts["RSS per open stream, 100 streams"] is True  # 15 KiB
    assert verdicts["RSS per open stream, 3000 streams"] is False  # 18 KiB
    assert verdicts["added p99 latency, 3000 streams open"] is False  # +2,350 us
    assert summary["rps_plain"]["ratio"] == pytest.approx(900 / 1001)
    assert summary["rps_plain"]["cpu_ratio"] == pytest.approx(200 / 251)
    assert summary["rps_plain"]["proxy_vs_nginx"] == pytest.approx(900 / 5000)
    assert summary["rps_translate_stream"]["ratio"] == pytest.approx(0.65)
    assert summary["latency_stream"]["added_p50_us"] == pytest.approx(451)
    assert summary["info_logging"]["rps_plain_info_vs_warning"] == pytest.approx(0.5)
    assert summary["memory_per_stream"]["3000"]["proxy"]["per_stream_kib"] == pytest.approx(18.0)
    assert summary["loaded_latency"]["proxy"]["added_p99_us"] == pytest.approx(2_350.0)
    table = "\n".join(format_table(rows))
    assert "5,000" in table  # the nginx column
    assert "(50.0% of warning)" in table
    assert "<= 16 KiB" in table
    assert "<= 2,000 us" in table
    assert ">= 1.00x" in table
    # Every row has its verdict at the end of its line, and only checked rows have one.
    verdict_lines = [line for line in table.splitlines() if line.endswith(("PASS", "FAIL"))]
    assert len(verdict_lines) == len(checks)


def test_report_says_why_nginx_is_missing_and_keeps_the_rest() -> None:
    inputs = Inputs(
        _measurements(nginx=False),
        {"plain": 9e4, "stream": 9e3},
        {"proxy": 50.0, "proxy_info": 50.0, "passthrough": 40.0},
        12.0,
        {"proxy": 0, "proxy_info": 0},
        nginx_note="not installed (make tools)",
        streams=None,
        sse_note="left out (--quick)",
    )
    rows, checks, summary = build_report(inputs)
    rps_rows = [r for r in rows if r.measure.startswith("requests/s @32 conns")]
    assert [r.nginx for r in rps_rows] == ["not installed (make tools)"] * 2
    assert "nginx" not in summary["rps_plain"]
    assert "memory_per_stream" not in summary
    assert any(r.proxy == "left out (--quick)" for r in rows)
    assert {c.name for c in checks} >= {"rps ratio, plain", "rps ratio, stream"}


def test_report_marks_stream_rows_not_measured_after_a_harness_failure() -> None:
    runs = StreamRuns((100, 1000))
    runs.memory["passthrough"] = {100: StreamMemory(100, 1000, 3000, 0.1)}
    runs.memory["proxy"] = {100: StreamMemory(100, 1000, 2000, 0.1)}
    runs.error = "proxy, 1000 streams: StreamsError('boom')"
    inputs = Inputs(
        _measurements(),
        {"plain": 9e4, "stream": 9e3},
        {"proxy": 50.0, "proxy_info": 50.0, "passthrough": 40.0},
        12.0,
        {"proxy": 0, "proxy_info": 0},
        streams=runs,
    )
    rows, checks, _ = build_report(inputs)
    verdicts = {c.name: c.passed for c in checks}
    assert verdicts["RSS per open stream, 100 streams"] is True  # 10 KiB
    assert verdicts["RSS per open stream, 1000 streams"] is False
    assert verdicts["added p99 latency, 1000 streams open"] is False
    assert any("boom" in r.proxy for r in rows)


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


# ------------------------------------------------------------------ nginx row


def test_nginx_conf_keeps_everything_in_its_directory(tmp_path: Path) -> None:
    conf = render_nginx_conf(tmp_path, 18080, "http://127.0.0.1:18999")
    for line in (
        "daemon off;",
        "master_process off;",
        "worker_processes 1;",
        f"pid {tmp_path / 'nginx.pid'};",
        "error_log stderr notice;",
        "listen 127.0.0.1:18080 backlog=1024;",
        "server 127.0.0.1:18999;",
        "proxy_http_version 1.1;",
        'proxy_set_header Connection "";',
        "proxy_buffering off;",
    ):
        assert line in conf
    assert "keepalive 256;" in conf  # upstream keep-alive connections
    temp_paths = [line.split()[1] for line in conf.splitlines() if "_temp_path" in line]
    assert len(temp_paths) == 5
    assert all(path.startswith(str(tmp_path)) for path in temp_paths)
    assert "/var/" not in conf


@pytest.mark.skipif(nginx_path() is None, reason=NO_NGINX)
def test_nginx_accepts_the_rendered_config(tmp_path: Path) -> None:
    exe = nginx_path()
    assert exe is not None
    conf = tmp_path / "nginx.conf"
    conf.write_text(render_nginx_conf(tmp_path, 18080, "http://127.0.0.1:18999"))
    accepted, said = check_nginx_conf(exe, tmp_path, conf)
    assert accepted, said
    assert "test is successful" in said


@pytest.mark.skipif(nginx_path() is None, reason=NO_NGINX)
async def test_nginx_relays_the_fake_plain_and_streaming(tmp_path: Path, fake_url: str) -> None:
    service = start_nginx(tmp_path / "nginx", fake_url, tmp_path)
    try:
        for stream in (False, True, False):  # the second plain request reuses the upstream
            status, body = await _post(service.url, OPENAI_MODEL, stream)
            assert check_reply(status, body, stream) is None
    finally:
        stop_service_proc(service.proc)
    assert service.proc.returncode is not None


# ------------------------------------------------------------------ held streams


def test_hold_requests_are_recognised() -> None:
    body = hold_body()
    assert wants_hold(b"/v1/chat/completions", body)
    assert not wants_hold(b"/v1/messages", body)
    assert not wants_hold(b"/v1/chat/completions", body.replace(b"true", b"false"))
    assert not wants_hold(b"/v1/chat/completions", _chat_body(OPENAI_MODEL, True))


async def test_fake_held_stream_ticks_then_ends_by_itself(
    fake_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(bench.fake_upstream, "HOLD_MAX_SECONDS", 5 * FAST_HOLD_INTERVAL)
    async with aiohttp.ClientSession() as session:
        for _ in range(2):  # the connection serves the next request after a held stream
            async with session.post(fake_url + "/v1/chat/completions", data=hold_body()) as resp:
                body = await resp.read()
            assert resp.status == 200
            assert body.count(b'"content":"tok "') == 5
            assert body.rstrip().endswith(b"data: [DONE]")
            assert b'"usage":{' in body


async def test_open_streams_counts_events_and_closes(fake_url: str) -> None:
    streams = await open_streams(fake_url, 4, concurrency=2)
    try:
        for stream in streams:
            await stream.steady
            assert stream.events >= 2
            assert stream.head_ok is True
    finally:
        close_streams(streams)
    assert all(stream.transport is None for stream in streams)


def _own_rss() -> int:
    return rss_kib(os.getpid())


def _sane(result_memory: StreamMemory, latency: LoadedLatency | None, requests: int) -> None:
    assert result_memory.streams == 5
    assert result_memory.rss_before_kib > 1024
    assert result_memory.rss_with_kib > 1024
    assert math.isfinite(result_memory.per_stream_kib)
    assert abs(result_memory.per_stream_kib) < 10 * 1024  # not MiB per stream
    assert result_memory.open_seconds >= 0
    assert latency is not None
    assert latency.requests == requests
    assert 0 < latency.direct_p50_us <= latency.direct_p99_us
    assert 0 < latency.via_p50_us <= latency.via_p99_us
    assert latency.added_p99_us == pytest.approx(latency.via_p99_us - latency.direct_p99_us)


async def test_hold_streams_through_the_passthrough(passthrough_url: str, fake_url: str) -> None:
    result = await hold_streams(
        passthrough_url,
        _own_rss,
        5,
        probe_direct_url=fake_url,
        probe_requests=20,
        probe_gap=0,
        time_limit=HARNESS_LIMIT,
    )
    _sane(result.memory, result.latency, 20)


async def test_hold_streams_through_the_proxy(tmp_path: Path, fake_url: str) -> None:
    rules = write_rules(tmp_path, render_rules(fake_url))
    async with running_proxy(rules) as proxy:
        result = await hold_streams(
            proxy.api_url,
            _own_rss,
            5,
            probe_direct_url=fake_url,
            probe_requests=20,
            probe_gap=0,
            time_limit=HARNESS_LIMIT,
        )
    _sane(result.memory, result.latency, 20)


def test_bench_rules_route_the_hold_model(tmp_path: Path) -> None:
    assert f"upstream_model: {HOLD_MODEL}" in render_rules("http://127.0.0.1:1")


def test_percentile_is_nearest_rank() -> None:
    values = list(range(1, 201))
    assert percentile(values, 50) == 100
    assert percentile(values, 99) == 198
    assert percentile(values, 100) == 200
    assert percentile([7.0], 99) == 7.0


def test_stream_counts_fit_the_fd_limit() -> None:
    assert usable_counts((100, 1000, 3000), 20_000) == (100, 1000, 3000)
    assert usable_counts((100, 1000, 3000), 4_096) == (100, 1000)
    assert usable_counts((100,), 256) == ()


def test_raise_fd_limit_reaches_the_hard_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = raise_fd_limit()
    assert limit.now >= soft
    assert limit.now == resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if hard != resource.RLIM_INFINITY:
        assert limit.now == hard
    assert str(limit.now) in limit.describe()
