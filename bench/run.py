"""`make bench`: the proxy against a bare aiohttp pass-through and nginx, in one run.

All three sit in front of the same fake upstream (``bench.fake_upstream``) and
get the same wrk load (``bench/chat.lua``): requests per second at 32
connections (plain and streaming; nginx is the compiled-limit row), p50/p99
latency at 1 connection, the translation row (client streams OpenAI, the
proxy talks to an Anthropic-format fake), the proxy's RSS after the run; then
memory per open stream and the latency a small request gets while thousands
of streams are open (``bench.streams``), the router micro-benchmark and the
SSE-writer comparison (``bench.sse_writer``). One summary table at the end
puts every figure beside its target.

Fairness and noise (the box has 2 cores shared with other work):
- the fake upstream, wrk and the stream/probe clients are pinned to one CPU,
  the system under test (proxy, pass-through or nginx) to the other, when
  ``taskset`` and 2+ CPUs exist (``--no-pin`` turns it off); the Python sides
  run on uvloop; nginx runs one worker without a master process;
- every wrk scenario runs once per round, its targets back to back, in
  alternating order from round to round; the table shows medians over rounds;
- next to requests/s, the CPU time the target process spent per request
  (/proc/PID/stat over the run) is shown: it barely moves when other work
  takes CPU away from the target, so its ratio is the steadier reading;
- the proxy runs at LOG_LEVEL=warning; a second proxy at info (the default)
  gets the 32-connection rows too, so the cost of info logging is visible;
- memory per stream is measured on a fresh proxy / pass-through process per
  stream count (alternating which goes first), so memory freed by an earlier
  count cannot hide the next one's.

Exit status: 0 when everything ran (targets missed or not: the table says; nginx
missing or not starting is reported in its column), 1 when something failed
to run (a process did not start, a sanity request got the wrong answer, wrk
failed or saw non-2xx responses, the stream harness failed).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import http.client
import os
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

import orjson

from bench import sse_writer
from bench.fake_upstream import CONTENT_CHUNKS, TOKEN_TEXT
from bench.fake_upstream import READY_PREFIX as FAKE_READY
from bench.nginx import nginx_path, start_nginx
from bench.passthrough import READY_PREFIX as PASS_READY
from bench.procs import (
    BENCH_DIR,
    BenchError,
    FdLimit,
    Service,
    cpu_seconds,
    raise_fd_limit,
    rss_kib,
    rss_mb,
    start_service,
    stop_service_proc,
    tail,
)
from bench.routing import CATALOG_SIZE, VIRTUAL_MODEL, build_catalog, time_plan_route
from bench.streams import HoldResult, LoadedLatency, StreamMemory, StreamsError, hold_streams
from bench.wrk import WrkError, WrkResult, run_wrk, wrk_path

RESULTS_PATH = BENCH_DIR / "results" / "latest.json"
WORK_DIR = BENCH_DIR / "results" / "work"
FAILED_MARK = " failed: "  # in the proxy's warning line for every request that got an error
RULES_TEMPLATE = BENCH_DIR / "rules-bench.yaml"
TEMPLATE_PORT = "127.0.0.1:18999"
PROXY_READY = "cb-proxy ready api="
OPENAI_MODEL = "bench-model"
ANTHROPIC_MODEL = "bench-claude"
SANITY_TIMEOUT = 10.0
MANY_CONNECTIONS = 32
ONE_CONNECTION = 1
DEFAULT_SECONDS = 3.0
DEFAULT_ROUNDS = 3
WARMUP_SECONDS = 1.0
ROUTING_CALLS = 20_000
STREAM_COUNTS = (100, 1_000, 3_000)
QUICK_STREAM_COUNTS = (50, 300)
FDS_PER_STREAM = 2  # a relay holds the client's socket and its upstream socket
FD_SLACK = 200
POOL_CAP_ENV = "CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST"
POOL_CAP_SLACK = 64
SETTLE_SECONDS = 0.3  # after the warm-up streams close, before RSS is read
T = TypeVar("T")

# Targets (the performance issue's goals; the translation, latency, RSS and
# routing rows keep the foundation issue's).
MIN_RPS_RATIO = 1.0
MIN_TRANSLATION_RATIO = 0.60
MAX_ADDED_P50_US = 400.0
MAX_RSS_MB = 80.0
MAX_ROUTING_US = 50.0
MAX_KIB_PER_STREAM = 16.0
MAX_LOADED_ADDED_P99_US = 2_000.0


def _word_url(line: str) -> str:
    """``<prefix> http://host:port`` -> the URL."""
    return line.split()[-1]


def _proxy_url(line: str) -> str:
    """``cb-proxy ready api=http://... metrics=http://...`` -> the API URL."""
    return line.split("api=", 1)[1].split()[0]


