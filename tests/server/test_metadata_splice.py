"""forward.with_metadata: the circuit_breaker object spliced into an upstream reply's bytes."""

from __future__ import annotations

from typing import Any

import orjson
import pytest

from proxy.server.forward import with_metadata

META: dict[str, Any] = {
    "provider": "openai",
    "model": "gpt-4o-mini",
    "upstream": "gpt-4o-mini@openai",
    "fallback_used": False,
    "attempts": 1,
    "breaker_state": "closed",
    "cost_usd": 1.5e-05,
    "usage_estimated": False,
    "route": "strategy=balanced; chose=gpt-4o-mini@openai",
}

REPLIES = [
    b'{"id":"c1","object":"chat.completion","model":"gpt-4o-mini","choices":[],'
    b'"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}',
    b'{\n  "id": "c2",\n  "choices": [{"message": {"content": "h\\u00e9 }"}}]\n}\n',
    b'  {"object": "list", "data": [{"embedding": [0.1, -2e-05]}]}  \r\n',
    b'{"a": {"b": {}}}',
]


@pytest.mark.parametrize("raw", REPLIES)
def test_spliced_reply_parses_to_the_redumped_form(raw: bytes) -> None:
    obj = orjson.loads(raw)
    spliced = with_metadata(raw, obj, META)
    assert orjson.loads(spliced) == orjson.loads(orjson.dumps({**obj, "circuit_breaker": META}))
    assert spliced.startswith(raw.rstrip()[:-1])  # the upstream's bytes are kept as they came


def test_empty_object_and_an_existing_key_are_redumped() -> None:
    assert orjson.loads(with_metadata(b"{}", {}, META)) == {"circuit_breaker": META}
    raw = b'{"id":"x","circuit_breaker":{"old":true}}'
    out = orjson.loads(with_metadata(raw, orjson.loads(raw), META))
    assert out == {"id": "x", "circuit_breaker": META}
    assert out["circuit_breaker"] == META
