"""The shipped catalogs know the legacy model names clients (and the founding guides) still send.

Each legacy name is an alias of a current model: it resolves, is reported in ``x-cb-route``
as a rewrite, applies as a fallback like any name, and never turns a completions model into
a chat one (``gpt-3.5-turbo-instruct`` is not a chat alias).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from proxy.config.check import load_rules
from proxy.config.model import RuleSet
from proxy.core.candidates import StaticView
from proxy.core.prefs import RequestPrefs
from proxy.core.router import plan_route

ROOT = Path(__file__).resolve().parents[2]
CATALOGS = [
    ROOT / "rules" / "default.yaml",
    ROOT / "rules" / "demo.yaml",
    ROOT / "deploy" / "k8s" / "base" / "rules.yaml",
    ROOT / "deploy" / "compose" / "rules.yaml",
]
# Every model name the founding guides use, and the legacy names most often sent.
LEGACY = [
    "claude-3-haiku-20240307",
    "claude-3-sonnet-20240229",
    "claude-3-opus-20240229",
    "gpt-3.5-turbo",
    "gpt-3.5-turbo-0125",
    "gpt-4",
    "gpt-4-turbo",
    "gpt-4o-mini",
    "gemini-pro",
    "gemini-1.5-pro",
]


@pytest.fixture(params=CATALOGS, ids=lambda p: str(p.relative_to(ROOT)))
def catalog(request: pytest.FixtureRequest) -> RuleSet:
    path: Path = request.param
    return load_rules(path)


@pytest.mark.parametrize("name", LEGACY)
def test_every_catalog_serves_the_legacy_name(catalog: RuleSet, name: str) -> None:
    plan = plan_route(catalog, name, {}, RequestPrefs(), StaticView())
    assert plan.candidates, name
    canonical = catalog.model_index[name]
    assert plan.resolved == canonical
    if canonical != name:
        assert f"rewrote={name}->{canonical}" in plan.header()


@pytest.mark.parametrize("name", LEGACY)
def test_a_legacy_name_is_a_usable_fallback(catalog: RuleSet, name: str) -> None:
    prefs = RequestPrefs(fallback_models=(name,))
    plan = plan_route(catalog, "auto", {}, prefs, StaticView())
    served = {c.deployment.model for c in plan.candidates}
    assert catalog.model_index[name] in served


def test_the_instruct_model_is_not_a_chat_alias(catalog: RuleSet) -> None:
    assert catalog.model_index.get("gpt-3.5-turbo-instruct") in (None, "gpt-3.5-turbo-instruct")
    assert catalog.match_route("gpt-3.5-turbo-instruct", {}) is None


def test_every_shipped_model_declares_its_endpoints(catalog: RuleSet) -> None:
    for model in catalog.models.values():
        assert model.endpoints, model.name


def test_no_chat_model_serves_completions_and_no_embeddings_model_serves_chat(
    catalog: RuleSet,
) -> None:
    for model in catalog.models.values():
        if model.quality:  # a chat model: the virtual models' candidates
            assert model.endpoints == ("chat",), model.name
        if "embedding" in model.name:
            assert model.endpoints == ("embeddings",), model.name
