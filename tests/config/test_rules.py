"""proxy.config.model: exact results, every error row, shipped files, routes, fingerprints."""

from __future__ import annotations

import copy
import dataclasses
import fnmatch
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml
from multidict import CIMultiDict, CIMultiDictProxy

from proxy.config.check import load_rules, parse_rules
from proxy.config.model import (
    BreakerOverrides,
    CostCap,
    Defaults,
    Deployment,
    HealthCheck,
    Model,
    Provider,
    RetryPolicy,
    Route,
    RulesError,
    RuleSet,
    Timeouts,
    VirtualModel,
    Weights,
    file_fingerprint,
    format_problems,
)

Doc = dict[str, Any]
RULES_DIR = Path(__file__).resolve().parents[2] / "rules"
SHIPPED = sorted(
    [RULES_DIR / "default.yaml", RULES_DIR / "demo.yaml", *RULES_DIR.glob("examples/*.yaml")]
)
CHAT_VIRTUAL_MODELS = (
    "auto",
    "cb:smart-chat",
    "cb:cost-optimal",
    "cb:fastest",
    "cb:coding",
    "cb:analysis",
    "cb:creative",
)

FULL_YAML = """
version: 1
providers:
  openai:
    type: openai
    base_url: https://api.openai.com/v1/
    api_key_env: OPENAI_API_KEY
    headers: {OpenAI-Organization: org-1}
    timeouts: {connect: 2, first_token: 20}
    breaker: {failure_threshold: 3, failure_rate: 0.25, open_seconds: 5, max_open_seconds: 30}
    health_check: {path: /models, interval: 0}
  local:
    type: openai
    base_url: http://127.0.0.1:8000/v1
  anthropic:
    type: anthropic
    base_url: https://api.anthropic.com
    api_key_env: ANTHROPIC_API_KEY
models:
  gpt-4o-mini:
    description: small
    provider: openai
    input_cost_per_1k: 0.00015
    output_cost_per_1k: 0.0006
    context_window: 128000
    latency_ms: 700
    quality: {chat: 7, coding: 6.5}
    aliases: [gpt-4o-mini-2024-07-18]
  llama:
    upstream_model: meta/llama
    input_cost_per_1k: 0.0001
    context_window: 8192
    deployments:
      - {provider: local, latency_ms: 300}
      - provider: anthropic
        upstream_model: other
        output_cost_per_1k: 0.002
        context_window: 4096
virtual_models:
  auto: {strategy: balanced, description: best mix}
  cb:cheap:
    strategy: cost_optimized
    task_type: coding
    candidates: [gpt-4o-mini-2024-07-18, llama]
    max_cost_per_1k_tokens: 0.001
    max_latency_ms: 1500
    fallback_models: [auto]
  cb:capped:
    strategy: task_specific
    max_cost_per_1k_tokens: {input: 0.001, output: 0.004}
routes:
  - match: {model: "gpt-3.5*", headers: {X-Team: "res*"}}
    rewrite: {model: gpt-4o-mini}
    fallbacks: [llama]
  - rewrite: {model: auto}
defaults:
  strategy: cost_optimized
  fallback_models: [gpt-4o-mini]
  weights: {quality: 1, cost: 1}
  retry: {max_attempts: 3, backoff_ms: 50}
  response_metadata: false
"""


def full_doc() -> Doc:
    import yaml

    data = yaml.safe_load(FULL_YAML)
    assert isinstance(data, dict)
    return data


def minimal_doc() -> Doc:
    return {
        "version": 1,
        "providers": {
            "openai": {
                "type": "openai",
                "base_url": "https://api.openai.com/v1",
                "api_key_env": "OPENAI_API_KEY",
            }
        },
        "models": {"gpt-4o-mini": {"provider": "openai"}, "gpt-4o": {"provider": "openai"}},
        "virtual_models": {"auto": {"strategy": "balanced"}},
    }


def problems_of(data: object) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(data)
    return info.value.problems


# ----------------------------------------------------------------------------- valid files


