"""Property: what check accepts, the runtime builds and hot-reloads; what it rejects, it names.

Rules files are drawn from the schema (tests.config.test_rules_properties'
``documents``) and then made near-valid by a few mutations whose values come
from the declaration (proxy/config/model.py's Specs): values at and beyond a
range's ends, wrong types, misspelt keys, references to undeclared names.

- Every file check accepts builds a ``ProxyState`` (what `cb-proxy serve`
  does at start) under a drawn CB_* environment, with a breaker for every
  provider, and hot-reloads into one running proxy (tests.harness, on
  127.0.0.1 port 0, in a thread; the test waits on ``state.reloads``).
- Every file check rejects is rejected by the running proxy too (rules in
  force kept, the error counter up by one), and each problem that a mutation
  must cause is reported at that mutation's key path.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from proxy.config.check import parse_rules
from proxy.config.model import (
    QUALITY,
    TASK_TYPES,
    BreakerOverrides,
    CostCap,
    Deployment,
    Provider,
    RetryPolicy,
    RulesError,
    RuleSet,
    Timeouts,
    VirtualModel,
    Weights,
)
from proxy.config.model import (
    HealthCheck as HealthCheckRules,
)
from proxy.config.settings import Settings
from proxy.config.spec import Spec, declared
from proxy.core.breaker import CircuitBreakerConfig
from proxy.server.metrics import Metrics
from proxy.server.state import ProxyState
from tests.config.test_rules_properties import documents
from tests.harness import ProxyHandle, running_proxy

Doc = dict[str, Any]
RUNTIME_SETTINGS = settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
ENV = st.fixed_dictionaries(
    {},
    optional={
        "CB_TIMEOUT_SECONDS": st.sampled_from(["0.01", "10", "90", "86400"]),
        "CB_FAILURE_THRESHOLD": st.sampled_from(["0", "1", "20"]),
        "CB_MIN_THROUGHPUT": st.sampled_from(["1", "500"]),
        "CIRCUIT_BREAKER_ENABLED": st.sampled_from(["true", "false"]),
    },
)
# The running proxy inherits the worst case for the breaker's one cross-field rule:
# a first open period above the default cap of max_open_seconds.
LIVE_ENV = {"CB_TIMEOUT_SECONDS": "86400", "CB_FAILURE_THRESHOLD": "0"}
WAIT_SECONDS = 30


# ----------------------------------------------------------------------------- values from specs


def valid_values(spec: Spec) -> st.SearchStrategy[Any]:
    """Values the spec accepts, leaning to its ends and to the small values defaults live at."""
    lo = spec.lo if spec.lo is not None else 0.0
    hi = spec.le if spec.le is not None else lo + 10_000
    typical = [lo, 0.5, 1, 2, 5, 10, 30, 60, 100, hi]
    if spec.kind == "integer":
        picks = [int(v) for v in typical if v == int(v)]
        return st.sampled_from([v for v in picks if spec.problem(v) is None]) | st.integers(
            int(lo), int(hi)
        )
    inside = st.floats(lo, hi, exclude_min=spec.lo_open, allow_nan=False)
    return st.sampled_from([v for v in typical if spec.problem(v) is None]) | inside


def invalid_values(spec: Spec) -> st.SearchStrategy[Any]:
    """Values the spec rejects: beyond either end, non-finite, the wrong type."""
    bad: list[Any] = ["5", True, None if False else [1]]
    if spec.lo is not None:
        bad += [spec.lo] if spec.lo_open else [spec.lo - 1, spec.lo - 0.25]
    if spec.le is not None:
        bad += [spec.le + 1, spec.le * 10 + 1]
    if spec.kind == "integer":
        bad += [2.5, float(int(spec.lo or 0) + 1)]
    else:
        bad += [float("inf"), float("nan")]
    return st.sampled_from(bad)


# ----------------------------------------------------------------------------- where specs apply


@dataclass
class Slot:
    """A mapping of the document holding declared numeric keys (present or not)."""

    path: str
    mapping: Doc
    specs: dict[str, Spec]
    # key -> its cross-field partners (timeouts.total has three: connect, first_token, idle)
    partners: dict[str, set[str]] = field(default_factory=dict)

    @property
    def group(self) -> str:
        """The section kind ('breaker', 'quality', 'deployments', ...): drawn uniformly."""
        return self.path.rsplit(".", 1)[-1].split("[")[0] if "." in self.path else self.path


def specs_of(cls: type) -> tuple[dict[str, Spec], dict[str, set[str]]]:
    specs = {name: d.spec for name, d in declared(cls).items()}
    partners: dict[str, set[str]] = {}
    for name, spec in specs.items():
        other = spec.at_least or spec.at_most
        if other is not None:
            partners.setdefault(name, set()).add(other)
            partners.setdefault(other, set()).add(name)
    return specs, partners


def slots(doc: Doc) -> Iterator[Slot]:
    for name, body in doc["providers"].items():
        for key, cls in (
            ("timeouts", Timeouts),
            ("breaker", BreakerOverrides),
            ("health_check", HealthCheckRules),
        ):
            yield Slot(f"providers.{name}.{key}", body.setdefault(key, {}), *specs_of(cls))
    deployment_specs, _ = specs_of(Deployment)
    for name, body in doc["models"].items():
        yield Slot(f"models.{name}", body, deployment_specs)
        yield Slot(
            f"models.{name}.quality",
            body.setdefault("quality", {}),
            dict.fromkeys(TASK_TYPES, QUALITY),
        )
        for i, deployment in enumerate(body.get("deployments", [])):
            yield Slot(f"models.{name}.deployments[{i}]", deployment, deployment_specs)
    for name, body in doc.get("virtual_models", {}).items():
        yield Slot(f"virtual_models.{name}", body, specs_of(VirtualModel)[0])
        cap = body.get("max_cost_per_1k_tokens")
        if isinstance(cap, dict):
            yield Slot(f"virtual_models.{name}.max_cost_per_1k_tokens", cap, specs_of(CostCap)[0])
    defaults = doc.setdefault("defaults", {})
    yield Slot("defaults.retry", defaults.setdefault("retry", {}), *specs_of(RetryPolicy))
    if "weights" in defaults:
        yield Slot("defaults.weights", defaults["weights"], specs_of(Weights)[0])


def references(doc: Doc) -> Iterator[tuple[str, Any, Any]]:
    """(path, container, key) of every reference to a provider or a model."""
    for name, body in doc["models"].items():
        if "provider" in body:
            yield f"models.{name}.provider", body, "provider"
        for i, deployment in enumerate(body.get("deployments", [])):
            yield f"models.{name}.deployments[{i}].provider", deployment, "provider"
    for name, body in doc.get("virtual_models", {}).items():
        for key in ("candidates", "fallback_models"):
            for i in range(len(body.get(key, []))):
                yield f"virtual_models.{name}.{key}[{i}]", body[key], i
    for i, route in enumerate(doc.get("routes", [])):
        if "rewrite" in route:
            yield f"routes[{i}].rewrite.model", route["rewrite"], "model"


@dataclass
class Drawn:
    doc: Doc
    must_name: list[str]  # paths some problem must start with (the file must be rejected)
    may_name: set[str]  # paths a problem may start with (cross-field partners, parents)


@st.composite
def near_valid_documents(draw: st.DrawFn) -> Drawn:
    doc = draw(documents())
    must: list[str] = []
    may: set[str] = set()
    undeclared = 0  # references made so far: each names its own undeclared target
    # Half the files get a provider breaker with any subset of its keys: the section the
    # runtime builds from the rules and the environment together.
    breakers = [t for t in slots(doc) if t.group == "breaker"]
    if draw(st.booleans()):
        slot = draw(st.sampled_from(breakers))
        values = {k: valid_values(spec) for k, spec in slot.specs.items()}
        slot.mapping.update(draw(st.fixed_dictionaries({}, optional=values)))
        may.update(f"{slot.path}.{key}" for key in slot.specs)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["valid", "section", "invalid", "unknown", "reference"]))
        targets = list(slots(doc))
        group = draw(st.sampled_from(sorted({t.group for t in targets})))
        slot = draw(st.sampled_from([t for t in targets if t.group == group]))
        if kind == "section":  # every key of one section at once: the cross-field rules
            values = draw(
                st.fixed_dictionaries(
                    {}, optional={k: valid_values(spec) for k, spec in slot.specs.items()}
                )
            )
            slot.mapping.update(values)
            # A valid value drawn over an earlier invalid one: that problem is gone.
            overwritten = {f"{slot.path}.{key}" for key in values}
            must = [p for p in must if p not in overwritten]
            may.update(f"{slot.path}.{key}" for key in slot.specs)
            may.add(slot.path)
        elif kind in ("valid", "invalid"):
            key = draw(st.sampled_from(sorted(slot.specs)))
            spec = slot.specs[key]
            value = draw(valid_values(spec) if kind == "valid" else invalid_values(spec))
            slot.mapping[key] = value
            path = f"{slot.path}.{key}"
            must = [p for p in must if p != path]  # the value drawn last is the one checked
            if kind == "invalid" and value is not None:
                must.append(path)
            may.add(path)
            may.update(f"{slot.path}.{other}" for other in slot.partners.get(key, ()))
            may.add(slot.path)  # e.g. 'the weights must not all be 0'
        elif kind == "unknown":
            known = sorted(slot.specs)
            key = draw(st.sampled_from(known)) + draw(st.sampled_from(["x", "_", "s"]))
            slot.mapping[key] = 1
            must.append(f"{slot.path}.{key}")
        else:
            refs = list(references(doc))
            if not refs:
                continue
            path, container, key = draw(st.sampled_from(refs))
            undeclared += 1
            container[key] = f"undeclared-{undeclared}"  # distinct: never 'listed twice'

            must.append(path)
            may.add(path.rsplit("[", 1)[0])  # e.g. a list whose names must be distinct
    # Sections added empty by ``slots`` mean "not given"; drop them to keep files readable.
    for body in doc["providers"].values():
        for key in ("timeouts", "breaker", "health_check"):
            if body.get(key) == {}:
                del body[key]
    for body in doc["models"].values():
        if body.get("quality") == {}:
            del body["quality"]
    defaults = doc.get("defaults", {})
    if defaults.get("retry") == {}:
        del defaults["retry"]
    if "defaults" in doc and not defaults:
        del doc["defaults"]
    return Drawn(doc, must, may | set(must))


def check(drawn: Drawn) -> RuleSet | None:
    """parse_rules, asserting that a rejection names every path it must."""
    try:
        return parse_rules(drawn.doc)
    except RulesError as err:
        problems = err.problems
    assert problems
    for path in drawn.must_name:
        assert any(p.startswith(f"{path}: ") for p in problems), (path, problems)
    if not drawn.must_name:  # only in-range values were set: the problems are theirs
        named = {p.split(": ", 1)[0] for p in problems}
        assert named <= drawn.may_name, (named, drawn.may_name)
    return None


def expected_breaker(state: ProxyState, provider: Provider) -> CircuitBreakerConfig:
    """The provider's: the defaults with the file's overrides but no slow-call rule (slow
    calls and stalls are the models', docs/breaker.md 'Keys')."""
    return state.breaker_defaults.with_overrides(replace(provider.breaker, slow_call_ms=None))


def expected_deployment_breaker(state: ProxyState, provider: Provider) -> CircuitBreakerConfig:
    """A deployment's: the provider's overrides whole; stalls judged by its first-token timeout."""
    config = state.breaker_defaults.with_overrides(provider.breaker)
    return replace(config, first_token_seconds=provider.timeouts.first_token)


def assert_breakers_follow(state: ProxyState, rules: RuleSet) -> None:
    for name, provider in rules.providers.items():
        config = state.breaker(name).config
        assert config == expected_breaker(state, provider)
        assert config.open_seconds <= config.max_open_seconds
    for model in rules.models.values():
        for dep in model.deployments:
            config = state.deployment_breaker(dep).config
            assert config == expected_deployment_breaker(state, rules.providers[dep.provider])


def health_check_off(breaker: Doc) -> Drawn:
    """Regression (hypothesis): ``interval: 0`` (off) drawn over an earlier invalid interval
    was still expected to be named; only the breaker's string is wrong, and is named."""
    doc: Doc = {
        "version": 1,
        "providers": {
            "p-0": {
                "type": "openai",
                "base_url": "http://localhost",
                "breaker": breaker,
                "health_check": {"interval": 0},
            }
        },
        "models": {"m-0": {"provider": "p-0"}},
    }
    must = [f"providers.p-0.breaker.{key}" for key in breaker]
    # With no mutation to name, a rejection fails: ``interval: 0`` must be accepted.
    return Drawn(doc, must, set(must))


HEALTH_CHECK_OFF = [
    health_check_off({"failure_rate": "5"}),
    health_check_off({"failure_threshold": "5"}),
    health_check_off({}),
]


def build_state(rules: RuleSet, env: dict[str, str], path: Path) -> ProxyState:
    """What `cb-proxy serve` does with the rules at start, before it listens."""
    return ProxyState(
        settings=Settings(rules_path=path, environ=env), rules=rules, metrics=Metrics()
    )


# ----------------------------------------------------------------------------- (1) serve start


@RUNTIME_SETTINGS
@given(drawn=near_valid_documents(), env=ENV)
@example(drawn=HEALTH_CHECK_OFF[0], env={})
@example(drawn=HEALTH_CHECK_OFF[1], env={})
@example(drawn=HEALTH_CHECK_OFF[2], env={})
def test_every_accepted_file_builds_the_runtime_state(drawn: Drawn, env: dict[str, str]) -> None:
    rules = check(drawn)
    event("accepted" if rules is not None else "rejected")
    if rules is None:
        return
    state = build_state(rules, env, Path("unused.yaml"))
    assert_breakers_follow(state, rules)


# ----------------------------------------------------------------------------- (2) hot reload


class LiveProxy:
    """One real proxy running in a thread of its own, for a whole hypothesis run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.generation = 0
        self.loop = asyncio.new_event_loop()
        self._ready: concurrent.futures.Future[ProxyHandle] = concurrent.futures.Future()
        self._done: asyncio.Event | None = None
        self._thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),))

    async def _main(self) -> None:
        self._done = asyncio.Event()
        try:
            async with running_proxy(self.path, reload_interval=0.005, environ=LIVE_ENV) as proxy:
                self._ready.set_result(proxy)
                await self._done.wait()
        except BaseException as exc:  # surface a start failure to the test thread
            if not self._ready.done():
                self._ready.set_exception(exc)
            raise

    def __enter__(self) -> ProxyHandle:
        self._thread.start()
        return self._ready.result(timeout=WAIT_SECONDS)

    def __exit__(self, *exc: object) -> None:
        if self._done is not None:
            self.loop.call_soon_threadsafe(self._done.set)
        self._thread.join(timeout=WAIT_SECONDS)
        self.loop.close()

    def run(self, coro: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout=WAIT_SECONDS)

    def replace(self, text: str) -> None:
        """Write beside, give it a distinct mtime, rename over: the watcher must see it."""
        self.generation += 1
        new = self.path.with_name("next.yaml")
        new.write_text(text)
        stamp = 1_700_000_000_000_000_000 + self.generation * 1_000_000_000
        os.utime(new, ns=(stamp, stamp))
        new.replace(self.path)


STARTING_RULES = """
version: 1
providers:
  start: {type: openai, base_url: "http://127.0.0.1:9/v1"}
models:
  start-model: {provider: start}
"""


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LiveProxy, ProxyHandle]]:
    path = tmp_path_factory.mktemp("live") / "rules.yaml"
    path.write_text(STARTING_RULES)
    runner = LiveProxy(path)
    with runner as proxy:
        yield runner, proxy


def error_count(proxy: ProxyHandle) -> float:
    return float(proxy.state.metrics.rules_reloads.labels("error")._value.get())


@RUNTIME_SETTINGS
@given(drawn=near_valid_documents())
@example(drawn=HEALTH_CHECK_OFF[0])
@example(drawn=HEALTH_CHECK_OFF[1])
@example(drawn=HEALTH_CHECK_OFF[2])
def test_every_file_hot_reloads_or_is_rejected_by_a_running_proxy(
    live: tuple[LiveProxy, ProxyHandle], drawn: Drawn
) -> None:
    runner, proxy = live
    rules = check(drawn)
    event("accepted" if rules is not None else "rejected")
    state = proxy.state
    before = state.rules
    errors = error_count(proxy)
    attempts = len(state.reload_results)
    runner.replace(yaml.safe_dump(drawn.doc, allow_unicode=True, sort_keys=False))
    results = runner.run(state.wait_reloads(attempts + 1))
    assert len(results) == attempts + 1
    if rules is None:
        assert results[-1] is False
        assert state.rules is before
        assert error_count(proxy) == errors + 1
    else:
        assert results[-1] is True, "check accepted it, the running proxy refused it"
        assert state.rules.providers == rules.providers
        assert state.rules.models == rules.models
        assert_breakers_follow(state, rules)
        assert error_count(proxy) == errors
