"""The OpenAI-compatible endpoints.

/v1/chat/completions, /v1/completions, /v1/embeddings and /v1/models.

Each handler reads the body once (orjson), checks the shape the OpenAI API
requires (a clear 400 otherwise), pops the ``circuit_breaker`` extension (it
is never forwarded upstream), plans the route and hands over to ``forward``.
"""

from __future__ import annotations

import functools
import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web

from proxy.core.errors import InvalidRequest, PayloadTooLarge, UnsupportedMediaType
from proxy.core.explain import plan_log_fields
from proxy.core.prefs import EXTENSION_KEY, parse_prefs, routing_inputs
from proxy.core.router import RoutePlan, plan_route
from proxy.providers.anthropic_inbound import ANTHROPIC_VERSION_HEADER, models_list
from proxy.providers.base import Endpoint, JSONDict
from proxy.server.continuation import for_request
from proxy.server.forward import Exchange, serve
from proxy.server.state import REQUEST_INFO, ProxyState

STATE: web.AppKey[ProxyState] = web.AppKey("state", ProxyState)
REQUEST_ID_MAX = 128
# Nesting of a request body. orjson parses up to 1,024 levels but writes only 254, and the
# translators recurse: without a lower limit a deep body parses, then fails as a 500. Real
# requests (tool schemas included) stay far below 64 levels.
MAX_JSON_DEPTH = 128
_OPENERS = (b"[", b"{")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
Wrap = Callable[[Handler, str | None], Handler]
# aiohttp's `Expect:` hook of a route (server/connections.py); None keeps aiohttp's default.
ExpectHandler = Callable[[web.Request], Awaitable[web.StreamResponse | None]]


ROUTE_LOG = logging.getLogger("cb_proxy.route")


def log_plan(plan: RoutePlan, request_id: str) -> None:
    """One structured debug line per request with the whole plan (LOG_LEVEL=debug).

    A skipped request fallback is a warning line of its own, at any level.
    """
    for warning in plan.warnings:
        ROUTE_LOG.warning("route %s: %s", request_id, warning)
    if ROUTE_LOG.isEnabledFor(logging.DEBUG):
        fields = plan_log_fields(plan)
        fields["request_id"] = request_id
        ROUTE_LOG.debug("route %s: %s", request_id, plan.header(), extra={"cb": fields})


def _bare(handler: Handler, endpoint: str | None) -> Handler:
    return handler


MODEL_OWNER = "cb-proxy"


def request_id(request: web.Request) -> str:
    """The client's x-request-id when it is sane, otherwise a fresh one."""
    given = request.headers.get("x-request-id")
    if given and len(given) <= REQUEST_ID_MAX and given.isprintable():
        return given
    return "req_" + os.urandom(12).hex()


async def read_json(request: web.Request) -> JSONDict:
    encoding = request.headers.get("Content-Encoding", "identity").strip().lower()
    if encoding != "identity":
        # OpenAI's and Anthropic's SDKs send plain JSON; a compressed body could inflate far
        # past the body limit, so it is refused unread (the server does not inflate it).
        raise UnsupportedMediaType(
            f"Content-Encoding {encoding!r} is not supported; send the JSON body uncompressed"
        )
    limit = request.app[STATE].settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise PayloadTooLarge(
            f"request body is {request.content_length} bytes; the limit is {limit}"
        )
    # Read from the stream rather than with request.read(), which keeps the raw body on the
    # request for as long as the request lives (a stream's whole life); only the parse is kept.
    parts: list[bytes] = []
    size = 0
    while chunk := await request.content.readany():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body exceeds the limit of {limit} bytes")
        parts.append(chunk)
    raw = parts[0] if len(parts) == 1 else b"".join(parts)
    if not raw:
        raise InvalidRequest("request body is empty; expected a JSON object")
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if not isinstance(body, dict):
        raise InvalidRequest("request body must be a JSON object")
    # Counting brackets is C speed; only a body with enough of them can be too deep to walk.
    if sum(map(raw.count, _OPENERS)) > MAX_JSON_DEPTH and json_depth(body) > MAX_JSON_DEPTH:
        raise InvalidRequest(
            f"request body nests deeper than {MAX_JSON_DEPTH} levels", code="too_deep"
        )
    return body


