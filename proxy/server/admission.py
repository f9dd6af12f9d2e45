"""Admission control and the descriptor limit (docs/architecture.md, 'Admission control').

Every proxied request holds a client socket and, while it calls an upstream, an
upstream socket. Left unbounded, a burst larger than the descriptor table ends
in EMFILE on upstream connects, and in accept() failing for everyone, health
probes included. So, at start, the soft ``RLIMIT_NOFILE`` is raised to the hard
limit, and requests beyond ``CB_MAX_IN_FLIGHT`` (by default a quarter of that
soft limit: ``proxy.config.settings.derived_max_in_flight``) get a fast 503
``proxy_overloaded`` with ``Retry-After`` before anything is read or planned.
``/healthz``, ``/readyz``, ``/metrics`` and the admin API are never counted and
never turned away (``proxy.server.app.guarded``).
"""

from __future__ import annotations

import logging

from proxy.config.settings import Settings, derived_max_in_flight
from proxy.core.errors import ProxyOverloaded
from proxy.server.state import ProxyState

try:  # POSIX only; elsewhere the limit is whatever the platform allows
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

LOG = logging.getLogger("cb_proxy")
# The `upstream` label of cb_proxy_rejections_total for a request turned away before any
# upstream was chosen (label values are never free text: a fixed value, not a provider name).
NO_UPSTREAM = "-"
OVERLOADED = "overloaded"


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit (logged); return the soft limit now.

    -1 means unlimited or unknown. A platform that refuses the change keeps its limit
    (logged as a warning): start-up goes on, and the derived admission limit follows
    the limit in force.
    """
    if resource is None:  # pragma: no cover - Windows
        return -1
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == hard or (hard != resource.RLIM_INFINITY and 0 <= hard < soft):
        LOG.info("open file limit: %s (already the hard limit)", _text(soft))
        return soft
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError) as exc:
        LOG.warning(
            "open file limit stays at %s: raising it to the hard limit %s failed: %s",
            _text(soft),
            _text(hard),
            exc,
        )
        return soft
    LOG.info("open file limit raised from %s to the hard limit %s", _text(soft), _text(hard))
    return hard


def max_in_flight(settings: Settings, fd_limit: int) -> int:
    """CB_MAX_IN_FLIGHT when set (0 = no limit), else derived from the descriptor limit."""
    if settings.max_in_flight is not None:
        return settings.max_in_flight
    return derived_max_in_flight(fd_limit)


def configure(state: ProxyState) -> None:
    """At start: raise the descriptor limit, set the admission limit, create its series.

    The rejection series exists from the start (at 0), so alerts and dashboards can
    rate() it before the first overload.
    """
    state.max_in_flight = max_in_flight(state.settings, raise_fd_limit())
    state.metrics.rejections.labels(NO_UPSTREAM, OVERLOADED)
    if state.max_in_flight:
        LOG.info("admission control: at most %d requests in flight", state.max_in_flight)
    else:
        LOG.info("admission control: off (CB_MAX_IN_FLIGHT=0)")


def overloaded(limit: int) -> ProxyOverloaded:
    return ProxyOverloaded(
        f"the proxy is serving its limit of {limit} requests (CB_MAX_IN_FLIGHT); retry shortly"
    )


def _text(limit: int) -> str:
    return "unlimited" if resource is not None and limit == resource.RLIM_INFINITY else str(limit)
