"""Structured output and ``n`` through the proxy, with the demo rules and the official SDK.

``client.chat.completions.parse(response_format=Model)`` must work through the proxy (the
OpenAI mock and, translated, the Gemini mock honour the schema); ``n=2`` must come back as two
choices where the upstream can give them, and as a 400 naming ``n`` where it cannot
(Anthropic has one reply per request).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

import openai
import pytest
from pydantic import BaseModel

from tests.e2e.test_readme_examples import demo_stack


class Step(BaseModel):
    title: str
    minutes: int


class Recipe(BaseModel):
    name: str
    servings: int
    vegetarian: bool
    difficulty: Literal["easy", "hard"]
    steps: list[Step]
    note: str | None


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gemini-2.0-flash"])
async def test_parse_with_a_pydantic_model_through_the_proxy(tmp_path: Path, model: str) -> None:
    async with demo_stack(tmp_path) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        async with client:
            completion = await client.chat.completions.parse(
                model=model,
                messages=[{"role": "user", "content": "Pancakes please"}],
                response_format=Recipe,
            )
            async with client.chat.completions.stream(
                model=model,
                messages=[{"role": "user", "content": "Pancakes please"}],
                response_format=Recipe,
            ) as stream:
                streamed = await stream.get_final_completion()
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Recipe)
    assert parsed.name == "Pancakes"
    assert parsed.difficulty == "easy"
    assert streamed.choices[0].message.parsed == parsed


@pytest.mark.parametrize("model", ["gpt-4o-mini", "gemini-2.0-flash"])
async def test_n_2_returns_two_choices_through_the_proxy(tmp_path: Path, model: str) -> None:
    async with demo_stack(tmp_path) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        async with client:
            reply = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], n=2
            )
            stream = await client.chat.completions.create(
                model=model, messages=[{"role": "user", "content": "Hello!"}], n=2, stream=True
            )
            streamed: dict[int, str] = {}
            async for chunk in stream:
                for choice in chunk.choices:
                    streamed[choice.index] = streamed.get(choice.index, "") + (
                        choice.delta.content or ""
                    )
    assert [c.index for c in reply.choices] == [0, 1]
    assert all(c.message.content for c in reply.choices)
    assert streamed == {c.index: c.message.content for c in reply.choices}


async def test_n_2_to_anthropic_is_a_400_naming_n(tmp_path: Path) -> None:
    async with demo_stack(tmp_path) as proxy:
        client = openai.AsyncOpenAI(base_url=proxy.base_url, api_key="x", max_retries=0)
        async with client:
            with pytest.raises(openai.BadRequestError) as caught:
                await client.chat.completions.create(
                    model="claude-3-5-haiku", messages=[{"role": "user", "content": "Hi"}], n=2
                )
    body = caught.value.body
    assert isinstance(body, dict)
    assert body.get("param") == "n"
