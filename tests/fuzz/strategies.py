"""Request bodies for the fuzz suite: plausible OpenAI requests with anything in any field.

Each field of a plausible request is drawn either from values the API takes
or from ``junk``: wrong types, odd unicode, huge numbers, nested containers.
``any_json`` is totally random JSON for the top level.
"""

from __future__ import annotations

import copy
from typing import Any

from hypothesis import strategies as st

from tests.fuzz.stack import CHAT_MODELS, COMPLETION_MODELS, EMBEDDING_MODELS

MAX_MUTATIONS = 3  # fields of a plausible body replaced by junk
# Fields Anthropic or Gemini cannot express (a 400 naming them): rare, so most bodies go deeper.
RARE_FIELDS = ("logit_bias", "logprobs", "top_logprobs", "audio", "functions", "function_call")
RARE_VALUES = st.sampled_from([{"50256": -100}, True, 3, {"voice": "alloy", "format": "wav"}])
ODD_TEXT = st.sampled_from(
    [
        "",
        " ",
        "\x00",
        "\u202e\u0301\ufeff",
        "🧪" * 40,
        "a" * 3000,  # long text
        "data: [DONE]\n\n",
        '{"error": 1}',
        "${x}%s%n{}",
        "sk-not-a-key",
    ]
)
TEXT = st.one_of(st.text(max_size=40), ODD_TEXT)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**63, -(2**63) - 1, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
any_json: st.SearchStrategy[Any] = st.recursive(
    SCALARS,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(TEXT, inner, max_size=4)),
    max_leaves=12,
)


