"""The stall rule (docs/breaker.md, 'Stalled attempts count as they age'), on a fake clock.

Attempts in flight past the stall threshold count as provisional failures toward
``failure_threshold`` and ``failure_rate``; each is replaced by its real outcome
when it ends, so nothing is counted twice. Invariant 10 of proxy/core/breaker.py.
"""

from __future__ import annotations

import random

import pytest

from proxy.config.model import BreakerOverrides
from proxy.core.breaker import (
    STALL_FRACTION,
    CircuitBreaker,
    CircuitBreakerConfig,
    Mode,
    Permit,
    State,
)
from proxy.core.breaker_registry import BreakerRegistry
from proxy.core.outcome import Outcome
from tests.core.test_breaker import FakeClock, Transitions, state

FIRST_TOKEN = 5.0  # seconds: the stall threshold is STALL_FRACTION of it
STALL = STALL_FRACTION * FIRST_TOKEN


def make(
    clock: FakeClock, transitions: Transitions | None = None, **settings: float
) -> CircuitBreaker:
    base: dict[str, float] = {
        "jitter": 0.0,
        "failure_threshold": 3,
        "min_throughput": 1000,  # the rate rule off unless a test lowers it
        "first_token_seconds": FIRST_TOKEN,
    }
    config = CircuitBreakerConfig(**{**base, **settings})  # type: ignore[arg-type]
    return CircuitBreaker(
        "up", config, clock=clock, rng=random.Random(7), on_transition=transitions
    )


def grant(breaker: CircuitBreaker, count: int = 1) -> list[Permit]:
    """``count`` permits whose requests were sent (the stall clock starts at ``sent``)."""
    permits = [breaker.permit() for _ in range(count)]
    assert all(p is not None for p in permits)
    granted = [p for p in permits if p is not None]
    for permit in granted:
        breaker.sent(permit)
    return granted


def stalled(breaker: CircuitBreaker) -> tuple[int, int]:
    metrics = breaker.get_metrics()
    return metrics["stalled"], metrics["stalled_streak"]


def test_the_threshold_is_slow_call_ms_else_a_fraction_of_the_first_token_timeout() -> None:
    assert CircuitBreakerConfig().stall_seconds == 0  # library default: rule off
    assert CircuitBreakerConfig(first_token_seconds=30).stall_seconds == 30 * STALL_FRACTION
    assert CircuitBreakerConfig(first_token_seconds=30, slow_call_ms=800).stall_seconds == 0.8
    assert CircuitBreakerConfig(first_token_seconds=30, stall_fraction=0).stall_seconds == 0
    for bad in ({"first_token_seconds": -1.0}, {"stall_fraction": 1.5}):
        with pytest.raises(ValueError, match="invalid breaker config"):
            CircuitBreakerConfig(**bad)  # type: ignore[arg-type]


def test_registry_derives_each_upstream_threshold_from_its_first_token_timeout() -> None:
    registry = BreakerRegistry(
        CircuitBreakerConfig(),
        {"b": BreakerOverrides(slow_call_ms=400)},
        first_token_seconds={"a": 10.0, "b": 10.0},
    )
    assert registry.get_or_create("a").config.stall_seconds == 10.0 * STALL_FRACTION
    assert registry.get_or_create("b").config.stall_seconds == 0.4
    assert registry.get_or_create("c").config.stall_seconds == 0  # no timeout known
    registry.configure(CircuitBreakerConfig(), {}, {"a": 2.0})
    assert registry.get_or_create("a").config.stall_seconds == 2.0 * STALL_FRACTION


def test_a_stalled_upstream_opens_after_threshold_stuck_attempts_not_a_timeout() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    stuck = grant(breaker, 3)
    clock.advance(STALL - 0.001)
    late = grant(breaker)  # nothing is stale yet: granted
    assert stalled(breaker) == (0, 0)
    clock.advance(0.001)  # the three first ones are exactly STALL old
    assert breaker.permit() is None  # the next request fails over at once
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]
    # The stuck ones end at their deadline: late results of the old generation, no effect.
    clock.advance(FIRST_TOKEN - STALL)
    for permit in stuck + late:
        breaker.record(permit, Outcome.FAILURE, FIRST_TOKEN * 1000)
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]
    assert breaker.get_metrics()["calls"] == 0  # nothing landed in the window


def test_a_stale_attempt_is_replaced_by_its_outcome_never_counted_twice() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, failure_threshold=5)
    stuck = grant(breaker, 3)
    clock.advance(STALL)
    assert state(breaker) is State.CLOSED
    assert stalled(breaker) == (3, 3)
    for permit in stuck:  # each provisional failure becomes a real one: still 3, not 6
        breaker.record(permit, Outcome.FAILURE)
    assert stalled(breaker) == (0, 0)
    assert breaker.get_metrics()["consecutive_failures"] == 3
    [fourth] = grant(breaker)
    breaker.record(fourth, Outcome.FAILURE)
    assert state(breaker) is State.CLOSED  # 4 of 5
    [fifth] = grant(breaker)
    breaker.record(fifth, Outcome.FAILURE)
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]


