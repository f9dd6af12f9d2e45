"""The Gemini model goes in the URL path: one segment, percent-encoded (RFC 3986 section 3.3).

What would split or leave the segment is refused by ``cb-proxy check``
(tests/config/test_upstream_model_names.py); what check accepts is encoded here.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.config.check import upstream_model_problem
from proxy.config.model import Deployment, Provider
from proxy.providers.base import Endpoint
from proxy.providers.gemini import GeminiAdapter, path_segment

PROVIDER = Provider(
    name="gem",
    type="gemini",
    base_url="https://generativelanguage.googleapis.com",
    api_key_env=None,
)
BASE = "https://generativelanguage.googleapis.com/v1beta/models/"


def chat_url(upstream_model: str, *, stream: bool = False) -> str:
    deployment = Deployment(model="m", provider="gem", upstream_model=upstream_model)
    body = {"messages": [{"role": "user", "content": "hi"}]}
    return (
        GeminiAdapter().build_request(Endpoint.CHAT, body, PROVIDER, deployment, None, stream).url
    )


@pytest.mark.parametrize(
    ("upstream_model", "segment"),
    [
        ("gemini-2.0-flash", "gemini-2.0-flash"),
        ("models/gemini-2.0-flash", "gemini-2.0-flash"),  # the resource prefix is dropped
        ("gemini-é", "gemini-%C3%A9"),  # UTF-8, then percent-encoded
        ("gemini-100%", "gemini-100%25"),
        ("gemini@eu+beta~1", "gemini%40eu%2Bbeta~1"),
    ],
)
def test_the_model_is_one_percent_encoded_path_segment(upstream_model: str, segment: str) -> None:
    assert chat_url(upstream_model) == f"{BASE}{segment}:generateContent"
    assert chat_url(upstream_model, stream=True) == f"{BASE}{segment}:streamGenerateContent?alt=sse"


def test_embeddings_urls_are_encoded_the_same_way() -> None:
    deployment = Deployment(model="e", provider="gem", upstream_model="models/emb-é")
    request = GeminiAdapter().build_request(
        Endpoint.EMBEDDINGS, {"input": "x"}, PROVIDER, deployment, None, False
    )
    assert request.url == f"{BASE}emb-%C3%A9:embedContent"


@given(st.text(min_size=1, max_size=12))
def test_every_name_check_accepts_stays_in_its_segment(name: str) -> None:
    if upstream_model_problem(name, "gemini") is not None:
        return
    url = urlsplit(chat_url(name))
    assert (url.query, url.fragment) == ("", "")
    prefix, _, last = url.path.rpartition("/")
    assert prefix == "/v1beta/models"
    segment, sep, method = last.rpartition(":")
    assert (sep, method) == (":", "generateContent")
    assert path_segment(name.removeprefix("models/")) == segment
    assert unquote(segment) == name.removeprefix("models/")
    assert segment.isascii()