def test_full_document_parses_to_the_exact_dataclasses() -> None:
    rules = parse_rules(full_doc(), source="full.yaml")
    expected = RuleSet(
        version=1,
        providers={
            "openai": Provider(
                name="openai",
                type="openai",
                base_url="https://api.openai.com/v1",
                api_key_env="OPENAI_API_KEY",
                headers={"OpenAI-Organization": "org-1"},
                timeouts=Timeouts(connect=2.0, first_token=20.0, idle=30.0, total=600.0),
                breaker=BreakerOverrides(
                    failure_threshold=3, failure_rate=0.25, open_seconds=5.0, max_open_seconds=30.0
                ),
                health_check=HealthCheck(path="/models", interval=0.0),
            ),
            "local": Provider(
                name="local", type="openai", base_url="http://127.0.0.1:8000/v1", api_key_env=None
            ),
            "anthropic": Provider(
                name="anthropic",
                type="anthropic",
                base_url="https://api.anthropic.com",
                api_key_env="ANTHROPIC_API_KEY",
            ),
        },
        models={
            "gpt-4o-mini": Model(
                name="gpt-4o-mini",
                deployments=(
                    Deployment(
                        model="gpt-4o-mini",
                        provider="openai",
                        upstream_model="gpt-4o-mini",
                        input_cost_per_1k=0.00015,
                        output_cost_per_1k=0.0006,
                        latency_ms=700.0,
                        context_window=128000,
                    ),
                ),
                context_window=128000,
                quality={"chat": 7.0, "coding": 6.5},
                aliases=("gpt-4o-mini-2024-07-18",),
                description="small",
            ),
            "llama": Model(
                name="llama",
                deployments=(
                    Deployment(
                        model="llama",
                        provider="local",
                        upstream_model="meta/llama",
                        input_cost_per_1k=0.0001,
                        output_cost_per_1k=0.0,
                        latency_ms=300.0,
                        context_window=8192,
                    ),
                    Deployment(
                        model="llama",
                        provider="anthropic",
                        upstream_model="other",
                        input_cost_per_1k=0.0001,
                        output_cost_per_1k=0.002,
                        latency_ms=None,
                        context_window=4096,
                    ),
                ),
                context_window=8192,
            ),
        },
        virtual_models={
            "auto": VirtualModel(name="auto", strategy="balanced", description="best mix"),
            "cb:cheap": VirtualModel(
                name="cb:cheap",
                strategy="cost_optimized",
                task_type="coding",
                candidates=("gpt-4o-mini", "llama"),  # the alias is resolved
                max_cost_per_1k_tokens=CostCap(input=0.001, output=0.001),
                max_latency_ms=1500.0,
                fallback_models=("auto",),
            ),
            "cb:capped": VirtualModel(
                name="cb:capped",
                strategy="task_specific",
                max_cost_per_1k_tokens=CostCap(input=0.001, output=0.004),
            ),
        },
        routes=(
            Route(
                model_glob="gpt-3.5*",
                headers=(("x-team", "res*"),),
                rewrite_model="gpt-4o-mini",
                fallbacks=("llama",),
            ),
            Route(model_glob=None, headers=(), rewrite_model="auto"),
        ),
        defaults=Defaults(
            strategy="cost_optimized",
            fallback_models=("gpt-4o-mini",),
            weights=Weights(quality=1.0, cost=1.0, latency=0.0, reliability=0.0),
            retry=RetryPolicy(max_attempts=3, backoff_ms=50.0),
            response_metadata=False,
        ),
        source="full.yaml",
        model_index={
            "gpt-4o-mini": "gpt-4o-mini",
            "gpt-4o-mini-2024-07-18": "gpt-4o-mini",
            "llama": "llama",
        },
    )
    assert rules == expected
    assert list(rules.providers) == ["openai", "local", "anthropic"]  # file order is kept


def test_minimal_document_gets_the_documented_defaults() -> None:
    rules = parse_rules(minimal_doc())
    assert rules.defaults == Defaults()
    assert rules.routes == ()
    deployment = rules.models["gpt-4o"].deployments[0]
    assert deployment == Deployment(model="gpt-4o", provider="openai", upstream_model="gpt-4o")
    assert deployment.key == "gpt-4o@openai"
    assert rules.providers["openai"].timeouts == Timeouts()
    assert rules.virtual_models["auto"].candidates is None


def test_lookups_resolve_names_and_aliases() -> None:
    rules = parse_rules(full_doc())
    mini = rules.resolve_model("gpt-4o-mini-2024-07-18")
    assert mini is not None
    assert mini.name == "gpt-4o-mini"
    assert rules.resolve_model("auto") is None  # virtual models are looked up by name
    assert rules.resolve_model("nope") is None
    assert rules.is_known_name("auto")
    assert rules.is_known_name("gpt-4o-mini-2024-07-18")
    assert not rules.is_known_name("gpt-5")


def test_rule_set_is_immutable() -> None:
    rules = parse_rules(full_doc())
    with pytest.raises(TypeError):
        rules.models["x"] = rules.models["llama"]  # type: ignore[index]
    with pytest.raises(TypeError):
        rules.providers["openai"].headers["x"] = "y"  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        rules.defaults.retry.max_attempts = 9  # type: ignore[misc]


def test_null_on_an_optional_key_means_not_given() -> None:
    doc = minimal_doc()
    doc["providers"]["openai"]["api_key_env"] = None
    doc["providers"]["openai"]["headers"] = None
    doc["routes"] = None
    rules = parse_rules(doc)
    assert rules.providers["openai"].api_key_env is None
    assert rules.routes == ()


# ----------------------------------------------------------------------------- error rows


def _set(path: str, value: object) -> Callable[[Doc], None]:
    """A mutation setting the value at a dotted path ('a.b.0.c'; digits index lists)."""

    def mutate(doc: Doc) -> None:
        *parents, last = path.split("|")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Callable[[Doc], None]:
    def mutate(doc: Doc) -> None:
        *parents, last = path.split("|")
        node: Any = doc
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


P = "providers|openai|"
M = "models|gpt-4o-mini|"
V = "virtual_models|auto|"
D = "defaults|"

