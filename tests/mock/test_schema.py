"""The mock's JSON Schema instance generator (proxy.mock.schema): every instance validates."""

from __future__ import annotations

import enum
import time
from datetime import date, datetime
from typing import Any, Literal

import jsonschema
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from openai.lib._pydantic import to_strict_json_schema
from pydantic import BaseModel

from proxy.mock.schema import MAX_NODES, UnsupportedSchema, instance_of

JSON = dict[str, Any]
NAMES = st.text("abcdefghij_", min_size=1, max_size=6)


def check(schema: Any, **kwargs: Any) -> Any:
    value = instance_of(schema, **kwargs)
    jsonschema.Draft202012Validator(
        schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(value)
    return value


# -- a strategy of simple schemas ------------------------------------------------------


def _bounded_int() -> st.SearchStrategy[JSON]:
    return st.builds(
        lambda lo, width, step: {
            "type": "integer",
            **({"minimum": lo} if lo is not None else {}),
            **({"maximum": lo + width} if lo is not None and width is not None else {}),
            **({"multipleOf": step} if step else {}),
        },
        st.none() | st.integers(-50, 50),
        st.none() | st.integers(20, 100),  # wide enough to hold a multiple of any step
        st.none() | st.integers(1, 5),
    )


def _bounded_number() -> st.SearchStrategy[JSON]:
    bound = st.floats(-1e6, 1e6, allow_nan=False)
    return st.builds(
        lambda lo, width, exclusive: {
            "type": "number",
            **({("exclusiveMinimum" if exclusive else "minimum"): lo} if lo is not None else {}),
            **({"maximum": lo + width} if lo is not None and width is not None else {}),
        },
        st.none() | bound,
        st.none() | st.floats(0.5, 1e3),
        st.booleans(),
    )


def _string() -> st.SearchStrategy[JSON]:
    lengths = st.builds(
        lambda lo, extra: {
            "type": "string",
            **({"minLength": lo} if lo is not None else {}),
            **({"maxLength": (lo or 0) + extra} if extra is not None else {}),
        },
        st.none() | st.integers(0, 30),
        st.none() | st.integers(0, 10),
    )
    formats = st.sampled_from(["date-time", "date", "email", "uuid", "uri", "ipv4"])
    return lengths | formats.map(lambda f: {"type": "string", "format": f})


LEAVES: st.SearchStrategy[JSON] = st.one_of(
    _string(),
    _bounded_int(),
    _bounded_number(),
    st.just({"type": "boolean"}),
    st.just({"type": "null"}),
    st.lists(st.text(max_size=5) | st.integers(), min_size=1, max_size=4).map(
        lambda values: {"enum": values}
    ),
    st.sampled_from([{"const": "fixed"}, {"const": 3}, {}]),
)


def _extend(children: st.SearchStrategy[JSON]) -> st.SearchStrategy[JSON]:
    objects = st.builds(
        lambda props, n_required, closed: {
            "type": "object",
            "properties": props,
            "required": list(props)[:n_required],
            **({"additionalProperties": False} if closed else {}),
        },
        st.dictionaries(NAMES, children, max_size=4),
        st.integers(0, 4),
        st.booleans(),
    )
    arrays = st.builds(
        lambda items, lo: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + 2},
        children,
        st.integers(0, 3),
    )
    unions = st.lists(children, min_size=1, max_size=3).map(lambda bs: {"anyOf": bs})
    nullable = children.map(lambda c: {"anyOf": [c, {"type": "null"}]})
    return st.one_of(objects, arrays, unions, nullable)


SCHEMAS = st.recursive(LEAVES, _extend, max_leaves=12)


@given(SCHEMAS, st.text(min_size=1, max_size=8).filter(lambda w: not w.isspace()))
@settings(max_examples=300, deadline=None)
def test_instances_of_generated_schemas_validate(schema: JSON, word: str) -> None:
    check(schema, word=word)


@given(SCHEMAS)
@settings(max_examples=100, deadline=None)
def test_schemas_behind_defs_and_refs_validate(schema: JSON) -> None:
    wrapped = {
        "type": "object",
        "properties": {"first": {"$ref": "#/$defs/Thing"}, "rest": {"$ref": "#/$defs/Things"}},
        "required": ["first", "rest"],
        "$defs": {
            "Thing": schema,
            "Things": {"type": "array", "items": {"$ref": "#/$defs/Thing"}, "minItems": 1},
        },
    }
    check(wrapped)


