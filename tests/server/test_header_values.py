"""Response headers built from rules never carry raw CR/LF or non-ASCII (proxy.server.exchange).

The rules below are accepted by ``cb-proxy check`` and hold odd names: a model name with
CR/LF and a would-be header in it, non-ASCII provider and model names, an OpenAI-style
upstream model with '/' and a space, and a Gemini upstream model that must be
percent-encoded in the URL path. Every ``x-cb-*`` value comes out as printable ASCII.
"""

from __future__ import annotations

import json
from pathlib import Path

import aiohttp
import pytest

from proxy.config.check import load_rules
from tests.fakes.upstream import running_mock
from tests.harness import ProxyHandle, running_proxy, write_rules

INJECTING_MODEL = "mödel\r\nx-injected: 1"
RULES = """
version: 1
providers:
  "prövider":
    type: openai
    base_url: {openai}/v1
  "gém":
    type: gemini
    base_url: {gemini}
models:
  {injecting}:
    provider: "prövider"
    upstream_model: "org/modèle v2"
  "gemini-é":
    provider: "gém"
"""
X_CB = ("x-cb-provider", "x-cb-model", "x-cb-upstream", "x-cb-route")


def raw_headers(resp: aiohttp.ClientResponse) -> dict[bytes, bytes]:
    return {name.lower(): value for name, value in resp.raw_headers}


async def chat(proxy: ProxyHandle, model: str, *, stream: bool = False) -> dict[bytes, bytes]:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], "stream": stream}
    async with (
        aiohttp.ClientSession() as session,
        session.post(proxy.base_url + "/chat/completions", json=body) as resp,
    ):
        assert resp.status == 200, await resp.text()
        await resp.read()
        return raw_headers(resp)


def assert_clean(headers: dict[bytes, bytes]) -> None:
    assert b"x-injected" not in headers
    for name in X_CB:
        value = headers[name.encode()]
        assert value.isascii(), (name, value)
        assert not any(b < 0x20 or b == 0x7F for b in value), (name, value)


@pytest.mark.parametrize("stream", [False, True])
async def test_x_cb_headers_from_odd_rules_names_are_printable_ascii(
    tmp_path: Path, stream: bool
) -> None:
    async with running_mock("openai") as openai, running_mock("gemini") as gemini:
        path = write_rules(
            tmp_path,
            RULES.format(
                openai=openai.url, gemini=gemini.url, injecting=json.dumps(INJECTING_MODEL)
            ),
        )
        load_rules(path)  # check accepts these names
        async with running_proxy(path) as proxy:
            headers = await chat(proxy, INJECTING_MODEL, stream=stream)
            assert_clean(headers)
            assert headers[b"x-cb-provider"] == b"pr?vider"
            assert headers[b"x-cb-model"] == b"org/mod?le v2"
            assert headers[b"x-cb-upstream"] == b"m?del??x-injected: 1@pr?vider"
            assert openai.stats()["by_model"] == {"org/modèle v2": 1}  # the body keeps it

            headers = await chat(proxy, "gemini-é", stream=stream)
            assert_clean(headers)
            assert headers[b"x-cb-model"] == b"gemini-?"
            assert headers[b"x-cb-upstream"] == b"gemini-?@g?m"
            # Percent-encoded in the path, decoded back to the same name by the upstream.
            assert gemini.stats()["by_model"] == {"gemini-é": 1}