ERROR_ROWS: list[tuple[str, Callable[[Doc], object], str]] = [
    ("top-level typo", _set("modles", {}), "modles: unknown key, did you mean 'models'?"),
    ("version 2", _set("version", 2), "version: unsupported version 2, expected 1"),
    ("version missing", _delete("version"), "version: required key is missing"),
    ("version string", _set("version", "1"), "version: expected an integer, got string"),
    ("version bool", _set("version", True), "version: expected an integer, got boolean"),
    ("providers missing", _delete("providers"), "providers: required section is missing"),
    ("providers empty", _set("providers", {}), "providers: must not be empty"),
    ("models list", _set("models", []), "models: expected a mapping, got list"),
    (
        "non-string name",
        lambda d: d["models"].update({7: {"provider": "openai"}}),
        "models.7: keys must be strings, got integer",
    ),
    ("blank name", _set("models| ", {"provider": "openai"}), "models.' ': name must not be empty"),
    # providers
    (
        "provider key without suggestion",
        _set(P + "zzz", 1),
        "providers.openai.zzz: unknown key (expected one of: type, base_url, api_key_env, "
        "headers, timeouts, breaker, health_check, prefill)",
    ),
    (
        "provider type",
        _set(P + "type", "azure"),
        "providers.openai.type: unknown provider type 'azure' "
        "(expected one of: openai, anthropic, gemini)",
    ),
    (
        "provider type typo",
        _set(P + "type", "gemni"),
        "providers.openai.type: unknown provider type 'gemni', did you mean 'gemini'? "
        "(expected one of: openai, anthropic, gemini)",
    ),
    ("type missing", _delete(P + "type"), "providers.openai.type: required key is missing"),
    (
        "base_url scheme",
        _set(P + "base_url", "ftp://x"),
        "providers.openai.base_url: must be an http:// or https:// URL, got 'ftp://x'",
    ),
    (
        "base_url no host",
        _set(P + "base_url", "https:///v1"),
        "providers.openai.base_url: must be an http:// or https:// URL, got 'https:///v1'",
    ),
    (
        "base_url query",
        _set(P + "base_url", "https://x/v1?a=1"),
        "providers.openai.base_url: must not have a query or fragment",
    ),
    (
        "base_url space",
        _set(P + "base_url", "https://x/v 1"),
        "providers.openai.base_url: must be ASCII without spaces or control characters "
        "(percent-encode the path)",
    ),
    (
        "base_url non-ascii path",
        _set(P + "base_url", "https://x/v\u0142"),
        "providers.openai.base_url: must be ASCII without spaces or control characters "
        "(percent-encode the path)",
    ),
    (
        "base_url bad IPv6",
        _set(P + "base_url", "http://[::1/v1"),
        "providers.openai.base_url: not a valid URL: Invalid IPv6 URL",
    ),
    (
        "base_url bad port",
        _set(P + "base_url", "http://h:99999/v1"),
        "providers.openai.base_url: not a valid URL: Port out of range 0-65535",
    ),
    (
        "header twice",
        _set(P + "headers", {"X-A": "1", "x-a": "2"}),
        "providers.openai.headers.x-a: header 'x-a' is listed twice (names are case-insensitive)",
    ),
    ("base_url empty", _set(P + "base_url", " "), "providers.openai.base_url: must not be empty"),
    (
        "api_key_env",
        _set(P + "api_key_env", "OPENAI-KEY"),
        "providers.openai.api_key_env: 'OPENAI-KEY' is not an environment variable name",
    ),
    (
        "header value type",
        _set(P + "headers", {"x-a": 1}),
        "providers.openai.headers.x-a: expected a string, got integer",
    ),
    (
        "header value newline",
        _set(P + "headers", {"x-a": "a\r\nb"}),
        "providers.openai.headers.x-a: header value must not contain CR, LF or NUL",
    ),
    (
        "header value not latin-1",
        _set(P + "headers", {"x-team": "zesp\u00f3\u0142"}),
        "providers.openai.headers.x-team: header value must be Latin-1 text "
        "(encode anything else yourself)",
    ),
    (
        "header name",
        _set(P + "headers", {"bad header": "v"}),
        "providers.openai.headers.'bad header': not a valid HTTP header name",
    ),
    (
        "headers list",
        _set(P + "headers", ["a"]),
        "providers.openai.headers: expected a mapping, got list",
    ),
    (
        "timeout zero",
        _set(P + "timeouts", {"connect": 0}),
        "providers.openai.timeouts.connect: must be > 0 and <= 86400, got 0",
    ),
    (
        "timeout over total",
        _set(P + "timeouts", {"first_token": 20, "total": 10}),
        "providers.openai.timeouts.first_token: must not exceed total (10)",
    ),
    (
        "timeout key typo",
        _set(P + "timeouts", {"frist_token": 20}),
        "providers.openai.timeouts.frist_token: unknown key, did you mean 'first_token'?",
    ),
    (
        "failure_rate over 1",
        _set(P + "breaker", {"failure_rate": 1.5}),
        "providers.openai.breaker.failure_rate: must be > 0 and <= 1, got 1.5",
    ),
    (
        "failure_rate zero",
        _set(P + "breaker", {"failure_rate": 0}),
        "providers.openai.breaker.failure_rate: must be > 0 and <= 1, got 0",
    ),
    (
        "failure_threshold float",
        _set(P + "breaker", {"failure_threshold": 2.5}),
        "providers.openai.breaker.failure_threshold: expected an integer, got number",
    ),
    (
        "failure_threshold negative",
        _set(P + "breaker", {"failure_threshold": -1}),
        "providers.openai.breaker.failure_threshold: must be >= 0 and <= 1000000, got -1",
    ),
    (
        "window below one bucket",
        _set(P + "breaker", {"window_seconds": 0.5}),
        "providers.openai.breaker.window_seconds: must be >= 1 and <= 3600, got 0.5",
    ),
    (
        "window over an hour",
        _set(P + "breaker", {"window_seconds": 36000}),
        "providers.openai.breaker.window_seconds: must be >= 1 and <= 3600, got 36000",
    ),
    (
        "open_seconds of 10**30 (an open breaker for ever)",
        _set(P + "breaker", {"open_seconds": 10**30}),
        "providers.openai.breaker.open_seconds: must be > 0 and <= 86400, "
        "got 1000000000000000000000000000000",
    ),
    (
        "max_open_seconds with an extra zero too many",
        _set(P + "breaker", {"max_open_seconds": 864000}),
        "providers.openai.breaker.max_open_seconds: must be > 0 and <= 86400, got 864000",
    ),
    (
        "timeout given in ms",
        _set(P + "timeouts", {"total": 600_000}),
        "providers.openai.timeouts.total: must be > 0 and <= 86400, got 600000",
    ),
    (
        "failure_threshold huge",
        _set(P + "breaker", {"failure_threshold": 10_000_000}),
        "providers.openai.breaker.failure_threshold: must be >= 0 and <= 1000000, got 10000000",
    ),
    (
        "half_open_probes zero",
        _set(P + "breaker", {"half_open_probes": 0}),
        "providers.openai.breaker.half_open_probes: must be >= 1 and <= 1000, got 0",
    ),
    (
        "max_open below open",
        _set(P + "breaker", {"open_seconds": 30, "max_open_seconds": 10}),
        "providers.openai.breaker.max_open_seconds: must be >= open_seconds",
    ),
    (
        "health path",
        _set(P + "health_check", {"path": "models"}),
        "providers.openai.health_check.path: must start with '/'",
    ),
    (
        "health interval",
        _set(P + "health_check", {"interval": -1}),
        "providers.openai.health_check.interval: must be >= 0 and <= 86400, got -1",
    ),
    # models
    (
        "model key typo",
        _set(M + "prvider", "openai"),
        "models.gpt-4o-mini.prvider: unknown key, did you mean 'provider'?",
    ),
    (
        "negative cost",
        _set(M + "input_cost_per_1k", -1),
        "models.gpt-4o-mini.input_cost_per_1k: must be >= 0 and <= 1000, got -1",
    ),
    (
        "cost string",
        _set(M + "output_cost_per_1k", "0.1"),
        "models.gpt-4o-mini.output_cost_per_1k: expected a number, got string",
    ),
    (
        "cost bool",
        _set(M + "output_cost_per_1k", True),
        "models.gpt-4o-mini.output_cost_per_1k: expected a number, got boolean",
    ),
    (
        "cost infinite",
        _set(M + "output_cost_per_1k", float("inf")),
        "models.gpt-4o-mini.output_cost_per_1k: must be a finite number",
    ),
    (
        "quality range",
        _set(M + "quality", {"chat": 11}),
        "models.gpt-4o-mini.quality.chat: must be >= 0 and <= 10, got 11",
    ),
    (
        "quality task typo",
        _set(M + "quality", {"codng": 5}),
        "models.gpt-4o-mini.quality.codng: unknown key, did you mean 'coding'?",
    ),
    (
        "context window zero",
        _set(M + "context_window", 0),
        "models.gpt-4o-mini.context_window: must be >= 1 and <= 100000000, got 0",
    ),
    (
        "price per 1M tokens given as per 1k",
        _set(M + "output_cost_per_1k", 15000),
        "models.gpt-4o-mini.output_cost_per_1k: must be >= 0 and <= 1000, got 15000",
    ),
    (
        "latency zero",
        _set(M + "latency_ms", 0),
        "models.gpt-4o-mini.latency_ms: must be > 0 and <= 3600000, got 0",
    ),
    (
        "description type",
        _set(M + "description", 5),
        "models.gpt-4o-mini.description: expected a string, got integer",
    ),
    (
        "provider and deployments",
        _set(M + "deployments", [{"provider": "openai"}]),
        "models.gpt-4o-mini: give either 'provider' (one deployment) or 'deployments', not both",
    ),
    (
        "neither provider nor deployments",
        _delete(M + "provider"),
        "models.gpt-4o-mini: a model needs 'provider' or 'deployments'",
    ),
    (
        "unknown provider",
        _set(M + "provider", "opena"),
        "models.gpt-4o-mini.provider: unknown provider 'opena', did you mean 'openai'?",
    ),
    (
        "deployment key typo",
        _set("models|gpt-4o", {"deployments": [{"provider": "openai"}, {"prvider": "openai"}]}),
        "models.gpt-4o.deployments[1].prvider: unknown key, did you mean 'provider'?",
    ),
    (
        "deployment without provider",
        _set("models|gpt-4o", {"deployments": [{"latency_ms": 5}]}),
        "models.gpt-4o.deployments[0].provider: required key is missing",
    ),
    (
        "deployment not a mapping",
        _set("models|gpt-4o", {"deployments": ["openai"]}),
        "models.gpt-4o.deployments[0]: expected a mapping, got string",
    ),
    (
        "deployments empty",
        _set("models|gpt-4o", {"deployments": []}),
        "models.gpt-4o.deployments: must not be empty",
    ),
    (
        "deployment twice on one provider",
        _set("models|gpt-4o", {"deployments": [{"provider": "openai"}, {"provider": "openai"}]}),
        "models.gpt-4o.deployments[1].provider: "
        "model 'gpt-4o' already has a deployment on 'openai'",
    ),
    (
        "alias is a model name",
        _set(M + "aliases", ["gpt-4o"]),
        "models.gpt-4o-mini.aliases[0]: alias 'gpt-4o' collides with the model of that name",
    ),
    (
        "alias is a virtual model",
        _set(M + "aliases", ["auto"]),
        "models.gpt-4o-mini.aliases[0]: alias 'auto' collides with the virtual model of that name",
    ),
    (
        "alias of two models",
        lambda d: (_set(M + "aliases", ["mini"])(d), _set("models|gpt-4o|aliases", ["mini"])(d)),
        "models.gpt-4o.aliases[0]: alias 'mini' is already an alias of model 'gpt-4o-mini'",
    ),
    (
        "alias listed twice",
        _set(M + "aliases", ["mini", "mini"]),
        "models.gpt-4o-mini.aliases[1]: 'mini' is listed twice",
    ),
    (
        "aliases string",
        _set(M + "aliases", "mini"),
        "models.gpt-4o-mini.aliases: expected a list, got string",
    ),
    # virtual models
    (
        "virtual collides with model",
        _set("virtual_models|gpt-4o", {"strategy": "balanced"}),
        "virtual_models.gpt-4o: virtual model 'gpt-4o' collides with the model of that name",
    ),
    (
        "strategy missing",
        _set(V + "strategy", None),
        "virtual_models.auto.strategy: must not be null",
    ),
    (
        "strategy typo",
        _set(V + "strategy", "balance"),
        "virtual_models.auto.strategy: unknown strategy 'balance', did you mean 'balanced'? "
        "(expected one of: cost_optimized, performance_first, balanced, reliability_first, "
        "task_specific)",
    ),
    (
        "task type",
        _set(V + "task_type", "poetry"),
        "virtual_models.auto.task_type: unknown task type 'poetry' "
        "(expected one of: chat, coding, analysis, creative)",
    ),
    (
        "candidate unknown",
        _set(V + "candidates", ["gpt-4o", "gpt4o-mini"]),
        "virtual_models.auto.candidates[1]: unknown model or alias 'gpt4o-mini', "
        "did you mean 'gpt-4o-mini'?",
    ),
    (
        "candidate is virtual",
        _set(V + "candidates", ["auto"]),
        "virtual_models.auto.candidates[0]: unknown model or alias 'auto'",
    ),
    (
        "candidates empty",
        _set(V + "candidates", []),
        "virtual_models.auto.candidates: must not be empty (omit it to use every model)",
    ),
    (
        "candidate twice via alias",
        lambda d: (
            _set(M + "aliases", ["mini"])(d),
            _set(V + "candidates", ["gpt-4o-mini", "mini"])(d),
        ),
        "virtual_models.auto.candidates[1]: 'mini' names model 'gpt-4o-mini' again",
    ),
    (
        "fallback unknown",
        _set(V + "fallback_models", ["nope"]),
        "virtual_models.auto.fallback_models[0]: unknown model, alias or virtual model 'nope'",
    ),
    (
        "cost cap negative",
        _set(V + "max_cost_per_1k_tokens", -0.5),
        "virtual_models.auto.max_cost_per_1k_tokens: must be >= 0 and <= 1000, got -0.5",
    ),
    (
        "cost cap string",
        _set(V + "max_cost_per_1k_tokens", "cheap"),
        "virtual_models.auto.max_cost_per_1k_tokens: expected a number or a mapping "
        "{input, output}, got string",
    ),
    (
        "cost cap half",
        _set(V + "max_cost_per_1k_tokens", {"input": 1}),
        "virtual_models.auto.max_cost_per_1k_tokens.output: required key is missing",
    ),
    (
        "cost cap typo",
        _set(V + "max_cost_per_1k_tokens", {"input": 1, "outptu": 1}),
        "virtual_models.auto.max_cost_per_1k_tokens.outptu: unknown key, did you mean 'output'?",
    ),
    (
        "max latency",
        _set(V + "max_latency_ms", 0),
        "virtual_models.auto.max_latency_ms: must be > 0 and <= 3600000, got 0",
    ),
    # routes
    ("routes mapping", _set("routes", {}), "routes: expected a list, got mapping"),
    (
        "route rewrite unknown",
        _set("routes", [{"rewrite": {"model": "gpt-4o-mni"}}]),
        "routes[0].rewrite.model: unknown model, alias or virtual model 'gpt-4o-mni', "
        "did you mean 'gpt-4o-mini'?",
    ),
    (
        "route rewrite without model",
        _set("routes", [{"rewrite": {}}]),
        "routes[0].rewrite.model: required key is missing",
    ),
    (
        "route fallback unknown",
        _set("routes", [{"fallbacks": ["gpt-4o", "x"]}]),
        "routes[0].fallbacks[1]: unknown model, alias or virtual model 'x'",
    ),
    (
        "route does nothing",
        _set("routes", [{"match": {"model": "x"}}]),
        "routes[0]: a route needs 'rewrite', 'fallbacks', 'continuation' or 'hedge_after_ms'",
    ),
    (
        "route match typo",
        _set("routes", [{"match": {"modle": "x"}, "fallbacks": ["gpt-4o"]}]),
        "routes[0].match.modle: unknown key, did you mean 'model'?",
    ),
    (
        "route header glob type",
        _set("routes", [{"match": {"headers": {"x-team": 5}}, "fallbacks": ["gpt-4o"]}]),
        "routes[0].match.headers.x-team: expected a string, got integer",
    ),
    (
        "route header twice",
        _set(
            "routes",
            [{"match": {"headers": {"x-team": "a", "X-Team": "b"}}, "fallbacks": ["gpt-4o"]}],
        ),
        "routes[0].match.headers.X-Team: "
        "header 'x-team' is listed twice (names are case-insensitive)",
    ),
    ("route not a mapping", _set("routes", ["x"]), "routes[0]: expected a mapping, got string"),
    # defaults
    (
        "default strategy",
        _set(D + "strategy", "fastest"),
        "defaults.strategy: unknown strategy 'fastest' (expected one of: cost_optimized, "
        "performance_first, balanced, reliability_first, task_specific)",
    ),
    (
        "default fallback unknown",
        _set(D + "fallback_models", ["gpt-4"]),
        "defaults.fallback_models[0]: unknown model, alias or virtual model 'gpt-4', "
        "did you mean 'gpt-4o'?",
    ),
    (
        "weights all zero",
        _set(D + "weights", {"quality": 0, "cost": 0}),
        "defaults.weights: the weights must not all be 0",
    ),
    (
        "weights huge",
        _set(D + "weights", {"cost": 1e9}),
        "defaults.weights.cost: must be >= 0 and <= 1000, got 1000000000.0",
    ),
    (
        "weights negative",
        _set(D + "weights", {"cost": -1}),
        "defaults.weights.cost: must be >= 0 and <= 1000, got -1",
    ),
    (
        "retry attempts zero",
        _set(D + "retry", {"max_attempts": 0}),
        "defaults.retry.max_attempts: must be >= 1 and <= 20, got 0",
    ),
    (
        "retry attempts huge",
        _set(D + "retry", {"max_attempts": 100}),
        "defaults.retry.max_attempts: must be >= 1 and <= 20, got 100",
    ),
    (
        "retry backoff order",
        _set(D + "retry", {"backoff_ms": 900}),
        "defaults.retry.max_backoff_ms: must be >= backoff_ms",
    ),
    (
        "retry backoff of an hour",
        _set(D + "retry", {"backoff_ms": 3_600_000, "max_backoff_ms": 3_600_000}),
        "defaults.retry.backoff_ms: must be >= 0 and <= 60000, got 3600000",
    ),
    (
        "retry budget ratio",
        _set(D + "retry", {"budget_ratio": 2}),
        "defaults.retry.budget_ratio: must be >= 0 and <= 1, got 2",
    ),
    (
        "response_metadata",
        _set(D + "response_metadata", "yes"),
        "defaults.response_metadata: expected true or false, got string",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "expected"), [pytest.param(m, e, id=i) for i, m, e in ERROR_ROWS]
)
def test_each_mistake_is_reported_with_its_path(
    mutate: Callable[[Doc], object], expected: str
) -> None:
    doc = minimal_doc()
    mutate(doc)
    assert expected in problems_of(doc)