def count_failed_requests(log_path: Path) -> int:
    """Requests the proxy answered with an error, from its warning log lines."""
    with log_path.open(errors="replace") as log:
        return sum(1 for line in log if "WARNING" in line and FAILED_MARK in line)


# ------------------------------------------------------------------ sanity


def _chat_body(model: str, stream: bool) -> bytes:
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": "user", "content": "Say hello to the benchmark."}],
        "max_tokens": 32,
    }
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return orjson.dumps(body)


def post_chat(url: str, model: str, stream: bool) -> tuple[int, bytes]:
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(
        parts.hostname or "127.0.0.1", parts.port, timeout=SANITY_TIMEOUT
    )
    try:
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=_chat_body(model, stream),
            headers={"Content-Type": "application/json"},
        )
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_reply(status: int, body: bytes, stream: bool) -> str | None:
    """None when the reply carries the fake's full answer; else what is wrong."""
    if status != 200:
        return f"HTTP {status}: {body[:300]!r}"
    if not stream:
        try:
            content = orjson.loads(body)["choices"][0]["message"]["content"]
        except (orjson.JSONDecodeError, KeyError, IndexError, TypeError):
            return f"not a chat.completion: {body[:300]!r}"
        return None if content == TOKEN_TEXT * CONTENT_CHUNKS else f"content {content!r}"
    text = body.decode("utf-8", "replace")
    tokens = text.count(orjson.dumps({"content": TOKEN_TEXT}).decode())
    if tokens != CONTENT_CHUNKS:
        return f"{tokens} content chunks, expected {CONTENT_CHUNKS}: {text[:300]!r}"
    if not text.rstrip().endswith("data: [DONE]"):
        return f"stream does not end with [DONE]: {text[-200:]!r}"
    if '"usage":{' not in text:
        return "no usage chunk although include_usage was asked"
    return None


def _diagnose(url: str, model: str, stream: bool) -> str:
    """What one request answers now, to explain a failed load run."""
    try:
        status, body = post_chat(url, model, stream)
    except OSError as exc:
        return f"a single request now fails: {exc}"
    return f"a single request now gets HTTP {status}: {body[:400]!r}"


def sanity(name: str, url: str, model: str, streams: Sequence[bool]) -> None:
    for stream in streams:
        status, body = post_chat(url, model, stream)
        problem = check_reply(status, body, stream)
        if problem is not None:
            kind = "stream" if stream else "plain"
            raise BenchError(f"{name} ({model}, {kind}) answered wrongly: {problem}")


# ------------------------------------------------------------------ scenarios


@dataclass(frozen=True, slots=True)
class Scenario:
    key: str
    connections: int
    stream: bool
    # (target name, model) pairs measured back to back each round
    runs: tuple[tuple[str, str], ...]


def scenarios(with_nginx: bool = False) -> list[Scenario]:
    pair = (("passthrough", OPENAI_MODEL), ("proxy", OPENAI_MODEL))
    more: tuple[tuple[str, str], ...] = (("proxy_info", OPENAI_MODEL),)
    if with_nginx:
        more += (("nginx", OPENAI_MODEL),)
    return [
        Scenario("rps_plain", MANY_CONNECTIONS, False, (*pair, *more)),
        Scenario("rps_stream", MANY_CONNECTIONS, True, (*pair, *more)),
        Scenario("rps_translate_stream", MANY_CONNECTIONS, True, (("proxy", ANTHROPIC_MODEL),)),
        Scenario("latency_plain", ONE_CONNECTION, False, pair),
        Scenario("latency_stream", ONE_CONNECTION, True, pair),
    ]


@dataclass
class Measurements:
    runs: dict[str, dict[str, list[WrkResult]]] = field(default_factory=dict)
    # CPU time the target process used per request in each run (us): unlike requests/s,
    # it barely moves when other work on the machine takes CPU away from the target.
    cpu: dict[str, dict[str, list[float]]] = field(default_factory=dict)

    def add(self, scenario: str, target: str, result: WrkResult, cpu_us: float) -> None:
        self.runs.setdefault(scenario, {}).setdefault(target, []).append(result)
        self.cpu.setdefault(scenario, {}).setdefault(target, []).append(cpu_us)

    def median_cpu(self, scenario: str, target: str) -> float:
        return statistics.median(self.cpu[scenario][target])

    def median(self, scenario: str, target: str, metric: Callable[[WrkResult], float]) -> float:
        return statistics.median(metric(r) for r in self.runs[scenario][target])


def _rps(r: WrkResult) -> float:
    return r.rps


def _p50(r: WrkResult) -> float:
    return float(r.p50_us)


def _p99(r: WrkResult) -> float:
    return float(r.p99_us)


# ------------------------------------------------------------------ streams


