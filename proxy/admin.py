"""Operational endpoints: /healthz, /readyz, /metrics, /api/usage, /api/circuit-breaker/*.

Read-only endpoints answer anyone who can reach the listener. Mutating calls
(breaker resets and overrides) need a loopback peer or ``CB_ADMIN_TOKEN`` as
a bearer token, and every mutation is logged.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from proxy.errors import AuthenticationFailed, PermissionDenied
from proxy.state import ProxyState

LOG = logging.getLogger("cb_proxy.admin")
STATE_KEY_NAME = "state"


def _state(request: web.Request) -> ProxyState:
    from proxy.api import STATE

    return request.app[STATE]


def json_response(payload: object, status: int = 200) -> web.Response:
    return web.Response(status=status, body=orjson.dumps(payload), content_type="application/json")


def is_loopback(request: web.Request) -> bool:
    peer = request.remote
    if not peer:
        return False
    try:
        return ipaddress.ip_address(peer.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def authorize_mutation(request: web.Request) -> str:
    """Who may change breaker state: loopback peers, or anyone with the admin token.

    Returns a short description of the caller for the audit log.
    """
    state = _state(request)
    token = state.settings.admin_token
    given = request.headers.get("Authorization", "")
    if token and given.startswith("Bearer "):
        if hmac.compare_digest(given[7:].strip().encode(), token.encode()):
            return f"token holder at {request.remote}"
        raise AuthenticationFailed("invalid admin token")
    if is_loopback(request):
        return f"loopback peer {request.remote}"
    if token:
        raise AuthenticationFailed(
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


def add_routes(app: web.Application, *, api_port: bool) -> None:
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/api/usage", usage)
    if not api_port:
        app.router.add_get("/metrics", metrics)