def test_the_document_must_be_a_mapping() -> None:
    assert problems_of(["version", 1]) == ["<root>: expected a mapping, got list"]


def test_every_problem_is_reported_at_once() -> None:
    doc = minimal_doc()
    doc["version"] = 3
    doc["providers"]["openai"]["type"] = "openapi"
    doc["models"]["gpt-4o"]["prvider"] = "openai"
    doc["virtual_models"]["auto"]["candidates"] = ["gpt-4o-maxi"]
    doc["defaults"] = {"retry": {"max_attempts": "4"}}
    problems = problems_of(doc)
    assert problems == [
        "version: unsupported version 3, expected 1",
        "providers.openai.type: unknown provider type 'openapi', did you mean 'openai'? "
        "(expected one of: openai, anthropic, gemini)",
        "models.gpt-4o.prvider: unknown key, did you mean 'provider'?",
        "virtual_models.auto.candidates[0]: unknown model or alias 'gpt-4o-maxi', "
        "did you mean 'gpt-4o-mini'?",
        "defaults.retry.max_attempts: expected an integer, got string",
    ]


def test_an_invalid_entry_does_not_cascade_into_unknown_name_problems() -> None:
    doc = minimal_doc()
    doc["providers"]["openai"] = "broken"
    doc["models"]["gpt-4o"] = ["broken"]
    doc["routes"] = [{"rewrite": {"model": "gpt-4o"}}]
    assert problems_of(doc) == [
        "providers.openai: expected a mapping, got string",
        "models.gpt-4o: expected a mapping, got list",
    ]


