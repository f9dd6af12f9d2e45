"""Child processes of the benchmark: start, wait until ready, measure, stop.

Every service the bench starts prints (or logs) one line once it listens;
``start_service`` waits for that line, copying the child's output to a log
file in the bench's work directory so a failure can be looked into. Nothing
here sleeps to wait: readiness is a line read from a pipe.
"""

from __future__ import annotations

import contextlib
import os
import queue
import resource
import shutil
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

BENCH_DIR = Path(__file__).resolve().parent
READY_TIMEOUT = 20.0
STOP_TIMEOUT = 10.0
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


class BenchError(RuntimeError):
    """Something the benchmark needs did not run or answered wrongly."""


@dataclass
class Service:
    name: str
    url: str
    proc: subprocess.Popen[str]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.proc.pid


def pin(cmd: list[str], cpus: Sequence[int]) -> list[str]:
    """``cmd`` under ``taskset -c CPUS`` when CPUs are given and taskset exists."""
    if cpus and shutil.which("taskset"):
        return ["taskset", "-c", ",".join(map(str, cpus)), *cmd]
    return cmd


def _pump(stream: IO[str], sink: IO[str], lines: queue.Queue[str]) -> None:
    """Copy a child's output to its log, handing lines to the starter until EOF."""
    with sink, stream:
        for line in stream:
            sink.write(line)
            sink.flush()
            lines.put(line)
    lines.put("")  # EOF marker: the process closed the pipe (usually: it exited)


def start_service(
    name: str,
    cmd: list[str],
    ready: str | Callable[[str], bool],
    url_of: Callable[[str], str],
    workdir: Path,
    *,
    env: dict[str, str] | None = None,
    cpus: Sequence[int] = (),
    ready_on_stderr: bool = False,
) -> Service:
    """Start ``cmd`` and wait for its ready line.

    ``ready`` is the prefix of that line on stdout, or a test of each line.
    With ``ready_on_stderr`` the line is looked for on stderr instead (nginx
    says nothing on stdout) and both streams go to the log.
    """
    is_ready = ready if callable(ready) else (lambda line, prefix=ready: line.startswith(prefix))
    log_path = workdir / f"{name}.log"
    log = log_path.open("w")
    proc = subprocess.Popen(
        pin(cmd, cpus),
        stdout=log if ready_on_stderr else subprocess.PIPE,
        stderr=subprocess.PIPE if ready_on_stderr else log,
        text=True,
        env={**os.environ, **(env or {})},
        cwd=BENCH_DIR.parent,
    )
    watched = proc.stderr if ready_on_stderr else proc.stdout
    if watched is None:  # pragma: no cover - PIPE always gives a stream
        raise BenchError(f"{name}: no pipe to read")
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_pump, args=(watched, log, lines), daemon=True).start()
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
            raise BenchError(f"{name} {why}; log: {log_path}\n{tail(log_path)}")
        if is_ready(line):
            return Service(name, url_of(line.strip()), proc, log_path)


def tail(path: Path, lines: int = 15) -> str:
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


def cpu_seconds(pid: int) -> float:
    """User + system CPU time a live process has used so far, from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the command name: state is field 3 of stat(5), utime 14 and stime 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def rss_kib(pid: int) -> int:
    """Resident set size of a live process, from /proc/PID/status VmRSS (KiB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise BenchError(f"no VmRSS for pid {pid}")


def rss_mb(pid: int) -> float:
    """Resident set size of a live process (MiB)."""
    return rss_kib(pid) / 1024


@dataclass(frozen=True, slots=True)
class FdLimit:
    before: int
    now: int
    hard: int

    def describe(self) -> str:
        if self.now > self.before:
            return (
                f"open-file limit raised from {self.before} to {self.now} (the hard limit) "
                "for the bench and every process it starts"
            )
        return f"open-file limit {self.now} (hard {self.hard}), left as it was"


def raise_fd_limit() -> FdLimit:
    """Soft RLIMIT_NOFILE up to the hard limit; children inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
    if wanted > soft:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
    now = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return FdLimit(before=soft, now=now, hard=hard)
