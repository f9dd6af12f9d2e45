"""The breaker state machine against docs/breaker.md, 'Tests a trustworthy breaker passes'.

Cases are numbered as in the spec; 18 is in test_ratelimit.py, and 20-24 and 28
are end-to-end tests of the proxy. Fake clock and seeded RNG, no sleeps.
"""

from __future__ import annotations

import asyncio
import json
import random
from collections.abc import Callable

import pytest
from prometheus_client import CollectorRegistry

from proxy.config.model import BreakerOverrides
from proxy.core.breaker import (
    MAX_RETRY_AFTER_OPEN_SECONDS,
    STATE_VALUES,
    TRANSITIONS,
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    Event,
    Mode,
    State,
)
from proxy.core.breaker_registry import BreakerRegistry
from proxy.core.outcome import Outcome, classify_status
from proxy.core.ratelimit import parse_retry_after
from proxy.server.metrics import Metrics

T0 = 1000.0  # a whole second, so bucket boundaries fall on round numbers


class FakeClock:
    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


class Transitions:
    """on_transition callback that keeps every (from, to) pair."""

    def __init__(self) -> None:
        self.pairs: list[tuple[State, State]] = []

    def __call__(self, name: str, source: State, target: State) -> None:
        self.pairs.append((source, target))


def make(
    clock: FakeClock, transitions: Transitions | None = None, /, **settings: float
) -> CircuitBreaker:
    config = CircuitBreakerConfig(**{"jitter": 0.0, **settings})  # type: ignore[arg-type]
    return CircuitBreaker(
        "up", config, clock=clock, rng=random.Random(7), on_transition=transitions
    )


def report(breaker: CircuitBreaker, outcome: Outcome, count: int = 1) -> None:
    for _ in range(count):
        permit = breaker.permit()
        assert permit is not None
        breaker.record(permit, outcome)


def state(breaker: CircuitBreaker) -> State:
    """The state, read through a call so mypy does not narrow it between reads."""
    return breaker.state


def trip_and_wait(breaker: CircuitBreaker, clock: FakeClock) -> None:
    """Trip a breaker with failure_threshold=1 and move to the end of its open period."""
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN
    clock.advance(breaker.get_metrics()["open_until"])


# -- closed: the opening rules -------------------------------------------------------


def test_01_below_min_throughput_never_opens_and_rate_is_minus_one() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=0, min_throughput=10)
    report(breaker, Outcome.FAILURE, 9)
    assert state(breaker) is State.CLOSED
    assert breaker.error_rate() == -1
    assert breaker.success_ratio() == 0.0
    assert seen.pairs == []
    report(breaker, Outcome.FAILURE)  # the 10th call makes the ratio count
    assert state(breaker) is State.OPEN


def test_02_half_failures_open_on_the_tenth_result_exactly_once() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, min_throughput=10, failure_rate=0.5)
    permits = [breaker.permit() for _ in range(14)]
    outcomes = [Outcome.FAILURE, Outcome.SUCCESS] * 5 + [Outcome.FAILURE] * 4
    for index, (permit, outcome) in enumerate(zip(permits, outcomes, strict=True), start=1):
        assert permit is not None
        breaker.record(permit, outcome)
        assert state(breaker) is (State.OPEN if index >= 10 else State.CLOSED), index
    assert seen.pairs == [(State.CLOSED, State.OPEN)]
    assert breaker.error_rate() == 0.5  # the late failures landed in no window


@pytest.mark.parametrize(("gap", "opens"), [(59.9, True), (60.0, False)])
def test_03_window_evicts_at_the_bucket_boundary(gap: float, opens: bool) -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=0, min_throughput=2, failure_rate=1.0)
    report(breaker, Outcome.FAILURE)
    clock.advance(gap)
    assert breaker.get_metrics()["calls"] == (1 if opens else 0)
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is (State.OPEN if opens else State.CLOSED)


def test_04_consecutive_rule_resets_on_success() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=5, min_throughput=1000)
    for outcome in [Outcome.FAILURE] * 4 + [Outcome.SUCCESS]:
        report(breaker, outcome)
    assert breaker.get_metrics()["consecutive_failures"] == 0
    report(breaker, Outcome.FAILURE, 4)
    assert state(breaker) is State.CLOSED
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN


# -- open ------------------------------------------------------------------------------


