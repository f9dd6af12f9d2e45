"""The rate-limit gate per (upstream, model), and Retry-After parsing (docs/breaker.md).

A true 429 is not an upstream failure: it closes the gate of its (upstream,
model) pair for as long as the upstream asked, and the candidate is skipped
without I/O until then. 429s are per model and key, so one model's limit
never blocks another model on the same upstream.

Invariants:
- ``parse_retry_after`` returns a finite number of seconds >= 0, or None when
  no usable header is present (garbage is treated as absent).
- ``gate_seconds`` is always within [MIN_GATE_SECONDS, MAX_GATE_SECONDS].
- A gate is closed exactly while ``clock() < reopens_at(key)``; closing an
  already closed gate never shortens it.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC
from email.utils import parsedate_to_datetime

DEFAULT_GATE_SECONDS = 5.0  # no Retry-After given
MIN_GATE_SECONDS = 1.0
MAX_GATE_SECONDS = 60.0  # an upstream asking for an hour must not idle a model for an hour
MS_HEADER = "retry-after-ms"  # OpenAI and Azure send this, more precise than retry-after
SECONDS_HEADER = "retry-after"  # RFC 9110 10.2.3: delta-seconds or an HTTP-date

GateKey = tuple[str, str]  # (upstream, model)


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is not None:
        return value
    # A plain dict is case-sensitive; aiohttp's CIMultiDict is not. Only 429s get here.
    for key, candidate in headers.items():
        if key.lower() == name:
            return candidate
    return None


def _seconds(text: str) -> float | None:
    try:
        value = float(text.strip())
    except ValueError:
        return None
    return value if 0 <= value < math.inf else None


def parse_retry_after(headers: Mapping[str, str], now_wall: float) -> float | None:
    """Seconds the upstream asked us to wait; ``now_wall`` is the wall-clock time (for dates)."""
    raw_ms = _header(headers, MS_HEADER)
    if raw_ms is not None:
        ms = _seconds(raw_ms)
        if ms is not None:
            return ms / 1000.0
    raw = _header(headers, SECONDS_HEADER)
    if raw is None:
        return None
    seconds = _seconds(raw)
    if seconds is not None:
        return seconds
    try:
        when = parsedate_to_datetime(raw.strip())
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    # RFC 9110 dates are GMT; a zone-less parse (from '-0000') means GMT too.
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, when.timestamp() - now_wall)


def gate_seconds(value: float | None) -> float:
    """How long a 429 closes the gate: the asked time, 5 s when absent, clamped to 1..60 s."""
    if value is None or math.isnan(value):
        return DEFAULT_GATE_SECONDS
    return min(MAX_GATE_SECONDS, max(MIN_GATE_SECONDS, value))


class RateLimitGate:
    """Closed (upstream, model) pairs and when each reopens, on an injected monotonic clock."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._until: dict[GateKey, float] = {}

    def close(self, key: GateKey, seconds: float) -> float:
        """Close for ``seconds``, never shortening a longer closure; returns the reopen time."""
        until = max(self._until.get(key, -math.inf), self._clock() + seconds)
        self._until[key] = until
        return until

    def is_open(self, key: GateKey) -> bool:
        until = self._until.get(key)
        if until is None:
            return True
        if self._clock() >= until:
            del self._until[key]  # keeps the dict as small as the set of closed gates
            return True
        return False

    def reopens_at(self, key: GateKey) -> float | None:
        """Clock time the gate reopens, or None when it is open."""
        return self._until[key] if not self.is_open(key) else None

    def retry_after(self, key: GateKey) -> float:
        """Seconds until the gate reopens; 0 when open."""
        at = self.reopens_at(key)
        return 0.0 if at is None else at - self._clock()

    def closed(self) -> dict[GateKey, float]:
        """Every closed gate and the seconds until it reopens (for the admin API)."""
        now = self._clock()
        return {key: until - now for key, until in self._until.items() if until > now}
