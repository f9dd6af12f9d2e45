"""The bugs the fuzz suite found, one test each (they failed before their fix)."""

from __future__ import annotations

from typing import Any

import aiohttp
import pytest

from proxy.core.errors import InvalidRequest
from proxy.providers import anthropic, gemini
from tests.fakes.upstream import running_mock


def _anthropic(body: dict[str, Any]) -> dict[str, Any]:
    return anthropic.translate_request(body, "claude-x", False)


@pytest.mark.parametrize("translate", [_anthropic, gemini.translate_request])
@pytest.mark.parametrize("text", [True, 5, {"a": 1}, ["x"]])
def test_a_system_text_part_that_is_not_a_string_is_a_400_naming_it(
    translate: Any, text: Any
) -> None:
    """Was a TypeError (a 500) joining the parts of a system message."""
    body = {
        "model": "m",
        "messages": [
            {
                "role": "system",
                "content": [{"type": "text", "text": "a"}, {"type": "text", "text": text}],
            },
            {"role": "user", "content": "hi"},
        ],
    }
    with pytest.raises(InvalidRequest) as caught:
        translate(body)
    assert caught.value.param == "messages[0].content[1].text"


@pytest.mark.parametrize("translate", [_anthropic, gemini.translate_request])
def test_a_system_text_part_without_text_still_counts_as_empty(translate: Any) -> None:
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": [{"type": "text"}, {"type": "text", "text": None}]},
            {"role": "user", "content": "hi"},
        ],
    }
    assert translate(body)


@pytest.mark.parametrize("tool_call_id", [["call_1"], {"id": 1}])
async def test_the_openai_mock_answers_an_unhashable_tool_call_id_with_a_400(
    tool_call_id: Any,
) -> None:
    """The mock upstream crashed (a 500 that opened the breaker) on a list as the id."""
    messages = [
        {"role": "user", "content": "hi"},
        {
            "role": "assistant",
            "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
            ],
        },
        {"role": "tool", "tool_call_id": tool_call_id, "content": "r"},
    ]
    async with running_mock("openai") as mock, aiohttp.ClientSession() as http:
        body = {"model": "m", "messages": messages}
        async with http.post(mock.url + "/v1/chat/completions", json=body) as resp:
            assert resp.status == 400