def test_05_open_boundary_is_exact() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, open_seconds=30)
    report(breaker, Outcome.FAILURE)
    clock.now = T0 + 29.999
    assert breaker.permit() is None
    assert breaker.retry_at() == T0 + 30
    clock.now = T0 + 30.0
    probe = breaker.permit()
    assert probe is not None
    assert probe.probe
    assert state(breaker) is State.HALF_OPEN


def test_06_reading_state_after_open_until_is_deterministic() -> None:
    clock = FakeClock()
    seen = [Transitions(), Transitions()]
    twins = [
        CircuitBreaker(
            "up",
            CircuitBreakerConfig(failure_threshold=1),
            clock=clock,
            rng=random.Random(42),
            on_transition=seen[i],
        )
        for i in range(2)
    ]
    for breaker in twins:
        report(breaker, Outcome.FAILURE)
    open_for = [b.get_metrics()["open_until"] for b in twins]
    assert open_for[0] == open_for[1]
    assert 9.0 <= open_for[0] <= 11.0
    clock.advance(open_for[0])
    for breaker, transitions in zip(twins, seen, strict=True):
        assert [breaker.state for _ in range(3)] == [State.HALF_OPEN] * 3
        assert transitions.pairs == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]
        assert breaker.get_metrics()["half_open"]["in_flight"] == 0  # reading took no slot
        assert [breaker.permit() is not None for _ in range(4)] == [True, True, True, False]


# -- half-open -------------------------------------------------------------------------


def test_07_half_open_lets_exactly_three_through() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1)
    trip_and_wait(breaker, clock)
    granted = [p for p in (breaker.permit() for _ in range(10)) if p is not None]
    assert len(granted) == 3
    assert all(p.probe for p in granted)
    assert breaker.get_metrics()["rejected"] == 7


def test_08_all_probes_succeed_closes_with_a_fresh_window() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1)
    trip_and_wait(breaker, clock)
    probes = [breaker.permit() for _ in range(3)]
    for probe in probes:
        assert probe is not None
        breaker.record(probe, Outcome.SUCCESS, latency_ms=50)
    assert state(breaker) is State.CLOSED
    metrics = breaker.get_metrics()
    assert (metrics["calls"], metrics["opens"], metrics["error_rate"]) == (0, 0, -1)
    assert breaker.latency_p95_ms() == -1
    assert seen.pairs[-1] == (State.HALF_OPEN, State.CLOSED)
    report(breaker, Outcome.FAILURE)
    assert breaker.get_metrics()["open_until"] == 10.0  # back to the first duration


def test_09_failed_probes_reopen_for_twice_as_long() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1)
    trip_and_wait(breaker, clock)
    probes = [breaker.permit() for _ in range(3)]
    assert probes[0] is not None
    assert probes[1] is not None
    breaker.record(probes[0], Outcome.FAILURE)
    assert state(breaker) is State.HALF_OPEN  # 1 of 3 failed: closing is still possible
    breaker.record(probes[1], Outcome.FAILURE)  # 2 of 3: the ratio can no longer be under 0.5
    assert state(breaker) is State.OPEN
    assert breaker.get_metrics()["open_until"] == 20.0
    assert seen.pairs[-1] == (State.HALF_OPEN, State.OPEN)


def test_09_one_failed_probe_of_three_still_closes() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1)
    trip_and_wait(breaker, clock)
    probes = [breaker.permit() for _ in range(3)]
    for probe, outcome in zip(
        probes, [Outcome.SUCCESS, Outcome.FAILURE, Outcome.SUCCESS], strict=True
    ):
        assert probe is not None
        breaker.record(probe, outcome)
    assert state(breaker) is State.CLOSED


def test_10_open_durations_double_up_to_the_cap_and_reset_after_closing() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, half_open_probes=1)
    durations = []
    report(breaker, Outcome.FAILURE)
    for _ in range(5):
        durations.append(breaker.get_metrics()["open_until"])
        clock.advance(durations[-1])
        report(breaker, Outcome.FAILURE)  # the probe fails
    assert durations == [10, 20, 40, 60, 60]
    clock.advance(breaker.get_metrics()["open_until"])
    report(breaker, Outcome.SUCCESS)
    assert state(breaker) is State.CLOSED
    report(breaker, Outcome.FAILURE)
    assert breaker.get_metrics()["open_until"] == 10


