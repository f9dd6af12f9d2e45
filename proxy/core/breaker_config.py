"""Breaker settings: ``CircuitBreakerConfig``, and its defaults from the environment.

Invariants:
- A ``CircuitBreakerConfig`` that exists is valid: each field named like a rules
  breaker key is in the range ``BreakerOverrides`` declares (``RULES_KEYS``),
  ``max_open_seconds >= open_seconds``, and the runtime-only fields are in
  range; anything else raises ValueError when it is built.
- ``with_overrides`` never raises for overrides ``cb-proxy check`` accepted.
- ``from_env`` reads only the mapping it is given (the core reads no globals):
  an unset or empty variable takes the default, any other value is checked
  against its rules key's declared type and range.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from proxy.config.model import BreakerOverrides
from proxy.config.spec import declared

# Without slow_call_ms, an attempt still waiting for its first token after this fraction of
# its first-token timeout counts as a provisional failure (docs/breaker.md, 'Stalled attempts
# count as they age'). Half: a stalled upstream opens in half the time the timeouts would
# take, while a healthy one is never judged on an attempt that has used less than half of
# the time it is allowed; the trip still needs failure_threshold of them with no success
# in between.
STALL_FRACTION = 0.5

_TRUE_WORDS = frozenset({"1", "true", "yes", "on"})
_FALSE_WORDS = frozenset({"0", "false", "no", "off"})

# The breaker keys of the rules file (providers.*.breaker) are declared once, in
# proxy/config/model.py: their defaults and ranges here come from that declaration,
# so whatever `cb-proxy check` accepts is a valid runtime config (docs/rules.md).
RULES_KEYS = declared(BreakerOverrides)
_D = RULES_KEYS


@dataclass(frozen=True, slots=True)
class CircuitBreakerConfig:
    """Breaker settings (docs/rules.md, ``providers.*.breaker``); bad values raise ValueError.

    The fields named like the rules' breaker keys take their defaults and ranges from
    ``BreakerOverrides``' declaration (``RULES_KEYS``); the rest are runtime-only.
    """

    failure_threshold: int = _D["failure_threshold"].as_int()  # consecutive failures; 0 = off
    failure_rate: float = _D["failure_rate"].as_float()  # failure ratio in the window that opens
    min_throughput: int = _D["min_throughput"].as_int()  # ... once this many calls are in it
    window_seconds: float = _D["window_seconds"].as_float()  # 1 s buckets
    open_seconds: float = _D["open_seconds"].as_float()  # first open; doubles per re-open
    max_open_seconds: float = _D["max_open_seconds"].as_float()  # cap on every open period
    half_open_probes: int = _D["half_open_probes"].as_int()
    slow_call_ms: float = _D["slow_call_ms"].as_float()  # >0: a slower first token is slow
    slow_call_rate: float | None = None  # slow ratio that opens; None = failure_rate
    max_half_open_seconds: float = _D["max_half_open_seconds"].as_float()  # hung probe: reopen
    jitter: float = 0.1  # open durations vary by +- this fraction
    enabled: bool = True  # False = monitor-only: never blocks, shadow state exported
    # The upstream's first-token timeout (the proxy sets it from the provider's timeouts);
    # 0 = unknown. With slow_call_ms unset, stalls are judged at stall_fraction of it.
    first_token_seconds: float = 0.0
    stall_fraction: float = STALL_FRACTION  # 0 = stall rule only through slow_call_ms

    def __post_init__(self) -> None:
        problems = [
            f"{name} {problem}"
            for name, d in RULES_KEYS.items()
            if (problem := d.spec.problem(getattr(self, name))) is not None
        ]
        for name, d in RULES_KEYS.items():
            other = d.spec.at_least
            if other is not None and getattr(self, name) < getattr(self, other):
                problems.append(f"{name} must be >= {other}")
        if not (self.slow_call_rate is None or 0 < self.slow_call_rate <= 1):
            problems.append("slow_call_rate must be in (0, 1]")
        if not 0 <= self.jitter < 1:
            problems.append("jitter must be in [0, 1)")
        if not (math.isfinite(self.first_token_seconds) and self.first_token_seconds >= 0):
            problems.append("first_token_seconds must be >= 0")
        if not 0 <= self.stall_fraction <= 1:
            problems.append("stall_fraction must be in [0, 1]")
        if problems:
            raise ValueError("invalid breaker config: " + "; ".join(problems))

    @property
    def slow_rate(self) -> float:
        return self.failure_rate if self.slow_call_rate is None else self.slow_call_rate

    @property
    def stall_seconds(self) -> float:
        """Age at which an attempt in flight counts as a provisional failure; 0 = rule off.

        ``slow_call_ms`` when set (an attempt past it will be slow whatever it returns),
        otherwise ``stall_fraction`` of the first-token timeout.
        """
        if self.slow_call_ms > 0:
            return self.slow_call_ms / 1000.0
        return self.stall_fraction * self.first_token_seconds

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> CircuitBreakerConfig:
        """Defaults from an environment mapping (docs/architecture.md); unset or empty: default.

        The caller passes the mapping (the shell passes ``os.environ``): the core reads no globals.
        Each variable is checked against the range its rules key declares.
        """
        base = cls()
        open_seconds = _env_number(env, "CB_TIMEOUT_SECONDS", "open_seconds")
        return cls(
            enabled=_env_bool(env, "CIRCUIT_BREAKER_ENABLED", base.enabled),
            failure_threshold=int(_env_number(env, "CB_FAILURE_THRESHOLD", "failure_threshold")),
            min_throughput=int(_env_number(env, "CB_MIN_THROUGHPUT", "min_throughput")),
            open_seconds=open_seconds,
            # A first open longer than the default cap raises the cap rather than failing.
            max_open_seconds=max(base.max_open_seconds, open_seconds),
        )

    def with_overrides(self, overrides: BreakerOverrides) -> CircuitBreakerConfig:
        """This config with the rules file's per-provider values (None = keep) applied.

        Never raises for overrides ``cb-proxy check`` accepted, whatever the environment
        set (docs/rules.md, "Providers": the breaker keys): each value is in its declared
        range, and the one cross-field rule (``max_open_seconds >= open_seconds``) is
        settled here when the file sets only one side of it. ``max_open_seconds`` caps
        every open period, so given alone below the inherited ``open_seconds`` it lowers
        the first open period to itself; ``open_seconds`` given alone above the inherited
        cap raises the cap.
        """
        changes: dict[str, Any] = {
            f.name: getattr(overrides, f.name)
            for f in fields(overrides)
            if getattr(overrides, f.name) is not None
        }
        if "open_seconds" in changes and "max_open_seconds" not in changes:
            changes["max_open_seconds"] = max(self.max_open_seconds, changes["open_seconds"])
        if "max_open_seconds" in changes and "open_seconds" not in changes:
            changes["open_seconds"] = min(self.open_seconds, changes["max_open_seconds"])
        return replace(self, **changes)


def _env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE_WORDS:
        return True
    if raw in _FALSE_WORDS:
        return False
    raise ValueError(f"{name}={env[name]!r}: expected true or false")


def _env_number(env: Mapping[str, str], name: str, key: str) -> float:
    """The variable ``name`` as a value of the rules key ``key`` (its declared type and range)."""
    declared_key = RULES_KEYS[key]
    raw = env.get(name, "").strip()
    if not raw:
        return declared_key.as_float()
    spec = declared_key.spec
    value: float | None
    try:
        value = int(raw) if spec.kind == "integer" else float(raw)
    except ValueError:
        value = None
    if value is None or spec.problem(value) is not None:
        unit = "an integer" if spec.kind == "integer" else "a number of seconds"
        raise ValueError(f"{name}={raw!r}: expected {unit} {spec.range_text()}")
    return value
