"""Active health checks (docs/breaker.md, 'Active health checks').

One task per API app sends each provider's ``health_request`` (its models
endpoint unless the rules name another path) on a schedule, and tells the
provider's breaker what it learned.

Invariants:

1. The only breaker calls are ``trip`` and ``end_open_period``: a check result
   never enters the request window, never takes a probe slot and never closes
   a breaker (the next real request, as a probe, decides that).
2. Two failures in a row trip the breaker, and every further failure trips it
   again (a no-op while it is open) until a check passes: a pass clears the
   streak. A result that says nothing about the upstream's health (429, 408,
   other statuses below 500 except 401, 402 and 403) neither extends nor
   breaks the streak. A provider whose key is missing is skipped, not failed.
3. The provider list is read from ``state.rules`` every round, so a rules
   reload adds and drops providers without restarting the task; a dropped
   provider's snapshot goes with it.
4. ``HEALTH_CHECK_INTERVAL=0`` turns checks off entirely (no task is started).
   A provider's ``health_check.interval`` overrides the global value; 0 there
   turns that provider off.
5. While a provider's breaker is open or half-open its interval is at most
   ``RECOVERY_INTERVAL_SECONDS``, and the loop never waits longer than that, so
   a breaker that opened between rounds is checked again within 10 s (the
   recovery goal: a returning primary serves again within 30 s).
6. Every check is bounded by a 5 s timeout and the checks of one round run
   concurrently, so one hanging upstream delays no other.
7. Timing is injected (``clock`` and ``wait``), so tests step the loop without
   sleeping; ``check_once`` and ``check_all`` check at once, off schedule.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import suppress
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from proxy.config.model import Provider
from proxy.core.breaker import State
from proxy.providers import registry as providers
from proxy.server.api import STATE
from proxy.server.state import ProxyState
from proxy.upstream.errors import UPSTREAM_ERRORS, failure

LOG = logging.getLogger("cb_proxy.health")

HEALTH_CHECK_TIMEOUT_SECONDS = 5.0
# docs/breaker.md: checks come every 10 s while the breaker is not closed, whatever the interval.
RECOVERY_INTERVAL_SECONDS = 10.0
# A tiny configured interval would turn the loop into a flood against the upstream.
MIN_INTERVAL_SECONDS = 1.0
# A models list is a few kB; a misconfigured path must not make us download a large file.
MAX_BODY_BYTES = 1024 * 1024
FAILURES_TO_TRIP = 2
# 429 and 408 say "slow down" or "too slow this time", not "down" (docs/breaker.md).
# 401/403: our key was refused; 402: the account cannot pay. Both break every request.
KEY_FAILURE_STATUSES = frozenset({401, 402, 403})
RECOVERING_STATES = frozenset({State.OPEN, State.HALF_OPEN})

Clock = Callable[[], float]
Wait = Callable[[float], Awaitable[None]]


class Verdict(enum.Enum):
    PASS = "pass"
    FAIL = "fail"
    IGNORED = "ignored"  # the answer says nothing about the upstream's health
    SKIPPED = "skipped"  # not sent: the provider needs a key that is not set


def judge_status(status: int) -> Verdict:
    """What an HTTP status from a health check says about the upstream."""
    if 200 <= status < 300:
        return Verdict.PASS
    if status >= 500 or status in KEY_FAILURE_STATUSES:
        return Verdict.FAIL
    # 408, 429, and statuses that point at the check itself (a wrong path, a redirect):
    # counting those as a pass could end an open period on an upstream that serves nothing.
    return Verdict.IGNORED


@dataclass(slots=True)
class ProviderHealth:
    """What the checks have found for one provider (the admin API shows it)."""

    verdict: Verdict | None = None  # None: not checked yet
    detail: str = ""
    consecutive_failures: int = 0
    checks: int = 0
    last_checked: float | None = None  # unix time of the last check's start
    latency_ms: float | None = None
    interval_seconds: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {
            "last_result": None if self.verdict is None else self.verdict.value,
            "detail": self.detail,
            "consecutive_failures": self.consecutive_failures,
            "checks": self.checks,
            "last_checked": self.last_checked,
            "latency_ms": self.latency_ms,
            "interval_seconds": self.interval_seconds,
        }


class HealthChecker:
    """Checks every provider of the current rules on its schedule; see the module docstring."""

    def __init__(
        self,
        state: ProxyState,
        *,
        interval: float | None = None,
        timeout: float = HEALTH_CHECK_TIMEOUT_SECONDS,
        clock: Clock = time.monotonic,
        wall_clock: Clock = time.time,
        wait: Wait = asyncio.sleep,
    ) -> None:
        self._state = state
        self.interval = state.settings.health_check_interval if interval is None else interval
        self._timeout = timeout
        self._clock = clock
        self._wall_clock = wall_clock
        self._wait = wait
        self._health: dict[str, ProviderHealth] = {}
        self._last_started: dict[str, float] = {}  # provider -> clock at its last check
        self._task: asyncio.Task[None] | None = None

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    @property
    def running(self) -> bool:
        return self._task is not None and not self._task.done()

    def interval_for(self, provider: Provider) -> float:
        """Seconds between checks of this provider now; 0 = not checked."""
        if not self.enabled:
            return 0.0
        configured = provider.health_check.interval
        base = self.interval if configured is None else configured
        if base <= 0:
            return 0.0
        base = max(base, MIN_INTERVAL_SECONDS)
        if self._state.breaker(provider.name).state in RECOVERING_STATES:
            return min(base, RECOVERY_INTERVAL_SECONDS)
        return base

    def snapshot(self) -> dict[str, Any]:
        """JSON for the admin API: the settings and each provider's last result."""
        return {
            "enabled": self.enabled,
            "interval_seconds": self.interval,
            "timeout_seconds": self._timeout,
            "providers": {name: h.to_json() for name, h in sorted(self._health.items())},
        }

    # -- lifecycle ----------------------------------------------------------------------

    def start(self) -> None:
        """Start the loop (a no-op when checks are off or it already runs)."""
        if self.enabled and not self.running:
            self._task = asyncio.create_task(self.run(), name="health-checks")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        with suppress(asyncio.CancelledError):
            await task

    async def run(self) -> None:
        """Check providers as they fall due, until cancelled."""
        if not self.enabled:
            return
        while True:
            due, wake_in = self._schedule(self._clock())
            if due:
                await self._check_each(due)
                continue  # the checks took time and may have moved breakers: plan again
            await self._wait(wake_in)

    async def _check_each(self, providers: list[Provider]) -> None:
        results = await asyncio.gather(
            *(self.check_once(p) for p in providers), return_exceptions=True
        )
        for provider, result in zip(providers, results, strict=True):
            if isinstance(result, asyncio.CancelledError):
                raise result
            if isinstance(result, BaseException):
                # One provider's bug must not end the checks of the others, nor spin the loop.
                self._last_started[provider.name] = self._clock()
                LOG.error("health check of %s crashed", provider.name, exc_info=result)

    def _schedule(self, now: float) -> tuple[list[Provider], float]:
        """The providers due now, and how long to wait when none is."""
        providers = self._state.rules.providers
        for gone in self._health.keys() - providers.keys():
            del self._health[gone]
            self._last_started.pop(gone, None)
        due: list[Provider] = []
        # Waking at least every RECOVERY_INTERVAL_SECONDS notices breakers that opened
        # and rules that changed meanwhile.
        wake_in = min(self.interval, RECOVERY_INTERVAL_SECONDS)
        for name, provider in providers.items():
            interval = self.interval_for(provider)
            if interval <= 0:
                self._health.pop(name, None)
                self._last_started.pop(name, None)
                continue
            last = self._last_started.get(name)
            next_at = now if last is None else last + interval
            if next_at <= now:
                due.append(provider)
            else:
                wake_in = min(wake_in, next_at - now)
        return due, wake_in

    # -- checks -------------------------------------------------------------------------

    async def check_all(self) -> dict[str, ProviderHealth]:
        """Check every provider that is not turned off, now, concurrently."""
        providers = [p for p in self._state.rules.providers.values() if self.interval_for(p) > 0]
        results = await asyncio.gather(*(self.check_once(p) for p in providers))
        return {p.name: h for p, h in zip(providers, results, strict=True)}

    async def check_once(self, provider: Provider) -> ProviderHealth:
        """Check one provider now and apply the result to its breaker."""
        health = self._health.setdefault(provider.name, ProviderHealth())
        health.interval_seconds = self.interval_for(provider)
        self._last_started[provider.name] = self._clock()
        health.last_checked = self._wall_clock()
        health.checks += 1
        previous = health.verdict, health.detail
        verdict, detail, latency_ms = await self._probe(provider)
        health.verdict, health.detail, health.latency_ms = verdict, detail, latency_ms
        self._state.metrics.health_checks.labels(provider.name, verdict.value).inc()
        if not self._apply(provider.name, health) and (verdict, detail) != previous:
            # Changes only: a steady state costs no log line per round.
            LOG.info("health check: %s %s (%s)", provider.name, verdict.value, detail)
        return health

    async def _probe(self, provider: Provider) -> tuple[Verdict, str, float | None]:
        state = self._state
        if not state.has_key(provider):
            return Verdict.SKIPPED, f"no key: {provider.api_key_env} is not set", None
        pool = state.upstream
        if pool is None:
            return Verdict.SKIPPED, "the upstream client is not running", None
        started = time.perf_counter()
        try:
            request = providers.adapter(provider.type).health_request(
                provider, state.keys.get(provider.name)
            )
            # The same client as every request (docs/upstream.md): same pool, proxy, CAs and
            # limits. It never follows a redirect, which could carry the key to another host.
            async with asyncio.timeout(self._timeout):
                response = await pool.request(
                    request.method,
                    request.url,
                    request.headers,
                    request.body,
                    connect_timeout=self._timeout,
                )
                async with response:
                    await response.read(limit=MAX_BODY_BYTES)
                status = response.status
        except UPSTREAM_ERRORS as exc:
            found = failure(exc, provider.name, doing=f"(no answer within {self._timeout:g} s)")
            if found.local:  # our own descriptors or pool ran out: says nothing about theirs
                return Verdict.IGNORED, f"local failure: {exc}", None
            if isinstance(exc, TimeoutError):
                return Verdict.FAIL, f"no answer within {self._timeout:g} s", None
            # The message can quote the upstream's bytes: no key in the admin API's detail.
            return Verdict.FAIL, state.redactor.redact_text(f"{type(exc).__name__}: {exc}"), None
        except Exception:
            # A bug here must not trip breakers of healthy upstreams.
            LOG.exception("health check of %s: unexpected error", provider.name)
            return Verdict.IGNORED, "internal error in the health checker", None
        latency_ms = (time.perf_counter() - started) * 1000
        return judge_status(status), f"HTTP {status}", latency_ms

    def _apply(self, name: str, health: ProviderHealth) -> bool:
        """Tell the breaker; True when that changed something (and was logged)."""
        verdict = health.verdict
        breaker = self._state.breaker(name)
        if verdict is Verdict.FAIL:
            health.consecutive_failures += 1
            if health.consecutive_failures < FAILURES_TO_TRIP:
                return False
            before = breaker.state
            breaker.trip()
            after = breaker.state
            if after is before:
                return False
            LOG.warning(
                "health check: %s failed %d times in a row (%s); breaker %s -> %s",
                name,
                health.consecutive_failures,
                health.detail,
                before.value,
                after.value,
                extra={"cb": {"upstream": name, "health": verdict.value}},
            )
            return True
        if verdict is Verdict.PASS:
            health.consecutive_failures = 0
            if breaker.state is not State.OPEN:
                return False
            left = breaker.retry_after_seconds()
            breaker.end_open_period()
            LOG.info(
                "health check: %s passed while its breaker was open (%s s left); "
                "the next request is a probe",
                name,
                "unknown" if left is None else f"{left:.1f}",
                extra={"cb": {"upstream": name, "health": verdict.value}},
            )
            return True
        return False


_CHECKERS: weakref.WeakKeyDictionary[ProxyState, HealthChecker] = weakref.WeakKeyDictionary()


def checker_of(state: ProxyState) -> HealthChecker | None:
    """The checker running for this state (None before the API app started)."""
    return _CHECKERS.get(state)


async def health_checks(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx hook of the API app; must come after the upstream client's hook."""
    state = app[STATE]
    checker = HealthChecker(state)
    _CHECKERS[state] = checker
    checker.start()
    yield
    await checker.stop()