def test_10_jitter_stays_within_ten_percent() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "up", CircuitBreakerConfig(failure_threshold=1), clock=clock, rng=random.Random(3)
    )
    durations = []
    for _ in range(200):
        report(breaker, Outcome.FAILURE)
        durations.append(breaker.get_metrics()["open_until"])
        breaker.reset()
    assert all(9.0 <= d <= 11.0 for d in durations)
    assert max(durations) - min(durations) > 1.5  # actually jittered, not constant


@pytest.mark.parametrize("outcome", [Outcome.IGNORED, Outcome.RATE_LIMITED])
def test_11_ignored_result_in_half_open_returns_its_slot(outcome: Outcome) -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1)
    trip_and_wait(breaker, clock)
    probes = [breaker.permit() for _ in range(3)]
    assert breaker.permit() is None
    before = breaker.get_metrics()
    assert probes[0] is not None
    breaker.record(probes[0], outcome)
    after = breaker.get_metrics()
    assert after["half_open"] == {**before["half_open"], "in_flight": 2}
    assert (after["state"], after["calls"], len(seen.pairs)) == ("half_open", before["calls"], 2)
    assert breaker.permit() is not None


def test_12_cancelled_probes_release_their_slots() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1)
    trip_and_wait(breaker, clock)
    for _ in range(5):  # cancel every probe, repeatedly: the breaker never gets stuck
        probes = [breaker.permit() for _ in range(3)]
        assert breaker.permit() is None
        for probe in probes:
            assert probe is not None
            breaker.release(probe)
    report(breaker, Outcome.SUCCESS, 3)
    assert state(breaker) is State.CLOSED


async def test_12_cancelled_call_returns_its_probe_slot() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, half_open_probes=1)
    trip_and_wait(breaker, clock)
    started, never = asyncio.Event(), asyncio.Event()

    async def hang() -> None:
        started.set()
        await never.wait()

    task = asyncio.create_task(breaker.call(hang))
    await started.wait()
    assert not breaker.can_permit()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert breaker.can_permit()
    assert breaker.get_metrics()["reports"]["released"] == 1
    assert state(breaker) is State.HALF_OPEN


def test_13_hung_probe_reopens_and_its_late_result_is_ignored() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1, max_half_open_seconds=120)
    trip_and_wait(breaker, clock)
    hung = breaker.permit()
    assert hung is not None
    clock.advance(119.999)
    assert state(breaker) is State.HALF_OPEN
    clock.advance(0.001)
    assert state(breaker) is State.OPEN
    assert breaker.get_metrics()["open_until"] == 20.0  # a re-open: the longer duration
    transitions = len(seen.pairs)
    breaker.record(hung, Outcome.SUCCESS)
    assert state(breaker) is State.OPEN
    assert len(seen.pairs) == transitions


def test_13_hung_deadline_counts_from_the_probe_not_the_half_open_start() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, max_half_open_seconds=120)
    trip_and_wait(breaker, clock)
    assert state(breaker) is State.HALF_OPEN
    clock.advance(500)  # no traffic for a while
    probe = breaker.permit()
    assert probe is not None
    clock.advance(60)
    assert state(breaker) is State.HALF_OPEN


@pytest.mark.parametrize("outcome", [Outcome.SUCCESS, Outcome.FAILURE])
def test_14_call_from_before_the_open_is_not_a_probe(outcome: Outcome) -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=2)
    old = breaker.permit()
    assert old is not None
    report(breaker, Outcome.FAILURE, 2)
    clock.advance(10)
    assert state(breaker) is State.HALF_OPEN
    breaker.record(old, outcome)
    metrics = breaker.get_metrics()
    assert metrics["half_open"] == {"slots": 3, "in_flight": 0, "succeeded": 0, "failed": 0}
    assert metrics["state"] == "half_open"
    assert len(seen.pairs) == 2


def test_15_reporting_twice_is_a_no_op() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=2, min_throughput=100)
    permit = breaker.permit()
    assert permit is not None
    breaker.record(permit, Outcome.FAILURE)
    breaker.record(permit, Outcome.FAILURE)
    breaker.release(permit)
    assert state(breaker) is State.CLOSED
    metrics = breaker.get_metrics()
    assert (metrics["calls"], metrics["consecutive_failures"]) == (1, 1)
    assert metrics["reports"] == {
        "success": 0,
        "failure": 1,
        "rate_limited": 0,
        "ignored": 0,
        "released": 0,
    }
    released = breaker.permit()
    assert released is not None
    breaker.release(released)
    breaker.record(released, Outcome.FAILURE)
    assert state(breaker) is State.CLOSED
    assert breaker.get_metrics()["reports"]["released"] == 1