@dataclass
class StreamRuns:
    """Memory per open stream (per target and count) and latency under the largest count."""

    counts: tuple[int, ...]
    memory: dict[str, dict[int, StreamMemory]] = field(default_factory=dict)
    latency: dict[str, LoadedLatency] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def loaded_streams(self) -> int:
        return max(self.counts) if self.counts else 0


def usable_counts(counts: Sequence[int], fd_limit: int) -> tuple[int, ...]:
    """The stream counts a target's open-file limit allows (two sockets per stream)."""
    return tuple(n for n in counts if FDS_PER_STREAM * n + FD_SLACK <= fd_limit)


def run_async(coro: Coroutine[Any, Any, T], cpus: Sequence[int] = ()) -> T:
    """Run ``coro`` on a fresh loop (uvloop when there), this process pinned to ``cpus``."""
    saved = os.sched_getaffinity(0)
    if cpus:
        os.sched_setaffinity(0, cpus)
    try:
        try:
            import uvloop
        except ImportError:  # pragma: no cover - platforms without uvloop
            return asyncio.run(coro)
        return uvloop.run(coro)
    finally:
        if cpus:
            os.sched_setaffinity(0, saved)


def measure_streams(
    start: Callable[[str, int], Service],
    fake_url: str,
    counts: Sequence[int],
    fd: FdLimit,
    load_cpus: Sequence[int],
) -> StreamRuns:
    """Hold N streams open through a fresh pass-through and a fresh proxy, for each N.

    ``start(target, n)`` starts the target process for one count. The largest
    count also gets the loaded-latency probe. Failures are recorded, not raised,
    so the rest of the report still prints.
    """
    usable = usable_counts(counts, fd.now)
    runs = StreamRuns(usable)
    for n in counts:
        if n not in usable:
            runs.notes.append(
                f"{n} streams skipped: the open-file limit {fd.now} is below "
                f"{FDS_PER_STREAM * n + FD_SLACK}"
            )
    for i, n in enumerate(usable):
        order = ("passthrough", "proxy") if i % 2 == 0 else ("proxy", "passthrough")
        for target in order:
            svc = start(target, n)
            try:
                sanity(svc.name, svc.url, OPENAI_MODEL, (False, True))
                result: HoldResult = run_async(
                    hold_streams(
                        svc.url,
                        lambda pid=svc.pid: rss_kib(pid),  # type: ignore[misc]
                        n,
                        probe_direct_url=fake_url if n == runs.loaded_streams else None,
                        settle=SETTLE_SECONDS,
                    ),
                    load_cpus,
                )
            except (StreamsError, BenchError, OSError, TimeoutError) as exc:
                runs.error = f"{target}, {n} streams: {exc!r}; log {svc.log_path}"
                return runs
            finally:
                stop_service_proc(svc.proc)
            runs.memory.setdefault(target, {})[n] = result.memory
            if result.latency is not None:
                runs.latency[target] = result.latency
        print(f"  {n} streams held through both targets", flush=True)
    return runs


# ------------------------------------------------------------------ report


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    target: str
    passed: bool


@dataclass(frozen=True, slots=True)
class Row:
    measure: str
    passthrough: str = ""
    nginx: str = ""
    proxy: str = ""
    compare: str = ""  # the proxy against the pass-through: ratio or difference
    target: str = ""
    verdict: str = ""  # PASS, FAIL, or empty for rows shown for information


COLUMNS = ("measure", "pass-through", "nginx", "cb-proxy", "proxy vs pass", "target", "")


def _fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def _us(v: float) -> str:
    return f"{v:,.0f}"


def _verdict(passed: bool) -> str:
    return "PASS" if passed else "FAIL"


@dataclass
class Inputs:
    """Everything the report is built from (kept together so tests can fake it)."""

    m: Measurements
    ceiling: dict[str, float]
    rss: dict[str, float]
    routing_us: float
    failed: dict[str, int]
    nginx_note: str | None = None  # why there is no nginx figure, when there is none
    streams: StreamRuns | None = None
    sse: dict[str, float] | None = None
    sse_note: str | None = None


