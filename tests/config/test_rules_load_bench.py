"""bench/rules_load.py runs (small) and its generated file is a valid rules file."""

from __future__ import annotations

import pytest

from bench.rules_load import bad_document, main, rules_document
from proxy.config.check import parse_rules
from proxy.config.model import RulesError


def test_the_generated_document_is_valid_and_the_bad_one_names_each_mistake() -> None:
    rules = parse_rules(rules_document(25))
    assert len(rules.models) == 25
    with pytest.raises(RulesError) as info:
        parse_rules(bad_document())
    assert [p.split(":")[0] for p in info.value.problems] == [
        "providers.openai-main.breaker.window_seconds",
        "models.model-1.prvider",
        "models.model-1",
        "models.model-2.context_window",
    ]


def test_the_benchmark_runs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--models", "30", "--repeat", "1"]) == 0
    out = capsys.readouterr().out
    assert "load_rules (file -> RuleSet)" in out
    assert "did you mean 'provider'?" in out