# -- outcomes --------------------------------------------------------------------------

OUTCOME_TABLE = [
    (200, None, False, Outcome.SUCCESS),
    (201, None, False, Outcome.SUCCESS),
    (500, None, False, Outcome.FAILURE),
    (502, None, False, Outcome.FAILURE),
    (503, None, False, Outcome.FAILURE),
    (504, None, False, Outcome.FAILURE),
    (529, None, False, Outcome.FAILURE),  # Anthropic overloaded
    (408, None, False, Outcome.FAILURE),
    (402, None, False, Outcome.FAILURE),
    (429, "insufficient_quota", False, Outcome.FAILURE),
    (401, "invalid_api_key", False, Outcome.FAILURE),  # the proxy's own key
    (403, None, False, Outcome.FAILURE),
    (429, None, False, Outcome.RATE_LIMITED),
    (429, "rate_limit_exceeded", False, Outcome.RATE_LIMITED),
    (401, "invalid_api_key", True, Outcome.IGNORED),  # a key the client supplied
    (403, None, True, Outcome.IGNORED),
    (400, None, False, Outcome.IGNORED),
    (404, "model_not_found", False, Outcome.IGNORED),
    (409, None, False, Outcome.IGNORED),
    (413, None, False, Outcome.IGNORED),
    (415, None, False, Outcome.IGNORED),
    (422, None, False, Outcome.IGNORED),
]


@pytest.mark.parametrize(("status", "code", "client_key", "expected"), OUTCOME_TABLE)
def test_16_outcome_table_row_by_row(
    status: int, code: str | None, client_key: bool, expected: Outcome
) -> None:
    outcome = classify_status(status, code, client_key=client_key)
    assert outcome is expected
    clock = FakeClock()
    closed = make(clock, failure_threshold=1, min_throughput=1)
    report(closed, outcome)
    assert state(closed) is (State.OPEN if outcome is Outcome.FAILURE else State.CLOSED)
    assert closed.get_metrics()["calls"] == (0 if outcome in _NO_WEIGHT else 1)

    probing = make(clock, failure_threshold=1, half_open_probes=1)
    trip_and_wait(probing, clock)
    report(probing, outcome)
    assert state(probing) is _AFTER_PROBE[outcome]
    assert probing.can_permit() is (outcome is not Outcome.FAILURE)


_NO_WEIGHT = (Outcome.RATE_LIMITED, Outcome.IGNORED)
_AFTER_PROBE = {
    Outcome.SUCCESS: State.CLOSED,
    Outcome.FAILURE: State.OPEN,
    Outcome.RATE_LIMITED: State.HALF_OPEN,  # the slot came back
    Outcome.IGNORED: State.HALF_OPEN,
}


def test_17_a_flood_of_400s_never_opens() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1, min_throughput=1)
    for _ in range(1000):
        report(breaker, classify_status(400))
        clock.advance(0.01)
    assert state(breaker) is State.CLOSED
    assert seen.pairs == []
    assert breaker.error_rate() == -1


async def test_19_retry_after_keeps_the_breaker_open_and_the_503_carries_it() -> None:
    clock = FakeClock()
    breaker = CircuitBreaker(
        "up", CircuitBreakerConfig(failure_threshold=1), clock=clock, rng=random.Random(1)
    )
    permit = breaker.permit()
    assert permit is not None
    wait = parse_retry_after({"Retry-After": "120"}, now_wall=1.7e9)
    breaker.record(permit, classify_status(503), retry_after=wait)
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(_never_called)
    assert caught.value.retry_after == 120
    assert caught.value.headers == {"Retry-After": "120", "retry-after-ms": "120000"}
    assert (caught.value.http_status, caught.value.code) == (503, "circuit_open")
    clock.advance(119.999)
    assert breaker.permit() is None
    clock.advance(0.001)
    assert breaker.permit() is not None


def test_19_retry_after_extension_is_capped() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1)
    permit = breaker.permit()
    assert permit is not None
    breaker.record(permit, Outcome.FAILURE, retry_after=86400)
    assert breaker.retry_after_seconds() == MAX_RETRY_AFTER_OPEN_SECONDS


