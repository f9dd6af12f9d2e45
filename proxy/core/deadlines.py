"""Live first-token times per deployment, and the deadlines and hedge delays they give.

Pure and synchronous, on an injected clock (docs/breaker.md, 'Adaptive first-token
deadline' and 'Hedging'). One sliding window (``proxy.core.window``) per deployment
holds the first-token times of its streams; a deployment that usually starts in
milliseconds then gets a first-token deadline of milliseconds-times-a-factor (never
below the floor, never above the configured ``first_token``), and an ``auto`` hedge
delay of its p95 times a factor.

Invariants:

1. ``deadline`` is in ``[min(floor, configured), configured]``; it is ``configured``
   while the deployment has fewer than ``min_samples`` first tokens in the window,
   or when the policy's factor is 0.
2. ``hedge_after`` is None (no hedge) for no setting, and for ``auto`` until the
   deployment has ``hedge.min_samples`` first tokens; otherwise at least
   ``hedge.min_ms`` for ``auto``, and exactly the setting for a number.
3. Reading is O(1) amortised: once a deployment has its minimum of samples, its
   quantiles are recomputed at most once per ``REFRESH_SECONDS`` of the clock (the
   window moves by whole seconds anyway), so asking per attempt costs a dictionary
   lookup; before that, every new sample is seen by the next read.
4. Memory is bounded: a window per deployment that was ever observed, each of
   ``window_seconds`` one-second buckets.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

from proxy.config.model import HEDGE_AUTO, AdaptiveDeadline, HedgeAfter, HedgePolicy
from proxy.core.window import Window

# How long computed quantiles are reused before the window is read again.
REFRESH_SECONDS = 1.0
HEDGE_QUANTILE = 0.95  # ``auto`` hedges on the p95 (docs/breaker.md, 'Hedging')

__all__ = ["FirstTokenTimes", "Snapshot"]


@dataclass(slots=True)
class Snapshot:
    """One deployment's figures, as the admin API shows them."""

    samples: int
    p50_ms: float | None
    p95_ms: float | None
    quantile_ms: float | None  # at the policy's quantile
    adaptive_ms: float | None  # the deadline it earns (before the configured cap); None = none


class _Deployment:
    __slots__ = ("computed_at", "p95_ms", "quantile_ms", "samples", "window")

    def __init__(self, seconds: float) -> None:
        self.window = Window(seconds)
        self.computed_at = -1e18
        self.samples = 0
        self.quantile_ms = -1.0
        self.p95_ms = -1.0


class FirstTokenTimes:
    """First-token times per deployment key, with the deadline and hedge delay they allow."""

    def __init__(
        self,
        policy: AdaptiveDeadline | None = None,
        hedge: HedgePolicy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.policy = policy if policy is not None else AdaptiveDeadline()
        self.hedge = hedge if hedge is not None else HedgePolicy()
        self._clock = clock
        self._by_key: dict[str, _Deployment] = {}

    def configure(self, policy: AdaptiveDeadline, hedge: HedgePolicy) -> None:
        """New settings (a rules reload); a new window length starts the windows afresh."""
        if policy.window_seconds != self.policy.window_seconds:
            self._by_key.clear()
        self.policy = policy
        self.hedge = hedge
        for entry in self._by_key.values():
            entry.computed_at = -1e18  # quantile or factor may have changed

    def observe(self, key: str, seconds: float) -> None:
        """A stream of ``key`` produced its first content ``seconds`` after it was sent."""
        entry = self._by_key.get(key)
        if entry is None:
            entry = self._by_key[key] = _Deployment(self.policy.window_seconds)
        entry.window.add(self._clock(), False, False, seconds * 1000.0)
        if entry.samples < max(self.policy.min_samples, self.hedge.min_samples):
            # Still gathering: the next read counts this sample (a deployment's first few
            # streams decide when it leaves the configured deadline, not the refresh tick).
            entry.computed_at = -1e18

    def deadline(self, key: str, configured: float) -> float:
        """Seconds to wait for ``key``'s first token: adaptive, capped by ``configured``."""
        policy = self.policy
        entry = self._fresh(key)
        if entry is None or policy.factor <= 0 or entry.samples < policy.min_samples:
            return configured
        adaptive = max(policy.floor_ms, entry.quantile_ms * policy.factor) / 1000.0
        return min(configured, adaptive)

    def hedge_after(self, key: str, setting: HedgeAfter) -> float | None:
        """Seconds without a first token after which to hedge ``key``; None = do not."""
        if setting is None:
            return None
        if setting != HEDGE_AUTO:
            return float(setting) / 1000.0
        entry = self._fresh(key)
        hedge = self.hedge
        if entry is None or entry.samples < hedge.min_samples:
            return None
        return max(hedge.min_ms, entry.p95_ms * hedge.factor) / 1000.0

    def snapshot(self, key: str, configured: float) -> Snapshot:
        entry = self._fresh(key)
        if entry is None or not entry.samples:
            return Snapshot(0, None, None, None, None)
        adaptive = self.deadline(key, configured)
        return Snapshot(
            samples=entry.samples,
            p50_ms=entry.window.quantile(0.5),
            p95_ms=entry.p95_ms,
            quantile_ms=entry.quantile_ms,
            adaptive_ms=adaptive * 1000.0 if entry.samples >= self.policy.min_samples else None,
        )

    def _fresh(self, key: str) -> _Deployment | None:
        entry = self._by_key.get(key)
        if entry is None:
            return None
        now = self._clock()
        if now - entry.computed_at >= REFRESH_SECONDS:
            window = entry.window
            window.roll(now)  # old seconds leave the window even without new samples
            entry.computed_at = now
            entry.samples = window.samples
            entry.quantile_ms = window.quantile(self.policy.quantile)
            entry.p95_ms = window.quantile(HEDGE_QUANTILE)
        return entry