def build_report(inp: Inputs) -> tuple[list[Row], list[Check], dict[str, Any]]:
    m = inp.m
    rows: list[Row] = []
    checks: list[Check] = []
    summary: dict[str, Any] = {}

    def check(name: str, value: str, target: str, passed: bool) -> str:
        checks.append(Check(name, value, target, passed))
        return _verdict(passed)

    def rps(scenario: str, target: str) -> float:
        return m.median(scenario, target, _rps)

    has_nginx = inp.nginx_note is None and "nginx" in m.runs.get("rps_plain", {})
    nginx_missing = inp.nginx_note or "not run"

    for label, key in (("plain", "rps_plain"), ("stream", "rps_stream")):
        base, prox = rps(key, "passthrough"), rps(key, "proxy")
        base_cpu, prox_cpu = m.median_cpu(key, "passthrough"), m.median_cpu(key, "proxy")
        ratio = prox / base
        entry: dict[str, Any] = {
            "passthrough": base,
            "proxy": prox,
            "ratio": ratio,
            "passthrough_cpu_us_per_request": base_cpu,
            "proxy_cpu_us_per_request": prox_cpu,
            "cpu_ratio": base_cpu / prox_cpu,
        }
        ngx = ngx_cpu = ""
        if has_nginx:
            n_rps, n_cpu = rps(key, "nginx"), m.median_cpu(key, "nginx")
            ngx, ngx_cpu = _fmt_rps(n_rps), _us(n_cpu)
            entry |= {
                "nginx": n_rps,
                "nginx_cpu_us_per_request": n_cpu,
                "proxy_vs_nginx": prox / n_rps,
            }
        summary[key] = entry
        rows.append(
            Row(
                f"requests/s @{MANY_CONNECTIONS} conns, {label}",
                _fmt_rps(base),
                ngx or nginx_missing,
                _fmt_rps(prox),
                f"{ratio:.2f}x",
                f">= {MIN_RPS_RATIO:.2f}x",
                check(
                    f"rps ratio, {label}",
                    f"{ratio:.2f}x",
                    f">= {MIN_RPS_RATIO:.2f}x",
                    ratio >= MIN_RPS_RATIO,
                ),
            )
        )
        rows.append(
            Row(
                f"  CPU us/request, {label} (pass/proxy)",
                _us(base_cpu),
                ngx_cpu,
                _us(prox_cpu),
                f"{base_cpu / prox_cpu:.2f}x",
            )
        )

    base, prox = rps("rps_stream", "passthrough"), rps("rps_translate_stream", "proxy")
    ratio = prox / base
    base_cpu = m.median_cpu("rps_stream", "passthrough")
    prox_cpu = m.median_cpu("rps_translate_stream", "proxy")
    summary["rps_translate_stream"] = {
        "passthrough": base,
        "proxy": prox,
        "ratio": ratio,
        "passthrough_cpu_us_per_request": base_cpu,
        "proxy_cpu_us_per_request": prox_cpu,
        "cpu_ratio": base_cpu / prox_cpu,
    }
    rows.append(
        Row(
            f"requests/s @{MANY_CONNECTIONS}, stream via Anthropic",
            _fmt_rps(base),
            "",
            _fmt_rps(prox),
            f"{ratio:.2f}x",
            f">= {MIN_TRANSLATION_RATIO:.2f}x",
            check(
                "translation rps ratio (Anthropic stream)",
                f"{ratio:.2f}x",
                f">= {MIN_TRANSLATION_RATIO:.2f}x",
                ratio >= MIN_TRANSLATION_RATIO,
            ),
        )
    )

    for key, label in (("latency_plain", "plain"), ("latency_stream", "stream")):
        lat: dict[str, float] = {}
        for pct, metric in (("p50", _p50), ("p99", _p99)):
            b, p = m.median(key, "passthrough", metric), m.median(key, "proxy", metric)
            lat[f"passthrough_{pct}_us"], lat[f"proxy_{pct}_us"] = b, p
            target = verdict = ""
            if pct == "p50":
                target = f"<= +{MAX_ADDED_P50_US:.0f} us"
                verdict = check(
                    f"added p50 latency @1 conn, {label}",
                    f"{p - b:+.0f} us",
                    target,
                    p - b < MAX_ADDED_P50_US,
                )
            rows.append(
                Row(
                    f"latency {pct} @1 conn, {label} (us)",
                    _us(b),
                    "",
                    _us(p),
                    f"{p - b:+,.0f} us",
                    target,
                    verdict,
                )
            )
        lat["added_p50_us"] = lat["proxy_p50_us"] - lat["passthrough_p50_us"]
        summary[key] = lat

    info: dict[str, float] = {}
    for key, label in (("rps_plain", "plain"), ("rps_stream", "stream")):
        warn, inf = rps(key, "proxy"), rps(key, "proxy_info")
        warn_cpu, info_cpu = m.median_cpu(key, "proxy"), m.median_cpu(key, "proxy_info")
        rows.append(
            Row(
                f"requests/s @{MANY_CONNECTIONS}, {label}, proxy at LOG_LEVEL=info",
                _fmt_rps(rps(key, "passthrough")),
                "",
                _fmt_rps(inf),
                f"{inf / rps(key, 'passthrough'):.2f}x",
                f"({inf / warn:.1%} of warning)",
            )
        )
        info[f"{key}_info"] = inf
        info[f"{key}_info_vs_warning"] = inf / warn
        info[f"{key}_info_cpu_us_per_request"] = info_cpu
        info[f"{key}_warning_cpu_us_per_request"] = warn_cpu
    summary["info_logging"] = info
    summary["ceiling"] = inp.ceiling

    rss = inp.rss
    rows.append(
        Row(
            "RSS after the wrk runs (MiB)",
            f"{rss['passthrough']:.1f}",
            f"{rss['nginx']:.1f}" if "nginx" in rss else "",
            f"{rss['proxy']:.1f}",
            "",
            f"< {MAX_RSS_MB:.0f} MB",
            check(
                "proxy RSS after the run",
                f"{rss['proxy']:.1f} MiB",
                f"< {MAX_RSS_MB:.0f} MB",
                rss["proxy"] < MAX_RSS_MB,
            ),
        )
    )
    summary["rss_mb"] = rss

    rows += _stream_rows(inp.streams, check, summary)

    rows.append(
        Row(
            f"routing: plan_route({VIRTUAL_MODEL!r}), {CATALOG_SIZE} models (us)",
            "",
            "",
            f"{inp.routing_us:.1f}",
            "",
            f"< {MAX_ROUTING_US:.0f} us",
            check(
                f"routing: plan_route({VIRTUAL_MODEL!r}), {CATALOG_SIZE} models, median",
                f"{inp.routing_us:.1f} us",
                f"< {MAX_ROUTING_US:.0f} us",
                inp.routing_us < MAX_ROUTING_US,
            ),
        )
    )
    summary["routing_median_us"] = inp.routing_us
    if inp.sse is not None:
        rows.append(
            Row(
                "SSE writer: aiohttp-sse / direct writes, req/s",
                "",
                "",
                f"{_fmt_rps(inp.sse['aiohttp_sse_rps'])} / {_fmt_rps(inp.sse['direct_rps'])}",
                f"{inp.sse['ratio']:.2f}x",
                "(why direct)",
            )
        )
        summary["sse_writer"] = inp.sse
    elif inp.sse_note:
        rows.append(Row("SSE writer: aiohttp-sse / direct writes", proxy=inp.sse_note))
    rows.append(
        Row(
            "requests answered with an error (proxy log)",
            "",
            "",
            f"{inp.failed['proxy']} (info: {inp.failed['proxy_info']})",
            "",
            "(0 expected)",
        )
    )
    summary["proxy_failed_requests"] = inp.failed
    return rows, checks, summary