def test_19_late_failure_with_retry_after_extends_an_open_period() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1)
    late = breaker.permit()
    assert late is not None
    report(breaker, Outcome.FAILURE)
    breaker.record(late, Outcome.FAILURE, retry_after=45)
    assert breaker.retry_after_seconds() == 45


async def _never_called() -> None:
    raise AssertionError("the breaker should have rejected the call")


# -- slow calls, monitor-only, admin ------------------------------------------------------


def test_25_slow_first_token_counts_as_slow_a_fast_long_stream_does_not() -> None:
    clock = FakeClock()
    settings = {
        "failure_threshold": 0,
        "min_throughput": 4,
        "slow_call_ms": 1000.0,
        "window_seconds": 600.0,
        "open_seconds": 600.0,
        "max_open_seconds": 600.0,
    }
    slow, fast = make(clock, **settings), make(clock, **settings)
    for _ in range(4):
        for breaker, first_token_ms in ((slow, 1500.0), (fast, 200.0)):
            permit = breaker.permit()
            assert permit is not None
            clock.advance(30)  # a long stream: its total time is not the first-token latency
            breaker.record(permit, Outcome.SUCCESS, latency_ms=first_token_ms)
    assert (state(slow), state(fast)) == (State.OPEN, State.CLOSED)
    assert (slow.get_metrics()["slow_calls"], fast.get_metrics()["slow_calls"]) == (4, 0)


def test_25_slow_rule_is_off_by_default() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=0, min_throughput=4)
    for _ in range(10):
        permit = breaker.permit()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, latency_ms=90_000)
    assert state(breaker) is State.CLOSED
    assert 90_000 * 0.95 <= breaker.latency_p95_ms() <= 90_000 * 1.05


def test_26_monitor_only_passes_everything_while_the_shadow_opens() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=3, enabled=False)
    assert breaker.mode is Mode.MONITOR_ONLY
    report(breaker, Outcome.FAILURE, 3)
    assert state(breaker) is State.OPEN
    shadowed = [breaker.permit() for _ in range(10)]
    assert all(p is not None and not p.counted for p in shadowed)
    for permit in shadowed:
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS)  # no weight: the shadow stays open
    metrics = breaker.get_metrics()
    assert (metrics["state"], metrics["mode"], metrics["would_block"]) == (
        "open",
        "monitor_only",
        10,
    )
    clock.advance(10)
    probes = [breaker.permit() for _ in range(5)]
    assert [p is not None and p.probe for p in probes] == [True] * 3 + [False] * 2
    assert breaker.get_metrics()["would_block"] == 12
    for probe in probes[:3]:
        assert probe is not None
        breaker.record(probe, Outcome.SUCCESS)
    assert state(breaker) is State.CLOSED
    assert seen.pairs == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
    ]
    breaker.enforce()
    report(breaker, Outcome.FAILURE, 3)
    assert breaker.permit() is None


def test_26_monitor_only_from_the_environment() -> None:
    config = CircuitBreakerConfig.from_env({"CIRCUIT_BREAKER_ENABLED": "false"})
    assert CircuitBreaker("up", config).mode is Mode.MONITOR_ONLY


async def test_27_forced_open_survives_the_wait_and_rejects_even_in_monitor_mode() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen)
    breaker.force_open()
    breaker.force_open()
    clock.advance(1e6)
    assert state(breaker) is State.FORCED_OPEN
    assert breaker.permit() is None
    breaker.set_monitor_only(True)
    assert breaker.permit() is None
    assert breaker.retry_after_seconds() is None
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(_never_called)
    assert caught.value.retry_after is None
    assert caught.value.headers == {}
    assert seen.pairs == [(State.CLOSED, State.FORCED_OPEN)]


def test_27_disabled_permits_everything_and_records_nothing() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=1, min_throughput=1)
    breaker.disable()
    report(breaker, Outcome.FAILURE, 50)
    metrics = breaker.get_metrics()
    assert (metrics["state"], metrics["calls"], metrics["error_rate"]) == ("disabled", 0, -1)
    assert seen.pairs == [(State.CLOSED, State.DISABLED)]
    breaker.reset()
    assert state(breaker) is State.CLOSED
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN


def test_27_reset_emits_only_when_the_state_changes_and_starts_fresh() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=5, min_throughput=100)
    in_flight = breaker.permit()
    assert in_flight is not None
    report(breaker, Outcome.FAILURE, 3)
    breaker.reset()
    assert seen.pairs == []
    breaker.record(in_flight, Outcome.FAILURE)  # from before the reset: no weight
    report(breaker, Outcome.FAILURE, 4)
    assert state(breaker) is State.CLOSED
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN
    clock.advance(10)
    report(breaker, Outcome.FAILURE, 2)  # failed probes: open for 20 s
    assert breaker.get_metrics()["open_until"] == 20
    breaker.reset()
    assert seen.pairs[-1] == (State.OPEN, State.CLOSED)
    assert breaker.get_metrics()["opens"] == 0
    report(breaker, Outcome.FAILURE, 5)
    assert breaker.get_metrics()["open_until"] == 10


def test_transitions_table_covers_every_state_for_admin_events() -> None:
    for state in State:
        assert TRANSITIONS[(state, Event.RESET)] is State.CLOSED
        assert TRANSITIONS[(state, Event.FORCE_OPEN)] is State.FORCED_OPEN
        assert TRANSITIONS[(state, Event.DISABLE)] is State.DISABLED


def test_health_check_helpers_trip_and_end_the_open_period_early() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen)
    breaker.trip()
    assert state(breaker) is State.OPEN
    breaker.trip()  # already open: nothing
    clock.advance(3)
    breaker.end_open_period()
    assert state(breaker) is State.HALF_OPEN  # the next real request is a probe; not closed
    assert seen.pairs == [(State.CLOSED, State.OPEN), (State.OPEN, State.HALF_OPEN)]


# -- gauges and counters, races ---------------------------------------------------------


def test_29_exported_gauges_and_counters_agree_at_every_step() -> None:
    clock, seen = FakeClock(), Transitions()
    metrics = Metrics(CollectorRegistry())
    breakers = BreakerRegistry(
        CircuitBreakerConfig(failure_threshold=3, jitter=0.0), clock=clock, rng=random.Random(0)
    )

    def on_transition(name: str, source: State, target: State) -> None:
        seen(name, source, target)
        metrics.transitions.labels(name, source.value, target.value).inc()

    breakers.on_transition = on_transition
    metrics.bind_breakers(breakers)
    breaker = breakers.get_or_create("up")

    def check() -> None:
        sample = metrics.registry.get_sample_value
        labels = {"upstream": "up"}
        assert sample("circuit_breaker_state", labels) == STATE_VALUES[breaker.state.value]
        assert sample("circuit_breaker_error_rate", labels) == breaker.error_rate()
        assert sample("circuit_breaker_latency_p95", labels) == breaker.latency_p95_ms()
        for source, target in {*seen.pairs, (State.CLOSED, State.OPEN)}:
            counted = sample(
                "circuit_breaker_transitions_total",
                {"upstream": "up", "from_state": source.value, "to_state": target.value},
            )
            assert (counted or 0) == seen.pairs.count((source, target))

    def latency(ms: float) -> None:
        permit = breaker.permit()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, latency_ms=ms)

    steps: list[Callable[[], object]] = [
        lambda: latency(100),
        lambda: latency(400),
        lambda: report(breaker, Outcome.FAILURE, 3),
        lambda: clock.advance(5),
        lambda: clock.advance(5),  # open period over: the scrape itself sees half-open
        lambda: report(breaker, Outcome.FAILURE, 2),
        lambda: clock.advance(20),
        lambda: report(breaker, Outcome.SUCCESS, 3),
        breaker.force_open,
        breaker.disable,
        breaker.reset,
        lambda: clock.advance(61),
    ]
    check()
    for step in steps:
        step()
        check()
    assert seen.pairs == [
        (State.CLOSED, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.OPEN),
        (State.OPEN, State.HALF_OPEN),
        (State.HALF_OPEN, State.CLOSED),
        (State.CLOSED, State.FORCED_OPEN),
        (State.FORCED_OPEN, State.DISABLED),
        (State.DISABLED, State.CLOSED),
    ]


async def test_30_fifty_simultaneous_failures_trip_exactly_once() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=5)
    go, all_waiting = asyncio.Event(), asyncio.Event()
    waiting = 0

    async def failing() -> None:
        nonlocal waiting
        waiting += 1
        if waiting == 50:
            all_waiting.set()
        await go.wait()
        raise ConnectionRefusedError("upstream down")

    tasks = [asyncio.create_task(breaker.call(failing)) for _ in range(50)]
    await all_waiting.wait()
    go.set()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    assert all(isinstance(r, ConnectionRefusedError) for r in results)
    assert seen.pairs == [(State.CLOSED, State.OPEN)]
    assert breaker.get_metrics()["failures"] == 5  # the other 45 were late: no weight
    with pytest.raises(CircuitOpenError):
        await breaker.call(_never_called)


