"""The rules are declared once: check, the runtime breaker and docs/rules.md agree with it."""

from __future__ import annotations

import ast
import dataclasses
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config.check import parse_rules
from proxy.config.model import (
    QUALITY,
    BreakerOverrides,
    CostCap,
    Deployment,
    HealthCheck,
    RetryPolicy,
    RulesError,
    Timeouts,
    VirtualModel,
    Weights,
)
from proxy.config.settings import SettingsError, load_settings
from proxy.config.spec import Declared, declared
from proxy.core.breaker import RULES_KEYS, CircuitBreakerConfig

ROOT = Path(__file__).resolve().parents[2]
CONFIG_DIR = ROOT / "proxy" / "config"
DOCS = ROOT / "docs" / "rules.md"
# Where each declared section sits in a rules file (for the reference in docs/rules.md).
SECTIONS: list[tuple[str, type]] = [
    ("providers.*.timeouts", Timeouts),
    ("providers.*.breaker", BreakerOverrides),
    ("providers.*.health_check", HealthCheck),
    ("models.* and models.*.deployments[*]", Deployment),
    ("virtual_models.*", VirtualModel),
    ("virtual_models.*.max_cost_per_1k_tokens", CostCap),
    ("defaults.weights", Weights),
    ("defaults.retry", RetryPolicy),
]
NUMBERS = (
    st.integers(-5, 5000)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.floats(-1, 10)
    | st.booleans()
    | st.sampled_from([0, 0.5, 1, 3600, 3600.5, 10**30])
)
ENV_VALUES = {
    "CB_TIMEOUT_SECONDS": st.sampled_from(["", "0.001", "1", "10", "90", "86400"]),
    "CB_FAILURE_THRESHOLD": st.sampled_from(["", "0", "1", "50"]),
    "CB_MIN_THROUGHPUT": st.sampled_from(["", "1", "100"]),
    "CIRCUIT_BREAKER_ENABLED": st.sampled_from(["", "true", "false"]),
}
PROPERTY_SETTINGS = settings(max_examples=200, deadline=None)


def doc_with_breaker(breaker: dict[str, Any]) -> dict[str, Any]:
    return {
        "version": 1,
        "providers": {"p": {"type": "openai", "base_url": "http://h/v1", "breaker": breaker}},
        "models": {"m": {"provider": "p"}},
    }


def checked_breaker(breaker: dict[str, Any]) -> BreakerOverrides | None:
    try:
        return parse_rules(doc_with_breaker(breaker)).providers["p"].breaker
    except RulesError as err:
        problems = err.problems
    assert all(p.startswith("providers.p.breaker.") for p in problems), problems
    return None


def test_the_breaker_defaults_are_the_declared_ones() -> None:
    config = CircuitBreakerConfig()
    assert set(RULES_KEYS) == {f.name for f in dataclasses.fields(BreakerOverrides)}
    for name, d in RULES_KEYS.items():
        assert getattr(config, name) == d.default, name
        assert d.spec.problem(d.default) is None, name  # every default is in its own range


@pytest.mark.parametrize("name", list(RULES_KEYS))
@PROPERTY_SETTINGS
@given(value=NUMBERS)
def test_check_and_the_runtime_agree_on_each_breaker_value(name: str, value: Any) -> None:
    accepted_by_check = checked_breaker({name: value}) is not None
    try:
        CircuitBreakerConfig().with_overrides(BreakerOverrides(**{name: value}))
        accepted_at_runtime = True
    except (ValueError, TypeError):
        accepted_at_runtime = False
    assert accepted_by_check == accepted_at_runtime


@PROPERTY_SETTINGS
@given(
    breaker=st.fixed_dictionaries({}, optional=dict.fromkeys(RULES_KEYS, NUMBERS)),
    env=st.fixed_dictionaries({}, optional=ENV_VALUES),
)
def test_nothing_check_accepts_fails_at_runtime_whatever_the_environment(
    breaker: dict[str, Any], env: dict[str, str]
) -> None:
    overrides = checked_breaker(breaker)
    if overrides is None:
        return
    base = CircuitBreakerConfig.from_env(env)
    config = base.with_overrides(overrides)  # never raises
    given_values = {k: v for k, v in breaker.items() if v is not None}
    for name, value in given_values.items():
        if name != "open_seconds" or "max_open_seconds" in given_values:
            assert float(getattr(config, name)) == float(value), name
    assert config.open_seconds <= config.max_open_seconds
    if "open_seconds" in given_values and "max_open_seconds" not in given_values:
        assert config.open_seconds == given_values["open_seconds"]
    if "max_open_seconds" in given_values and "open_seconds" not in given_values:
        assert config.open_seconds == min(base.open_seconds, given_values["max_open_seconds"])


