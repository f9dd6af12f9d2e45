"""`make bench`: the proxy against a bare aiohttp pass-through, in one run.

Both sit in front of the same fake upstream (``bench.fake_upstream``) and get
the same wrk load (``bench/chat.lua``): requests per second at 32 connections
and p50/p99 latency at 1 connection, plain and streaming; the translation row
(client streams OpenAI, the proxy talks to an Anthropic-format fake); the
proxy's RSS after the run; and the router micro-benchmark.

Fairness and noise (the box has 2 cores shared with other work):
- the fake upstream and wrk are pinned to one CPU, the system under test (the
  proxy or the pass-through) to the other, when ``taskset`` and 2+ CPUs exist
  (``--no-pin`` turns it off); both sides run on uvloop;
- every scenario runs once per round, A and B back to back, in alternating
  order from round to round; the table shows the median over rounds;
- next to requests/s, the CPU time the target process spent per request
  (/proc/PID/stat over the run) is shown: it barely moves when other work
  takes CPU away from the target, so its ratio is the steadier reading;
- the proxy runs at LOG_LEVEL=warning; a second proxy at info (the default)
  gets the 32-connection rows too, so the cost of info logging is visible.

Exit status: 0 when everything ran (targets missed or not: the table says), 1
when something failed to run (a process did not start, a sanity request got
the wrong answer, wrk failed or saw non-2xx responses).
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import os
import queue
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import orjson

from bench.fake_upstream import CONTENT_CHUNKS, TOKEN_TEXT
from bench.fake_upstream import READY_PREFIX as FAKE_READY
from bench.passthrough import READY_PREFIX as PASS_READY
from bench.routing import CATALOG_SIZE, VIRTUAL_MODEL, build_catalog, time_plan_route
from bench.wrk import WrkError, WrkResult, run_wrk, wrk_path

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_PATH = BENCH_DIR / "results" / "latest.json"
WORK_DIR = BENCH_DIR / "results" / "work"
FAILED_MARK = " failed: "  # in the proxy's warning line for every request that got an error
RULES_TEMPLATE = BENCH_DIR / "rules-bench.yaml"
TEMPLATE_PORT = "127.0.0.1:18999"
PROXY_READY = "cb-proxy ready api="
OPENAI_MODEL = "bench-model"
ANTHROPIC_MODEL = "bench-claude"
READY_TIMEOUT = 20.0
SANITY_TIMEOUT = 10.0
STOP_TIMEOUT = 10.0
MANY_CONNECTIONS = 32
ONE_CONNECTION = 1
DEFAULT_SECONDS = 3.0
DEFAULT_ROUNDS = 3
WARMUP_SECONDS = 1.0
ROUTING_CALLS = 20_000
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")

# Targets (foundation issue and later rows).
MIN_RPS_RATIO = 0.85
MIN_TRANSLATION_RATIO = 0.60
MAX_ADDED_P50_US = 400.0
MAX_RSS_MB = 80.0
MAX_ROUTING_US = 50.0


class BenchError(RuntimeError):
    """Something the benchmark needs did not run or answered wrongly."""


# ------------------------------------------------------------------ processes


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def _pin(cmd: list[str], cpus: Sequence[int]) -> list[str]:
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    return cmd


def _pump(stream: IO[str], sink: IO[str], lines: queue.Queue[str]) -> None:
    """Copy a child's stdout to its log, handing lines to the starter until EOF."""
    for line in stream:
        sink.write(line)
        sink.flush()
        lines.put(line)
    lines.put("")  # EOF marker: the process closed stdout (usually: it exited)


def start_service(
    name: str,
    cmd: list[str],
    ready_prefix: str,
    url_of: Callable[[str], str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    cpus: Sequence[int] = (),
) -> Service:
    """Start ``cmd`` and wait for its ready line on stdout; stderr goes to a log file."""
    log_path = workdir / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        _pin(cmd, cpus),
        stdout=subprocess.PIPE,
        stderr=log,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=BENCH_DIR.parent,
    )
    if proc.stdout is None:  # pragma: no cover - PIPE always gives a stream
        raise BenchError(f"{name}: no stdout pipe")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, log, lines), daemon=True).start()
    deadline = time.monotonic() + READY_TIMEOUT
    while True:
        remaining = deadline - time.monotonic()
        try:
            line = lines.get(timeout=max(0.01, remaining))
        except queue.Empty:
            line = None
        if line is None or line == "":
            stop_service_proc(proc)
            why = "exited" if line == "" else f"not ready in {READY_TIMEOUT:.0f} s"
            raise BenchError(f"{name} {why}; log: {log_path}\n{_tail(log_path)}")
        if line.startswith(ready_prefix):
            return Service(name, url_of(line.strip()), proc, log_path)


