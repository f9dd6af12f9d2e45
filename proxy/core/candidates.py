"""What the router plans with: candidates (a deployment on its provider) and live facts.

``LiveView`` is the seam to the shell: the server answers it from the breakers, ``StaticView``
answers for ``explain`` and tests. Strategies and the router both read these types.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Protocol

from proxy.config.model import Deployment, Provider

_EMPTY: Mapping[str, float] = MappingProxyType({})


class LiveView(Protocol):
    """Live facts about upstreams that routing depends on.

    The router asks once per deployment per request (breakers are per deployment)
    and uses the answer for every deployment on that provider.
    """

    def has_key(self, provider: Provider) -> bool: ...

    def epoch(self) -> object:
        """A value that changes whenever any answer below may have changed.

        The router keeps the answers it got while this stays equal (docs/architecture.md,
        'Routing'): the server's changes at each breaker transition, each rules swap and
        every 100 ms (windowed rates move slowly; a breaker the plan still thinks closed is
        skipped by the attempt loop without I/O anyway).
        """
        ...

    def is_blocked(self, deployment: Deployment) -> bool:
        """True when the deployment's breaker is open (no probe allowed now)."""
        ...

    def latency_ms(self, deployment: Deployment) -> float | None:
        """Live p95 latency in ms over the breaker window; None when nothing was measured."""
        ...

    def success_ratio(self, deployment: Deployment) -> float | None:
        """Share of calls that succeeded in the breaker window (0..1); None with no calls."""
        ...


class StaticView:
    """Every provider usable, no breaker open, nothing measured: for `explain` and tests."""

    def has_key(self, provider: Provider) -> bool:
        return True

    def epoch(self) -> object:
        return 0  # nothing here ever changes

    def is_blocked(self, deployment: Deployment) -> bool:
        return False

    def latency_ms(self, deployment: Deployment) -> float | None:
        return None

    def success_ratio(self, deployment: Deployment) -> float | None:
        return None


@dataclass(frozen=True, slots=True)
class UpstreamStats:
    """What the router knew about one upstream (provider) when it planned."""

    available: bool  # has its key
    blocked: bool  # breaker open now
    latency_ms: float | None = None  # live p95; None = not measured (or not asked)
    success_ratio: float | None = None  # None = no calls in the window (or not asked)


@dataclass(frozen=True, slots=True)
class Candidate:
    deployment: Deployment
    provider: Provider
    context_window: int | None
    # The model's quality ratings (shared by its deployments), for explain and the log.
    quality: Mapping[str, float] = field(default_factory=lambda: _EMPTY, compare=False)