# -- pydantic models through the OpenAI SDK's strict schema -----------------------------


class Colour(enum.Enum):
    RED = "red"
    BLUE = "blue"


class Address(BaseModel):
    street: str
    number: int


class Node(BaseModel):
    label: str
    children: list[Node]


class Everything(BaseModel):
    name: str
    age: int
    score: float
    active: bool
    tags: list[str]
    colour: Colour
    kind: Literal["a", "b"]
    home: Address
    work: Address | None
    seen: datetime
    born: date
    tree: Node
    either: int | str


def test_a_pydantic_model_round_trips() -> None:
    schema = to_strict_json_schema(Everything)
    value = check(schema, word="hello")
    parsed = Everything.model_validate(value)
    assert parsed.name == "hello"
    assert parsed.kind == "a"
    assert parsed.tree.children == []


def test_tool_arguments_fill_optional_properties_up_to_the_limit() -> None:
    schema = {
        "type": "object",
        "properties": {k: {"type": "string"} for k in "abcdef"},
        "required": ["f"],
    }
    assert check(schema, word="x", top_level_optional=4) == {"f": "x", "a": "x", "b": "x", "c": "x"}
    assert check(schema, word="x") == {"f": "x"}


def test_patterns_are_met_or_refused() -> None:
    assert check({"type": "string", "pattern": "^[0-9]+$"}) == "0"
    with pytest.raises(UnsupportedSchema, match="pattern"):
        instance_of({"type": "string", "pattern": "^z{3}$"})


@pytest.mark.parametrize(
    ("schema", "needle"),
    [
        ({"type": "object", "not": {}}, "'not'"),
        ({"type": "array", "contains": {"type": "string"}}, "contains"),
        ({"$ref": "https://example.com/schema"}, "local $ref"),
        ({"$ref": "#/$defs/Missing"}, "unresolvable"),
        ({"type": "integer", "minimum": 3, "maximum": 2}, "no integer"),
        ({"type": "string", "minLength": 5, "maxLength": 2}, "maxLength"),
        ({"type": "array", "minItems": 10_000}, "larger"),
        ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "overlap"),
        ({"type": "object", "required": ["x"], "additionalProperties": False}, "required"),
        ({"type": "wat"}, "unknown type"),
        (False, "admits no value"),
    ],
)
def test_what_cannot_be_satisfied_is_refused_by_name(schema: Any, needle: str) -> None:
    with pytest.raises(UnsupportedSchema, match=needle.replace("$", r"\$")):
        instance_of(schema)


def test_recursion_that_must_recurse_is_refused() -> None:
    schema = {
        "$defs": {
            "Loop": {
                "type": "object",
                "properties": {"next": {"$ref": "#/$defs/Loop"}},
                "required": ["next"],
            }
        },
        "$ref": "#/$defs/Loop",
    }
    with pytest.raises(UnsupportedSchema, match="deeper"):
        instance_of(schema)


def test_work_is_bounded_for_exploding_schemas() -> None:
    # Each level refers to the one below twice: 2**20 nodes if expanded.
    defs = {
        f"L{i}": {
            "type": "object",
            "properties": {"a": {"$ref": f"#/$defs/L{i + 1}"}, "b": {"$ref": f"#/$defs/L{i + 1}"}},
            "required": ["a", "b"],
        }
        for i in range(20)
    }
    defs["L20"] = {"type": "string"}
    started = time.perf_counter()
    with pytest.raises(UnsupportedSchema, match=str(MAX_NODES)):
        instance_of({"$defs": defs, "$ref": "#/$defs/L0"})
    assert time.perf_counter() - started < 2


def test_gemini_upper_case_types_and_nullable() -> None:
    schema = {
        "type": "OBJECT",
        "properties": {"n": {"type": "INTEGER", "nullable": True}, "s": {"type": "STRING"}},
        "required": ["n", "s"],
        "propertyOrdering": ["n", "s"],
    }
    assert instance_of(schema) == {"n": 1, "s": "mock"}