def _tail(path: Path, lines: int = 15) -> str:
    with contextlib.suppress(OSError):
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    return ""


def stop_service_proc(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=STOP_TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=STOP_TIMEOUT)


def count_failed_requests(log_path: Path) -> int:
    """Requests the proxy answered with an error, from its warning log lines."""
    with log_path.open(errors="replace") as log:
        return sum(1 for line in log if "WARNING" in line and FAILED_MARK in line)


def _word_url(line: str) -> str:
    """``<prefix> http://host:port`` -> the URL."""
    return line.split()[-1]


def _proxy_url(line: str) -> str:
    """``cb-proxy ready api=http://... metrics=http://...`` -> the API URL."""
    return line.split("api=", 1)[1].split()[0]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_mb(pid: int) -> float:
    """Resident set size of a live process, from /proc (MiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise BenchError(f"no VmRSS for pid {pid}")


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


def scenarios() -> list[Scenario]:
    pair = (("passthrough", OPENAI_MODEL), ("proxy", OPENAI_MODEL))
    info = ("proxy_info", OPENAI_MODEL)
    return [
        Scenario("rps_plain", MANY_CONNECTIONS, False, (*pair, info)),
        Scenario("rps_stream", MANY_CONNECTIONS, True, (*pair, info)),
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


# ------------------------------------------------------------------ report


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    value: str
    target: str
    passed: bool


def _fmt_rps(v: float) -> str:
    return f"{v:,.0f}"


def build_report(
    m: Measurements,
    ceiling: dict[str, float],
    rss: dict[str, float],
    routing_us: float,
    failed: dict[str, int],
) -> tuple[list[str], list[Check], dict[str, Any]]:
    lines: list[str] = []
    checks: list[Check] = []
    summary: dict[str, Any] = {}

    def rps(scenario: str, target: str) -> float:
        return m.median(scenario, target, _rps)

    header = (
        f"{'':44} {'pass-through':>13} {'proxy':>10} {'proxy/pass':>11}   "
        f"{'CPU us/request: pass':>20} {'proxy':>6} {'pass/proxy':>11}"
    )
    lines.append(header)
    lines.append("-" * len(header))
    rows = (
        ("plain", "rps_plain", "rps_plain", "rps ratio, plain", MIN_RPS_RATIO),
        ("stream", "rps_stream", "rps_stream", "rps ratio, stream", MIN_RPS_RATIO),
        (
            "stream via Anthropic",
            "rps_stream",
            "rps_translate_stream",
            "translation rps ratio (Anthropic stream)",
            MIN_TRANSLATION_RATIO,
        ),
    )
    for label, base_key, proxy_key, check_name, wanted in rows:
        base, prox = rps(base_key, "passthrough"), rps(proxy_key, "proxy")
        ratio = prox / base
        base_cpu, prox_cpu = m.median_cpu(base_key, "passthrough"), m.median_cpu(proxy_key, "proxy")
        lines.append(
            f"{'requests/s @32 conns, ' + label:44} {_fmt_rps(base):>13} {_fmt_rps(prox):>10} "
            f"{ratio:>10.1%}   {base_cpu:>20,.0f} {prox_cpu:>6,.0f} {base_cpu / prox_cpu:>10.1%}"
        )
        checks.append(Check(check_name, f"{ratio:.1%}", f">= {wanted:.0%}", ratio >= wanted))
        summary[proxy_key] = {
            "passthrough": base,
            "proxy": prox,
            "ratio": ratio,
            "passthrough_cpu_us_per_request": base_cpu,
            "proxy_cpu_us_per_request": prox_cpu,
            "cpu_ratio": base_cpu / prox_cpu,
        }

    for key, label in (("latency_plain", "plain"), ("latency_stream", "stream")):
        entry: dict[str, float] = {}
        for pct, metric in (("p50", _p50), ("p99", _p99)):
            b, p = m.median(key, "passthrough", metric), m.median(key, "proxy", metric)
            lines.append(
                f"{f'latency {pct} @1 conn, {label} (us)':44} {b:>13,.0f} {p:>10,.0f} "
                f"{p - b:>+8,.0f} us added"
            )
            entry[f"passthrough_{pct}_us"], entry[f"proxy_{pct}_us"] = b, p
        added = entry["proxy_p50_us"] - entry["passthrough_p50_us"]
        entry["added_p50_us"] = added
        checks.append(
            Check(
                f"added p50 latency @1 conn, {label}",
                f"{added:.0f} us",
                f"< {MAX_ADDED_P50_US:.0f} us",
                added < MAX_ADDED_P50_US,
            )
        )
        summary[key] = entry

    lines.append("")
    lines.append("proxy at LOG_LEVEL=info (the default) vs warning, @32 conns:")
    info: dict[str, float] = {}
    for key, label in (("rps_plain", "plain"), ("rps_stream", "stream")):
        warn, inf = rps(key, "proxy"), rps(key, "proxy_info")
        warn_cpu, info_cpu = m.median_cpu(key, "proxy"), m.median_cpu(key, "proxy_info")
        lines.append(
            f"  {label:8} info {_fmt_rps(inf):>6} req/s = {inf / warn:.1%} of warning "
            f"({inf / rps(key, 'passthrough'):.1%} of pass-through); "
            f"CPU/request info {info_cpu:,.0f} us vs warning {warn_cpu:,.0f} us"
        )
        info[f"{key}_info"] = inf
        info[f"{key}_info_vs_warning"] = inf / warn
        info[f"{key}_info_cpu_us_per_request"] = info_cpu
        info[f"{key}_warning_cpu_us_per_request"] = warn_cpu
    summary["info_logging"] = info
    lines.append(
        f"ceiling (wrk straight to the fake upstream, round 1): plain {_fmt_rps(ceiling['plain'])}"
        f" req/s, stream {_fmt_rps(ceiling['stream'])} req/s"
    )
    summary["ceiling"] = ceiling
    lines.append(
        "RSS after the run: proxy "
        + f"{rss['proxy']:.1f} MiB, proxy(info) {rss['proxy_info']:.1f} MiB, "
        + f"pass-through {rss['passthrough']:.1f} MiB"
    )
    summary["rss_mb"] = rss
    lines.append(
        f"requests the proxy answered with an error (its warning log): {failed['proxy']} at "
        f"warning, {failed['proxy_info']} at info (wrk cuts in-flight requests at the end of "
        "each run; those should be clients gone, not errors)"
    )
    summary["proxy_failed_requests"] = failed
    checks.append(
        Check(
            "proxy RSS after the run",
            f"{rss['proxy']:.1f} MiB",
            f"< {MAX_RSS_MB:.0f} MB",
            rss["proxy"] < MAX_RSS_MB,
        )
    )
    checks.append(
        Check(
            f"routing: plan_route({VIRTUAL_MODEL!r}), {CATALOG_SIZE} models, median",
            f"{routing_us:.1f} us",
            f"< {MAX_ROUTING_US:.0f} us",
            routing_us < MAX_ROUTING_US,
        )
    )
    summary["routing_median_us"] = routing_us
    return lines, checks, summary


def format_checks(checks: Sequence[Check]) -> list[str]:
    out = ["", f"{'target':52} {'measured':>12}  {'wanted':>9}"]
    out += [
        f"{c.name:52} {c.value:>12}  {c.target:>9}  {'PASS' if c.passed else 'FAIL'}"
        for c in checks
    ]
    return out


# ------------------------------------------------------------------ main


@dataclass(frozen=True, slots=True)
class Config:
    seconds: float
    rounds: int
    warmup: float
    pin: bool
    routing_calls: int


def _cpu_plan(pin: bool) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(CPUs for fake upstream + wrk, CPUs for the system under test)."""
    cpus = sorted(os.sched_getaffinity(0))
    if not pin or len(cpus) < 2 or shutil.which("taskset") is None:
        return (), ()
    return (cpus[0],), (cpus[1],)


