"""Property tests for proxy.rules.

(a) random valid documents always parse and keep their values (also through
a YAML dump); (b) a random mutation (an unknown key anywhere, a value of the
wrong type anywhere) always gives a RulesError naming the mutated path; (c)
arbitrary junk anywhere never raises anything but RulesError.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config.check import parse_rules
from proxy.config.model import (
    PROVIDER_TYPES,
    STRATEGIES,
    TASK_TYPES,
    BreakerOverrides,
    CostCap,
    Deployment,
    RetryPolicy,
    RulesError,
    RuleSet,
    Timeouts,
    Weights,
)

Doc = dict[str, Any]
Slot = tuple[str, Any, Any]  # (path, container, key or index)

PROPERTY_SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)

SUFFIX = st.text(alphabet="abcdefgh0123", min_size=1, max_size=4)
NONNEG = st.integers(0, 1000) | st.floats(0, 1000, allow_nan=False, allow_infinity=False)
SMALL_POSITIVE = st.integers(1, 100) | st.floats(0.001, 100)
PRICE = st.floats(0, 0.1) | st.just(0)
TEXT = st.text(alphabet=st.characters(categories=("L", "N", "P", "Zs")), max_size=12)
HEADER_NAME = st.text(alphabet="abcxyz-", min_size=1, max_size=6)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=8)
GLOB = st.text(alphabet="abm-*?[]0", min_size=1, max_size=6)
UNKNOWN_KEY = st.text(alphabet="qxz", min_size=2, max_size=5).map(lambda s: "zz" + s)
JUNK = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=5),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=3)
    ),
    max_leaves=8,
)


def names(prefix: str, min_size: int, max_size: int) -> st.SearchStrategy[list[str]]:
    return st.lists(
        SUFFIX.map(lambda s: prefix + s), min_size=min_size, max_size=max_size, unique=True
    )


def optional_fields(**fields: st.SearchStrategy[Any]) -> st.SearchStrategy[Doc]:
    return st.fixed_dictionaries({}, optional=fields)


def deployment_fields() -> dict[str, st.SearchStrategy[Any]]:
    return {
        # Names every provider type takes: a Gemini name is one URL path segment (no '/'),
        # after an optional 'models/' (tests/config/test_upstream_model_names.py).
        "upstream_model": st.builds(str.__add__, st.sampled_from(["up-", "models/up-"]), SUFFIX),
        "input_cost_per_1k": PRICE,
        "output_cost_per_1k": PRICE,
        "latency_ms": SMALL_POSITIVE,
        "context_window": st.integers(1, 2_000_000),
    }


@st.composite
def provider_body(draw: st.DrawFn) -> Doc:
    scheme = draw(st.sampled_from(["http", "https"]))
    host = draw(st.sampled_from(["localhost", "127.0.0.1:8000", "api.example.com"]))
    suffix = draw(st.sampled_from(["", "/", "/v1", "/v1/", "/api/v1//"]))
    body: Doc = {
        "type": draw(st.sampled_from(PROVIDER_TYPES)),
        "base_url": f"{scheme}://{host}{suffix}",
    }
    body |= draw(
        optional_fields(
            api_key_env=st.from_regex(r"[A-Z_][A-Z0-9_]{0,8}", fullmatch=True),
            headers=st.dictionaries(HEADER_NAME, HEADER_VALUE, max_size=2),
            timeouts=optional_fields(
                connect=SMALL_POSITIVE,
                first_token=SMALL_POSITIVE,
                idle=SMALL_POSITIVE,
                total=st.integers(100, 1000),
            ),
            breaker=optional_fields(
                failure_threshold=st.integers(0, 50),
                failure_rate=st.floats(0.01, 1.0),
                min_throughput=st.integers(1, 100),
                window_seconds=st.integers(1, 3600) | st.floats(1, 3600),
                open_seconds=st.integers(1, 30),
                max_open_seconds=st.integers(30, 300),
                half_open_probes=st.integers(1, 10),
                slow_call_ms=NONNEG,
                max_half_open_seconds=SMALL_POSITIVE,
            ),
            health_check=optional_fields(path=SUFFIX.map(lambda s: "/" + s), interval=NONNEG),
        )
    )
    return body


@st.composite
def documents(draw: st.DrawFn) -> Doc:
    provider_names = draw(names("p-", 1, 3))
    model_names = draw(names("m-", 1, 4))
    alias_names = draw(names("a-", 0, 4))
    virtual_names = draw(names("v-", 0, 3))

    models: Doc = {}
    for name in model_names:
        body = draw(
            optional_fields(
                **deployment_fields(),
                quality=optional_fields(
                    **{t: st.integers(0, 10) | st.floats(0, 10) for t in TASK_TYPES}
                ),
                description=TEXT,
            )
        )
        if draw(st.booleans()):
            body["provider"] = draw(st.sampled_from(provider_names))
        else:
            used = draw(st.lists(st.sampled_from(provider_names), min_size=1, unique=True))
            body["deployments"] = [
                draw(st.fixed_dictionaries({"provider": st.just(p)}, optional=deployment_fields()))
                for p in used
            ]
        models[name] = body
    owners: dict[str, str] = {}
    for alias in alias_names:
        owner = draw(st.sampled_from(model_names))
        models[owner].setdefault("aliases", []).append(alias)
        owners[alias] = owner

    def spelling(model: str) -> str:
        return draw(st.sampled_from([model, *(a for a, o in owners.items() if o == model)]))

    every_name = st.sampled_from(model_names + alias_names + virtual_names)
    virtual_models: Doc = {}
    for name in virtual_names:
        body = {"strategy": draw(st.sampled_from(STRATEGIES))}
        body |= draw(
            optional_fields(
                task_type=st.sampled_from(TASK_TYPES),
                max_cost_per_1k_tokens=PRICE
                | st.fixed_dictionaries({"input": PRICE, "output": PRICE}),
                max_latency_ms=SMALL_POSITIVE,
                fallback_models=st.lists(every_name, unique=True, max_size=3),
                description=TEXT,
            )
        )
        if draw(st.booleans()):
            chosen = draw(st.lists(st.sampled_from(model_names), min_size=1, unique=True))
            body["candidates"] = [spelling(model) for model in chosen]
        virtual_models[name] = body

    routes = []
    for _ in range(draw(st.integers(0, 3))):
        route = draw(
            optional_fields(
                match=optional_fields(
                    model=GLOB, headers=st.dictionaries(HEADER_NAME, GLOB, max_size=2)
                )
            )
        )
        action = draw(st.sampled_from(["rewrite", "fallbacks", "both"]))
        if action != "fallbacks":
            route["rewrite"] = {"model": draw(every_name)}
        if action != "rewrite":
            route["fallbacks"] = draw(st.lists(every_name, unique=True, max_size=3))
        routes.append(route)

    doc: Doc = {
        "version": 1,
        "providers": {name: draw(provider_body()) for name in provider_names},
        "models": models,
    }
    if draw(st.booleans()) or virtual_names:
        doc["virtual_models"] = virtual_models
    if draw(st.booleans()) or routes:
        doc["routes"] = routes
    defaults = draw(
        optional_fields(
            strategy=st.sampled_from(STRATEGIES),
            fallback_models=st.lists(every_name, unique=True, max_size=3),
            weights=optional_fields(
                **dict.fromkeys(("quality", "cost", "latency", "reliability"), NONNEG)
            ).filter(lambda w: sum(w.values()) > 0),
            retry=optional_fields(
                max_attempts=st.integers(1, 20),
                same_deployment_retries=st.integers(0, 5),
                max_retry_wait=st.integers(0, 60) | st.floats(0, 60),
                backoff_ms=st.integers(0, 100),
                max_backoff_ms=st.integers(100, 1000),
                budget_ratio=st.floats(0, 1),
            ),
            response_metadata=st.booleans(),
        )
    )
    if draw(st.booleans()) or defaults:
        doc["defaults"] = defaults
    return doc


# ----------------------------------------------------------------------------- (a) round trip


def assert_round_trip(doc: Doc, rules: RuleSet) -> None:
    assert rules.version == 1
    assert list(rules.providers) == list(doc["providers"])
    for name, body in doc["providers"].items():
        provider = rules.providers[name]
        assert provider.name == name
        assert provider.type == body["type"]
        assert provider.base_url == body["base_url"].rstrip("/")
        assert provider.api_key_env == body.get("api_key_env")
        assert dict(provider.headers) == body.get("headers", {})
        assert provider.timeouts == Timeouts(**body.get("timeouts", {}))
        assert provider.breaker == BreakerOverrides(**body.get("breaker", {}))
        health = body.get("health_check", {})
        assert (provider.health_check.path, provider.health_check.interval) == (
            health.get("path"),
            health.get("interval"),
        )

    index: dict[str, str] = {}
    for name, body in doc["models"].items():
        model = rules.models[name]
        inherited = {k: v for k, v in body.items() if k in deployment_fields()}
        specs = [{"provider": body["provider"]}] if "provider" in body else body["deployments"]
        assert model.deployments == tuple(
            Deployment(model=name, **{"upstream_model": name, **inherited, **spec})
            for spec in specs
        )
        assert model.context_window == body.get("context_window")
        assert dict(model.quality) == body.get("quality", {})
        assert model.aliases == tuple(body.get("aliases", ()))
        assert model.description == body.get("description", "")
        index[name] = name
        index.update((alias, name) for alias in body.get("aliases", ()))
    assert dict(rules.model_index) == index

    for name, body in doc.get("virtual_models", {}).items():
        virtual = rules.virtual_models[name]
        assert virtual.strategy == body["strategy"]
        assert virtual.task_type == body.get("task_type")
        candidates = body.get("candidates")
        assert virtual.candidates == (
            None if candidates is None else tuple(index[c] for c in candidates)
        )
        cap = body.get("max_cost_per_1k_tokens")
        if isinstance(cap, dict):
            assert virtual.max_cost_per_1k_tokens == CostCap(**cap)
        else:
            assert virtual.max_cost_per_1k_tokens == (None if cap is None else CostCap(cap, cap))
        assert virtual.max_latency_ms == body.get("max_latency_ms")
        assert virtual.fallback_models == tuple(body.get("fallback_models", ()))
        assert virtual.description == body.get("description", "")

    assert len(rules.routes) == len(doc.get("routes", []))
    for route, body in zip(rules.routes, doc.get("routes", []), strict=True):
        match = body.get("match", {})
        assert route.model_glob == match.get("model")
        assert route.headers == tuple((k.lower(), v) for k, v in match.get("headers", {}).items())
        assert route.rewrite_model == body.get("rewrite", {}).get("model")
        assert route.fallbacks == tuple(body.get("fallbacks", ()))

    defaults = doc.get("defaults", {})
    assert rules.defaults.strategy == defaults.get("strategy", "balanced")
    assert rules.defaults.fallback_models == tuple(defaults.get("fallback_models", ()))
    weights = defaults.get("weights")
    assert rules.defaults.weights == (
        Weights()
        if weights is None
        else Weights(
            **{k: weights.get(k, 0) for k in ("quality", "cost", "latency", "reliability")}
        )
    )
    assert rules.defaults.retry == RetryPolicy(**defaults.get("retry", {}))
    assert rules.defaults.response_metadata is defaults.get("response_metadata", True)


@PROPERTY_SETTINGS
@given(doc=documents())
def test_valid_documents_parse_and_keep_their_values(doc: Doc) -> None:
    rules = parse_rules(doc)
    assert_round_trip(doc, rules)
    assert (
        parse_rules(yaml.safe_load(yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)))
        == rules
    )


@PROPERTY_SETTINGS
@given(doc=documents(), data=st.data())
def test_route_matching_agrees_with_a_linear_scan(doc: Doc, data: st.DataObject) -> None:
    rules = parse_rules(doc)
    model = data.draw(st.text(alphabet="abm-0", max_size=6), label="model")
    headers = data.draw(
        st.dictionaries(HEADER_NAME, st.text(alphabet="abm-0", max_size=4)), label="headers"
    )

    def naive(route_body: Doc) -> bool:
        match = route_body.get("match", {})
        if "model" in match and not fnmatch.fnmatchcase(model, match["model"]):
            return False
        return all(
            k.lower() in headers and fnmatch.fnmatchcase(headers[k.lower()], glob)
            for k, glob in match.get("headers", {}).items()
        )

    bodies = doc.get("routes", [])
    expected = next((i for i, body in enumerate(bodies) if naive(body)), None)
    found = rules.match_route(model, headers)
    assert found is (None if expected is None else rules.routes[expected])


# ----------------------------------------------------------------------------- (b) mutations


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def schema_maps(doc: Doc) -> Iterator[tuple[str, Doc]]:
    """Every mapping of the document whose keys are fixed by the format."""
    yield "", doc
    for name, body in doc["providers"].items():
        path = f"providers.{name}"
        yield path, body
        for key in ("timeouts", "breaker", "health_check"):
            if key in body:
                yield f"{path}.{key}", body[key]
    for name, body in doc["models"].items():
        path = f"models.{name}"
        yield path, body
        if "quality" in body:
            yield f"{path}.quality", body["quality"]
        for i, deployment in enumerate(body.get("deployments", [])):
            yield f"{path}.deployments[{i}]", deployment
    for name, body in doc.get("virtual_models", {}).items():
        path = f"virtual_models.{name}"
        yield path, body
        if isinstance(body.get("max_cost_per_1k_tokens"), dict):
            yield f"{path}.max_cost_per_1k_tokens", body["max_cost_per_1k_tokens"]
    for i, route in enumerate(doc.get("routes", [])):
        yield f"routes[{i}]", route
        for key in ("match", "rewrite"):
            if key in route:
                yield f"routes[{i}].{key}", route[key]
    if "defaults" in doc:
        yield "defaults", doc["defaults"]
        for key in ("weights", "retry"):
            if key in doc["defaults"]:
                yield f"defaults.{key}", doc["defaults"][key]


def value_slots(doc: Doc) -> Iterator[Slot]:
    """Every place holding a value: keys of schema maps, named entries, free maps, list items."""
    for path, mapping in schema_maps(doc):
        for key, value in mapping.items():
            slot_path = _join(path, key)
            yield slot_path, mapping, key
            named_section = not path and key in ("providers", "models", "virtual_models")
            if named_section or key == "headers":
                yield from ((_join(slot_path, k), value, k) for k in value)
            elif isinstance(value, list):
                yield from ((f"{slot_path}[{i}]", value, i) for i in range(len(value)))


def wrong_type(value: object) -> object:
    """A value no key of the format accepts where ``value`` was valid."""
    return 3.5 if isinstance(value, str) else "text"


@PROPERTY_SETTINGS
@given(doc=documents(), data=st.data())
def test_an_unknown_key_anywhere_is_reported_at_its_path(doc: Doc, data: st.DataObject) -> None:
    path, mapping = data.draw(st.sampled_from(list(schema_maps(doc))), label="mapping")
    key = data.draw(UNKNOWN_KEY, label="key")
    mapping[key] = data.draw(JUNK, label="value")
    with pytest.raises(RulesError) as info:
        parse_rules(doc)
    assert any(p.startswith(f"{_join(path, key)}: unknown key") for p in info.value.problems)


@PROPERTY_SETTINGS
@given(doc=documents(), data=st.data())
def test_a_wrong_type_anywhere_is_reported_at_its_path(doc: Doc, data: st.DataObject) -> None:
    path, container, key = data.draw(st.sampled_from(list(value_slots(doc))), label="slot")
    container[key] = wrong_type(container[key])
    with pytest.raises(RulesError) as info:
        parse_rules(doc)
    assert any(p.startswith(f"{path}: ") for p in info.value.problems), info.value.problems


# ----------------------------------------------------------------------------- (c) junk


@PROPERTY_SETTINGS
@given(doc=documents(), data=st.data())
def test_junk_anywhere_raises_only_rules_error(doc: Doc, data: st.DataObject) -> None:
    _, container, key = data.draw(st.sampled_from(list(value_slots(doc))), label="slot")
    container[key] = data.draw(JUNK, label="junk")
    problems: list[str] | None = None
    try:
        parse_rules(doc)
    except RulesError as err:
        problems = err.problems
    if problems is not None:
        assert problems
        assert all(isinstance(p, str) and ": " in p for p in problems)


@PROPERTY_SETTINGS
@given(data=JUNK)
def test_any_document_raises_only_rules_error(data: object) -> None:
    with pytest.raises(RulesError) as info:
        parse_rules(data)
    assert info.value.problems
