"""Retry-After parsing and the (upstream, model) rate-limit gate (docs/breaker.md, case 18)."""

from __future__ import annotations

from email.utils import formatdate

import pytest

from proxy.core.ratelimit import (
    DEFAULT_GATE_SECONDS,
    MAX_GATE_SECONDS,
    MIN_GATE_SECONDS,
    RateLimitGate,
    gate_seconds,
    parse_retry_after,
)

NOW_WALL = 1_700_000_000.0  # a whole second, so HTTP dates (second precision) are exact
KEY = ("openai", "gpt-4o-mini")


class FakeClock:
    def __init__(self, now: float = 500.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def http_date(offset: float) -> str:
    return formatdate(NOW_WALL + offset, usegmt=True)


@pytest.mark.parametrize(
    ("headers", "parsed", "gate"),
    [
        ({"retry-after-ms": "1500"}, 1.5, 1.5),
        ({"retry-after-ms": "250"}, 0.25, MIN_GATE_SECONDS),
        ({"retry-after-ms": "2500", "retry-after": "9"}, 2.5, 2.5),  # ms wins
        ({"retry-after-ms": "soon", "retry-after": "9"}, 9.0, 9.0),  # garbage ms: fall back
        ({"retry-after": "7"}, 7.0, 7.0),
        ({"Retry-After": " 12 "}, 12.0, 12.0),  # any case, surrounding space
        ({"retry-after": "3600"}, 3600.0, MAX_GATE_SECONDS),
        ({"retry-after": "0"}, 0.0, MIN_GATE_SECONDS),
        ({"retry-after": http_date(20)}, 20.0, 20.0),
        ({"retry-after": http_date(-30)}, 0.0, MIN_GATE_SECONDS),  # a date in the past
        ({"retry-after": http_date(7200)}, 7200.0, MAX_GATE_SECONDS),
        ({"retry-after": "Sun, 06 Nov 1994 08:49:37"}, 0.0, MIN_GATE_SECONDS),  # no zone = GMT
        ({"retry-after": "garbage"}, None, DEFAULT_GATE_SECONDS),
        ({"retry-after": "-5"}, None, DEFAULT_GATE_SECONDS),
        ({"retry-after": "nan"}, None, DEFAULT_GATE_SECONDS),
        ({"retry-after": "inf"}, None, DEFAULT_GATE_SECONDS),
        ({"retry-after": ""}, None, DEFAULT_GATE_SECONDS),
        ({}, None, DEFAULT_GATE_SECONDS),
        ({"x-ratelimit-reset-requests": "20s"}, None, DEFAULT_GATE_SECONDS),
    ],
)
def test_18_retry_after_variants_give_the_exact_clamped_gate(
    headers: dict[str, str], parsed: float | None, gate: float
) -> None:
    assert parse_retry_after(headers, NOW_WALL) == parsed
    seconds = gate_seconds(parse_retry_after(headers, NOW_WALL))
    assert seconds == gate
    clock = FakeClock()
    gates = RateLimitGate(clock)
    assert gates.close(KEY, seconds) == 500.0 + gate
    assert gates.reopens_at(KEY) == 500.0 + gate
    clock.now = 500.0 + gate - 0.001
    assert not gates.is_open(KEY)
    clock.now = 500.0 + gate
    assert gates.is_open(KEY)
    assert gates.reopens_at(KEY) is None


def test_gate_is_per_upstream_and_model() -> None:
    clock = FakeClock()
    gates = RateLimitGate(clock)
    gates.close(KEY, 10)
    assert not gates.is_open(KEY)
    assert gates.is_open(("openai", "gpt-4o"))
    assert gates.is_open(("azure", "gpt-4o-mini"))
    assert gates.closed() == {KEY: 10.0}


def test_closing_again_never_shortens_the_gate() -> None:
    clock = FakeClock()
    gates = RateLimitGate(clock)
    gates.close(KEY, 30)
    gates.close(KEY, 2)
    assert gates.retry_after(KEY) == 30
    clock.now += 10
    gates.close(KEY, 40)
    assert gates.retry_after(KEY) == 40
    clock.now += 40
    assert gates.retry_after(KEY) == 0
    assert gates.closed() == {}


def test_gate_seconds_handles_nan_as_absent() -> None:
    assert gate_seconds(float("nan")) == DEFAULT_GATE_SECONDS
    assert gate_seconds(float("inf")) == MAX_GATE_SECONDS