def _stream_rows(
    runs: StreamRuns | None,
    check: Callable[[str, str, str, bool], str],
    summary: dict[str, Any],
) -> list[Row]:
    if runs is None:
        return []
    rows: list[Row] = []
    target = f"<= {MAX_KIB_PER_STREAM:.0f} KiB"
    per: dict[str, dict[str, Any]] = {}
    for n in runs.counts:
        mem = {t: runs.memory.get(t, {}).get(n) for t in ("passthrough", "proxy")}
        pas, prox = mem["passthrough"], mem["proxy"]
        label = f"RSS per open stream, {n:,} streams (KiB)"
        if prox is None or pas is None:
            rows.append(Row(label, proxy="not measured", target=target, verdict="FAIL"))
            checks_value = "not measured"
            check(f"RSS per open stream, {n} streams", checks_value, target, False)
            continue
        rows.append(
            Row(
                label,
                f"{pas.per_stream_kib:.1f}",
                "",
                f"{prox.per_stream_kib:.1f}",
                f"{prox.per_stream_kib - pas.per_stream_kib:+.1f} KiB",
                target,
                check(
                    f"RSS per open stream, {n} streams",
                    f"{prox.per_stream_kib:.1f} KiB",
                    target,
                    prox.per_stream_kib <= MAX_KIB_PER_STREAM,
                ),
            )
        )
        per[str(n)] = {
            t: asdict(r) | {"per_stream_kib": r.per_stream_kib} for t, r in mem.items() if r
        }
    summary["memory_per_stream"] = per
    n = runs.loaded_streams
    lat = {t: runs.latency.get(t) for t in ("passthrough", "proxy")}
    loaded: dict[str, Any] = {}
    for pct in ("p50", "p99"):
        label = f"added latency {pct} @{n:,} open streams (us)"
        pas_l, prox_l = lat["passthrough"], lat["proxy"]
        is_p99 = pct == "p99"
        tgt = f"<= {MAX_LOADED_ADDED_P99_US:,.0f} us" if is_p99 else ""
        if prox_l is None:
            if is_p99:
                check(f"added p99 latency, {n} streams open", "not measured", tgt, False)
            rows.append(
                Row(label, proxy="not measured", target=tgt, verdict="FAIL" if is_p99 else "")
            )
            continue
        value = prox_l.added_p99_us if is_p99 else prox_l.added_p50_us
        pas_value = (
            "" if pas_l is None else _us(pas_l.added_p99_us if is_p99 else pas_l.added_p50_us)
        )
        verdict = ""
        if is_p99:
            verdict = check(
                f"added p99 latency, {n} streams open",
                f"{value:,.0f} us",
                tgt,
                value <= MAX_LOADED_ADDED_P99_US,
            )
        rows.append(Row(label, pas_value, "", _us(value), "", tgt, verdict))
    for t, r in lat.items():
        if r is not None:
            loaded[t] = asdict(r) | {"added_p50_us": r.added_p50_us, "added_p99_us": r.added_p99_us}
    summary["loaded_latency"] = {"streams": n, **loaded}
    if runs.error:
        rows.append(Row("stream harness", proxy=f"failed: {runs.error}"))
        summary["streams_error"] = runs.error
    return rows


