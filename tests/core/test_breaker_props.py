"""Property test: random sequences of clock moves, calls, reports and admin orders
never break the breaker's invariants (proxy/core/breaker.py module docstring)."""

from __future__ import annotations

import random

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from proxy.core.breaker import (
    STATE_VALUES,
    CircuitBreaker,
    CircuitBreakerConfig,
    Mode,
    Permit,
    State,
)
from proxy.core.outcome import Outcome

CONFIG = CircuitBreakerConfig(
    failure_threshold=3,
    min_throughput=4,
    window_seconds=10,
    open_seconds=5,
    max_open_seconds=20,
    half_open_probes=2,
    slow_call_ms=500,
    max_half_open_seconds=30,
)
ADMIN = ("force_open", "disable", "reset", "monitor_only", "enforce", "trip", "end_open_period")


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class BreakerMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.clock = FakeClock()
        self.transitions: list[tuple[State, State]] = []
        self.breaker = CircuitBreaker(
            "p",
            CONFIG,
            clock=self.clock,
            rng=random.Random(0),
            on_transition=lambda _name, a, b: self.transitions.append((a, b)),
        )
        self.outstanding: list[Permit] = []
        self.sent_ids: set[int] = set()
        self.reported: list[Permit] = []

    @initialize(monitor=st.booleans())
    def choose_mode(self, monitor: bool) -> None:
        self.breaker.set_monitor_only(monitor)

    @rule(seconds=st.one_of(st.floats(0, 2), st.floats(0, 40)))
    def advance(self, seconds: float) -> None:
        self.clock.now += seconds

    @rule()
    def permit(self) -> None:
        state = self.breaker.state
        half_open_full = state is State.HALF_OPEN and not self.breaker.can_permit()
        permit = self.breaker.permit()
        enforcing = self.breaker.mode is Mode.ENFORCE
        blocked = state is State.FORCED_OPEN or (
            enforcing and (state is State.OPEN or half_open_full)
        )
        assert (permit is None) is blocked
        if permit is not None:
            self.outstanding.append(permit)

    @rule(data=st.data())
    def sent(self, data: st.DataObject) -> None:
        """A request leaves the proxy (tracked for stalls from here on), once per permit."""
        unsent = [p for p in self.outstanding if id(p) not in self.sent_ids]
        if unsent:
            permit = data.draw(st.sampled_from(unsent))
            self.sent_ids.add(id(permit))
            self.breaker.sent(permit)

    @rule(
        data=st.data(),
        outcome=st.sampled_from(Outcome),
        latency=st.one_of(st.none(), st.floats(0, 2000)),
        retry_after=st.one_of(st.none(), st.floats(0, 1000)),
    )
    def record(
        self,
        data: st.DataObject,
        outcome: Outcome,
        latency: float | None,
        retry_after: float | None,
    ) -> None:
        if self.outstanding:
            index = data.draw(st.integers(0, len(self.outstanding) - 1))
            permit = self.outstanding.pop(index)
            self.breaker.record(permit, outcome, latency, retry_after)
            self.reported.append(permit)

    @rule(data=st.data())
    def first_token(self, data: st.DataObject) -> None:
        if self.outstanding:
            permit = data.draw(st.sampled_from(self.outstanding))
            self.breaker.first_token(permit)

    @rule(data=st.data())
    def release(self, data: st.DataObject) -> None:
        if self.outstanding:
            index = data.draw(st.integers(0, len(self.outstanding) - 1))
            permit = self.outstanding.pop(index)
            self.breaker.release(permit)
            self.reported.append(permit)

    @rule(data=st.data(), outcome=st.sampled_from(Outcome))
    def report_again(self, data: st.DataObject, outcome: Outcome) -> None:
        if self.reported:
            permit = data.draw(st.sampled_from(self.reported))
            before = self.breaker.get_metrics()
            transitions = len(self.transitions)
            if data.draw(st.booleans()):
                self.breaker.record(permit, outcome, 1000.0, 60.0)
            else:
                self.breaker.release(permit)
            assert self.breaker.get_metrics() == before
            assert len(self.transitions) == transitions

    @rule(order=st.sampled_from(ADMIN))
    def admin(self, order: str) -> None:
        if order == "monitor_only":
            self.breaker.set_monitor_only(True)
        else:
            getattr(self.breaker, order)()

    @invariant()
    def holds(self) -> None:
        metrics = self.breaker.get_metrics()
        state = self.breaker.state
        assert isinstance(state, State)
        assert metrics["state"] == state.value
        assert state.value in STATE_VALUES
        rate = metrics["error_rate"]
        assert rate == -1 or 0 <= rate <= 1
        ratio = metrics["success_ratio"]
        assert ratio == -1 or 0 <= ratio <= 1
        assert metrics["latency_p95_ms"] == -1 or metrics["latency_p95_ms"] > 0
        assert metrics["calls"] >= metrics["failures"] >= 0
        probes = metrics["half_open"]
        assert probes["in_flight"] + probes["succeeded"] + probes["failed"] <= probes["slots"]
        live_probes = sum(
            1 for p in self.outstanding if p.probe and p.generation == metrics["generation"]
        )
        assert live_probes == probes["in_flight"]
        if state is not State.HALF_OPEN:
            assert probes["in_flight"] == probes["succeeded"] == probes["failed"] == 0
        # Invariant 10: exactly the current generation's closed-state calls past the stall
        # threshold are stale, and the streak is a part of them.
        assert 0 <= metrics["stalled_streak"] <= metrics["stalled"]
        if state is State.CLOSED:
            threshold = CONFIG.stall_seconds
            stale = sum(
                1
                for p in self.outstanding
                if p.generation == metrics["generation"]
                and id(p) in self.sent_ids  # tracked from ``sent`` on
                and p.counted
                and not p.probe
                and not p.answered
                and p.started_at <= self.clock.now - threshold  # as the breaker computes it
            )
            assert metrics["stalled"] == stale
        else:
            assert metrics["stalled"] == 0
        blocking = state is State.FORCED_OPEN or (
            self.breaker.mode is Mode.ENFORCE and state is State.OPEN
        )
        if blocking:
            assert not self.breaker.can_permit()
            assert self.breaker.retry_at() > self.clock.now
        current = State.CLOSED
        for source, target in self.transitions:
            assert source is current
            assert source is not target
            current = target
        assert current is state


BreakerMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
test_breaker_invariants = BreakerMachine.TestCase