def test_stuck_attempts_that_then_succeed_leave_nothing_behind() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, failure_threshold=5)
    stuck = grant(breaker, 4)
    clock.advance(STALL + 1)
    assert stalled(breaker) == (4, 4)
    for permit in stuck:
        breaker.record(permit, Outcome.SUCCESS, (STALL + 1) * 1000)
    metrics = breaker.get_metrics()
    assert (metrics["stalled"], metrics["stalled_streak"]) == (0, 0)
    assert (metrics["calls"], metrics["failures"], metrics["consecutive_failures"]) == (4, 0, 0)
    # A full streak of real failures is needed again: the old provisional ones are gone.
    for _ in range(4):
        [permit] = grant(breaker)
        breaker.record(permit, Outcome.FAILURE)
    assert state(breaker) is State.CLOSED
    assert transitions.pairs == []


def test_a_trip_by_stale_attempts_is_not_undone_by_their_late_success() -> None:
    """Defined semantics: the open period runs out and probes decide, as after any trip."""
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, open_seconds=10)
    stuck = grant(breaker, 3)
    clock.advance(STALL)
    assert state(breaker) is State.OPEN
    clock.advance(1)
    for permit in stuck:
        breaker.record(permit, Outcome.SUCCESS, (STALL + 1) * 1000)
    assert state(breaker) is State.OPEN
    assert breaker.get_metrics()["calls"] == 0
    clock.advance(10)
    probes = grant(breaker, 3)
    assert all(p.probe for p in probes)
    for permit in probes:
        breaker.record(permit, Outcome.SUCCESS, 100)
    assert transitions.pairs == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]


def test_a_success_since_excuses_the_stale_attempts_from_the_streak() -> None:
    """A slow-but-answering upstream: stale attempts with successes between them never trip."""
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    slow = grant(breaker, 2)
    clock.advance(STALL)
    assert stalled(breaker) == (2, 2)
    [quick] = grant(breaker)
    breaker.record(quick, Outcome.SUCCESS, 50)
    assert stalled(breaker) == (2, 0)
    [third] = grant(breaker)
    clock.advance(STALL)
    assert stalled(breaker) == (3, 1)
    assert state(breaker) is State.CLOSED
    # An excused stale attempt that fails counts as a failure then, and only then.
    breaker.record(slow[0], Outcome.FAILURE)
    assert stalled(breaker) == (2, 1)
    assert breaker.get_metrics()["consecutive_failures"] == 1
    breaker.record(slow[1], Outcome.FAILURE)  # 2 real + 1 provisional (third) = 3
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]
    breaker.record(third, Outcome.FAILURE)  # late: no second transition
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]


def test_stale_attempts_count_toward_the_failure_rate() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, failure_threshold=0, min_throughput=4, failure_rate=0.5)
    for permit in grant(breaker, 2):
        breaker.record(permit, Outcome.SUCCESS, 100)
    grant(breaker, 1)
    clock.advance(STALL)
    assert state(breaker) is State.CLOSED  # 1 of 3 (and 3 < min_throughput)
    grant(breaker, 1)
    clock.advance(STALL)
    assert state(breaker) is State.OPEN  # (0 + 2) / (2 + 2) = 0.5
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]


@pytest.mark.parametrize("ending", ["ignored", "rate_limited", "released"])
def test_a_stale_attempt_that_says_nothing_about_health_leaves_the_counts(ending: str) -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    stuck = grant(breaker, 2)
    clock.advance(STALL)
    assert stalled(breaker) == (2, 2)
    if ending == "released":
        breaker.release(stuck[0])
    else:
        breaker.record(stuck[0], Outcome(ending))
    assert stalled(breaker) == (1, 1)
    metrics = breaker.get_metrics()
    assert (metrics["calls"], metrics["consecutive_failures"]) == (0, 0)
    grant(breaker, 1)
    clock.advance(STALL)
    assert transitions.pairs == []  # 2 stale of 3 needed
    assert stalled(breaker) == (2, 2)


def test_a_reset_forgets_the_attempts_in_flight() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    stuck = grant(breaker, 2)
    clock.advance(STALL)
    breaker.reset()  # closed -> closed: no transition, a new generation
    assert stalled(breaker) == (0, 0)
    for permit in stuck:
        breaker.record(permit, Outcome.FAILURE)
    assert breaker.get_metrics()["consecutive_failures"] == 0  # late results
    grant(breaker, 2)
    clock.advance(STALL)
    assert state(breaker) is State.CLOSED
    assert transitions.pairs == []