def format_table(rows: Sequence[Row]) -> list[str]:
    cells = [COLUMNS] + [
        (r.measure, r.passthrough, r.nginx, r.proxy, r.compare, r.target, r.verdict) for r in rows
    ]
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS))]

    def line(c: Sequence[str]) -> str:
        first = c[0].ljust(widths[0])
        rest = [c[i].rjust(widths[i]) for i in range(1, len(c) - 1)]
        return "  ".join([first, *rest, c[-1]]).rstrip()

    out = [line(cells[0]), "-" * (sum(widths) + 2 * (len(widths) - 1))]
    out += [line(c) for c in cells[1:]]
    return out


def notes(inp: Inputs, cfg: Config, pin_text: str, fd: FdLimit) -> list[str]:
    out = [
        f"wrk rows: {cfg.rounds} round(s) x {cfg.seconds:.0f} s per run, targets back to back in "
        "alternating order, medians over rounds; proxy at LOG_LEVEL=warning unless noted",
        pin_text,
        "CPU us/request: CPU time of the target process per request over a run "
        "(the steadier reading on a busy machine; 'proxy vs pass' is pass/proxy)",
        "ceiling (wrk straight to the fake upstream, round 1): "
        f"plain {_fmt_rps(inp.ceiling['plain'])} req/s, "
        f"stream {_fmt_rps(inp.ceiling['stream'])} req/s",
    ]
    if inp.nginx_note:
        out.append(f"nginx: {inp.nginx_note}")
    else:
        out.append(
            "nginx: one worker, no master process, keep-alive upstream connections, "
            "proxy_buffering off (the compiled limit, no features)"
        )
    runs = inp.streams
    if runs is not None:
        out.append(
            "RSS per open stream = (VmRSS with N streams open - VmRSS before) / N, on a fresh "
            "process per N warmed with a few requests; each stream a long-lived SSE request "
            "the fake upstream holds open with a small event every second, counted once it "
            "has relayed its first periodic event"
        )
        out.append(
            f"added latency @{runs.loaded_streams:,} open streams = pXX of small plain requests "
            "via the target - pXX of the same requests sent straight to the fake upstream, one of "
            f"each in turn, {PROBE_REQUESTS_TEXT}, while the streams stay open"
        )
        out.append(
            f"the proxies of these rows run with {POOL_CAP_ENV}=N+{POOL_CAP_SLACK} (the default "
            "cap of 256 upstream connections per host would queue the streams); the pass-through "
            "with no connector limit"
        )
        out.append(fd.describe())
        out += runs.notes
    if inp.sse is not None:
        out.append(
            "SSE writer: a 13-event stream written with aiohttp-sse's per-event send vs one "
            "write per event (bench/sse_writer.py)"
        )
    return out


PROBE_REQUESTS_TEXT = "200 of each at ~100 pairs/s"


# ------------------------------------------------------------------ main


@dataclass(frozen=True, slots=True)
class Config:
    seconds: float
    rounds: int
    warmup: float
    pin: bool
    routing_calls: int
    stream_counts: tuple[int, ...] = STREAM_COUNTS
    nginx: bool = True
    sse_rounds: int = DEFAULT_ROUNDS


