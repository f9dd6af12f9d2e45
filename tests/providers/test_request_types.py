"""Fields the translators read are type-checked: a wrong type is a 400 naming it, never a 500."""

from __future__ import annotations

from typing import Any

import pytest

from proxy.core.errors import InvalidRequest
from proxy.providers import anthropic, gemini

CHAT: list[dict[str, Any]] = [{"role": "user", "content": "hi"}]


def _anthropic(body: dict[str, Any]) -> dict[str, Any]:
    return anthropic.translate_request(body, "claude-x", False)


@pytest.mark.parametrize("translate", [_anthropic, gemini.translate_request])
@pytest.mark.parametrize("modalities", [5, "text", {"audio": True}, [1], True])
def test_modalities_of_a_wrong_type_are_a_400(translate: Any, modalities: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        translate({"model": "m", "messages": CHAT, "modalities": modalities})
    assert caught.value.status == 400
    assert caught.value.param == "modalities"


@pytest.mark.parametrize("translate", [_anthropic, gemini.translate_request])
def test_text_modalities_are_accepted(translate: Any) -> None:
    assert translate({"model": "m", "messages": CHAT, "modalities": ["text"]})


@pytest.mark.parametrize("dimensions", [True, 0, -3, 1.5, "256", [256]])
def test_gemini_embedding_dimensions_must_be_a_positive_integer(dimensions: Any) -> None:
    with pytest.raises(InvalidRequest) as caught:
        gemini.translate_embeddings({"input": "x", "dimensions": dimensions}, "text-embedding")
    assert caught.value.param == "dimensions"


def test_gemini_embedding_dimensions_are_forwarded() -> None:
    _, body = gemini.translate_embeddings({"input": "x", "dimensions": 256}, "text-embedding")
    assert body["outputDimensionality"] == 256
