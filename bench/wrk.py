"""Run wrk with ``chat.lua`` and parse what it prints.

The Lua ``done`` hook prints one ``BENCH_JSON {...}`` line with raw integers
(latencies in microseconds), so parsing never depends on wrk's human units.
A run counts as failed when wrk exits non-zero, the line is missing, or any
response was not 2xx: a benchmark of error pages is not a benchmark.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import orjson

SCRIPT = Path(__file__).with_name("chat.lua")
MARKER = "BENCH_JSON "
WRK_TIMEOUT = "5s"
# Socket errors (reads cut when wrk stops mid-response) tolerated as a share of requests.
MAX_SOCKET_ERROR_RATIO = 0.01
PROCESS_SLACK_SECONDS = 30.0


class WrkError(RuntimeError):
    """wrk did not run, or its run is not usable as a measurement."""


@dataclass(frozen=True, slots=True)
class WrkResult:
    requests: int
    duration_us: int
    p50_us: int
    p90_us: int
    p99_us: int
    mean_us: float
    max_us: int
    socket_errors: int  # connect + read + write + timeout
    status_errors: int  # non-2xx/3xx responses

    @property
    def rps(self) -> float:
        return self.requests * 1_000_000 / self.duration_us if self.duration_us else 0.0


def parse_wrk_output(text: str) -> WrkResult:
    """The result in wrk's stdout; WrkError if the ``BENCH_JSON`` line is absent or malformed."""
    for line in text.splitlines():
        if line.startswith(MARKER):
            try:
                raw = orjson.loads(line[len(MARKER) :])
                return WrkResult(
                    requests=int(raw["requests"]),
                    duration_us=int(raw["duration_us"]),
                    p50_us=int(raw["p50_us"]),
                    p90_us=int(raw["p90_us"]),
                    p99_us=int(raw["p99_us"]),
                    mean_us=float(raw["mean_us"]),
                    max_us=int(raw["max_us"]),
                    socket_errors=sum(
                        int(raw[f"errors_{k}"]) for k in ("connect", "read", "write", "timeout")
                    ),
                    status_errors=int(raw["errors_status"]),
                )
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise WrkError(f"malformed wrk report line: {line!r}") from exc
    raise WrkError("wrk printed no BENCH_JSON line (was chat.lua loaded?)")


def check_usable(result: WrkResult, label: str) -> None:
    if result.requests == 0:
        raise WrkError(f"{label}: no request completed")
    if result.status_errors:
        raise WrkError(f"{label}: {result.status_errors} non-2xx responses")
    if result.socket_errors > MAX_SOCKET_ERROR_RATIO * result.requests:
        raise WrkError(f"{label}: {result.socket_errors} socket errors in {result.requests}")


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(
    url: str,
    *,
    connections: int,
    seconds: float,
    model: str,
    stream: bool,
    cpus: Sequence[int] = (),
    label: str = "",
) -> WrkResult:
    """One wrk run against ``url`` (base URL, no path); checked with ``check_usable``."""
    exe = wrk_path()
    if exe is None:
        raise WrkError("wrk is not installed (make tools)")
    threads = 1 if connections < 4 else 2
    cmd = [
        exe,
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={WRK_TIMEOUT}",
        "-s",
        str(SCRIPT),
        url,
    ]
    if cpus and shutil.which("taskset"):
        cmd = ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    env: Mapping[str, str] = {
        **os.environ,
        "BENCH_MODEL": model,
        "BENCH_STREAM": "1" if stream else "0",
    }
    try:
        proc = subprocess.run(
            cmd,
            env=env,
            capture_output=True,
            text=True,
            timeout=seconds + PROCESS_SLACK_SECONDS,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise WrkError(f"{label}: wrk did not finish in time") from exc
    if proc.returncode != 0:
        raise WrkError(f"{label}: wrk exited {proc.returncode}: {proc.stderr.strip()[:300]}")
    result = parse_wrk_output(proc.stdout)
    check_usable(result, label or url)
    return result
