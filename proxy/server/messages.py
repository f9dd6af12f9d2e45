"""The Anthropic-compatible endpoints: ``POST /v1/messages`` and ``/v1/messages/count_tokens``.

An Anthropic SDK app points its ``base_url`` at the proxy and changes nothing else.
Its Messages request is translated to the internal OpenAI chat body
(``proxy.providers.anthropic_inbound``) and routed exactly like
``/v1/chat/completions``: rules, aliases, virtual models, strategies, breakers,
failover, cost, metrics and the ``x-cb-*`` headers. The routing extension rides in
the ``x-cb-routing`` header (JSON) or in the body's ``circuit_breaker``. The reply
goes back in Anthropic's shape: a plain body is translated once; a stream is
re-encoded event by event as the relay writes it (``REFRAME``, proxy.server.streaming).
A candidate that is itself an Anthropic upstream gets the client's own body instead
(``Exchange.native``; proxy.providers.anthropic_native) and its reply is relayed as
bytes, untranslated: ``thinking``, ``top_k`` and every stop reason survive.

Errors here use Anthropic's shape ``{"type": "error", "error": {"type", "message"}}``.
The client's ``x-api-key``/``authorization`` are never forwarded: adapters build
upstream headers from the rules and the proxy's own keys only.
"""

from __future__ import annotations

import time
from typing import Any

import orjson
from aiohttp import web

from proxy.core.errors import InvalidRequest, ProxyError, UpstreamHTTPError
from proxy.core.prefs import EXTENSION_KEY, parse_prefs, routing_inputs
from proxy.core.router import plan_route
from proxy.core.usage import CHARS_PER_TOKEN
from proxy.providers import anthropic_inbound as inbound
from proxy.providers.anthropic import upstream_headers as anthropic_headers
from proxy.providers.base import Endpoint, JSONDict, NativeBody, Usage
from proxy.server.api import STATE, ExpectHandler, Wrap, log_plan, read_json
from proxy.server.forward import Exchange, serve
from proxy.server.state import REQUEST_INFO
from proxy.server.streaming import REFRAME, StreamRelay

ROUTING_HEADER = "x-cb-routing"
PATH_PREFIX = "/v1/messages"  # every path of this API: its errors answer in Anthropic's shape
COUNT_TOKENS_PATH = "/v1/messages/count_tokens"
COUNT_BODY_LIMIT = 64 * 1024
# Headers of the proxy's own reply that the translated body invalidates.
DROPPED_HEADERS = frozenset({"content-type", "content-length"})


class ReframedRelay(StreamRelay):
    """The stream relay with its output re-encoded as Anthropic Messages events."""

    __slots__ = ("_inner", "_writer")

    def __init__(self, inner: StreamRelay, writer: inbound.AnthropicSSEWriter) -> None:
        # Not StreamRelay.__init__: every member is delegated to ``inner``.
        self._inner = inner
        self._writer = writer

    def feed(self, chunk: bytes) -> bytes:
        return self._writer.feed(self._inner.feed(chunk))

    def finish(self) -> bytes:
        return self._writer.feed(self._inner.finish()) + self._writer.finish()

    def error_frame(self, error: JSONDict) -> bytes:
        return self._writer.error(error)

    @property
    def has_content(self) -> bool:
        return self._inner.has_content

    @property
    def content_chars(self) -> int:
        return self._inner.content_chars

    @property
    def usage(self) -> Usage | None:
        return self._inner.usage


def error_response(err: ProxyError, rid: str) -> web.Response:
    """A proxy error in Anthropic's shape, with its status and retry headers."""
    headers = {"x-request-id": rid, "request-id": rid, **err.headers}
    if isinstance(err, UpstreamHTTPError):
        headers.setdefault("x-should-retry", "false" if err.http_status < 500 else "true")
    return web.Response(
        status=err.http_status,
        body=orjson.dumps(inbound.error_of(err)),
        content_type="application/json",
        headers=headers,
    )


def _extension(request: web.Request, body: JSONDict) -> Any:
    """The routing extension: the body's ``circuit_breaker``, else the ``x-cb-routing`` header."""
    raw = body.pop(EXTENSION_KEY, None)
    if raw is not None:
        return raw
    header = request.headers.get(ROUTING_HEADER)
    if not header:
        return None
    try:
        return orjson.loads(header)
    except orjson.JSONDecodeError:
        raise InvalidRequest(
            f"the {ROUTING_HEADER} header is not valid JSON", param=ROUTING_HEADER
        ) from None


async def messages(request: web.Request) -> web.StreamResponse:
    info = request[REQUEST_INFO]
    try:
        return await _messages(request)
    except ProxyError as err:
        return error_response(err, info.request_id)