def test_env_variables_are_held_to_the_declared_ranges() -> None:
    with pytest.raises(ValueError, match=r"^CB_FAILURE_THRESHOLD='-1': expected an integer >= 0"):
        CircuitBreakerConfig.from_env({"CB_FAILURE_THRESHOLD": "-1"})
    with pytest.raises(ValueError, match=r"^CB_TIMEOUT_SECONDS='inf': expected a number of sec"):
        CircuitBreakerConfig.from_env({"CB_TIMEOUT_SECONDS": "inf"})
    assert CircuitBreakerConfig.from_env({"CB_FAILURE_THRESHOLD": "0"}).failure_threshold == 0


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("CB_TIMEOUT_SECONDS", "864000", "expected a number of seconds > 0 and <= 86400"),
        ("CB_TIMEOUT_SECONDS", "1e30", "expected a number of seconds > 0 and <= 86400"),
        ("CB_FAILURE_THRESHOLD", "50000000", "expected an integer >= 0 and <= 1000000"),
        ("CB_MIN_THROUGHPUT", "10000000", "expected an integer >= 1 and <= 1000000"),
    ],
)
def test_env_variables_are_held_to_the_declared_maxima(name: str, value: str, message: str) -> None:
    with pytest.raises(ValueError, match=rf"^{name}='{value}': {message}$"):
        CircuitBreakerConfig.from_env({name: value})
    config = CircuitBreakerConfig.from_env({"CB_TIMEOUT_SECONDS": "86400"})  # the maximum itself
    assert (config.open_seconds, config.max_open_seconds) == (86400, 86400)


def test_health_check_interval_is_held_to_the_range_of_its_rules_key() -> None:
    assert load_settings({"HEALTH_CHECK_INTERVAL": "86400"}, {}).health_check_interval == 86400
    with pytest.raises(SettingsError, match=r"^HEALTH_CHECK_INTERVAL: expected a number >= 0 and "):
        load_settings({"HEALTH_CHECK_INTERVAL": "864000"}, {})
    with pytest.raises(SettingsError, match=r"^HEALTH_CHECK_INTERVAL: .*got 'soon'$"):
        load_settings({"HEALTH_CHECK_INTERVAL": "soon"}, {})


def test_every_duration_count_price_and_weight_has_an_upper_bound() -> None:
    for where, cls in SECTIONS:
        for name, d in declared(cls).items():
            assert d.spec.le is not None, f"{where}.{name} has no upper bound"
            assert d.spec.problem(10**30) is not None, f"{where}.{name} accepts 10**30"


def test_every_numeric_key_is_declared_with_a_meaning() -> None:
    for _, cls in SECTIONS:
        for name, d in declared(cls).items():
            assert d.spec.doc, f"{cls.__name__}.{name} has no doc"
            assert d.spec.lo is not None, f"{cls.__name__}.{name} has no lower bound"
    assert QUALITY.doc


def _imports(path: Path) -> set[str]:
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return found


def test_the_config_package_has_no_import_cycle() -> None:
    modules = {f"proxy.config.{p.stem}": p for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"}
    graph = {name: _imports(path) & set(modules) for name, path in modules.items()}
    assert "proxy.config.check" not in graph["proxy.config.model"]
    assert graph["proxy.config.spec"] == set()
    visiting: set[str] = set()
    done: set[str] = set()

    def visit(node: str, trail: tuple[str, ...]) -> None:
        assert node not in visiting, "import cycle: " + " -> ".join((*trail, node))
        if node in done:
            return
        visiting.add(node)
        for nxt in sorted(graph[node]):
            visit(nxt, (*trail, node))
        visiting.discard(node)
        done.add(node)

    for name in sorted(graph):
        visit(name, ())


def _default_text(d: Declared) -> str:
    if d.required:
        return "required"
    return "unset" if d.default is None else f"{d.default:g}"


def test_docs_rules_reference_lists_every_declared_key_with_range_and_default() -> None:
    """Each key has a row ``| `key` | type | range | default | meaning |`` in its section."""
    text = DOCS.read_text()
    for where, cls in SECTIONS:
        assert f"`{where}`" in text, where
        for name, d in declared(cls).items():
            rows = [
                [c.strip() for c in m.group(1).split("|")]
                for m in re.finditer(rf"^\| `{re.escape(name)}` \|([^\n]*)$", text, re.MULTILINE)
            ]
            expected = [d.spec.kind, d.spec.range_text(), _default_text(d)]
            assert any(row[:3] == expected for row in rows), f"{where}.{name}: {expected}"