def test_contract_example_reports_its_undeclared_provider_only() -> None:
    import yaml

    doc = yaml.safe_load(
        """
version: 1
providers:
  anthropic: {type: anthropic, base_url: https://api.anthropic.com, api_key_env: ANTHROPIC_API_KEY}
models:
  claude-3-haiku-20240307:
    context_window: 200000
    deployments:
      - {provider: anthropic, input_cost_per_1k: 0.00025, output_cost_per_1k: 0.00125}
      - {provider: openrouter, upstream_model: anthropic/claude-3-haiku}
"""
    )
    assert problems_of(doc) == [
        "models.claude-3-haiku-20240307.deployments[1].provider: unknown provider 'openrouter'"
    ]


# ----------------------------------------------------------------------------- load_rules


def _load_problems(path: Path) -> list[str]:
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert info.value.source == str(path)
    return info.value.problems


def test_load_rules_reads_a_file_and_records_its_source(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(FULL_YAML)
    rules = load_rules(path)
    assert rules.source == str(path)
    assert rules == parse_rules(full_doc(), source=str(path))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "version: 1\nproviders: a: b\n",
            "line 2, column 13: invalid YAML: mapping values are not allowed here",
        ),
        (
            "version: 1\nproviders: [\n",
            "line 3, column 1: invalid YAML: expected the node content, but found '<stream end>'",
        ),
        (
            "version: 1\nmodels: {}\nversion: 1\n",
            "line 3, column 1: invalid YAML: found duplicate key 'version'",
        ),
        ("", "<root>: the file is empty"),
        ("# only a comment\n", "<root>: the file is empty"),
    ],
)
def test_load_rules_reports_yaml_problems_with_their_location(
    tmp_path: Path, text: str, expected: str
) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(text)
    assert _load_problems(path) == [expected]