def junk_or(*plausible: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """A plausible value; ``mutated`` puts junk in its place (a field at a time)."""
    return st.one_of(*plausible)


def _slots(value: Any) -> list[tuple[Any, Any]]:
    """Every (container, key or index) of parsed JSON, nested ones too."""
    found: list[tuple[Any, Any]] = []
    stack = [value]
    while stack:
        node = stack.pop()
        items = node.items() if isinstance(node, dict) else enumerate(node)
        for key, child in items:
            found.append((node, key))
            if isinstance(child, dict | list) and child:
                stack.append(child)
    return found


@st.composite
def mutated(draw: st.DrawFn, base: st.SearchStrategy[dict[str, Any]]) -> dict[str, Any]:
    """A plausible body with anything at all in up to three of its fields, at any depth."""
    body = copy.deepcopy(draw(base))  # st.just values are shared: never change them
    if draw(st.integers(0, 9)) == 0:  # now and then a field some translators refuse
        body[draw(st.sampled_from(RARE_FIELDS))] = copy.deepcopy(
            draw(st.one_of(RARE_VALUES, any_json))
        )
    for _ in range(draw(st.integers(0, MAX_MUTATIONS))):
        slots = _slots(body)
        if not slots:
            break
        container, key = slots[draw(st.integers(0, len(slots) - 1))]
        container[key] = copy.deepcopy(draw(any_json))
    return body


ROLE = st.one_of(
    st.sampled_from(["system", "developer", "user", "assistant", "tool"]),
    junk_or(st.just("function")),
)
IMAGE_URL = junk_or(
    st.sampled_from(
        ["https://example.com/a.png", "data:image/png;base64,iVBORw0KGgo=", "data:,", "ftp://x"]
    )
)
PART = junk_or(
    st.fixed_dictionaries({"type": st.just("text"), "text": junk_or(TEXT)}),
    st.fixed_dictionaries(
        {
            "type": st.just("image_url"),
            "image_url": junk_or(st.fixed_dictionaries({"url": IMAGE_URL})),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("file"),
            "file": junk_or(st.fixed_dictionaries({"file_data": IMAGE_URL})),
        }
    ),
    st.fixed_dictionaries(
        {
            "type": st.just("input_audio"),
            "input_audio": junk_or(st.just({"data": "AA", "format": "wav"})),
        }
    ),
)
CONTENT = junk_or(TEXT, st.lists(PART, max_size=3), st.none())
FUNCTION_CALL = st.fixed_dictionaries(
    {"name": junk_or(st.just("get_weather")), "arguments": junk_or(st.just('{"city": "x"}'), TEXT)}
)
TOOL_CALL = junk_or(
    st.fixed_dictionaries(
        {
            "id": junk_or(st.just("call_1"), TEXT),
            "type": junk_or(st.just("function")),
            "function": junk_or(FUNCTION_CALL),
        }
    )
)
MESSAGE = junk_or(
    st.fixed_dictionaries(
        {"role": ROLE, "content": CONTENT},
        optional={
            "tool_calls": junk_or(st.lists(TOOL_CALL, max_size=2)),
            "tool_call_id": junk_or(st.just("call_1"), TEXT),
            "name": junk_or(TEXT),
        },
    )
)
SCHEMA = junk_or(
    st.just({"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}),
    st.just({"$ref": "#/$defs/a", "$defs": {"a": {"$ref": "#/$defs/a"}}}),
    st.just({"type": ["string", "null"], "enum": [1, "a"], "anyOf": 5}),
)
TOOL = junk_or(
    st.fixed_dictionaries(
        {
            "type": junk_or(st.just("function")),
            "function": junk_or(
                st.fixed_dictionaries(
                    {"name": junk_or(st.just("get_weather")), "parameters": SCHEMA},
                    optional={"description": junk_or(TEXT), "strict": junk_or(st.booleans())},
                )
            ),
        }
    )
)
TOOL_CHOICE = junk_or(
    st.sampled_from(["auto", "none", "required"]),
    st.just({"type": "function", "function": {"name": "get_weather"}}),
)
RESPONSE_FORMAT = junk_or(
    st.just({"type": "json_object"}),
    st.just({"type": "text"}),
    st.fixed_dictionaries(
        {
            "type": st.just("json_schema"),
            "json_schema": junk_or(st.fixed_dictionaries({"name": st.just("x"), "schema": SCHEMA})),
        }
    ),
)
EXTENSION = junk_or(
    st.fixed_dictionaries(
        {},
        optional={
            "routing_strategy": junk_or(st.sampled_from(["cost_optimized", "balanced"])),
            "task_type": junk_or(st.sampled_from(["chat", "coding"])),
            "max_cost_per_1k_tokens": junk_or(NUMBERS),
            "max_latency_ms": junk_or(NUMBERS),
            "fallback_models": junk_or(st.lists(st.sampled_from(CHAT_MODELS), max_size=2)),
        },
    )
)
COMMON = {
    "stream": junk_or(st.booleans()),
    "stream_options": junk_or(st.just({"include_usage": True})),
    "max_tokens": junk_or(NUMBERS),
    "max_completion_tokens": junk_or(NUMBERS),
    "temperature": junk_or(NUMBERS),
    "top_p": junk_or(NUMBERS),
    "n": junk_or(st.integers(1, 3)),
    "stop": junk_or(TEXT, st.lists(TEXT, max_size=3)),
    "user": junk_or(TEXT),
    "seed": junk_or(NUMBERS),
    "presence_penalty": junk_or(NUMBERS),
    "frequency_penalty": junk_or(NUMBERS),
    "metadata": junk_or(st.just({"k": "v"})),
    "circuit_breaker": EXTENSION,
}
CHAT_BODY = mutated(
    st.fixed_dictionaries(
        {
            "model": st.sampled_from((*CHAT_MODELS, "cb:x")),
            "messages": junk_or(st.lists(MESSAGE, min_size=1, max_size=4)),
        },
        optional={
            **COMMON,
            "tools": junk_or(st.lists(TOOL, max_size=3)),
            "tool_choice": TOOL_CHOICE,
            "parallel_tool_calls": junk_or(st.booleans()),
            "response_format": RESPONSE_FORMAT,
            "modalities": junk_or(st.just(["text"])),
            "reasoning_effort": junk_or(st.sampled_from(["low", "high"])),
        },
    )
)
COMPLETION_BODY = mutated(
    st.fixed_dictionaries(
        {
            "model": junk_or(st.sampled_from(COMPLETION_MODELS)),
            "prompt": junk_or(
                TEXT, st.lists(TEXT, max_size=3), st.lists(st.integers(0, 50000), max_size=4)
            ),
        },
        optional={
            **COMMON,
            "echo": junk_or(st.booleans()),
            "suffix": junk_or(TEXT),
            "best_of": junk_or(NUMBERS),
        },
    )
)
EMBEDDING_BODY = mutated(
    st.fixed_dictionaries(
        {
            "model": junk_or(st.sampled_from(EMBEDDING_MODELS)),
            "input": junk_or(
                TEXT,
                st.lists(TEXT, min_size=1, max_size=3),
                st.lists(st.integers(0, 50000), min_size=1, max_size=4),
                st.lists(st.lists(st.integers(0, 50000), max_size=3), min_size=1, max_size=2),
            ),
        },
        optional={
            "encoding_format": junk_or(st.sampled_from(["float", "base64"])),
            "dimensions": junk_or(st.integers(1, 64)),
            "user": junk_or(TEXT),
            "circuit_breaker": EXTENSION,
        },
    )
)
HEADER_VALUE = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=200)
HEADERS = st.fixed_dictionaries(
    {},
    optional={
        "x-request-id": HEADER_VALUE,
        "x-team": HEADER_VALUE,
        "authorization": HEADER_VALUE,
        "content-type": st.sampled_from(
            ["application/json", "text/plain", "", "application/x-www-form-urlencoded"]
        ),
        "accept-encoding": st.sampled_from(["gzip", "br", "identity", "*"]),
    },
)