def render_rules(upstream_url: str) -> str:
    """The bench rules with both providers pointed at the fake upstream at ``upstream_url``."""
    return RULES_TEMPLATE.read_text().replace(TEMPLATE_PORT, urlsplit(upstream_url).netloc)


@contextlib.contextmanager
def _services(
    workdir: Path, load_cpus: Sequence[int], sut_cpus: Sequence[int]
) -> Iterator[dict[str, Service]]:
    py = sys.executable
    started: list[Service] = []
    try:
        fake = start_service(
            "fake_upstream",
            [py, "-m", "bench.fake_upstream", "--listen", "127.0.0.1:0"],
            FAKE_READY,
            _word_url,
            workdir,
            cpus=load_cpus,
        )
        started.append(fake)
        rules = workdir / "rules.yaml"
        rules.write_text(render_rules(fake.url))
        started.append(
            start_service(
                "passthrough",
                [py, "-m", "bench.passthrough", "--listen", "127.0.0.1:0", "--upstream", fake.url],
                PASS_READY,
                _word_url,
                workdir,
                cpus=sut_cpus,
            )
        )
        for name, level in (("proxy", "warning"), ("proxy_info", "info")):
            cmd = [py, "-m", "proxy", "serve", "--rules", str(rules)]
            cmd += ["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"]
            service = start_service(
                name, cmd, PROXY_READY, _proxy_url, workdir, env={"LOG_LEVEL": level}, cpus=sut_cpus
            )
            started.append(service)
        yield {s.name: s for s in started}
    finally:
        for service in reversed(started):
            stop_service_proc(service.proc)