def test_merge_keys_may_override_merged_values(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    path.write_text(
        "version: 1\n"
        "providers:\n"
        "  a: &base {type: openai, base_url: 'http://a'}\n"
        "  b: {<<: *base, base_url: 'http://b'}\n"
        "models: {m: {provider: b}}\n"
    )
    assert load_rules(path).providers["b"].base_url == "http://b"


def test_load_rules_reports_unreadable_files(tmp_path: Path) -> None:
    [problem] = _load_problems(tmp_path / "missing.yaml")
    assert problem.startswith("<root>: cannot read the file:")
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"version: 1\n\xff\xfe")
    assert _load_problems(binary) == ["byte 11: the file is not valid UTF-8"]


def test_format_problems_prefixes_every_line_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("version: 2\nprovidres: {}\n")
    with pytest.raises(RulesError) as info:
        load_rules(path)
    assert format_problems(info.value).splitlines() == [
        f"{path}: providres: unknown key, did you mean 'providers'?",
        f"{path}: version: unsupported version 2, expected 1",
        f"{path}: providers: required section is missing",
        f"{path}: models: required section is missing",
    ]


# ----------------------------------------------------------------------------- shipped files


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: str(p.relative_to(RULES_DIR)))
def test_shipped_rules_files_parse(path: Path) -> None:
    rules = load_rules(path)
    assert rules.models
    assert len(SHIPPED) >= 4


