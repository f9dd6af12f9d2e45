"""``BreakerRegistry``: the breakers by name; ``registry``, the one for library use.

Invariants:
- At most one breaker per name. Creation is explicit (``create``,
  ``get_or_create``); ``get`` only looks up.
- A breaker created without a config runs on the registry's config for its name
  (defaults, per-name overrides, first-token timeout), re-applied by every
  ``configure``; one created with a config keeps that config.
- Every breaker reads the registry's clock and RNG, and every transition reaches
  the registry's ``on_transition`` (which may be bound after the breakers exist).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping
from dataclasses import replace

from proxy.config.model import BreakerOverrides
from proxy.core.breaker import STATE_VALUES, CircuitBreaker, State, TransitionCallback
from proxy.core.breaker_config import CircuitBreakerConfig

__all__ = ["BreakerRegistry", "registry"]


class BreakerRegistry:
    """The breakers by name. Creation is explicit; ``get`` only looks up.

    ``get(name)`` is the breaker or None; ``get_or_create(name, config=None)`` returns
    the existing one or creates it; ``create(name, config=None)`` creates and raises
    ValueError if the name is taken. A breaker created without a config takes the
    registry's settings for its name (defaults and per-name overrides, which a
    ``configure`` re-applies); one created with a config keeps that config.
    ``first_token_seconds`` gives each upstream's first-token timeout, from which its
    stall threshold is derived (``CircuitBreakerConfig.stall_seconds``).
    """

    def __init__(
        self,
        config: CircuitBreakerConfig | None = None,
        overrides: Mapping[str, BreakerOverrides] | None = None,
        *,
        first_token_seconds: Mapping[str, float] | None = None,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_transition: TransitionCallback | None = None,
    ) -> None:
        self._default = config if config is not None else CircuitBreakerConfig()
        self._overrides = dict(overrides or {})
        self._first_token = dict(first_token_seconds or {})
        self._clock = clock
        self._rng = rng if rng is not None else random.Random()
        self.on_transition = on_transition  # may be bound after the breakers exist
        self._breakers: dict[str, CircuitBreaker] = {}
        self._explicit: dict[str, CircuitBreakerConfig] = {}  # configs given at creation

    def config_for(self, name: str) -> CircuitBreakerConfig:
        explicit = self._explicit.get(name)
        if explicit is not None:
            return explicit
        override = self._overrides.get(name)
        config = self._default if override is None else self._default.with_overrides(override)
        first_token = self._first_token.get(name)
        if first_token is not None:
            config = replace(config, first_token_seconds=first_token)
        return config

    def use_clock(self, clock: Callable[[], float]) -> None:
        """Every breaker, existing and future, reads ``clock`` (tests and simulations)."""
        self._clock = clock
        for breaker in self._breakers.values():
            breaker._clock = clock

    def get(self, name: str) -> CircuitBreaker | None:
        """The breaker called ``name``, or None if none was created."""
        return self._breakers.get(name)

    def get_or_create(
        self, name: str, config: CircuitBreakerConfig | None = None
    ) -> CircuitBreaker:
        """The breaker called ``name``; created first if missing (``config`` is used only then)."""
        breaker = self._breakers.get(name)
        return breaker if breaker is not None else self.create(name, config)

    def create(self, name: str, config: CircuitBreakerConfig | None = None) -> CircuitBreaker:
        """A new breaker called ``name``; ValueError if one exists."""
        if name in self._breakers:
            raise ValueError(f"circuit breaker {name!r} already exists")
        if config is not None:
            self._explicit[name] = config
        breaker = CircuitBreaker(
            name,
            self.config_for(name),
            clock=self._clock,
            rng=self._rng,
            on_transition=self._emit,
        )
        self._breakers[name] = breaker
        return breaker

    def get_all(self) -> dict[str, CircuitBreaker]:
        return dict(self._breakers)

    def reset_all(self) -> None:
        for breaker in self._breakers.values():
            breaker.reset()

    def configure(
        self,
        config: CircuitBreakerConfig,
        overrides: Mapping[str, BreakerOverrides],
        first_token_seconds: Mapping[str, float] | None = None,
    ) -> None:
        """New defaults and per-name overrides (rules reload), applied to existing breakers too."""
        self._default = config
        self._overrides = dict(overrides)
        if first_token_seconds is not None:
            self._first_token = dict(first_token_seconds)
        for name, breaker in self._breakers.items():
            breaker.reconfigure(self.config_for(name))

    def breaker_gauges(self) -> list[tuple[str, int, float, float]]:
        return [
            (name, STATE_VALUES[b.state.value], b.error_rate(), b.latency_p95_ms())
            for name, b in self._breakers.items()
        ]

    def breaker_counters(self) -> list[tuple[str, int]]:
        return [(name, b.would_block) for name, b in self._breakers.items()]

    def _emit(self, name: str, source: State, target: State) -> None:
        if self.on_transition is not None:
            self.on_transition(name, source, target)


# For library use: ``from proxy import registry``. The proxy builds its own per app.
registry = BreakerRegistry()
