"""Operational endpoints: /healthz, /readyz, /metrics, /api/usage, /api/circuit-breaker/*.

Read-only endpoints answer anyone who can reach the listener. Mutating calls
(breaker resets and overrides) need a loopback peer or ``CB_ADMIN_TOKEN`` as
a bearer token, and every mutation is logged with who did what (never the
token). The circuit-breaker API is served on both listeners.

Mutations act on breakers that exist (one per provider of the rules, made at
load): an unknown name is a 404 and never creates a breaker. A reset closes
the breaker with a fresh window and keeps its mode; ``monitor`` and
``enforce`` change the mode and keep the state.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.core.breaker import CircuitBreaker, State
from proxy.core.errors import AuthenticationFailed, NotFound, PermissionDenied
from proxy.server.health import checker_of
from proxy.server.state import ProxyState

LOG = logging.getLogger("cb_proxy.admin")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
BREAKER_API = "/api/circuit-breaker"
# States in which a breaker turns every call away (forced-open outranks monitor-only too).
UNAVAILABLE_STATES = frozenset({State.OPEN, State.FORCED_OPEN})
MUTATIONS: Mapping[str, Callable[[CircuitBreaker], None]] = {
    "reset": CircuitBreaker.reset,
    "force-open": CircuitBreaker.force_open,
    "disable": CircuitBreaker.disable,
    "monitor": lambda breaker: breaker.set_monitor_only(True),
    "enforce": CircuitBreaker.enforce,
}


def _state(request: web.Request) -> ProxyState:
    from proxy.server.api import STATE

    return request.app[STATE]


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def is_loopback(request: web.Request) -> bool:
    peer = request.remote
    if not peer:
        return False  # a Unix socket or an unknown peer: not trusted
    try:
        address = ipaddress.ip_address(peer.split("%", 1)[0])
    except ValueError:
        return False
    # A dual-stack listener sees IPv4 peers as ::ffff:a.b.c.d.
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped.is_loopback
    return address.is_loopback


def authorize_mutation(request: web.Request) -> str:
    """Who may change breaker state: loopback peers, or anyone with the admin token.

    Returns a short description of the caller for the audit log. A wrong token
    is a 401 from anywhere (it was presented, so it is checked); no token from
    another address is a 403.
    """
    state = _state(request)
    token = state.settings.admin_token
    given = request.headers.get("Authorization", "")
    scheme, _, credential = given.partition(" ")
    if token and scheme.lower() == "bearer":
        if hmac.compare_digest(credential.strip().encode(), token.encode()):
            return f"token holder at {request.remote}"
        raise AuthenticationFailed(
            "invalid admin token", headers={"WWW-Authenticate": 'Bearer error="invalid_token"'}
        )
    if is_loopback(request):
        return f"loopback peer {request.remote}"
    if token:
        raise PermissionDenied(
            "admin calls from this address need 'Authorization: Bearer <CB_ADMIN_TOKEN>'"
        )
    raise PermissionDenied("admin calls are only allowed from loopback (CB_ADMIN_TOKEN is not set)")


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


async def readyz(request: web.Request) -> web.Response:
    state = _state(request)
    if state.ready:
        return json_response({"status": "ready", "rules": state.rules.source})
    reason = "draining" if state.draining else "starting"
    return json_response({"status": reason}, status=503)


async def metrics(request: web.Request) -> web.Response:
    state = _state(request)
    body = generate_latest(state.metrics.registry)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def usage(request: web.Request) -> web.Response:
    return json_response(_state(request).usage.snapshot())


# -- circuit-breaker API --------------------------------------------------------------


def _lookup(state: ProxyState, name: str) -> tuple[CircuitBreaker, dict[str, CircuitBreaker]]:
    """The breaker called ``name`` and the deployment breakers an order on it governs.

    An upstream's name is its provider breaker and every deployment breaker on it (one
    operator order for the upstream, docs/breaker.md 'Admin'); ``model@upstream`` is that
    one deployment's breaker alone.
    """
    breaker = state.breakers.get(name)
    if breaker is not None:
        return breaker, state.deployments_on(name)
    breaker = state.deployment_breakers.get(name)
    if breaker is not None:
        return breaker, {}
    known = ", ".join(sorted(state.breakers.get_all())) or "none"
    raise NotFound(
        f"unknown circuit breaker {name!r}; known breakers: {known} "
        "(or a deployment as model@upstream)",
        param="name",
        code="breaker_not_found",
    )


def _deployment_metrics(state: ProxyState) -> dict[str, Any]:
    """Each deployment breaker's metrics, with its labels and its first-token figures."""
    out: dict[str, Any] = {}
    for key, breaker in sorted(state.deployment_breakers.get_all().items()):
        out[key] = {**breaker.get_metrics(), **state.deployment_facts(key)}
    return out


def overall_health(states: Mapping[str, State]) -> str:
    """healthy: nothing open; unhealthy: every breaker turns calls away; degraded: between."""
    unavailable = sum(s in UNAVAILABLE_STATES for s in states.values())
    if states and unavailable == len(states):
        return "unhealthy"
    if unavailable or any(s is State.HALF_OPEN for s in states.values()):
        return "degraded"
    return "healthy"