def test_default_rules_catalog() -> None:
    rules = load_rules(RULES_DIR / "default.yaml")
    assert {name: (p.type, p.base_url, p.api_key_env) for name, p in rules.providers.items()} == {
        "openai": ("openai", "https://api.openai.com/v1", "OPENAI_API_KEY"),
        "anthropic": ("anthropic", "https://api.anthropic.com", "ANTHROPIC_API_KEY"),
        "gemini": ("gemini", "https://generativelanguage.googleapis.com", "GEMINI_API_KEY"),
    }
    assert set(CHAT_VIRTUAL_MODELS) == set(rules.virtual_models)
    embeddings = {n for n in rules.models if "embedding" in n}
    assert embeddings == {"text-embedding-3-small", "text-embedding-3-large", "text-embedding-004"}
    for virtual in rules.virtual_models.values():
        assert virtual.description
        assert virtual.candidates  # explicit lists, so embedding models never route chat
        assert not embeddings.intersection(virtual.candidates)
    for name, model in rules.models.items():
        assert model.description, name
        for deployment in model.deployments:
            assert deployment.context_window is not None
            assert deployment.latency_ms is not None
        if model.endpoints == ("chat",):
            assert set(model.quality) == {"chat", "coding", "analysis", "creative"}, name
            assert model.deployments[0].output_cost_per_1k > model.deployments[0].input_cost_per_1k
    assert rules.resolve_model("claude-3-5-haiku") == rules.models["claude-3-5-haiku-20241022"]


def test_demo_rules_use_local_mocks_without_keys() -> None:
    rules = load_rules(RULES_DIR / "demo.yaml")
    assert {name: (p.type, p.base_url, p.api_key_env) for name, p in rules.providers.items()} == {
        "mock-openai": ("openai", "http://127.0.0.1:18081/v1", None),
        "mock-openai-backup": ("openai", "http://127.0.0.1:18082/v1", None),
        "mock-anthropic": ("anthropic", "http://127.0.0.1:18083", None),
        "mock-gemini": ("gemini", "http://127.0.0.1:18084", None),
    }
    mini = rules.models["gpt-4o-mini"]
    assert [d.provider for d in mini.deployments] == ["mock-openai", "mock-openai-backup"]
    # Legacy names are aliases (they apply to fallbacks too), not a glob route that would
    # also catch the completions model gpt-3.5-turbo-instruct.
    assert rules.model_index["gpt-3.5-turbo-0125"] == "gpt-4o-mini"
    instruct = rules.models["gpt-3.5-turbo-instruct"]
    assert instruct.endpoints == ("completions",)
    assert set(CHAT_VIRTUAL_MODELS) <= set(rules.virtual_models)


# ----------------------------------------------------------------------------- route matching


def _routes(*routes: Doc) -> RuleSet:
    doc = minimal_doc()
    doc["routes"] = list(routes)
    return parse_rules(doc)


def test_model_globs_use_fnmatch_semantics_case_sensitively() -> None:
    rules = _routes(
        {"match": {"model": "gpt-4?"}, "rewrite": {"model": "gpt-4o"}},
        {"match": {"model": "gpt-3.5-turbo-[01]*"}, "rewrite": {"model": "gpt-4o-mini"}},
        {"match": {"model": "claude-*"}, "fallbacks": ["gpt-4o"]},
    )
    first, second, third = rules.routes

    def matched(model: str) -> Route | None:
        return rules.match_route(model, {})

    assert matched("gpt-4o") is first
    assert matched("gpt-4o-mini") is None  # `?` is exactly one character
    assert matched("gpt-3.5-turbo-0125") is second
    assert matched("gpt-3.5-turbo-2023") is None
    assert matched("claude-3-haiku") is third
    assert matched("Claude-3-haiku") is None  # case-sensitive, whatever the OS
    assert matched("gpt.4o") is None  # a dot in a glob is literal


def test_header_globs_match_header_names_case_insensitively() -> None:
    rules = _routes(
        {
            "match": {"model": "gpt-*", "headers": {"X-Team": "research*"}},
            "rewrite": {"model": "gpt-4o"},
        },
        {"match": {"headers": {"x-tier": "*"}}, "rewrite": {"model": "gpt-4o-mini"}},
    )
    research, tiered = rules.routes
    assert research.headers == (("x-team", "research*"),)
    proxy = CIMultiDictProxy(CIMultiDict({"X-TEAM": "research-eu", "Content-Type": "x"}))
    assert rules.match_route("gpt-4o", proxy) is research
    assert rules.match_route("gpt-4o", {"x-team": "research"}) is research  # plain lower-case dict
    assert rules.match_route("claude", proxy) is None  # the model must match too
    assert rules.match_route("gpt-4o", {"x-team": "Research"}) is None  # values are case-sensitive
    # An absent header never matches, even `*`; present with any value does.
    assert rules.match_route("gpt-4o", {}) is None
    assert rules.match_route("gpt-4o", {"x-tier": ""}) is tiered


def test_every_listed_header_must_match_and_the_first_matching_route_wins() -> None:
    rules = _routes(
        {"match": {"headers": {"x-team": "a", "x-env": "prod"}}, "rewrite": {"model": "gpt-4o"}},
        {"match": {"headers": {"x-team": "a"}}, "rewrite": {"model": "gpt-4o-mini"}},
        {"match": {"model": "*"}, "rewrite": {"model": "auto"}},
    )
    both, team, catch_all = rules.routes
    assert rules.match_route("m", {"x-team": "a", "x-env": "prod"}) is both
    assert rules.match_route("m", {"x-team": "a", "x-env": "dev"}) is team
    assert rules.match_route("m", {"x-team": "b"}) is catch_all