def json_depth(value: Any) -> int:
    """Nesting depth of parsed JSON (a scalar is 0), without recursion."""
    deepest = 0
    stack: list[tuple[Any, int]] = [(value, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            children: Any = node.values()
        elif isinstance(node, list):
            children = node
        else:
            continue
        depth += 1
        deepest = max(deepest, depth)
        stack.extend((child, depth) for child in children if isinstance(child, dict | list))
    return deepest


def _present(body: JSONDict, key: str) -> Any:
    """The value of a required parameter; a 400 naming it when it is missing."""
    value = body.get(key)
    if value is None:
        raise InvalidRequest(
            f"you must provide a '{key}' parameter", param=key, code="missing_required_parameter"
        )
    return value


def _require_str(body: JSONDict, key: str) -> str:
    value = _present(body, key)
    if not isinstance(value, str) or not value:
        raise InvalidRequest(f"'{key}' must be a non-empty string", param=key, code="invalid_type")
    return value


def _check_messages(body: JSONDict) -> None:
    messages = _present(body, "messages")
    if not isinstance(messages, list) or not messages:
        raise InvalidRequest(
            "'messages' must be a non-empty array", param="messages", code="invalid_type"
        )
    for i, msg in enumerate(messages):
        if not isinstance(msg, dict):
            raise InvalidRequest(
                f"'messages[{i}]' must be an object", param=f"messages[{i}]", code="invalid_type"
            )
        role = msg.get("role")
        if not isinstance(role, str):
            raise InvalidRequest(
                f"'messages[{i}].role' is required and must be a string",
                param=f"messages[{i}].role",
                code="invalid_type",
            )


def _stream_flags(body: JSONDict) -> tuple[bool, bool]:
    stream = body.get("stream", False)
    if stream is None:
        stream = False
    if not isinstance(stream, bool):
        raise InvalidRequest("'stream' must be a boolean", param="stream", code="invalid_type")
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise InvalidRequest(
            "'stream_options' must be an object", param="stream_options", code="invalid_type"
        )
    include_usage = bool(options and options.get("include_usage"))
    return stream, include_usage


# An endpoint's own checks of the parsed body: (model, stream, include_usage), or a 400.
Check = Callable[[JSONDict], tuple[str, bool, bool]]


def _exchange(request: web.Request, endpoint: Endpoint, body: JSONDict, check: Check) -> Exchange:
    """Check the body, plan the route: the Exchange that carries the request from here on.

    A plain function, so the parsed body is held by the Exchange alone (``streaming``
    drops it at the commit point), not by the frames waiting on the upstream.
    """
    model, stream, include_usage = check(body)
    state = request.app[STATE]
    rules = state.rules  # read once: the request keeps these rules even if a reload swaps them
    prefs = parse_prefs(body.pop(EXTENSION_KEY, None))
    messages, prompt_tokens = routing_inputs(body)
    plan = plan_route(
        rules,
        model,
        request.headers,
        prefs,
        state,
        messages=messages,
        prompt_tokens=prompt_tokens,
        endpoint=endpoint.value,
    )
    info = request[REQUEST_INFO]
    log_plan(plan, info.request_id)  # one debug line with the whole plan; free at info
    info.model = plan.resolved
    info.stream = stream
    return Exchange(
        request=request,
        state=state,
        rules=rules,
        endpoint=endpoint,
        body=body,
        stream=stream,
        plan=plan,
        request_id=info.request_id,
        started=time.perf_counter(),
        include_usage=include_usage,
    )


async def _dispatch(request: web.Request, endpoint: Endpoint, check: Check) -> web.StreamResponse:
    """The handler of every proxied endpoint (one coroutine frame per request)."""
    ex = _exchange(request, endpoint, await read_json(request), check)
    ex.continuation = for_request(ex)
    try:
        return await serve(ex)
    finally:
        request[REQUEST_INFO].upstream_seconds = ex.upstream_seconds


def _check_chat(body: JSONDict) -> tuple[str, bool, bool]:
    model = _require_str(body, "model")
    _check_messages(body)
    stream, include_usage = _stream_flags(body)
    return model, stream, include_usage


def _check_completions(body: JSONDict) -> tuple[str, bool, bool]:
    model = _require_str(body, "model")
    prompt = _present(body, "prompt")
    if not isinstance(prompt, str | list):
        raise InvalidRequest(
            "'prompt' must be a string or an array", param="prompt", code="invalid_type"
        )
    stream, include_usage = _stream_flags(body)
    return model, stream, include_usage


def _check_embeddings(body: JSONDict) -> tuple[str, bool, bool]:
    model = _require_str(body, "model")
    value = _present(body, "input")
    if not isinstance(value, str | list) or value == [] or value == "":
        raise InvalidRequest(
            "'input' must be a non-empty string or array", param="input", code="invalid_type"
        )
    if body.get("stream"):
        raise InvalidRequest("embeddings cannot be streamed", param="stream")
    return model, False, False


# The handlers: partials of _dispatch (aiohttp takes them as coroutine functions), so no
# per-endpoint coroutine frame sits between the wrapper and _dispatch for a stream's life.
chat_completions: Handler = functools.partial(_dispatch, endpoint=Endpoint.CHAT, check=_check_chat)
completions: Handler = functools.partial(
    _dispatch, endpoint=Endpoint.COMPLETIONS, check=_check_completions
)
embeddings: Handler = functools.partial(
    _dispatch, endpoint=Endpoint.EMBEDDINGS, check=_check_embeddings
)


def models_payload(state: ProxyState) -> JSONDict:
    rules = state.rules
    created = int(state.started_at)
    data: list[dict[str, Any]] = []
    for model in rules.models.values():
        providers = sorted({d.provider for d in model.deployments})
        entry = {
            "id": model.name,
            "object": "model",
            "created": created,
            "owned_by": ",".join(providers),
        }
        if model.description:
            entry["description"] = model.description
        data.append(entry)
        for alias in model.aliases:
            data.append(
                {
                    "id": alias,
                    "object": "model",
                    "created": created,
                    "owned_by": ",".join(providers),
                    "alias_of": model.name,
                }
            )
    for vm in rules.virtual_models.values():
        data.append(
            {
                "id": vm.name,
                "object": "model",
                "created": created,
                "owned_by": MODEL_OWNER,
                "virtual": True,
                "strategy": vm.strategy,
                "description": vm.description or f"virtual model: {vm.strategy} routing",
            }
        )
    return {"object": "list", "data": data}


async def list_models(request: web.Request) -> web.Response:
    payload = models_payload(request.app[STATE])
    if ANTHROPIC_VERSION_HEADER in request.headers:  # an Anthropic SDK: its list shape
        payload = models_list(payload)
    return web.Response(body=orjson.dumps(payload), content_type="application/json")


def add_routes(
    app: web.Application, wrap: Wrap = _bare, expect: ExpectHandler | None = None
) -> None:
    routes = (
        ("/v1/chat/completions", "POST", chat_completions, "chat"),
        ("/v1/completions", "POST", completions, "completions"),
        ("/v1/embeddings", "POST", embeddings, "embeddings"),
        ("/v1/models", "GET", list_models, None),
    )
    for path, method, handler, endpoint in routes:
        app.router.add_route(method, path, wrap(handler, endpoint), expect_handler=expect)
        # Some clients are configured without the /v1 prefix.
        app.router.add_route(
            method, path.removeprefix("/v1"), wrap(handler, endpoint), expect_handler=expect
        )