def run_bench(cfg: Config) -> int:
    if wrk_path() is None:
        print("bench: wrk is not installed; run `make tools`", file=sys.stderr)
        return 1
    load_cpus, sut_cpus = _cpu_plan(cfg.pin)
    started_at = time.monotonic()
    # Logs stay after the run (git-ignored) so a failure can be looked into.
    shutil.rmtree(WORK_DIR, ignore_errors=True)
    WORK_DIR.mkdir(parents=True)
    with _services(WORK_DIR, load_cpus, sut_cpus) as svc:
        url = {name: s.url for name, s in svc.items()}
        for name in ("fake_upstream", "passthrough", "proxy", "proxy_info"):
            sanity(name, url[name], OPENAI_MODEL, (False, True))
        sanity("proxy", url["proxy"], ANTHROPIC_MODEL, (False, True))

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
            for target, model in (
                ("passthrough", OPENAI_MODEL),
                ("proxy", OPENAI_MODEL),
                ("proxy", ANTHROPIC_MODEL),
                ("proxy_info", OPENAI_MODEL),
            ):
                for stream in (False, True):
                    wrk(target, model, MANY_CONNECTIONS, stream, cfg.warmup)
        ceiling = {
            "plain": wrk("fake_upstream", OPENAI_MODEL, MANY_CONNECTIONS, False, cfg.seconds).rps,
            "stream": wrk("fake_upstream", OPENAI_MODEL, MANY_CONNECTIONS, True, cfg.seconds).rps,
        }
        m = Measurements()
        for round_no in range(cfg.rounds):
            for sc in scenarios():
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
        rss = {name: rss_mb(svc[name].pid) for name in ("proxy", "proxy_info", "passthrough")}
        for name in ("proxy", "proxy_info"):
            if svc[name].proc.poll() is not None:
                raise BenchError(f"{name} died during the run; log:\n{_tail(svc[name].log_path)}")
        failed = {
            name: count_failed_requests(svc[name].log_path) for name in ("proxy", "proxy_info")
        }
    # Timed after the load processes are gone, so they do not compete for the CPU.
    routing = time_plan_route(build_catalog(), VIRTUAL_MODEL, cfg.routing_calls)

    lines, checks, summary = build_report(m, ceiling, rss, routing.median_us, failed)
    pin_text = (
        f"fake upstream + wrk pinned to CPU {load_cpus[0]}, "
        f"proxy / pass-through to CPU {sut_cpus[0]}"
        if load_cpus
        else "no CPU pinning"
    )
    print()
    print(
        f"cb-proxy bench: {cfg.rounds} round(s) x {cfg.seconds:.0f} s per run, A/B interleaved, "
        "medians over rounds"
    )
    print(f"proxy LOG_LEVEL=warning unless noted; {pin_text}; uvloop on both sides")
    print()
    print("\n".join(lines))
    print("\n".join(format_checks(checks)))
    elapsed = time.monotonic() - started_at
    print(
        f"\n(bench took {elapsed:.0f} s; results in {RESULTS_PATH.relative_to(BENCH_DIR.parent)})"
    )
    RESULTS_PATH.parent.mkdir(parents=True, exist_ok=True)
    document = {
        "config": asdict(cfg) | {"load_cpus": load_cpus, "sut_cpus": sut_cpus},
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
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.run", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--seconds", type=float, default=DEFAULT_SECONDS, help="per wrk run")
    parser.add_argument("--rounds", type=int, default=DEFAULT_ROUNDS)
    parser.add_argument("--quick", action="store_true", help="1 round of 1 s runs, no warm-up")
    parser.add_argument("--no-pin", action="store_true", help="do not pin processes to CPUs")
    args = parser.parse_args(argv)
    cfg = Config(
        seconds=1.0 if args.quick else args.seconds,
        rounds=1 if args.quick else max(1, args.rounds),
        warmup=0.0 if args.quick else WARMUP_SECONDS,
        pin=not args.no_pin,
        routing_calls=2_000 if args.quick else ROUTING_CALLS,
    )
    try:
        return run_bench(cfg)
    except (BenchError, WrkError, OSError) as exc:
        print(f"bench failed: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