async def breaker_metrics(request: web.Request) -> web.Response:
    state = _state(request)
    breakers = state.breakers.get_all()
    return json_response(
        {
            "breakers": {n: b.get_metrics() for n, b in sorted(breakers.items())},
            "deployments": _deployment_metrics(state),
        }
    )


async def breaker_status(request: web.Request) -> web.Response:
    state = _state(request)
    return json_response(
        {
            name: {n: {"state": b.state.value, "mode": b.mode.value} for n, b in sorted(r.items())}
            for name, r in (
                ("breakers", state.breakers.get_all()),
                ("deployments", state.deployment_breakers.get_all()),
            )
        }
    )


async def breaker_health(request: web.Request) -> web.Response:
    state = _state(request)
    states = {n: b.state for n, b in sorted(state.breakers.get_all().items())}
    counts = Counter(s.value for s in states.values())
    checker = checker_of(state)
    checks: dict[str, Any] = (
        checker.snapshot()
        if checker is not None
        else {"enabled": False, "interval_seconds": 0.0, "providers": {}}
    )
    # Always 200: this reports the upstreams, and a probe reading it must not restart
    # the sidecar because a provider is down (/readyz is the probe endpoint).
    deployments = {n: b.state for n, b in sorted(state.deployment_breakers.get_all().items())}
    status = overall_health(states)
    if status == "healthy" and any(s is not State.CLOSED for s in deployments.values()):
        status = "degraded"  # one model out on a provider that is otherwise fine
    return json_response(
        {
            "status": status,
            "breakers": {"total": len(states), **{s.value: counts[s.value] for s in State}},
            "open": [n for n, s in states.items() if s in UNAVAILABLE_STATES],
            "half_open": [n for n, s in states.items() if s is State.HALF_OPEN],
            "open_deployments": [n for n, s in deployments.items() if s in UNAVAILABLE_STATES],
            "half_open_deployments": [n for n, s in deployments.items() if s is State.HALF_OPEN],
            "health_checks": checks,
        }
    )


async def mutate_breaker(request: web.Request) -> web.Response:
    who = authorize_mutation(request)
    action = request.match_info["action"]
    name = request.match_info["name"]
    breaker, governed = _lookup(_state(request), name)
    before_state, before_mode = breaker.state, breaker.mode
    MUTATIONS[action](breaker)
    for deployment in governed.values():
        MUTATIONS[action](deployment)
    LOG.warning(
        "admin: %s on breaker %s by %s: state %s -> %s, mode %s -> %s",
        action,
        name,
        who,
        before_state.value,
        breaker.state.value,
        before_mode.value,
        breaker.mode.value,
        extra={"cb": {"admin_action": action, "upstream": name, "by": who}},
    )
    return json_response(
        {
            "action": action,
            "breaker": breaker.get_metrics(),
            "deployments": {n: b.get_metrics() for n, b in sorted(governed.items())},
        }
    )


async def reset_all_breakers(request: web.Request) -> web.Response:
    who = authorize_mutation(request)
    state = _state(request)
    registry = state.breakers
    changed = sorted(
        n
        for r in (registry, state.deployment_breakers)
        for n, b in r.get_all().items()
        if b.state is not State.CLOSED
    )
    registry.reset_all()
    state.deployment_breakers.reset_all()
    LOG.warning(
        "admin: reset-all by %s: %d breaker(s) were not closed: %s",
        who,
        len(changed),
        ", ".join(changed) or "none",
        extra={"cb": {"admin_action": "reset-all", "by": who}},
    )
    breakers = registry.get_all()
    return json_response(
        {
            "action": "reset-all",
            "breakers": {n: b.get_metrics() for n, b in sorted(breakers.items())},
            "deployments": _deployment_metrics(state),
        }
    )


def add_routes(
    app: web.Application,
    *,
    api_port: bool,
    wrap: Callable[[Handler, str | None], Handler] = lambda handler, _endpoint: handler,
    expect: Callable[[web.Request], Awaitable[web.StreamResponse | None]] | None = None,
) -> None:
    def add(method: str, path: str, handler: Handler) -> None:
        app.router.add_route(method, path, wrap(handler, None), expect_handler=expect)

    add("GET", "/healthz", healthz)
    add("GET", "/readyz", readyz)
    add("GET", "/api/usage", usage)
    add("GET", f"{BREAKER_API}/metrics", breaker_metrics)
    add("GET", f"{BREAKER_API}/status", breaker_status)
    add("GET", f"{BREAKER_API}/health", breaker_health)
    add("POST", f"{BREAKER_API}/reset-all", reset_all_breakers)
    actions = "|".join(MUTATIONS)
    add("POST", f"{BREAKER_API}/{{action:{actions}}}/{{name}}", mutate_breaker)
    if not api_port:
        add("GET", "/metrics", metrics)