# -- the library shape, config, registry ----------------------------------------------------


async def test_library_shape_from_the_issue() -> None:
    breaker = CircuitBreaker(
        "name", config=CircuitBreakerConfig(failure_threshold=3, min_throughput=1)
    )

    async def ok(value: int) -> int:
        return value

    async def boom() -> None:
        raise RuntimeError("down")

    assert await breaker.call(ok, 7) == 7
    for _ in range(3):
        with pytest.raises((RuntimeError, CircuitOpenError)):
            await breaker.call(boom)
    assert breaker.state.value == "open"
    with pytest.raises(CircuitOpenError) as caught:
        await breaker.call(ok, 1)
    assert caught.value.retry_after is not None
    assert 0 < caught.value.retry_after <= 11
    snapshot = breaker.get_metrics()
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert (snapshot["name"], snapshot["state"]) == ("name", "open")


def test_config_from_env_reads_the_documented_variables() -> None:
    config = CircuitBreakerConfig.from_env(
        {
            "CIRCUIT_BREAKER_ENABLED": "TRUE",
            "CB_FAILURE_THRESHOLD": "7",
            "CB_MIN_THROUGHPUT": "20",
            "CB_TIMEOUT_SECONDS": "90",
        }
    )
    assert (config.enabled, config.failure_threshold, config.min_throughput) == (True, 7, 20)
    assert (config.open_seconds, config.max_open_seconds) == (90, 90)
    assert CircuitBreakerConfig.from_env({"CB_MIN_THROUGHPUT": ""}) == CircuitBreakerConfig()


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("CIRCUIT_BREAKER_ENABLED", "maybe"),
        ("CB_FAILURE_THRESHOLD", "five"),
        ("CB_FAILURE_THRESHOLD", "2.5"),
        ("CB_MIN_THROUGHPUT", "0"),
        ("CB_TIMEOUT_SECONDS", "-1"),
        ("CB_TIMEOUT_SECONDS", "nan"),
    ],
)
def test_config_from_env_rejects_bad_values(name: str, value: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}="):
        CircuitBreakerConfig.from_env({name: value})


@pytest.mark.parametrize(
    "settings",
    [
        {"failure_rate": 0.0},
        {"failure_rate": 1.5},
        {"min_throughput": 0},
        {"window_seconds": 0.5},
        {"open_seconds": 0},
        {"open_seconds": 90, "max_open_seconds": 60},
        {"half_open_probes": 0},
        {"slow_call_ms": -1},
        {"slow_call_rate": 0},
        {"jitter": 1.0},
        {"failure_threshold": True},
    ],
)
def test_config_rejects_bad_values(settings: dict[str, float]) -> None:
    with pytest.raises(ValueError, match="invalid breaker config"):
        CircuitBreakerConfig(**settings)  # type: ignore[arg-type]


def test_config_overrides_replace_only_what_is_given() -> None:
    base = CircuitBreakerConfig(min_throughput=20)
    merged = base.with_overrides(BreakerOverrides(failure_threshold=2, open_seconds=120))
    assert (merged.failure_threshold, merged.min_throughput) == (2, 20)
    assert (merged.open_seconds, merged.max_open_seconds) == (120, 120)
    assert base.with_overrides(BreakerOverrides()) == base
    with pytest.raises(ValueError, match="failure_rate"):
        base.with_overrides(BreakerOverrides(failure_rate=2.0))


def test_registry_creates_on_demand_with_overrides_and_resets_all() -> None:
    clock = FakeClock()
    breakers = BreakerRegistry(
        CircuitBreakerConfig(failure_threshold=4),
        {"anthropic": BreakerOverrides(failure_threshold=1)},
        clock=clock,
    )
    assert breakers.breaker_gauges() == []
    openai, anthropic = breakers.get_or_create("openai"), breakers.get_or_create("anthropic")
    assert breakers.get_or_create("openai") is openai
    assert (openai.config.failure_threshold, anthropic.config.failure_threshold) == (4, 1)
    report(anthropic, Outcome.FAILURE)
    # one failure opened it; the rate stays -1 below min_throughput (10 by default)
    assert breakers.breaker_gauges() == [("openai", 0, -1.0, -1.0), ("anthropic", 2, -1.0, -1.0)]
    assert set(breakers.get_all()) == {"openai", "anthropic"}
    breakers.reset_all()
    assert state(anthropic) is State.CLOSED
    breakers.configure(CircuitBreakerConfig(failure_threshold=2), {})
    assert anthropic.config.failure_threshold == 2


