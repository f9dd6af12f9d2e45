"""Per-upstream circuit breaker: a pure, synchronous state machine (docs/breaker.md).

The states are ``State``; the events that move between them and where each
leads are the table ``TRANSITIONS``. Time comes from an injected monotonic
clock and jitter from an injected ``random.Random``, so tests drive it with a
fake clock and a seed. Nothing is scheduled: the open -> half-open move and
the hung-probe check are evaluated lazily whenever the breaker is asked
(``permit``, ``record``, any read). Its settings are ``CircuitBreakerConfig``
(``proxy.core.breaker_config``, re-exported here); the breakers by name are a
``BreakerRegistry`` (``proxy.core.breaker_registry``).

Invariants, true between any two calls:

1. ``state`` is a ``State``. A transition to the same state emits nothing;
   every other transition emits ``on_transition(name, from, to)`` once.
2. No method awaits (``call`` awaits only the caller's function), so each runs
   atomically on the event loop: the breaker trips exactly once however many
   results race in.
3. Every granted ``Permit`` is reported at most once: the first ``record`` or
   ``release`` counts, any later report of the same permit is a no-op.
4. A result counts only in the generation that issued its permit. A new
   generation starts at every transition and at every reset, so a late result
   is never a probe, never reopens, and never lands in a fresh window.
5. In half-open, probes in flight + probe results <= ``half_open_probes``.
6. Enforce mode: open and forced-open grant nothing; half-open grants only
   probes. Monitor-only mode: every call is granted; what the shadow machine
   would have rejected is counted in ``would_block`` and carries no weight.
   Forced-open rejects in both modes: an explicit admin order outranks the
   rollout switch. Disabled grants everything and records nothing.
7. The sliding window (``proxy.core.window``) holds exactly the 1 s buckets
   (head - size, head]; its running totals equal the sum over its buckets.
8. ``error_rate()`` is in [0, 1], or -1 below ``min_throughput``;
   ``success_ratio()`` is in [0, 1] or -1 with no calls; ``latency_p95_ms()``
   is positive or -1 with no samples.
9. ``permit`` and ``record`` are O(1) amortised: no sorting, no scans longer
   than ``half_open_probes``. The stall rule keeps its attempts in a FIFO in
   send order; each permit enters it at most once and leaves it once.
10. Stalls (docs/breaker.md, 'Stalled attempts count as they age'): with a
    stall threshold (``CircuitBreakerConfig.stall_seconds`` > 0), every
    counted permit granted in ``closed`` is tracked from ``sent`` (its request
    left the proxy) until it is reported; time spent before that, waiting for
    the proxy's own resources, never ages it.
    ``stalled`` = tracked permits of the current generation older than the
    threshold and not yet reported; ``stalled_streak`` = those of them that
    became stale after the last success. The trip rules read
    ``consecutive + stalled_streak`` against ``failure_threshold`` and
    ``(failures + stalled) / (calls + stalled)`` against ``failure_rate``.
    A stale attempt leaves both counts when it is reported, whatever the
    outcome, and its real outcome is then counted as usual: a provisional
    failure is replaced, never added to. A transition or a reset forgets every
    tracked attempt (their results are late, invariant 4). A trip caused by
    stale attempts is not undone when they later succeed: the open period runs
    out and probes decide, as after any trip. ``0 <= stalled_streak <= stalled``.
11. The two trip rules in closed (docs/breaker.md, 'Window and thresholds'): the
    consecutive rule opens when ``failure_threshold`` failures follow one another;
    the rate rule opens when the window holds at least ``min_throughput`` calls,
    at least ``failure_threshold`` of them failures, and the failure ratio reaches
    ``failure_rate``. So no breaker opens on fewer than ``failure_threshold``
    failures: ``CircuitBreakerConfig(failure_threshold=3, min_throughput=1)`` opens
    on the third consecutive failure, not the first. With ``failure_threshold=0``
    (consecutive rule off) the rate rule needs only ``min_throughput`` calls. The
    slow-call rule is a ratio of slow calls and needs only ``min_throughput``.
"""

from __future__ import annotations

import enum
import math
import random
import time
from collections import deque
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ParamSpec, TypeVar

