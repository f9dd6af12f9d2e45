"""Upstream model names are checked per provider type: in a Gemini URL path, in an OpenAI body.

Gemini puts the model in the path (``/v1beta/models/{model}:generateContent``), so its
names must stay one path segment; OpenAI-compatible and Anthropic upstreams get the
name in the JSON body, where ``meta-llama/Llama-3-70b`` is an ordinary name.
"""

from __future__ import annotations

from typing import Any

import pytest

from proxy.config.check import parse_rules, upstream_model_problem
from proxy.config.model import RulesError

Doc = dict[str, Any]


def doc(models: Doc) -> Doc:
    return {
        "version": 1,
        "providers": {
            "gem": {"type": "gemini", "base_url": "https://generativelanguage.googleapis.com"},
            "oai": {"type": "openai", "base_url": "https://api.example.com/v1"},
            "ant": {"type": "anthropic", "base_url": "https://api.anthropic.com"},
        },
        "models": models,
    }


def problems(models: Doc) -> list[str]:
    with pytest.raises(RulesError) as info:
        parse_rules(doc(models))
    return info.value.problems


@pytest.mark.parametrize(
    "name",
    [
        "meta-llama/Llama-3-70b",
        "accounts/fireworks/models/llama-v3-70b",
        "org/model?v=2#x:y",  # odd, but only ever a JSON string in the body
        "llama 3 (local)",
        "modèle-ünïcode",
    ],
)
def test_body_only_upstreams_take_any_name_without_control_characters(name: str) -> None:
    rules = parse_rules(
        doc(
            {
                "m": {
                    "upstream_model": name,
                    "deployments": [{"provider": "oai"}, {"provider": "ant"}],
                }
            }
        )
    )
    assert [d.upstream_model for d in rules.models["m"].deployments] == [name, name]


@pytest.mark.parametrize(
    "name", ["gemini-1.5-pro-002", "models/gemini-2.0-flash", "text-embedding-004", "gemini-é"]
)
def test_gemini_takes_names_that_stay_one_path_segment(name: str) -> None:
    rules = parse_rules(doc({"m": {"provider": "gem", "upstream_model": name}}))
    assert rules.models["m"].deployments[0].upstream_model == name


@pytest.mark.parametrize(
    ("name", "found"),
    [
        ("tunedModels/x", "'/'"),
        ("models/a/b", "'/'"),
        ("gemini-pro?alt=json", "'?'"),
        ("gemini-pro#x", "'#'"),
        ("gemini-pro:streamGenerateContent", "':'"),
        ("..", "'..'"),
        ("a..b", "'..'"),
        (".", "only '.'"),
        ("models/", "no name"),
        ("gemini pro", "whitespace"),
        ("gemini\u00a0pro", "whitespace"),
        ("../../v1/files?x", "'/', '?', '..'"),
    ],
)
def test_gemini_refuses_what_would_split_or_leave_the_path_segment(name: str, found: str) -> None:
    assert problems({"m": {"provider": "gem", "upstream_model": name}}) == [
        f"models.m.upstream_model: {name!r} goes in the URL path of a gemini upstream, "
        f"so it must not contain {found}"
    ]


@pytest.mark.parametrize(
    "name", ["a\r\nx-injected: 1", "tab\there", "nul\x00", "del\x7f", "c1\x85"]
)
@pytest.mark.parametrize("provider", ["oai", "ant", "gem"])
def test_no_upstream_takes_control_characters(name: str, provider: str) -> None:
    assert problems({"m": {"provider": provider, "upstream_model": name}}) == [
        "models.m.upstream_model: must not contain control characters"
    ]


def test_each_problem_is_reported_where_the_name_is_written() -> None:
    assert problems(
        {
            # the model's name stands for the upstream model
            "gemini/pro": {"provider": "gem"},
            "n": {"deployments": [{"provider": "oai"}, {"provider": "gem"}]},
            "n/2": {"deployments": [{"provider": "oai"}, {"provider": "gem"}]},
            # given on the model, inherited by its deployment
            "x": {"upstream_model": "a/b", "deployments": [{"provider": "gem"}]},
            # given on the deployment
            "y": {"deployments": [{"provider": "gem", "upstream_model": "a b"}]},
        }
    ) == [
        "models.gemini/pro: the model's name is its upstream model (no upstream_model "
        "given): 'gemini/pro' goes in the URL path of a gemini upstream, so it must not "
        "contain '/'",
        "models.n/2.deployments[1]: the model's name is its upstream model (no upstream_model "
        "given): 'n/2' goes in the URL path of a gemini upstream, so it must not contain '/'",
        "models.x.upstream_model: 'a/b' goes in the URL path of a gemini upstream, so it must "
        "not contain '/'",
        "models.y.deployments[0].upstream_model: 'a b' goes in the URL path of a gemini "
        "upstream, so it must not contain whitespace",
    ]


def test_a_model_level_name_is_reported_once_for_all_its_deployments() -> None:
    more = {
        "gem": {"type": "gemini", "base_url": "https://g.example.com"},
        "gem2": {"type": "gemini", "base_url": "https://g2.example.com"},
    }
    data = doc({"m": {"upstream_model": "a/b", "deployments": [{"provider": p} for p in more]}})
    data["providers"] |= more
    with pytest.raises(RulesError) as info:
        parse_rules(data)
    assert info.value.problems == [
        "models.m.upstream_model: 'a/b' goes in the URL path of a gemini upstream, so it must "
        "not contain '/'"
    ]


def test_the_rule_is_one_function_of_the_name_and_the_provider_type() -> None:
    assert upstream_model_problem("meta-llama/Llama-3-70b", "openai") is None
    assert upstream_model_problem("models/gemini-pro", "gemini") is None
    assert upstream_model_problem("a/b", "gemini") is not None