def test_registry_get_only_looks_up_and_creation_is_explicit() -> None:
    breakers = BreakerRegistry(CircuitBreakerConfig(failure_threshold=4), clock=FakeClock())
    assert breakers.get("svc") is None
    assert breakers.get_all() == {}  # a lookup created nothing
    own = CircuitBreakerConfig(failure_threshold=2, jitter=0.0)
    svc = breakers.get_or_create("svc", config=own)
    assert breakers.get("svc") is svc
    assert breakers.get_or_create("svc") is svc
    assert svc.config is own
    with pytest.raises(ValueError, match="already exists"):
        breakers.create("svc")
    other = breakers.create("other")
    assert other.config.failure_threshold == 4
    breakers.configure(CircuitBreakerConfig(failure_threshold=7), {})
    # a config given at creation stays; the registry's settings apply to the others
    assert (svc.config.failure_threshold, other.config.failure_threshold) == (2, 7)


def test_state_predicates_follow_the_state() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=1, open_seconds=10, max_open_seconds=10)
    assert (breaker.is_closed, breaker.is_open, breaker.is_half_open) == (True, False, False)
    report(breaker, Outcome.FAILURE)
    assert (breaker.is_closed, breaker.is_open, breaker.is_half_open) == (False, True, False)
    clock.advance(10)
    assert (breaker.is_closed, breaker.is_open, breaker.is_half_open) == (False, False, True)
    breaker.force_open()
    assert breaker.is_open
    breaker.disable()
    assert (breaker.is_closed, breaker.is_open, breaker.is_half_open) == (False, False, False)


def test_failure_threshold_three_with_min_throughput_one_opens_on_the_third_failure() -> None:
    clock, seen = FakeClock(), Transitions()
    breaker = make(clock, seen, failure_threshold=3, min_throughput=1)
    report(breaker, Outcome.FAILURE, 2)
    assert state(breaker) is State.CLOSED  # the ratio is 1.0, but only two failures
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN
    assert seen.pairs == [(State.CLOSED, State.OPEN)]


def test_the_rate_rule_needs_failure_threshold_failures_in_the_window() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=3, min_throughput=1, failure_rate=0.5)
    for outcome in [Outcome.FAILURE, Outcome.SUCCESS, Outcome.FAILURE, Outcome.SUCCESS]:
        report(breaker, outcome)
        assert state(breaker) is State.CLOSED  # never more than two failures
    report(breaker, Outcome.FAILURE)  # 3 of 5 failed, none consecutive beyond one
    assert state(breaker) is State.OPEN


def test_with_the_consecutive_rule_off_the_rate_rule_needs_only_min_throughput() -> None:
    clock = FakeClock()
    breaker = make(clock, failure_threshold=0, min_throughput=1)
    report(breaker, Outcome.FAILURE)
    assert state(breaker) is State.OPEN


async def test_the_guide_call_sequence_opens_on_the_third_of_five_failures() -> None:
    breaker = CircuitBreaker(
        "test", config=CircuitBreakerConfig(failure_threshold=3, min_throughput=1)
    )

    async def failing_call() -> None:
        raise RuntimeError("Service down")

    raised: list[type[BaseException]] = []
    for _ in range(5):
        try:
            await breaker.call(failing_call)
        except Exception as exc:  # the guide catches everything and prints the state
            raised.append(type(exc))
    assert raised == [RuntimeError] * 3 + [CircuitOpenError] * 2
    assert breaker.state.value == "open"
    assert breaker.get_metrics()["failures"] == 3


def test_p95_reads_the_window_within_five_percent() -> None:
    clock = FakeClock()
    breaker = make(clock)
    assert breaker.latency_p95_ms() == -1
    for ms in range(1, 101):  # 1..100 ms: p95 is 95 ms
        permit = breaker.permit()
        assert permit is not None
        breaker.record(permit, Outcome.SUCCESS, latency_ms=float(ms))
    assert 95 * 0.95 <= breaker.latency_p95_ms() <= 95 * 1.05
    clock.advance(60)
    assert breaker.latency_p95_ms() == -1