from proxy.core.breaker_config import RULES_KEYS as RULES_KEYS
from proxy.core.breaker_config import STALL_FRACTION as STALL_FRACTION
from proxy.core.breaker_config import CircuitBreakerConfig as CircuitBreakerConfig
from proxy.core.errors import ServiceUnavailable
from proxy.core.outcome import Outcome
from proxy.core.window import Window

# A failing reply's Retry-After extends an open period, but never beyond this:
# a buggy upstream asking for a day must not idle it for a day (health checks
# can still end the period early).
MAX_RETRY_AFTER_OPEN_SECONDS = 300.0
# Retry hint when half-open has no free probe slot: probes usually answer fast.
HALF_OPEN_RETRY_HINT_SECONDS = 1.0
MAX_BACKOFF_EXPONENT = 32  # 2^32 * open_seconds is beyond any cap; avoids float overflow

P = ParamSpec("P")
T = TypeVar("T")


class State(enum.Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"
    FORCED_OPEN = "forced_open"
    DISABLED = "disabled"


# The value each state exports on the ``circuit_breaker_state`` gauge (docs/architecture.md,
# 'Metrics'): 0 closed, 1 half-open, 2 open. Forced-open reads as open, disabled as closed.
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2, "forced_open": 2, "disabled": 0}


class Mode(enum.Enum):
    ENFORCE = "enforce"
    MONITOR_ONLY = "monitor_only"


class Event(enum.Enum):
    TRIP = "trip"  # a closed-state rule fired, or a health check gave up on the upstream
    OPEN_ELAPSED = "open_elapsed"  # asked at or after open_until
    PROBES_PASSED = "probes_passed"  # every probe result is in, ratio under the threshold
    PROBES_FAILED = "probes_failed"  # the threshold can no longer be met, or a probe hung
    FORCE_OPEN = "force_open"
    DISABLE = "disable"
    RESET = "reset"


TRANSITIONS: Mapping[tuple[State, Event], State] = {
    (State.CLOSED, Event.TRIP): State.OPEN,
    (State.HALF_OPEN, Event.TRIP): State.OPEN,
    (State.OPEN, Event.OPEN_ELAPSED): State.HALF_OPEN,
    (State.HALF_OPEN, Event.PROBES_PASSED): State.CLOSED,
    (State.HALF_OPEN, Event.PROBES_FAILED): State.OPEN,
    **{(s, Event.FORCE_OPEN): State.FORCED_OPEN for s in State},
    **{(s, Event.DISABLE): State.DISABLED for s in State},
    **{(s, Event.RESET): State.CLOSED for s in State},
}

TransitionCallback = Callable[[str, State, State], None]


class CircuitOpenError(ServiceUnavailable):
    """Raised by ``CircuitBreaker.call`` when the breaker rejects; renders as a 503.

    ``retry_after`` is the number of seconds until a probe may be allowed, or
    None when that is unknown (forced open).
    """

    default_code = "circuit_open"

    def __init__(self, name: str, retry_after: float | None) -> None:
        headers: dict[str, str] = {}
        if retry_after is not None:
            headers["Retry-After"] = str(math.ceil(retry_after))
            headers["retry-after-ms"] = str(math.ceil(retry_after * 1000))
        super().__init__(f"circuit breaker {name!r} is open", headers=headers)
        self.name = name
        self.retry_after = retry_after


class Permit:
    """One granted call; report it exactly once with ``record`` or ``release``."""

    __slots__ = (
        "answered",
        "counted",
        "done",
        "epoch",
        "generation",
        "probe",
        "stale",
        "started_at",
    )

    def __init__(self, generation: int, probe: bool, counted: bool, started_at: float) -> None:
        self.generation = generation
        self.probe = probe  # holds a half-open probe slot
        self.counted = counted  # False: monitor-only would-block or disabled; no weight
        # Clock at grant time for probes and for calls the stall rule tracks; 0.0 otherwise.
        self.started_at = started_at
        self.done = False
        self.stale = False  # counted in ``stalled`` (invariant 10)
        self.answered = False  # its first token arrived: never stale from then on
        self.epoch = -1  # the success count when it went stale: in ``stalled_streak`` if current