def test_probes_are_judged_by_the_hung_probe_rule_not_the_stall_rule() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, failure_threshold=1, open_seconds=10)
    [first] = grant(breaker)
    breaker.record(first, Outcome.FAILURE)
    clock.advance(10)
    grant(breaker, 3)  # probes
    clock.advance(STALL * 4)
    assert state(breaker) is State.HALF_OPEN
    assert stalled(breaker) == (0, 0)
    clock.advance(breaker.config.max_half_open_seconds)
    assert state(breaker) is State.OPEN


def test_monitor_only_runs_the_stall_rule_in_the_shadow() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, enabled=False)
    assert breaker.mode is Mode.MONITOR_ONLY
    grant(breaker, 3)
    clock.advance(STALL)
    permit = breaker.permit()
    assert permit is not None
    assert not permit.counted
    assert breaker.would_block == 1
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]


def test_turning_the_rule_off_keeps_stale_attempts_until_they_end() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=5)
    stuck = grant(breaker, 2)
    young = grant(breaker, 1)
    clock.advance(STALL)
    assert stalled(breaker) == (3, 3)
    [newer] = grant(breaker)
    breaker.reconfigure(CircuitBreakerConfig(failure_threshold=5, jitter=0.0))
    clock.advance(STALL * 2)
    assert stalled(breaker) == (3, 3)  # the newer one is no longer tracked
    for permit in [*stuck, *young, newer]:
        breaker.record(permit, Outcome.SUCCESS, 100)
    assert stalled(breaker) == (0, 0)


def test_reads_agree_with_permit() -> None:
    """``can_permit`` and ``state`` see the stall trip a permit would see (lazy, no timer)."""
    clock = FakeClock()
    breaker = make(clock)
    grant(breaker, 3)
    clock.advance(STALL)
    assert not breaker.can_permit()
    assert state(breaker) is State.OPEN
    assert breaker.retry_after_seconds() == pytest.approx(breaker.config.open_seconds)


def test_quick_traffic_keeps_the_tracking_short() -> None:
    """Permit and record stay O(1) amortised: reported calls leave the FIFO as it is walked."""
    clock = FakeClock()
    breaker = make(clock, failure_threshold=5)
    [head] = grant(breaker)  # one long call holds the front
    for _ in range(20_000):
        [permit] = grant(breaker)
        clock.advance(0.001)
        breaker.record(permit, Outcome.SUCCESS, 1)
    assert stalled(breaker) == (1, 0)  # the head went stale; later successes excused it
    breaker.record(head, Outcome.SUCCESS, 1)
    assert stalled(breaker) == (0, 0)
    assert breaker.get_metrics()["stall_tracked"] == 0


def test_a_call_that_answered_is_never_stalled_however_long_it_streams() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions, failure_threshold=1)
    streams = grant(breaker, 3)
    clock.advance(0.2)
    for permit in streams:
        breaker.first_token(permit)  # the first content event arrived
    clock.advance(600)  # minutes of streaming
    assert stalled(breaker) == (0, 0)
    assert state(breaker) is State.CLOSED
    for permit in streams:
        breaker.record(permit, Outcome.SUCCESS, 200)
    assert transitions.pairs == []


def test_a_late_first_token_withdraws_the_provisional_failure() -> None:
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    slow = grant(breaker, 2)
    clock.advance(STALL)
    assert stalled(breaker) == (2, 2)
    breaker.first_token(slow[0])
    breaker.first_token(slow[0])  # once only
    assert stalled(breaker) == (1, 1)
    grant(breaker, 1)
    clock.advance(STALL)
    assert stalled(breaker) == (2, 2)
    assert state(breaker) is State.CLOSED  # 2 of 3
    breaker.record(slow[0], Outcome.FAILURE)  # its real outcome counts, once
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]


def test_waiting_before_the_request_left_is_never_a_stall() -> None:
    """Time queued for the proxy's own resources (a pooled connection) does not age a call."""
    clock, transitions = FakeClock(), Transitions()
    breaker = make(clock, transitions)
    waiting = [breaker.permit() for _ in range(5)]
    assert all(p is not None for p in waiting)
    clock.advance(STALL * 10)  # queued far past the threshold, never sent
    assert breaker.permit() is not None
    assert stalled(breaker) == (0, 0)
    assert transitions.pairs == []
    for permit in waiting:
        assert permit is not None
        breaker.sent(permit)  # the slots came free: the requests leave now
    clock.advance(STALL / 2)
    assert breaker.permit() is not None
    assert stalled(breaker) == (0, 0)
    clock.advance(STALL)
    breaker.permit()  # aged from when they left: now they count, and open the breaker
    assert transitions.pairs == [(State.CLOSED, State.OPEN)]
