"""Fuzz every endpoint of a real proxy in front of OpenAI, Anthropic and Gemini upstreams.

Hypothesis draws structurally plausible requests with anything in any field
(tests/fuzz/strategies.py), totally random JSON, random bytes and headers, and
sends them to the proxy (tests/fuzz/stack.py). The properties, for every reply:

- no 5xx caused by the request itself: no upstream is told to fail here, so
  any 5xx is the proxy's bug;
- every error is in OpenAI's shape (``ErrorResponse`` of the official spec),
  every success in the endpoint's response shape, every stream event too;
- the proxy is alive after it all: a normal request per format succeeds.

The number of examples is bounded for ``make test`` (about 15 s on two cores);
``CB_FUZZ_EXAMPLES`` scales it up and ``CB_FUZZ_RANDOM=1`` drops the fixed seed
for an exploratory run.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tests.fuzz.stack import CHAT_MODELS, EMBEDDING_MODELS, Reply, Stack, running_stack
from tests.fuzz.strategies import (
    CHAT_BODY,
    COMPLETION_BODY,
    EMBEDDING_BODY,
    HEADERS,
    any_json,
)
from tests.openapi import validate, validate_payloads

EXAMPLES = int(os.environ.get("CB_FUZZ_EXAMPLES", "400"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    derandomize=os.environ.get("CB_FUZZ_RANDOM") != "1",
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
SUCCESS_SCHEMAS = {
    "/v1/chat/completions": "CreateChatCompletionResponse",
    "/v1/completions": "CreateCompletionResponse",
    "/v1/embeddings": "CreateEmbeddingResponse",
    "/v1/models": "ListModelsResponse",
}
POST_PATHS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/chat/completions")
GET_PATHS = (
    "/v1/models",
    "/models",
    "/v1/models/gpt-4o-mini",
    "/healthz",
    "/readyz",
    "/api/usage",
    "/api/circuit-breaker/status",
    "/api/circuit-breaker/metrics",
    "/api/circuit-breaker/health",
)


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    with running_stack(Path(tmp_path_factory.mktemp("fuzz"))) as running:
        yield running


def check(stack: Stack, path: str, reply: Reply, sent: Any = None) -> None:
    """The properties every reply has, whatever was sent."""
    context = f"{path} {reply.status} sent={sent!r:.400} got={reply.body[:400]!r}"
    assert reply.status < 500 or stack.failing(), context
    content_type = reply.headers.get("Content-Type", "")
    if reply.status >= 400:
        assert content_type.startswith("application/json"), context
        validate("ErrorResponse", orjson.loads(reply.body))
        return
    if content_type.startswith("text/event-stream"):
        events = [e for e in reply.body.split(b"\n\n") if e.strip()]
        payloads = [e.removeprefix(b"data: ").decode() for e in events]
        if "chat" in path:
            validate_payloads(payloads)
        for payload in payloads:
            if payload != "[DONE]":
                obj = orjson.loads(payload)
                if "error" in obj:
                    validate("ErrorResponse", obj)
        return
    schema = SUCCESS_SCHEMAS.get(path if path.startswith("/v1") else "/v1" + path)
    if schema is not None and reply.status == 200:
        obj = orjson.loads(reply.body)
        obj.pop("circuit_breaker", None)
        for item in obj.get("data", []) if path.endswith("embeddings") else ():
            if isinstance(item.get("embedding"), str):  # base64: the spec models floats only
                item["embedding"] = []
        validate(schema, obj)


def post(stack: Stack, path: str, body: Any, headers: dict[str, str] | None = None) -> None:
    try:
        raw = orjson.dumps(body)
    except TypeError:  # a lone surrogate or a 65-bit integer: JSON orjson does not write
        raw = json.dumps(body).encode()
    reply = stack.request("POST", path, body=raw, headers=headers)
    event(f"{path} {reply.status} {_code(reply)}")  # --hypothesis-show-statistics: how deep
    check(stack, path, reply, body)


def _code(reply: Reply) -> str:
    if reply.status < 400:
        return ""
    error = orjson.loads(reply.body).get("error") or {}
    return f"{error.get('code')} {error.get('param')} {str(error.get('message'))[:50]}"


@FUZZ
@given(body=CHAT_BODY, headers=HEADERS)
def test_chat_completions(stack: Stack, body: dict[str, Any], headers: dict[str, str]) -> None:
    post(stack, "/v1/chat/completions", body, headers)


@FUZZ
@given(body=COMPLETION_BODY)
def test_completions(stack: Stack, body: dict[str, Any]) -> None:
    post(stack, "/v1/completions", body)


@FUZZ
@given(body=EMBEDDING_BODY)
def test_embeddings(stack: Stack, body: dict[str, Any]) -> None:
    post(stack, "/v1/embeddings", body)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 2))
@given(path=st.sampled_from(POST_PATHS), body=any_json)
def test_random_json(stack: Stack, path: str, body: Any) -> None:
    post(stack, path, body)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(path=st.sampled_from(POST_PATHS), body=st.binary(max_size=200))
def test_random_bytes(stack: Stack, path: str, body: bytes) -> None:
    check(stack, path, stack.request("POST", path, body=body), body)


@settings(FUZZ, max_examples=max(1, EXAMPLES // 3))
@given(path=st.sampled_from(GET_PATHS), headers=HEADERS, admin=st.booleans())
def test_gets(stack: Stack, path: str, headers: dict[str, str], admin: bool) -> None:
    reply = stack.request("GET", path, headers=headers, admin=admin)
    assert reply.status < 500 or path == "/readyz", reply
    if reply.status >= 400 and path != "/readyz":
        validate("ErrorResponse", orjson.loads(reply.body))


FAULTS: tuple[dict[str, Any], ...] = (
    {"kind": "status", "status": 500},
    {"kind": "status", "status": 503},
    {"kind": "error_event"},
    {"kind": "cut_stream"},
)


@pytest.mark.parametrize("fault", FAULTS, ids=[f"{f['kind']}{f.get('status', '')}" for f in FAULTS])
def test_chat_against_failing_upstreams(stack: Stack, fault: dict[str, Any]) -> None:
    """With every upstream told to fail, a 5xx is allowed; its shape is still OpenAI's."""

    @settings(FUZZ, max_examples=max(1, EXAMPLES // 10))
    @given(body=CHAT_BODY)
    def fuzz(body: dict[str, Any]) -> None:
        post(stack, "/v1/chat/completions", body)

    stack.fail_upstreams(fault)
    try:
        fuzz()
    finally:
        stack.heal()


@pytest.mark.parametrize("model", [*CHAT_MODELS, *EMBEDDING_MODELS])
def test_the_proxy_is_alive_after_the_fuzz(stack: Stack, model: str) -> None:
    body: dict[str, Any]
    if model in EMBEDDING_MODELS:
        path, body = "/v1/embeddings", {"model": model, "input": "hello"}
    else:
        path, body = (
            "/v1/chat/completions",
            {"model": model, "messages": [{"role": "user", "content": "hi"}]},
        )
    reply = stack.request("POST", path, body=orjson.dumps(body))
    assert reply.status == 200, reply
    check(stack, path, reply, body)