def _cpu_plan(pin: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(CPUs for fake upstream + wrk, CPUs for the system under test)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return (), ()
    return (cpus[0],), (cpus[1],)


def render_rules(upstream_url: str) -> str:
    """The bench rules with both providers pointed at the fake upstream at ``upstream_url``."""
    return RULES_TEMPLATE.read_text().replace(TEMPLATE_PORT, urlsplit(upstream_url).netloc)


def _start_proxy(
    name: str,
    rules: Path,
    workdir: Path,
    level: str,
    cpus: Sequence[int],
    env: dict[str, str] | None = None,
) -> Service:
    cmd = [sys.executable, "-m", "proxy", "serve", "--rules", str(rules)]
    cmd += ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
    env = {"LOG_LEVEL": level, **(env or {})}
    return start_service(name, cmd, PROXY_READY, _proxy_url, workdir, env=env, cpus=cpus)


def _start_passthrough(
    name: str, fake_url: str, workdir: Path, cpus: Sequence[int], limit: bool = True
) -> Service:
    cmd = [sys.executable, "-m", "bench.passthrough", "--listen", "127.0.0.1:0"]
    cmd += ["--upstream", fake_url, "--connector-limit", "1" if limit else "0"]
    return start_service(name, cmd, PASS_READY, _word_url, workdir, cpus=cpus)


@dataclass
class Services:
    by_name: dict[str, Service]
    rules: Path
    nginx_note: str | None


@contextlib.contextmanager
def _services(
    workdir: Path, load_cpus: Sequence[int], sut_cpus: Sequence[int], with_nginx: bool
) -> Iterator[Services]:
    started: list[Service] = []
    nginx_dir = Path(tempfile.mkdtemp(prefix="cb-bench-nginx-"))
    try:
        fake = start_service(
            "fake_upstream",
            [sys.executable, "-m", "bench.fake_upstream", "--listen", "127.0.0.1:0"],
            FAKE_READY,
            _word_url,
            workdir,
            cpus=load_cpus,
        )
        started.append(fake)
        rules = workdir / "rules.yaml"
        rules.write_text(render_rules(fake.url))
        started.append(_start_passthrough("passthrough", fake.url, workdir, sut_cpus))
        nginx_note: str | None = None
        if not with_nginx:
            nginx_note = "left out (--no-nginx)"
        elif nginx_path() is None:
            nginx_note = "not installed (make tools installs the Debian package nginx)"
        else:
            try:
                nginx = start_nginx(nginx_dir, fake.url, workdir, cpus=sut_cpus)
                started.append(nginx)
                sanity("nginx", nginx.url, OPENAI_MODEL, (False, True))
            except (BenchError, OSError) as exc:
                first = str(exc).strip().splitlines()
                nginx_note = f"did not start: {first[0] if first else exc!r}"
                started = [s for s in started if s.name != "nginx"]
                if nginx_path() is not None:
                    with contextlib.suppress(NameError):
                        stop_service_proc(nginx.proc)
        for name, level in (("proxy", "warning"), ("proxy_info", "info")):
            started.append(_start_proxy(name, rules, workdir, level, sut_cpus))
        yield Services({s.name: s for s in started}, rules, nginx_note)
    finally:
        for service in reversed(started):
            stop_service_proc(service.proc)
        shutil.rmtree(nginx_dir, ignore_errors=True)


def run_bench(cfg: Config) -> int:
    if wrk_path() is None:
        print("bench: wrk is not installed; run `make tools`", file=sys.stderr)
        return 1
    fd = raise_fd_limit()
    load_cpus, sut_cpus = _cpu_plan(cfg.pin)
    started_at = time.monotonic()
    # Logs stay after the run (git-ignored) so a failure can be looked into.
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    with _services(WORK_DIR, load_cpus, sut_cpus, cfg.nginx) as services:
        svc = services.by_name
        url = {name: s.url for name, s in svc.items()}
        for name in ("fake_upstream", "passthrough", "proxy", "proxy_info"):
            sanity(name, url[name], OPENAI_MODEL, (False, True))
        sanity("proxy", url["proxy"], ANTHROPIC_MODEL, (False, True))
        with_nginx = "nginx" in svc

        def wrk(target: str, model: str, conns: int, stream: bool, seconds: float) -> WrkResult:
            label = f"{target} {model} c{conns} {'stream' if stream else 'plain'}"
            try:
                return run_wrk(
                    url[target],
                    connections=conns,
                    seconds=seconds,
                    model=model,
                    stream=stream,
                    cpus=load_cpus,
                    label=label,
                )
            except WrkError as exc:
                raise WrkError(f"{exc}\n{_diagnose(url[target], model, stream)}") from None

        if cfg.warmup > 0:
            warm = [
                ("passthrough", OPENAI_MODEL),
                ("proxy", OPENAI_MODEL),
                ("proxy", ANTHROPIC_MODEL),
                ("proxy_info", OPENAI_MODEL),
            ]
            if with_nginx:
                warm.append(("nginx", OPENAI_MODEL))
            for target, model in warm:
                for stream in (False, True):
                    wrk(target, model, MANY_CONNECTIONS, stream, cfg.warmup)
        ceiling = {
            "plain": wrk("fake_upstream", OPENAI_MODEL, MANY_CONNECTIONS, False, cfg.seconds).rps,
            "stream": wrk("fake_upstream", OPENAI_MODEL, MANY_CONNECTIONS, True, cfg.seconds).rps,
        }
        m = Measurements()
        for round_no in range(cfg.rounds):
            for sc in scenarios(with_nginx):
                order = sc.runs if round_no % 2 == 0 else tuple(reversed(sc.runs))
                for target, model in order:
                    before = cpu_seconds(svc[target].pid)
                    result = wrk(target, model, sc.connections, sc.stream, cfg.seconds)
                    used = cpu_seconds(svc[target].pid) - before
                    m.add(sc.key, target, result, used * 1e6 / result.requests)
            print(
                f"round {round_no + 1}/{cfg.rounds} done ({time.monotonic() - started_at:.0f} s)",
                flush=True,
            )
        measured = ("proxy", "proxy_info", "passthrough", *(("nginx",) if with_nginx else ()))
        rss = {name: rss_mb(svc[name].pid) for name in measured}
        for name in ("proxy", "proxy_info"):
            if svc[name].proc.poll() is not None:
                raise BenchError(f"{name} died during the run; log:\n{tail(svc[name].log_path)}")
        failed = {
            name: count_failed_requests(svc[name].log_path) for name in ("proxy", "proxy_info")
        }
        # The wrk targets sit idle from here on; the stream rows use fresh processes.
        streams: StreamRuns | None = None
        if cfg.stream_counts:
            print("holding streams open (memory per stream, loaded latency)", flush=True)

            def start(target: str, n: int) -> Service:
                name = f"{target}_streams{n}"
                if target == "proxy":
                    # The default cap (256 upstream connections per host) would queue the streams.
                    env = {POOL_CAP_ENV: str(n + POOL_CAP_SLACK)}
                    return _start_proxy(
                        name, services.rules, WORK_DIR, "warning", sut_cpus, env=env
                    )
                return _start_passthrough(name, url["fake_upstream"], WORK_DIR, sut_cpus, False)

            streams = measure_streams(start, url["fake_upstream"], cfg.stream_counts, fd, load_cpus)
        nginx_note = services.nginx_note
    # Timed after the load processes are gone, so they do not compete for the CPU.
    routing = time_plan_route(build_catalog(), VIRTUAL_MODEL, cfg.routing_calls)
    sse: dict[str, float] | None = None
    sse_note: str | None = None
    if cfg.sse_rounds > 0:
        try:
            sse = sse_writer.measure(cfg.sse_rounds, cfg.seconds)
        except (RuntimeError, OSError, WrkError) as exc:
            sse_note = f"failed: {exc}"
    else:
        sse_note = "left out (--quick)"

    inp = Inputs(m, ceiling, rss, routing.median_us, failed, nginx_note, streams, sse, sse_note)
    rows, checks, summary = build_report(inp)
    pin_text = (
        f"fake upstream, wrk and the stream clients pinned to CPU {load_cpus[0]}, "
        f"proxy / pass-through / nginx to CPU {sut_cpus[0]}"
        if load_cpus
        else "no CPU pinning"
    )
    elapsed = time.monotonic() - started_at
    print()
    print("cb-proxy bench summary")
    print()
    print("\n".join(format_table(rows)))
    print()
    print("\n".join(f"- {line}" for line in notes(inp, cfg, pin_text, fd)))
    passed = sum(c.passed for c in checks)
    print(
        f"\n{passed}/{len(checks)} targets met; bench took {elapsed:.0f} s; "
        f"results in {RESULTS_PATH.relative_to(BENCH_DIR.parent)}"
    )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "config": asdict(cfg)
        | {"load_cpus": load_cpus, "sut_cpus": sut_cpus, "fd_limit": asdict(fd)},
        "summary": summary,
        "routing": asdict(routing),
        "checks": [asdict(c) for c in checks],
        "runs": {
            scenario: {
                target: [asdict(r) | {"rps": r.rps} for r in results]
                for target, results in per.items()
            }
            for scenario, per in m.runs.items()
        },
        "elapsed_seconds": elapsed,
    }
    RESULTS_PATH.write_bytes(orjson.dumps(document, option=orjson.OPT_INDENT_2))
    return 1 if streams is not None and streams.error else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument(
        "--quick",
        action="store_true",
        help="1 round of 1 s runs, no warm-up, small stream counts, no SSE-writer row",
    )
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    parser.add_argument("--no-nginx", action="store_true", help="leave the nginx row out")
    parser.add_argument(
        "--streams",
        default=",".join(map(str, STREAM_COUNTS)),
        help="comma-separated stream counts for the memory rows (empty: none); the largest "
        "also gets the loaded-latency rows",
    )
    args = parser.parse_args(argv)
    counts = tuple(int(x) for x in args.streams.split(",") if x.strip())
    if args.quick and args.streams == parser.get_default("streams"):
        counts = QUICK_STREAM_COUNTS
    cfg = Config(
        seconds=1.0 if args.quick else args.seconds,
        rounds=1 if args.quick else max(1, args.rounds),
        warmup=0.0 if args.quick else WARMUP_SECONDS,
        pin=not args.no_pin,
        routing_calls=2_000 if args.quick else ROUTING_CALLS,
        stream_counts=counts,
        nginx=not args.no_nginx,
        sse_rounds=0 if args.quick else max(1, args.rounds),
    )
    try:
        return run_bench(cfg)
    except (BenchError, WrkError, OSError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
