"""Which endpoints a model serves (models.*.endpoints) and how request fallbacks are taken.

A chat model never serves /v1/completions, an embeddings model never serves chat; a
request's unknown or unfit fallback is skipped with a warning instead of failing the
request; aliases and routes apply to request fallbacks as to the requested model.
"""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from proxy.config.check import parse_rules
from proxy.config.model import RulesError, RuleSet
from proxy.core.candidates import StaticView
from proxy.core.errors import InvalidRequest
from proxy.core.prefs import parse_prefs
from proxy.core.router import RoutePlan, plan_route

CATALOG = """
version: 1
providers:
  p1: {type: openai, base_url: "http://127.0.0.1:1/v1"}
  p2: {type: anthropic, base_url: "http://127.0.0.1:2"}
models:
  chatty:
    endpoints: [chat]
    provider: p1
    input_cost_per_1k: 0.001
    quality: {chat: 7}
    aliases: [chatty-legacy]
  claude:
    endpoints: [chat]
    provider: p2
    input_cost_per_1k: 0.002
    quality: {chat: 8}
  instruct:
    endpoints: [completions]
    provider: p1
  both:
    endpoints: [chat, completions]
    provider: p1
    input_cost_per_1k: 0.01
  embed:
    endpoints: [embeddings]
    provider: p1
  anything:
    provider: p1
virtual_models:
  auto: {strategy: cost_optimized, candidates: [chatty, claude]}
  mixed: {strategy: cost_optimized, candidates: [chatty, both, embed]}
routes:
  - match: {model: "old-*"}
    rewrite: {model: claude}
"""
RULES = parse_rules(yaml.safe_load(CATALOG), source="<endpoints catalog>")


def plan(model: str, endpoint: str | None, rules: RuleSet = RULES, **prefs: Any) -> RoutePlan:
    return plan_route(rules, model, {}, parse_prefs(prefs or None), StaticView(), endpoint=endpoint)


def order(p: RoutePlan) -> list[str]:
    return [c.deployment.key for c in p.candidates]


@pytest.mark.parametrize(
    ("model", "endpoint"),
    [
        ("chatty", "completions"),
        ("chatty-legacy", "completions"),
        ("instruct", "chat"),
        ("embed", "chat"),
        ("chatty", "embeddings"),
    ],
)
def test_a_model_on_an_endpoint_it_does_not_serve_is_a_clear_400(model: str, endpoint: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        plan(model, endpoint)
    assert info.value.param == "model"
    assert "does not serve /v1/" in info.value.message


@pytest.mark.parametrize(
    ("model", "endpoint"),
    [
        ("chatty", "chat"),
        ("instruct", "completions"),
        ("both", "completions"),
        ("both", "chat"),
        ("embed", "embeddings"),
        ("anything", "completions"),
        ("anything", "embeddings"),
    ],
)
def test_a_model_serves_the_endpoints_it_declares_and_undeclared_serves_all(
    model: str, endpoint: str
) -> None:
    assert plan(model, endpoint).candidates


def test_a_virtual_model_keeps_only_the_models_that_serve_the_endpoint() -> None:
    p = plan("mixed", "completions")
    assert order(p) == ["both@p1"]
    assert {r.deployment: r.reason for r in p.rejected} == {
        "chatty@p1": "does not serve /v1/completions",
        "embed@p1": "does not serve /v1/completions",
    }
    assert order(plan("mixed", "chat")) == ["chatty@p1", "both@p1"]


def test_a_virtual_model_with_nothing_for_the_endpoint_is_a_400_with_reasons() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan("auto", "embeddings")
    assert "chatty@p1: does not serve /v1/embeddings" in info.value.message


def test_unknown_and_unfit_request_fallbacks_are_skipped_with_warnings() -> None:
    p = plan("chatty", "chat", fallback_models=["nope", "embed", "claude"])
    assert order(p) == ["chatty@p1", "claude@p2"]
    assert p.warnings == (
        "fallback model 'nope' does not exist in the proxy's rules; skipped",
        "fallback model 'embed' does not serve /v1/chat/completions; skipped",
    )


def test_aliases_and_routes_apply_to_request_fallbacks() -> None:
    p = plan("claude", "chat", fallback_models=["chatty-legacy"])
    assert order(p) == ["claude@p2", "chatty@p1"]
    p = plan("chatty", "chat", fallback_models=["old-claude"])
    assert order(p) == ["chatty@p1", "claude@p2"]
    assert p.warnings == ()


def test_without_an_endpoint_nothing_is_filtered() -> None:
    assert order(plan("chatty", None)) == ["chatty@p1"]


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[chat, speech]", "models.m.endpoints[1]: unknown endpoint 'speech'"),
        ("[]", "models.m.endpoints: must not be empty"),
        ("[chat, chat]", "models.m.endpoints[1]: 'chat' is listed twice"),
        ("chat", "models.m.endpoints: expected a list"),
    ],
)
def test_the_endpoints_key_is_checked(value: str, problem: str) -> None:
    text = f"""
version: 1
providers: {{p: {{type: openai, base_url: "http://127.0.0.1:1/v1"}}}}
models:
  m: {{provider: p, endpoints: {value}}}
"""
    with pytest.raises(RulesError) as info:
        parse_rules(yaml.safe_load(text))
    assert any(line.startswith(problem) for line in info.value.problems), info.value.problems