class CircuitBreaker:
    """One upstream's breaker. Synchronous; see the module docstring for its invariants."""

    def __init__(
        self,
        name: str,
        config: CircuitBreakerConfig | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self.name = name
        self._config = config if config is not None else CircuitBreakerConfig()
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.on_transition = on_transition
        self._mode = Mode.ENFORCE if self._config.enabled else Mode.MONITOR_ONLY
        self._state = State.CLOSED
        self._generation = 0
        self._window = Window(self._config.window_seconds)
        self._consecutive = 0
        self._opens = 0  # opens since the breaker last closed: the backoff exponent
        self._open_until = 0.0
        self._probes: list[Permit] = []  # in flight, current generation, oldest first
        self._probe_ok = self._probe_failed = self._probe_slow = 0
        self._would_block = 0
        self._rejected = 0
        self._reports = dict.fromkeys(Outcome, 0)
        self._released = 0
        # The stall rule (invariant 10): closed-state calls not yet stale, in grant order
        # (reported ones are dropped lazily); stale calls in flight; those since the last
        # success; and the count of successes that delimits that streak.
        self._stall = self._config.stall_seconds
        self._young: deque[Permit] = deque()
        self._stalled = 0
        self._stalled_streak = 0
        self._successes = 0

    # -- the request path ------------------------------------------------------------

    def permit(self) -> Permit | None:
        """A permit for one upstream call, or None when the breaker rejects it."""
        if self._state is State.CLOSED:
            if not self._stall:  # the common case without the stall rule needs no clock read
                return Permit(self._generation, False, True, 0.0)
            now = self._clock()
            self._judge_stalls(now)
            if self._state is State.CLOSED:
                # Tracked for stalls from ``sent`` on: time spent waiting for the proxy's own
                # resources (a pooled connection) before the request left is never a stall.
                return Permit(self._generation, False, True, now)
        else:
            now = self._clock()
            self._advance(now)
        state = self._state  # _advance never closes, so not CLOSED here
        if state is State.DISABLED:
            return Permit(self._generation, False, False, 0.0)
        if state is State.HALF_OPEN and self._free_slots() > 0:
            probe = Permit(self._generation, True, True, now)
            self._probes.append(probe)
            return probe
        if state is State.FORCED_OPEN or self._mode is Mode.ENFORCE:
            self._rejected += 1
            return None
        self._would_block += 1
        return Permit(self._generation, False, False, 0.0)

    def record(
        self,
        permit: Permit,
        outcome: Outcome,
        latency_ms: float | None = None,
        retry_after: float | None = None,
    ) -> None:
        """Report how a permitted call ended (once; later reports are no-ops).

        ``latency_ms`` is the time to first token (response headers for a plain
        request, first content event for a stream): it feeds p95 and the
        slow-call rule. ``retry_after`` (seconds) from a failing reply extends
        the open period this failure causes (capped).
        """
        if permit.done:
            return
        permit.done = True
        self._reports[outcome] += 1
        if not permit.counted:
            return
        now = self._clock()
        if permit.stale and permit.generation == self._generation:
            self._unstall(permit)  # its provisional failure gives way to the real outcome
        self._advance(now)
        failed = outcome is Outcome.FAILURE
        if permit.generation != self._generation:
            # A late result: never a probe, never in a fresh window. An explicit
            # "come back later" still lengthens a period that is already open.
            if failed and retry_after is not None and self._state is State.OPEN:
                self._open_until = max(self._open_until, now + _capped(retry_after))
            return
        if permit.probe:
            self._probes.remove(permit)
        if not failed and outcome is not Outcome.SUCCESS:
            return  # rate-limited or ignored: says nothing about health; a probe slot returns
        config = self._config
        slow = 0 < config.slow_call_ms < (latency_ms if latency_ms is not None else 0.0)
        self._window.add(now, failed, slow, latency_ms)
        if permit.probe:
            self._judge_probe(now, failed, slow, retry_after)
            return
        if failed:
            self._consecutive += 1
        else:
            self._consecutive = 0
            self._successes += 1  # calls stale until now are excused from the streak
            self._stalled_streak = 0
        if self._should_trip():
            self._fire(Event.TRIP, now, retry_after if failed else None)

    def sent(self, permit: Permit) -> None:
        """The call's request left the proxy now: from here on it may age into a stall.

        Calls are tracked in the order they are sent, which keeps the FIFO ordered by
        start time (invariant 10). A call that never leaves (the proxy's own failure)
        is never tracked, so it can never count against the upstream.
        """
        if (
            self._stall
            and permit.counted
            and not permit.probe
            and not (permit.done or permit.answered)
            and permit.generation == self._generation
            and self._state is State.CLOSED
        ):
            permit.started_at = self._clock()
            self._young.append(permit)

    def first_token(self, permit: Permit) -> None:
        """The call's first token arrived (response headers, or a stream's first content).

        From then on it is not stalled, however long it streams (invariant 10); a
        provisional failure it carried is withdrawn. Its outcome still comes with
        ``record``.
        """
        if permit.answered or permit.done:
            return
        permit.answered = True
        if permit.stale and permit.generation == self._generation:
            self._unstall(permit)
            permit.stale = False

    def release(self, permit: Permit) -> None:
        """The call was cancelled: no outcome; a probe slot returns (once, like ``record``)."""
        if permit.done:
            return
        permit.done = True
        self._released += 1
        if permit.generation != self._generation:
            return
        if permit.probe:
            self._probes.remove(permit)
        elif permit.stale:
            self._unstall(permit)

    async def call(self, fn: Callable[P, Awaitable[T]], /, *args: P.args, **kwargs: P.kwargs) -> T:
        """Run ``fn`` under the breaker: an exception is a failure, cancellation no outcome."""
        permit = self.permit()
        if permit is None:
            raise CircuitOpenError(self.name, self.retry_after_seconds())
        started = self._clock()
        self.sent(permit)
        try:
            result = await fn(*args, **kwargs)
        except Exception:
            self.record(permit, Outcome.FAILURE, (self._clock() - started) * 1000)
            raise
        except BaseException:  # cancelled: the call has no outcome
            self.release(permit)
            raise
        self.record(permit, Outcome.SUCCESS, (self._clock() - started) * 1000)
        return result

    # -- reads (each evaluates pending transitions first) --------------------------------

    @property
    def state(self) -> State:
        state = self._state
        if (
            state is State.OPEN
            or state is State.HALF_OPEN
            or (state is State.CLOSED and self._young)
        ):
            self._advance(self._clock())
        return self._state

    @property
    def is_open(self) -> bool:
        """Rejecting calls: ``open`` or ``forced_open`` (half-open lets probes through)."""
        return self.state in (State.OPEN, State.FORCED_OPEN)

    @property
    def is_closed(self) -> bool:
        """``closed``: every call is granted and counted (``disabled`` is not closed)."""
        return self.state is State.CLOSED

    @property
    def is_half_open(self) -> bool:
        return self.state is State.HALF_OPEN

    @property
    def mode(self) -> Mode:
        return self._mode

    @property
    def would_block(self) -> int:
        """Monitor-only: calls the shadow state machine would have rejected, since start."""
        return self._would_block

    @property
    def config(self) -> CircuitBreakerConfig:
        return self._config

    def can_permit(self) -> bool:
        """Would ``permit`` grant a call now? Takes no slot."""
        if self._state is State.CLOSED and self._young:
            self._judge_stalls(self._clock())
        if self._state is State.CLOSED or self._state is State.DISABLED:
            return True  # the common case: no clock read, nothing to advance
        now = self._clock()
        return self._retry_at(now) <= now

    def error_rate(self) -> float:
        self._window.roll(self._clock())
        return self._error_rate()

    def success_ratio(self) -> float:
        self._window.roll(self._clock())
        return self._success_ratio()

    def latency_p95_ms(self) -> float:
        self._window.roll(self._clock())
        return self._window.p95()

    def retry_at(self) -> float:
        """Soonest clock time a call may be granted (now if it would be; inf when forced open)."""
        return self._retry_at(self._clock())

    def retry_after_seconds(self) -> float | None:
        """Seconds until a call may be granted, for Retry-After; None when unknown."""
        now = self._clock()
        at = self._retry_at(now)
        return None if at == math.inf else max(0.0, at - now)

    def get_metrics(self) -> dict[str, Any]:
        """A JSON-serializable snapshot for the admin API."""
        now = self._clock()
        self._advance(now)
        self._window.roll(now)
        window = self._window
        retry_at = self._retry_at(now)
        return {
            "name": self.name,
            "state": self._state.value,
            "mode": self._mode.value,
            "window_seconds": self._config.window_seconds,
            "calls": window.calls,
            "failures": window.failures,
            "slow_calls": window.slow,
            "consecutive_failures": self._consecutive,
            "stalled": self._stalled,
            "stalled_streak": self._stalled_streak,
            "stall_tracked": len(self._young),  # calls not yet stale (reported ones drop lazily)
            "error_rate": self._error_rate(),
            "success_ratio": self._success_ratio(),
            "latency_p95_ms": window.p95(),
            "opens": self._opens,
            "open_until": self._open_until - now if self._state is State.OPEN else None,
            "retry_after": None if retry_at == math.inf else max(0.0, retry_at - now),
            "half_open": {
                "slots": self._config.half_open_probes,
                "in_flight": len(self._probes),
                "succeeded": self._probe_ok,
                "failed": self._probe_failed,
            },
            "would_block": self._would_block,
            "rejected": self._rejected,
            "generation": self._generation,
            "reports": {o.value: n for o, n in self._reports.items()}
            | {"released": self._released},
        }

    # -- admin and health checks --------------------------------------------------------

    def force_open(self) -> None:
        """Reject everything until ``reset`` or ``disable``; never times out."""
        self._fire(Event.FORCE_OPEN, self._clock())

    def disable(self) -> None:
        """Grant everything and record nothing until ``reset`` or ``force_open``."""
        self._fire(Event.DISABLE, self._clock())

    def reset(self) -> None:
        """Closed with a fresh window and open count; emits only if the state changed."""
        if self._state is State.CLOSED:
            self._enter_closed()
            self._generation += 1
            self._forget_in_flight()
        else:
            self._fire(Event.RESET, self._clock())

    def set_monitor_only(self, monitor_only: bool) -> None:
        self._mode = Mode.MONITOR_ONLY if monitor_only else Mode.ENFORCE

    def enforce(self) -> None:
        self.set_monitor_only(False)

    def trip(self) -> None:
        """Open as if a rule fired (health checks failing); no-op unless closed or half-open."""
        now = self._clock()
        self._advance(now)
        if self._state is State.CLOSED or self._state is State.HALF_OPEN:
            self._fire(Event.TRIP, now)

    def end_open_period(self) -> None:
        """A health check passed while open: the next call becomes a probe. Never closes."""
        now = self._clock()
        if self._state is State.OPEN:
            self._open_until = min(self._open_until, now)

    def reconfigure(self, config: CircuitBreakerConfig) -> None:
        """New settings (rules reload); keeps state, mode and, if its size holds, the window."""
        if math.ceil(config.window_seconds) != math.ceil(self._config.window_seconds):
            self._window = Window(config.window_seconds)
        self._config = config
        # Calls already stale stay counted until they end; with the rule off, none are added.
        self._stall = config.stall_seconds
        if not self._stall:
            self._young.clear()

    # -- internals ----------------------------------------------------------------------

    def _advance(self, now: float) -> None:
        if self._state is State.CLOSED:
            if self._young:
                self._judge_stalls(now)
        elif self._state is State.OPEN:
            if now >= self._open_until:
                self._fire(Event.OPEN_ELAPSED, now)
        elif (
            self._state is State.HALF_OPEN
            and self._probes
            and now - self._probes[0].started_at >= self._config.max_half_open_seconds
        ):
            self._fire(Event.PROBES_FAILED, now)

    def _free_slots(self) -> int:
        used = len(self._probes) + self._probe_ok + self._probe_failed
        return self._config.half_open_probes - used

    def _judge_stalls(self, now: float) -> None:
        """Closed: calls in flight past the stall threshold become provisional failures.

        Pops from the front of the grant-ordered FIFO only (reported calls on the way
        are dropped), so the cost is amortised O(1) per permit. Trips when a newly
        stale call makes a rule fire.
        """
        young = self._young
        horizon = now - self._stall
        newly = 0
        while young:
            head = young[0]
            if not (head.done or head.answered) and head.started_at > horizon:
                break
            young.popleft()
            if not (head.done or head.answered):
                head.stale = True
                head.epoch = self._successes
                newly += 1
        if newly:
            self._stalled += newly
            self._stalled_streak += newly
            self._window.roll(now)
            if self._should_trip():
                self._fire(Event.TRIP, now)

    def _unstall(self, permit: Permit) -> None:
        """A stale call of this generation was reported: it leaves the provisional counts."""
        self._stalled -= 1
        if permit.epoch == self._successes:
            self._stalled_streak -= 1

    def _forget_in_flight(self) -> None:
        """A new generation: calls in flight carry no weight any more (invariants 4, 10)."""
        self._young.clear()
        self._stalled = self._stalled_streak = 0

    def _should_trip(self) -> bool:
        config = self._config
        threshold = config.failure_threshold
        if threshold and self._consecutive + self._stalled_streak >= threshold:
            return True
        window = self._window
        calls = window.calls + self._stalled
        if calls < config.min_throughput:
            return False
        failures = window.failures + self._stalled
        # The rate rule never opens on fewer failures than failure_threshold (invariant 11).
        if failures >= threshold and failures / calls >= config.failure_rate:
            return True
        return (
            config.slow_call_ms > 0
            and window.calls >= config.min_throughput
            and window.slow / window.calls >= config.slow_rate
        )

    def _judge_probe(self, now: float, failed: bool, slow: bool, retry_after: float | None) -> None:
        if failed:
            self._probe_failed += 1
        else:
            self._probe_ok += 1
        if slow:
            self._probe_slow += 1
        config = self._config
        slots = config.half_open_probes
        if self._probe_failed / slots >= config.failure_rate or (
            config.slow_call_ms > 0 and self._probe_slow / slots >= config.slow_rate
        ):
            self._fire(Event.PROBES_FAILED, now, retry_after if failed else None)
        elif self._probe_ok + self._probe_failed >= slots:
            self._fire(Event.PROBES_PASSED, now)

    def _error_rate(self) -> float:
        window = self._window
        if window.calls < self._config.min_throughput or not window.calls:
            return -1.0
        return window.failures / window.calls

    def _success_ratio(self) -> float:
        window = self._window
        return 1.0 - window.failures / window.calls if window.calls else -1.0

    def _retry_at(self, now: float) -> float:
        self._advance(now)
        state = self._state
        if state is State.FORCED_OPEN:
            return math.inf
        if self._mode is Mode.MONITOR_ONLY:
            return now
        if state is State.OPEN:
            return self._open_until
        if state is State.HALF_OPEN and self._free_slots() <= 0:
            return now + HALF_OPEN_RETRY_HINT_SECONDS
        return now

    def _fire(self, event: Event, now: float, retry_after: float | None = None) -> None:
        source = self._state
        target = TRANSITIONS[(source, event)]  # a missing pair is a bug in this module
        if target is source:
            return
        self._probes.clear()
        self._probe_ok = self._probe_failed = self._probe_slow = 0
        if target is State.OPEN:
            self._enter_open(now, retry_after)
        elif target is State.CLOSED:
            self._enter_closed()
        elif target is State.DISABLED:
            self._window.clear()
            self._consecutive = 0
        self._state = target
        self._generation += 1
        self._forget_in_flight()
        if self.on_transition is not None:
            self.on_transition(self.name, source, target)

    def _enter_open(self, now: float, retry_after: float | None) -> None:
        config = self._config
        self._opens += 1
        exponent = min(self._opens - 1, MAX_BACKOFF_EXPONENT)
        duration = min(config.open_seconds * 2.0**exponent, config.max_open_seconds)
        if config.jitter:
            duration *= 1.0 + self._rng.uniform(-config.jitter, config.jitter)
        if retry_after is not None:
            duration = max(duration, _capped(retry_after))
        self._open_until = now + duration

    def _enter_closed(self) -> None:
        self._window.clear()
        self._consecutive = 0
        self._opens = 0


def _capped(retry_after: float) -> float:
    return min(max(retry_after, 0.0), MAX_RETRY_AFTER_OPEN_SECONDS)