def test_route_matching_compiles_nothing_per_request(monkeypatch: pytest.MonkeyPatch) -> None:
    rules = _routes(
        {"match": {"model": "gpt-*", "headers": {"x-a": "b*"}}, "rewrite": {"model": "auto"}}
    )

    def forbidden(*args: object, **kwargs: object) -> None:
        raise AssertionError("compiled at request time")

    monkeypatch.setattr(re, "compile", forbidden)
    monkeypatch.setattr(fnmatch, "translate", forbidden)
    monkeypatch.setattr(fnmatch, "fnmatch", forbidden)
    monkeypatch.setattr(fnmatch, "fnmatchcase", forbidden)
    assert rules.match_route("gpt-4o", {"x-a": "bc"}) is rules.routes[0]
    assert rules.match_route("gpt-4o", {"x-a": "c"}) is None


def test_routes_built_in_code_are_compiled_too() -> None:
    route = Route(model_glob="a*", headers=(("x-h", "v?"),), rewrite_model="b")
    assert route.matches("abc", {"x-h": "v1"})
    assert not route.matches("abc", {"x-h": "v12"})
    assert route == copy.copy(route)


# ----------------------------------------------------------------------------- fingerprint


def _configmap_version(root: Path, version: str, text: str, mtime_ns: int) -> Path:
    directory = root / version
    directory.mkdir()
    target = directory / "rules.yaml"
    target.write_text(text)
    os.utime(target, ns=(mtime_ns, mtime_ns))
    return directory


def _point_data_at(root: Path, version: str) -> None:
    """Kubernetes' atomic swap: a new symlink renamed over `..data`."""
    tmp_link = root / "..data_tmp"
    tmp_link.symlink_to(version)
    os.replace(tmp_link, root / "..data")


def test_fingerprint_changes_on_a_configmap_symlink_swap(tmp_path: Path) -> None:
    text = (RULES_DIR / "demo.yaml").read_text()
    mtime_ns = 1_700_000_000_000_000_000
    _configmap_version(tmp_path, "..2024_01_01", text, mtime_ns)
    _point_data_at(tmp_path, "..2024_01_01")
    rules_path = tmp_path / "rules.yaml"
    rules_path.symlink_to("..data/rules.yaml")

    before = file_fingerprint(rules_path)
    assert before is not None
    assert before == file_fingerprint(rules_path)  # stable while nothing changes

    # Same size and same mtime: only the identity of the file tells the change.
    new_text = text.replace("latency_ms: 50", "latency_ms: 51")
    assert len(new_text) == len(text)
    assert new_text != text
    _configmap_version(tmp_path, "..2024_01_02", new_text, mtime_ns)
    _point_data_at(tmp_path, "..2024_01_02")
    after = file_fingerprint(rules_path)
    assert after is not None
    assert after != before
    assert after[0].endswith("..2024_01_02/rules.yaml")
    assert [d.latency_ms for d in load_rules(rules_path).models["gpt-4o-mini"].deployments] == [
        51,
        80,
    ]

    # Kubernetes then deletes the old version directory; nothing changes for us.
    for child in (tmp_path / "..2024_01_01").iterdir():
        child.unlink()
    (tmp_path / "..2024_01_01").rmdir()
    assert file_fingerprint(rules_path) == after


def test_fingerprint_of_plain_files(tmp_path: Path) -> None:
    path = tmp_path / "rules.yaml"
    assert file_fingerprint(path) is None
    path.write_text("version: 1\n")
    first = file_fingerprint(path)
    path.write_text("version: 1\nmodels: {}\n")
    assert file_fingerprint(path) not in (None, first)
    dangling = tmp_path / "dangling.yaml"
    dangling.symlink_to(tmp_path / "nowhere.yaml")
    assert file_fingerprint(dangling) is None


def test_the_libyaml_loader_decodes_like_the_pure_one(tmp_path: Path) -> None:
    import yaml

    from proxy.config import check

    for path in [*SHIPPED, write_full(tmp_path)]:
        text = path.read_text()
        assert check._decode(text) == yaml.load(text, Loader=check._StrictLoader)


def write_full(tmp_path: Path) -> Path:
    path = tmp_path / "full.yaml"
    path.write_text(FULL_YAML)
    return path


def test_continuation_keys_parse_and_inherit() -> None:
    text = """
version: 1
providers:
  openai: {type: openai, base_url: "https://api.openai.com/v1", api_key_env: OPENAI_API_KEY}
  deepseek:
    type: openai
    base_url: "https://api.deepseek.com/beta"
    api_key_env: DEEPSEEK_API_KEY
    prefill: true
models:
  gpt-4o: {provider: openai, upstream_model: gpt-4o, continuation: false}
  deepseek-chat: {provider: deepseek, upstream_model: deepseek-chat}
routes:
  - match: {model: "deepseek-*"}
    continuation: false
defaults:
  continuation: false
"""
    rules = parse_rules(yaml.safe_load(text))
    assert rules.providers["deepseek"].prefill is True
    assert rules.providers["openai"].prefill is None
    assert rules.models["gpt-4o"].continuation is False
    assert rules.models["deepseek-chat"].continuation is None
    assert rules.routes[0].continuation is False
    assert rules.defaults.continuation is False


def test_continuation_keys_are_booleans() -> None:
    text = """
version: 1
providers:
  openai: {type: openai, base_url: "https://api.openai.com/v1", prefill: "yes"}
models:
  gpt-4o: {provider: openai, upstream_model: gpt-4o, continuation: 1}
routes:
  - match: {model: "*"}
    continuation: "off"
defaults:
  continuation: []
"""
    with pytest.raises(RulesError) as caught:
        parse_rules(yaml.safe_load(text))
    message = str(caught.value)
    for path in (
        "providers.openai.prefill",
        "models.gpt-4o.continuation",
        "routes[0].continuation",
        "defaults.continuation",
    ):
        assert f"{path}: expected true or false" in message