async def _messages(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    prefs = parse_prefs(_extension(request, body))
    chat = inbound.to_chat(body)
    client_model: str = chat["model"]
    stream = bool(chat.get("stream"))
    rules = state.rules
    msgs, prompt_tokens = routing_inputs(chat)
    plan = plan_route(
        rules,
        client_model,
        request.headers,
        prefs,
        state,
        messages=msgs,
        prompt_tokens=prompt_tokens,
        endpoint=Endpoint.CHAT.value,  # a Messages request is a chat, never an embeddings one
    )
    info = request[REQUEST_INFO]
    log_plan(plan, info.request_id)
    info.model = plan.resolved
    info.stream = stream
    if stream:
        writer = inbound.AnthropicSSEWriter(client_model, prompt_tokens)
        request[REFRAME] = lambda relay: ReframedRelay(relay, writer)
    ex = Exchange(
        request=request,
        state=state,
        rules=rules,
        endpoint=Endpoint.CHAT,
        body=chat,
        stream=stream,
        plan=plan,
        request_id=info.request_id,
        started=time.perf_counter(),
        include_usage=True,  # the usage goes into message_delta
        native=NativeBody("anthropic", body),  # an Anthropic upstream gets it as it came
    )
    try:
        response = await serve(ex)
    finally:
        info.upstream_seconds = ex.upstream_seconds
    if stream or not isinstance(response, web.Response) or response.body is None:
        return response
    if ex.relayed_native:  # the upstream's own Messages reply: relayed as it came
        response.headers["request-id"] = info.request_id
        return response
    reply = orjson.loads(response.body)  # type: ignore[arg-type]
    headers = {k: v for k, v in response.headers.items() if k.lower() not in DROPPED_HEADERS}
    headers["request-id"] = info.request_id
    return web.Response(
        body=orjson.dumps(inbound.to_message(reply, client_model)),
        content_type="application/json",
        headers=headers,
    )


async def count_tokens(request: web.Request) -> web.StreamResponse:
    info = request[REQUEST_INFO]
    try:
        return await _count_tokens(request)
    except ProxyError as err:
        return error_response(err, info.request_id)


def _estimate(chat: JSONDict, body: JSONDict) -> int:
    chars = sum(len(orjson.dumps(m.get("content") or "")) for m in chat["messages"])
    chars += len(orjson.dumps(body.get("tools") or []))
    return max(1, -(-chars // CHARS_PER_TOKEN))


async def _count_tokens(request: web.Request) -> web.StreamResponse:
    state = request.app[STATE]
    body = await read_json(request)
    prefs = parse_prefs(_extension(request, body))
    # count_tokens takes no max_tokens: validate the rest with a placeholder.
    chat = inbound.to_chat({**body, "max_tokens": body.get("max_tokens") or 1, "stream": False})
    msgs, prompt_tokens = routing_inputs(chat)
    plan = plan_route(
        state.rules, chat["model"], request.headers, prefs, state, messages=msgs,
        prompt_tokens=prompt_tokens, endpoint=Endpoint.CHAT.value,
    )  # fmt: skip
    info = request[REQUEST_INFO]
    info.model = plan.resolved
    headers = {"x-request-id": info.request_id, "request-id": info.request_id}
    pool = state.upstream
    for cand in plan.candidates:
        if cand.provider.type != "anthropic" or pool is None:
            break
        # Exact: the upstream's own count (its key injected here, the client's never sent).
        key = state.keys.get(cand.provider.name)
        upstream_headers = {
            "content-type": "application/json",
            **anthropic_headers(cand.provider, key),
        }
        payload = orjson.dumps(inbound.count_body(body, cand.deployment.upstream_model))
        try:
            resp = await pool.request(
                "POST",
                cand.provider.base_url + COUNT_TOKENS_PATH,
                upstream_headers,
                payload,
                connect_timeout=cand.provider.timeouts.connect,
            )
            async with resp:
                raw = await resp.read(limit=COUNT_BODY_LIMIT)
                status = resp.status
        except Exception:
            continue  # this upstream cannot count now: the next, or an estimate
        if status == 200:
            headers["x-cb-provider"] = cand.provider.name
            headers["x-cb-model"] = cand.deployment.upstream_model
            return web.Response(
                body=state.redactor.redact_success(raw),
                content_type="application/json",
                headers=headers,
            )
        if 400 <= status < 500 and status not in (401, 403, 404, 429):
            err = inbound.error_payload(status, "the upstream rejected the count_tokens request")
            try:
                parsed = orjson.loads(state.redactor.redact_bytes(raw))
                if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
                    err = parsed
            except orjson.JSONDecodeError:
                pass
            return web.Response(
                status=status, body=orjson.dumps(err), content_type="application/json",
                headers=headers,
            )  # fmt: skip
    headers["x-cb-usage-estimated"] = "true"
    return web.Response(
        body=orjson.dumps({"input_tokens": _estimate(chat, body)}),
        content_type="application/json",
        headers=headers,
    )


def _bare(handler: Any, endpoint: str | None) -> Any:
    return handler


def add_routes(
    app: web.Application, wrap: Wrap = _bare, expect: ExpectHandler | None = None
) -> None:
    routes = (
        ("/v1/messages", messages, "messages"),
        (COUNT_TOKENS_PATH, count_tokens, "count_tokens"),
    )
    for path, handler, endpoint in routes:
        app.router.add_route("POST", path, wrap(handler, endpoint), expect_handler=expect)
