"""Environment and command-line flags -> one frozen ``Settings``.

Precedence (docs/architecture.md): flag > environment > built-in default; per-provider
values in the rules file override the breaker defaults found here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from proxy.config.model import HealthCheck
from proxy.config.spec import Spec, declared

DEFAULT_LISTEN = "127.0.0.1:3000"
DEFAULT_METRICS_LISTEN = "0.0.0.0:9464"
DEFAULT_MAX_BODY_BYTES = 20 * 1024 * 1024
# Kubernetes' default terminationGracePeriodSeconds is 30 s: drain in 25 s and leave 5 s to exit.
DEFAULT_GRACE_PERIOD = 25.0
DEFAULT_RULES = Path(__file__).parent.parent / "data" / "default.yaml"
LOG_LEVELS = ("debug", "info", "warning", "error")
# Shutdown and client connections (docs/architecture.md, 'Shutdown' and 'Client connections').
# After SIGTERM the API keeps accepting for this long while /readyz answers 503, so whatever
# routes to the proxy (Service endpoints, a load balancer polling /readyz every few seconds)
# stops sending before the listener closes. Part of the grace period, never added to it.
DEFAULT_SHUTDOWN_DELAY = 3.0
# From a request's first byte to the end of its headers: any real client sends them at once.
DEFAULT_CLIENT_HEADER_TIMEOUT = 10.0
# The longest gap between two pieces of a request body (nginx's client_body_timeout is 60 s).
DEFAULT_CLIENT_BODY_TIMEOUT = 30.0
# An idle keep-alive connection: longer than clients keep theirs (httpx 5 s, undici 4 s, Go's
# net/http 90 s), so the client closes first and never reuses one the proxy is just closing.
DEFAULT_CLIENT_KEEPALIVE_TIMEOUT = 120.0
MIN_CLIENT_TIMEOUT = 0.01
# The rules file is read whole, decoded and checked. The 50,000-model benchmark file
# (bench/rules_load.py) is 13.8 MB and takes about 10 s and 600 MiB of peak memory to load
# (measured with libyaml; both grow linearly). 32 MiB is more than twice that catalog, so no
# real one is refused, while a runaway file (a generator gone wrong, the wrong file mounted)
# is refused by its size before a byte is read, not after gigabytes and minutes. A sidecar
# with a tight memory limit and a small catalog can set CB_RULES_MAX_BYTES lower.
DEFAULT_RULES_MAX_BYTES = 32 * 1024 * 1024
RULES_MAX_BYTES_ENV = "CB_RULES_MAX_BYTES"
# HEALTH_CHECK_INTERVAL is the default of providers.*.health_check.interval: same range.
HEALTH_CHECK_INTERVAL_SPEC: Spec = declared(HealthCheck)["interval"].spec
# Upstream client bounds (docs/upstream.md, 'Limits'): each names its environment variable.
# A response head: real LLM APIs send 1-4 KiB; 64 KiB is nginx's and Node's order of magnitude.
DEFAULT_UPSTREAM_MAX_HEADER_BYTES = 64 * 1024
# One SSE event: a chat delta is ~200 bytes, but a Responses API `response.completed` event
# carries the whole reply and a Gemini image part is base64 in one event: a few MB at most.
DEFAULT_UPSTREAM_MAX_EVENT_BYTES = 8 * 1024 * 1024
# A plain (non-stream) reply, held whole to rewrite it: a float-encoded embeddings batch is
# the largest legitimate one (tens of MB); the proxy holds two or three copies of it.
DEFAULT_UPSTREAM_MAX_BODY_BYTES = 64 * 1024 * 1024
# Open connections per upstream host (idle + busy): one app's concurrency with headroom, and
# 256 x a few upstream hosts stays well inside a container's default 1024+ descriptors.
DEFAULT_UPSTREAM_MAX_CONNECTIONS_PER_HOST = 256
# Mid-stream continuation (docs/breaker.md): the OpenAI-format bytes of a committed chat stream
# are copied up to this size so that, if the upstream fails, the text already sent can be
# recovered; a longer stream drops its copy and is not continued. 0 turns continuation off.
# 1 MiB is ~7,000 chunks (~150 bytes each), far beyond most answers.
DEFAULT_CONTINUATION_MAX_BYTES = 1024 * 1024

# Admission control (CB_MAX_IN_FLIGHT, docs/architecture.md 'Admission control'): requests
# in flight beyond the limit get a fast 503. Unset, the limit is derived from the soft
# RLIMIT_NOFILE after start-up raised it to the hard limit: each admitted request may hold
# a client socket and an upstream socket, so 2 descriptors, and the other half of the table
# is left to what admission cannot bound (keep-alive client connections, idle or being turned
# away; idle pooled upstream connections; listeners, health checks, files).
FDS_PER_ADMITTED_REQUEST = 4
MIN_DERIVED_MAX_IN_FLIGHT = 16
# RLIM_INFINITY, or a limit beyond any real table: derive as if it were this.
FD_LIMIT_CEILING = 1 << 20


def derived_max_in_flight(fd_limit: int) -> int:
    """The default CB_MAX_IN_FLIGHT for a soft RLIMIT_NOFILE (negative = unlimited)."""
    if fd_limit < 0 or fd_limit > FD_LIMIT_CEILING:
        fd_limit = FD_LIMIT_CEILING
    return max(MIN_DERIVED_MAX_IN_FLIGHT, fd_limit // FDS_PER_ADMITTED_REQUEST)


LogFormat = Literal["json", "text"]


class SettingsError(ValueError):
    """A bad flag or environment value; the message names it."""


@dataclass(frozen=True, slots=True)
class HostPort:
    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class Settings:
    rules_path: Path = DEFAULT_RULES
    listen: HostPort = field(default_factory=lambda: parse_host_port(DEFAULT_LISTEN, "CB_LISTEN"))
    metrics_listen: HostPort = field(
        default_factory=lambda: parse_host_port(DEFAULT_METRICS_LISTEN, "CB_METRICS_LISTEN")
    )
    log_level: str = "info"
    log_format: LogFormat = "text"
    admin_token: str | None = field(default=None, repr=False)  # never in a log line
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    grace_period: float = DEFAULT_GRACE_PERIOD
    health_check_interval: float = 30.0
    reload_interval: float = 1.0
    rules_max_bytes: int = DEFAULT_RULES_MAX_BYTES
    upstream_max_header_bytes: int = DEFAULT_UPSTREAM_MAX_HEADER_BYTES
    upstream_max_event_bytes: int = DEFAULT_UPSTREAM_MAX_EVENT_BYTES
    upstream_max_body_bytes: int = DEFAULT_UPSTREAM_MAX_BODY_BYTES
    upstream_max_connections_per_host: int = DEFAULT_UPSTREAM_MAX_CONNECTIONS_PER_HOST
    continuation_max_bytes: int = DEFAULT_CONTINUATION_MAX_BYTES  # CB_CONTINUATION_MAX_BYTES
    # CB_MAX_IN_FLIGHT: None = derived_max_in_flight(soft RLIMIT_NOFILE) at start; 0 = no limit.
    max_in_flight: int | None = None
    shutdown_delay: float = DEFAULT_SHUTDOWN_DELAY  # bounded by grace_period
    client_header_timeout: float = DEFAULT_CLIENT_HEADER_TIMEOUT
    client_body_timeout: float = DEFAULT_CLIENT_BODY_TIMEOUT
    client_keepalive_timeout: float = DEFAULT_CLIENT_KEEPALIVE_TIMEOUT
    # The process environment, kept for provider keys and breaker defaults (read once at start).
    environ: Mapping[str, str] = field(default_factory=dict, repr=False)  # holds provider keys


def parse_host_port(value: str, name: str) -> HostPort:
    host, sep, port_text = value.strip().rpartition(":")
    if not sep or not port_text.isdigit():
        raise SettingsError(f"{name}: expected HOST:PORT, got {value!r}")
    port = int(port_text)
    if not 0 <= port <= 65535:
        raise SettingsError(f"{name}: port out of range in {value!r}")
    host = host.strip("[]") or "127.0.0.1"
    return HostPort(host, port)


def _number(value: str, name: str, *, minimum: float = 0.0) -> float:
    try:
        number = float(value)
    except ValueError:
        raise SettingsError(f"{name}: expected a number, got {value!r}") from None
    if number < minimum:
        raise SettingsError(f"{name}: must be at least {minimum}, got {value!r}")
    return number


def _declared_number(value: str, name: str, spec: Spec) -> float:
    """An environment value held to the range of the rules key it stands for."""
    try:
        number = float(value)
    except ValueError:
        number = None
    if number is None or spec.problem(number) is not None:
        raise SettingsError(f"{name}: expected a number {spec.range_text()}, got {value!r}")
    return number


def rules_max_bytes(environ: Mapping[str, str]) -> int:
    """CB_RULES_MAX_BYTES (an integer >= 1; unset or empty = DEFAULT_RULES_MAX_BYTES)."""
    raw = environ.get(RULES_MAX_BYTES_ENV, "").strip()
    if not raw:
        return DEFAULT_RULES_MAX_BYTES
    if not raw.isdigit() or int(raw) < 1:
        raise SettingsError(f"{RULES_MAX_BYTES_ENV}: expected a number of bytes >= 1, got {raw!r}")
    return int(raw)


def load_settings(environ: Mapping[str, str], flags: Mapping[str, str | None]) -> Settings:
    """Build Settings from the environment and parsed flags (None = flag not given)."""

    def pick(flag: str, env: str, default: str) -> tuple[str, str]:
        given = flags.get(flag)
        if given is not None:
            return given, f"--{flag.replace('_', '-')}"
        return environ.get(env, default), env

    rules_text, _ = pick("rules", "CB_RULES", str(DEFAULT_RULES))
    listen_text, listen_name = pick("listen", "CB_LISTEN", DEFAULT_LISTEN)
    metrics_text, metrics_name = pick("metrics_listen", "CB_METRICS_LISTEN", DEFAULT_METRICS_LISTEN)
    level, level_name = pick("log_level", "LOG_LEVEL", "info")
    fmt, fmt_name = pick("log_format", "CB_LOG_FORMAT", "text")
    body_text, body_name = pick("max_body_bytes", "CB_MAX_BODY_BYTES", str(DEFAULT_MAX_BODY_BYTES))
    grace_text, grace_name = pick("grace_period", "CB_GRACE_PERIOD", str(DEFAULT_GRACE_PERIOD))
    health_text = environ.get("HEALTH_CHECK_INTERVAL", "30")
    reload_text = environ.get("CB_RELOAD_INTERVAL", "1")

    level = level.strip().lower()
    if level not in LOG_LEVELS:
        raise SettingsError(f"{level_name}: expected one of {', '.join(LOG_LEVELS)}, got {level!r}")
    fmt = fmt.strip().lower()
    if fmt not in ("json", "text"):
        raise SettingsError(f"{fmt_name}: expected json or text, got {fmt!r}")
    max_body = int(_number(body_text, body_name, minimum=1024))

    def upstream_limit(env: str, default: int, minimum: int) -> int:
        return int(_number(environ.get(env, str(default)), env, minimum=minimum))

    return Settings(
        rules_path=Path(rules_text),
        listen=parse_host_port(listen_text, listen_name),
        metrics_listen=parse_host_port(metrics_text, metrics_name),
        log_level=level,
        log_format="json" if fmt == "json" else "text",
        admin_token=environ.get("CB_ADMIN_TOKEN") or None,
        max_body_bytes=max_body,
        grace_period=_number(grace_text, grace_name),
        health_check_interval=_declared_number(
            health_text, "HEALTH_CHECK_INTERVAL", HEALTH_CHECK_INTERVAL_SPEC
        ),
        reload_interval=_number(reload_text, "CB_RELOAD_INTERVAL", minimum=0.05),
        rules_max_bytes=rules_max_bytes(environ),
        upstream_max_header_bytes=upstream_limit(
            "CB_UPSTREAM_MAX_HEADER_BYTES", DEFAULT_UPSTREAM_MAX_HEADER_BYTES, 1024
        ),
        upstream_max_event_bytes=upstream_limit(
            "CB_UPSTREAM_MAX_EVENT_BYTES", DEFAULT_UPSTREAM_MAX_EVENT_BYTES, 1024
        ),
        upstream_max_body_bytes=upstream_limit(
            "CB_UPSTREAM_MAX_BODY_BYTES", DEFAULT_UPSTREAM_MAX_BODY_BYTES, 1024
        ),
        upstream_max_connections_per_host=upstream_limit(
            "CB_UPSTREAM_MAX_CONNECTIONS_PER_HOST", DEFAULT_UPSTREAM_MAX_CONNECTIONS_PER_HOST, 1
        ),
        continuation_max_bytes=upstream_limit(
            "CB_CONTINUATION_MAX_BYTES", DEFAULT_CONTINUATION_MAX_BYTES, 0
        ),
        **_connection_settings(environ, flags.get("shutdown_delay")),
        max_in_flight=_max_in_flight(environ),
        environ=dict(environ),
    )


def _max_in_flight(environ: Mapping[str, str]) -> int | None:
    raw = environ.get("CB_MAX_IN_FLIGHT", "").strip()
    if not raw:
        return None
    if not raw.isdigit():
        raise SettingsError(f"CB_MAX_IN_FLIGHT: expected a whole number >= 0, got {raw!r}")
    return int(raw)


def _connection_settings(environ: Mapping[str, str], delay_flag: str | None) -> dict[str, float]:
    """The shutdown delay (flag or CB_SHUTDOWN_DELAY) and the client connection timeouts."""
    if delay_flag is not None:
        delay = _number(delay_flag, "--shutdown-delay")
    else:
        delay = _number(
            environ.get("CB_SHUTDOWN_DELAY", str(DEFAULT_SHUTDOWN_DELAY)), "CB_SHUTDOWN_DELAY"
        )

    def seconds(env: str, default: float) -> float:
        return _number(environ.get(env, str(default)), env, minimum=MIN_CLIENT_TIMEOUT)

    return {
        "shutdown_delay": delay,
        "client_header_timeout": seconds("CB_CLIENT_HEADER_TIMEOUT", DEFAULT_CLIENT_HEADER_TIMEOUT),
        "client_body_timeout": seconds("CB_CLIENT_BODY_TIMEOUT", DEFAULT_CLIENT_BODY_TIMEOUT),
        "client_keepalive_timeout": seconds(
            "CB_CLIENT_KEEPALIVE_TIMEOUT", DEFAULT_CLIENT_KEEPALIVE_TIMEOUT
        ),
    }
