"""The router: strategies, constraints, fallbacks, breakers, reporting and `cb-proxy explain`.

Every order below is worked out by hand from the CATALOG and the live facts
the test gives its FakeView; see the comment by each expectation.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.cli import main
from proxy.config.check import parse_rules
from proxy.config.model import STRATEGIES, TASK_TYPES, Deployment, Provider, RuleSet, Weights
from proxy.core.candidates import LiveView, StaticView
from proxy.core.errors import InvalidRequest, ModelNotFound
from proxy.core.explain import candidate_facts, plan_log_fields
from proxy.core.prefs import RequestPrefs, estimate_prompt_tokens, parse_prefs, routing_inputs
from proxy.core.router import RoutePlan, format_usd, plan_route
from proxy.core.strategies import balanced_scores
from proxy.server.api import log_plan

CATALOG = """
version: 1
providers:
  p1: {type: openai, base_url: "http://127.0.0.1:1/v1"}
  p2: {type: anthropic, base_url: "http://127.0.0.1:2"}
  p3: {type: gemini, base_url: "http://127.0.0.1:3"}
  vault: {type: openai, base_url: "http://127.0.0.1:4/v1", api_key_env: VAULT_KEY}
models:
  cheap:
    provider: p1
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0004
    latency_ms: 800
    context_window: 16000
    quality: {chat: 6, coding: 5, analysis: 5, creative: 6}
  mid:
    input_cost_per_1k: 0.0005
    output_cost_per_1k: 0.0015
    context_window: 128000
    quality: {chat: 8, coding: 7, analysis: 7, creative: 7}
    deployments:
      - {provider: p1, latency_ms: 500}
      - {provider: p2, latency_ms: 400}
  coder:
    provider: p2
    input_cost_per_1k: 0.003
    output_cost_per_1k: 0.015
    latency_ms: 1200
    context_window: 200000
    quality: {chat: 7, coding: 10, analysis: 8, creative: 5}
  fast:
    provider: p3
    input_cost_per_1k: 0.0002
    output_cost_per_1k: 0.0008
    latency_ms: 200
    context_window: 1000000
    quality: {chat: 6, coding: 6, analysis: 6, creative: 5}
  twin:
    provider: p3
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0004
    latency_ms: 900
    context_window: 32000
    quality: {chat: 7, coding: 4, analysis: 5, creative: 8}
  locked:
    provider: vault
    input_cost_per_1k: 0.00001
    output_cost_per_1k: 0.00001
    quality: {chat: 1, coding: 1, analysis: 1, creative: 1}
  vague:
    provider: p1
    input_cost_per_1k: 0.0001
    output_cost_per_1k: 0.0001
    aliases: [vague-latest]
  embed:
    provider: p1
    input_cost_per_1k: 0.00002
virtual_models:
  auto: {strategy: balanced}
  cb:cheap: {strategy: cost_optimized, max_cost_per_1k_tokens: 0.001}
  cb:coding: {strategy: task_specific, task_type: coding}
  cb:fastest: {strategy: performance_first}
  cb:reliable: {strategy: reliability_first}
  cb:pair: {strategy: balanced, task_type: chat, candidates: [cheap, mid], fallback_models: [coder]}
  cb:capped:
    strategy: cost_optimized
    candidates: [cheap]
    max_cost_per_1k_tokens: 0.001
    fallback_models: [coder, fast]
routes:
  - match: {model: "legacy-*"}
    rewrite: {model: cheap}
    fallbacks: [fast]
  - match: {model: "team-*", headers: {x-team: research}}
    rewrite: {model: cb:coding}
defaults:
  strategy: balanced
"""

RULES = parse_rules(yaml.safe_load(CATALOG), source="<test catalog>")
# 'vague' rates no quality, so it is no chat model; 'embed' neither.
CHAT_DEPLOYMENTS = [
    "cheap@p1",
    "mid@p1",
    "mid@p2",
    "coder@p2",
    "fast@p3",
    "twin@p3",
    "locked@vault",
]


@dataclass
class FakeView:
    """Fixed live facts per provider."""

    no_key: frozenset[str] = frozenset({"vault"})
    open: frozenset[str] = frozenset()
    p95: Mapping[str, float] = field(default_factory=dict)
    success: Mapping[str, float] = field(default_factory=dict)

    def has_key(self, provider: Provider) -> bool:
        return provider.name not in self.no_key

    def epoch(self) -> object:
        return object()  # a test may change the facts between two plans: never reuse them

    def is_blocked(self, deployment: Deployment) -> bool:
        return deployment.provider in self.open

    def latency_ms(self, deployment: Deployment) -> float | None:
        return self.p95.get(deployment.provider)

    def success_ratio(self, deployment: Deployment) -> float | None:
        return self.success.get(deployment.provider)


def plan(
    model: str,
    view: LiveView | None = None,
    rules: RuleSet = RULES,
    headers: Mapping[str, str] | None = None,
    messages: Sequence[Mapping[str, object]] = (),
    prompt_tokens: int = 0,
    **prefs: Any,
) -> RoutePlan:
    return plan_route(
        rules,
        model,
        headers or {},
        parse_prefs(prefs) if prefs else RequestPrefs(),
        view if view is not None else FakeView(),
        messages=messages,
        prompt_tokens=prompt_tokens,
    )


def order(p: RoutePlan) -> list[str]:
    return [c.deployment.key for c in p.candidates]


def reasons(p: RoutePlan) -> dict[str, str]:
    return {r.deployment: r.reason for r in p.rejected}


# --------------------------------------------------------------------------- strategies


def test_cost_optimized_orders_by_price_then_mean_quality_then_declaration() -> None:
    p = plan("auto", routing_strategy="cost_optimized")
    # cheap and twin both cost 0.0005: twin's mean rating (6.0) beats cheap's (5.5);
    # mid@p1 and mid@p2 tie on everything: declaration order.
    assert order(p) == ["twin@p3", "cheap@p1", "fast@p3", "mid@p1", "mid@p2", "coder@p2"]
    assert p.reason == "cheapest of 6"
    assert reasons(p) == {"locked@vault": "no key (VAULT_KEY unset)"}


def test_cost_optimized_tie_uses_the_known_task_type() -> None:
    p = plan("auto", routing_strategy="cost_optimized", task_type="coding")
    assert order(p)[:2] == ["cheap@p1", "twin@p3"]  # coding: cheap 5 > twin 4
    assert p.task_type == "coding"
    assert p.task_source == "request"


def test_performance_first_uses_live_p95_then_prior_and_ties_by_price() -> None:
    view = FakeView(p95={"p2": 300.0})
    p = plan("auto", view, routing_strategy="performance_first")
    # fast 200 (prior); mid@p2 and coder@p2 both 300 (p2's live p95): mid is cheaper;
    # mid@p1 500, cheap 800, twin 900 (priors).
    assert order(p) == ["fast@p3", "mid@p2", "coder@p2", "mid@p1", "cheap@p1", "twin@p3"]
    assert p.reason == "fastest prior 200ms of 6"
    measured = plan("auto", FakeView(p95={"p3": 150.0}), routing_strategy="performance_first")
    assert measured.reason == "fastest p95 150ms of 6"


def test_performance_first_puts_unknown_latency_last() -> None:
    rules = parse_rules(
        {
            "version": 1,
            "providers": {"p": {"type": "openai", "base_url": "http://x/v1"}},
            "models": {
                "a": {"provider": "p", "input_cost_per_1k": 0.001, "quality": {"chat": 1}},
                "b": {"provider": "p", "latency_ms": 900, "quality": {"chat": 1}},
            },
            "virtual_models": {"v": {"strategy": "performance_first"}},
        }
    )
    assert order(plan("v", StaticView(), rules)) == ["b@p", "a@p"]


def test_reliability_first_measured_perfect_beats_unmeasured_then_latency() -> None:
    view = FakeView(p95={"p2": 300.0}, success={"p1": 0.9, "p2": 1.0})
    p = plan("cb:reliable", view)
    # p2 measured 1.0 (mid@p2 and coder@p2 tie at 300ms: declaration order), then p3
    # unmeasured (fast 200ms before twin 900ms), then p1 at 0.9 (mid 500 before cheap 800).
    assert order(p) == ["mid@p2", "coder@p2", "fast@p3", "twin@p3", "mid@p1", "cheap@p1"]
    assert p.reason == "most reliable 100.0% of 6"


def test_reliability_first_prefers_an_idle_upstream_over_a_failing_one() -> None:
    p = plan("cb:reliable", FakeView(success={"p1": 0.5, "p2": 0.75}))
    assert order(p)[:2] == ["fast@p3", "twin@p3"]
    assert p.reason == "most reliable (no data) of 6"


@pytest.mark.parametrize(
    ("task", "expected"),
    [
        # coding: coder 10; mid 7 twice (same price: declaration order); fast 6; cheap 5; twin 4
        ("coding", ["coder@p2", "mid@p1", "mid@p2", "fast@p3", "cheap@p1", "twin@p3"]),
        # creative: twin 8; mid 7 twice; cheap 6; fast and coder 5: fast is cheaper
        ("creative", ["twin@p3", "mid@p1", "mid@p2", "cheap@p1", "fast@p3", "coder@p2"]),
    ],
)
def test_task_specific_orders_by_quality_then_price(task: str, expected: list[str]) -> None:
    p = plan("auto", routing_strategy="task_specific", task_type=task)
    assert order(p) == expected
    assert p.reason == f"best {task} quality {10 if task == 'coding' else 8}"


def test_task_specific_virtual_model_uses_its_task_type() -> None:
    p = plan("cb:coding", messages=[{"role": "user", "content": "write me a poem about love"}])
    assert p.task_type == "coding"
    assert p.task_source == "virtual model"
    assert order(p)[0] == "coder@p2"


def test_balanced_scores_by_hand() -> None:
    # cb:pair, task chat: quality 6, 8, 8 -> 0, 1, 1; price 0.0005, 0.002, 0.002 -> 1, 0, 0;
    # latency 800, 500, 400 -> 0, 0.75, 1; reliability all equal -> 1. Weights 0.4/0.3/0.2/0.1:
    # cheap 0.3 + 0.1 = 0.4; mid@p1 0.4 + 0.15 + 0.1 = 0.65; mid@p2 0.4 + 0.2 + 0.1 = 0.7.
    p = plan("cb:pair", StaticView())
    assert order(p) == ["mid@p2", "mid@p1", "cheap@p1", "coder@p2"]
    assert p.scores == pytest.approx((0.7, 0.65, 0.4))
    assert p.primary_count == 3
    assert p.reason == "best score 0.70 of 3"


def test_balanced_reacts_to_live_latency_and_reliability() -> None:
    # p1 measured at 100ms: latencies 100, 100, 400 -> speed 1, 1, 0;
    # cheap 0.3 + 0.2 + 0.1 = 0.6, mid@p1 0.4 + 0.2 + 0.1 = 0.7, mid@p2 0.4 + 0.1 = 0.5.
    p = plan("cb:pair", FakeView(p95={"p1": 100.0}))
    assert order(p)[:3] == ["mid@p1", "cheap@p1", "mid@p2"]
    assert p.scores == pytest.approx((0.7, 0.6, 0.5))
    # p1 failing half its calls: its deployments lose the reliability term (0.1).
    worse = plan("cb:pair", FakeView(p95={"p1": 100.0}, success={"p1": 0.5}))
    assert worse.scores == pytest.approx((0.6, 0.5, 0.5))
    assert order(worse)[0] == "mid@p1"


def test_balanced_on_a_concrete_model_orders_its_deployments() -> None:
    p = plan("mid", StaticView())  # defaults.strategy balanced: only latency differs
    assert order(p) == ["mid@p2", "mid@p1"]
    assert p.task_type is None
    assert p.task_source == ""
    assert order(plan("mid", StaticView(), routing_strategy="cost_optimized")) == [
        "mid@p1",
        "mid@p2",
    ]


def test_balanced_scores_reference_formula() -> None:
    scores = balanced_scores(
        quality=[10, 5, 0],
        prices=[3.0, 2.0, 1.0],
        latencies=[100.0, math.inf, 300.0],
        success=[1.0, 1.0, 1.0],
        weights=Weights(quality=2, cost=1, latency=1, reliability=0),
    )
    # quality 1, .5, 0; cheapness 0, .5, 1; speed 1, 0 (unknown), 0; weights /4.
    assert scores == pytest.approx([0.75, 0.375, 0.25])
    assert balanced_scores([1.0], [1.0], [1.0], [1.0], Weights()) == pytest.approx([1.0])


def test_auto_detects_the_task_from_the_messages_only_when_needed() -> None:
    coding = [{"role": "user", "content": "Fix this Python TypeError traceback in my function"}]
    p = plan("auto", messages=coding)
    assert p.task_type == "coding"
    assert p.task_source == "detected"
    assert "task=coding" in p.header()
    cheap = plan("auto", messages=coding, routing_strategy="cost_optimized")
    assert cheap.task_type is None
    assert cheap.task_source == ""


def test_plans_are_deterministic_and_the_order_memo_follows_live_facts() -> None:
    a = FakeView(p95={"p3": 2000.0})
    b = FakeView(p95={"p3": 50.0})
    first = order(plan("cb:fastest", a))
    assert first[0] == "mid@p2"
    assert order(plan("cb:fastest", b))[:2] == ["twin@p3", "fast@p3"]  # both 50ms: twin is cheaper
    assert order(plan("cb:fastest", a)) == first
    fresh = parse_rules(yaml.safe_load(CATALOG))  # a new RuleSet: tables built again
    assert order(plan("cb:fastest", a, fresh)) == first


# --------------------------------------------------------------------------- constraints


def test_cost_cap_of_a_virtual_model_drops_with_reasons() -> None:
    p = plan("cb:cheap")
    assert order(p) == ["twin@p3", "cheap@p1", "fast@p3"]
    assert reasons(p) == {
        "mid@p1": "output $0.0015/1k over cap $0.001",
        "mid@p2": "output $0.0015/1k over cap $0.001",
        "coder@p2": "input $0.003/1k over cap $0.001, output $0.015/1k over cap $0.001",
        "locked@vault": "no key (VAULT_KEY unset)",
    }


def test_request_cost_cap_overrides_and_may_cap_one_side() -> None:
    p = plan("cb:cheap", max_cost_per_1k_tokens={"input": 0.0001})
    assert order(p) == ["twin@p3", "cheap@p1"]
    assert reasons(p)["fast@p3"] == "input $0.0002/1k over cap $0.0001"
    assert p.max_cost is not None
    assert p.max_cost.input == 0.0001


def test_latency_cap_uses_live_p95_then_prior() -> None:
    view = FakeView(p95={"p2": 300.0})
    p = plan("auto", view, max_latency_ms=450, routing_strategy="cost_optimized")
    assert order(p) == ["fast@p3", "mid@p2", "coder@p2"]
    assert reasons(p)["mid@p1"] == "prior latency 500ms over cap 450ms"
    assert reasons(p)["cheap@p1"] == "prior latency 800ms over cap 450ms"
    tight = plan("auto", view, max_latency_ms=250)
    assert order(tight) == ["fast@p3"]
    assert reasons(tight)["mid@p2"] == "p95 300ms over cap 250ms"


def test_latency_cap_drops_a_deployment_of_unknown_latency() -> None:
    p = plan("auto", StaticView(), routing_strategy="cost_optimized", max_latency_ms=10_000)
    assert reasons(p) == {"locked@vault": "latency unknown (no prior, not measured), cap 10000ms"}


def test_context_window_drops_deployments_too_small_for_the_prompt() -> None:
    p = plan("auto", prompt_tokens=20_000, routing_strategy="cost_optimized")
    assert order(p) == ["twin@p3", "fast@p3", "mid@p1", "mid@p2", "coder@p2"]
    assert reasons(p)["cheap@p1"] == "context window 16000 < estimated prompt 20000 tokens"


def test_over_constrained_is_400_listing_every_deployment_and_reason() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan("auto", max_cost_per_1k_tokens=0.00005)
    err = info.value
    assert err.http_status == 400
    assert err.code == "no_candidates"
    for key in CHAT_DEPLOYMENTS:
        assert f"{key}: " in err.message
    assert "cheap@p1: input $0.0001/1k over cap $0.00005" in err.message
    assert "locked@vault: no key (VAULT_KEY unset)" in err.message


def test_prompt_too_long_for_every_window_is_context_length_exceeded() -> None:
    with pytest.raises(InvalidRequest) as info:
        plan("cheap", prompt_tokens=50_000)
    assert info.value.code == "context_length_exceeded"
    assert "cheap@p1: context window 16000 < estimated prompt 50000 tokens" in info.value.message


def test_only_missing_keys_leave_an_empty_plan_for_the_503() -> None:
    p = plan("locked")
    assert p.candidates == ()
    assert reasons(p) == {"locked@vault": "no key (VAULT_KEY unset)"}


# --------------------------------------------------------------------------- breakers


def test_open_breakers_keep_their_place_and_are_listed() -> None:
    view = FakeView(open=frozenset({"p3"}))
    p = plan("auto", view, routing_strategy="cost_optimized")
    assert order(p) == ["twin@p3", "cheap@p1", "fast@p3", "mid@p1", "mid@p2", "coder@p2"]
    assert [c.deployment.key for c in p.blocked] == ["twin@p3", "fast@p3"]
    assert p.reason == "cheapest of 6, breaker open"
    facts = {f.candidate.deployment.key: f for f in candidate_facts(p)}
    assert facts["twin@p3"].blocked
    assert not facts["cheap@p1"].blocked


def test_every_candidate_blocked_still_plans_them_all() -> None:
    view = FakeView(open=frozenset({"p1", "p2", "p3"}))
    p = plan("cb:pair", view)
    assert len(p.blocked) == len(p.candidates) == 4


def test_single_deployment_fast_path_reports_its_breaker() -> None:
    p = plan("cheap", FakeView(open=frozenset({"p1"})))
    assert order(p) == ["cheap@p1"]
    assert len(p.blocked) == 1
    assert p.reason == "as requested"
    assert plan("vague-latest").candidates[0].deployment.key == "vague@p1"
    given = plan("cheap", task_type="creative")
    assert given.task_type == "creative"
    assert given.task_source == "request"


# --------------------------------------------------------------------------- routes, fallbacks


def test_route_rewrite_and_its_fallbacks() -> None:
    p = plan("legacy-3.5")
    assert p.resolved == "cheap"
    assert order(p) == ["cheap@p1", "fast@p3"]
    assert p.primary_count == 1
    assert "rewrote=legacy-3.5->cheap" in p.header()
    research = plan("team-x", headers={"x-team": "research"})
    assert research.resolved == "cb:coding"
    assert order(research)[0] == "coder@p2"
    with pytest.raises(ModelNotFound):
        plan("team-x", headers={"x-team": "sales"})


def test_fallbacks_come_after_the_primaries_each_deployment_once() -> None:
    p = plan("cheap", fallback_models=["mid", "cheap", "cb:pair"])
    # mid's deployments in the plan's strategy (balanced: mid@p2 is faster), cheap
    # again is skipped, cb:pair adds only what is new (coder, its own fallback, is not added:
    # a fallback's own fallbacks are not followed).
    assert order(p) == ["cheap@p1", "mid@p2", "mid@p1"]
    assert p.primary_count == 1
    assert [f.role for f in candidate_facts(p)] == ["primary", "fallback", "fallback"]


def test_request_fallbacks_are_exempt_from_constraints_rule_fallbacks_are_not() -> None:
    p = plan("cb:capped")
    # coder (a rule fallback) is over the virtual model's cap; fast passes it.
    assert order(p) == ["cheap@p1", "fast@p3"]
    assert reasons(p)["coder@p2"].startswith("input $0.003/1k over cap")
    own = plan("cb:capped", fallback_models=["coder"])
    assert order(own) == ["cheap@p1", "coder@p2", "fast@p3"]
    assert "coder@p2" not in reasons(own)


def test_fallbacks_serve_when_the_constraints_leave_no_primary() -> None:
    p = plan("cheap", max_cost_per_1k_tokens=0.00001, fallback_models=["mid"])
    assert order(p) == ["mid@p2", "mid@p1"]
    assert p.primary_count == 0
    assert p.reason == "no primary candidate left; fallback"
    assert reasons(p) == {
        "cheap@p1": "input $0.0001/1k over cap $0.00001, output $0.0004/1k over cap $0.00001"
    }


def test_unknown_fallback_is_skipped_with_a_warning() -> None:
    p = plan("cheap", fallback_models=["nope", "fast"])
    assert order(p) == ["cheap@p1", "fast@p3"]
    assert p.warnings == ("fallback model 'nope' does not exist in the proxy's rules; skipped",)


def test_unknown_names_are_404() -> None:
    with pytest.raises(ModelNotFound) as virtual:
        plan("cb:nope")
    message = virtual.value.message
    assert "'cb:nope'" in message
    assert "auto, cb:capped, cb:cheap, cb:coding, cb:fastest, cb:pair, cb:reliable" in message
    assert "twin" not in message
    with pytest.raises(ModelNotFound) as concrete:
        plan("gpt-9")
    assert "twin" in concrete.value.message
    assert "cb:pair" in concrete.value.message


def test_virtual_model_without_candidates_takes_only_rated_models() -> None:
    keys = {c.deployment.key for c in plan("auto").candidates} | set(reasons(plan("auto")))
    assert keys == set(CHAT_DEPLOYMENTS)


# --------------------------------------------------------------------------- reporting


def test_header_is_short_ascii_with_strategy_task_choice_and_reason() -> None:
    p = plan("cb:coding")
    assert p.header() == (
        "strategy=task_specific; task=coding; chose=coder@p2; reason=best coding quality 10"
    )
    rules = parse_rules(
        {
            "version": 1,
            "providers": {"p": {"type": "openai", "base_url": "http://x/v1"}},
            "models": {"caf\u00e9": {"provider": "p"}},
        }
    )
    header = plan("caf\u00e9", StaticView(), rules).header()
    assert header.isascii()
    assert "chose=caf?@p" in header


def test_plan_log_fields_are_json_ready_with_candidates_and_rejections() -> None:
    view = FakeView(p95={"p2": 300.0}, success={"p2": 0.987654}, open=frozenset({"p1"}))
    fields = plan_log_fields(plan("cb:pair", view))
    decoded = orjson.loads(orjson.dumps(fields))
    assert decoded["strategy"] == "balanced"
    assert decoded["task_type"] == "chat"
    by_key = {c["deployment"]: c for c in decoded["candidates"]}
    assert by_key["mid@p2"]["latency_ms"] == 300.0
    assert by_key["mid@p2"]["latency_source"] == "p95"
    assert by_key["mid@p2"]["success_ratio"] == 0.988  # compared at 0.1 % resolution
    assert by_key["cheap@p1"]["latency_source"] == "prior"
    assert by_key["cheap@p1"]["blocked"] is True
    assert by_key["coder@p2"]["role"] == "fallback"
    assert by_key["coder@p2"]["score"] is None
    rejected: Any = plan_log_fields(plan("cb:cheap"))["rejected"]
    assert {"deployment": "mid@p1", "reason": "output $0.0015/1k over cap $0.001"} in rejected


def test_log_plan_writes_one_debug_record(caplog: pytest.LogCaptureFixture) -> None:
    p = plan("cb:cheap")
    with caplog.at_level(logging.INFO, logger="cb_proxy.route"):
        log_plan(p, "req_1")
    assert caplog.records == []
    with caplog.at_level(logging.DEBUG, logger="cb_proxy.route"):
        log_plan(p, "req_1")
    (record,) = caplog.records
    assert record.name == "cb_proxy.route"
    assert "chose=twin@p3" in record.getMessage()
    extra: Any = record.__dict__["cb"]
    assert extra["request_id"] == "req_1"
    assert len(extra["rejected"]) == 4


def test_estimate_prompt_tokens_and_routing_inputs() -> None:
    chat = {
        "messages": [
            {"role": "system", "content": "x" * 10},
            {"role": "user", "content": [{"type": "text", "text": "y" * 7}, {"type": "image"}]},
        ]
    }
    assert estimate_prompt_tokens(chat) == 5  # 17 characters / 4, rounded up
    assert estimate_prompt_tokens({"prompt": ["ab", "abcdefghi"]}) == 3  # the longest of a batch
    assert estimate_prompt_tokens({"input": [[1, 2, 3], [4]]}) == 3  # token arrays
    assert estimate_prompt_tokens({"input": 42}) == 0
    messages, tokens = routing_inputs({"prompt": "write a poem"})
    assert messages == ({"role": "user", "content": "write a poem"},)
    assert tokens == 3
    assert routing_inputs(chat)[0] is chat["messages"]
    assert routing_inputs({"input": "abcd"}) == ((), 1)


def test_format_usd_never_uses_exponents() -> None:
    assert format_usd(0.000075) == "$0.000075"
    assert format_usd(0.0025) == "$0.0025"
    assert format_usd(0) == "$0"
    assert format_usd(math.inf) == "$inf"


# --------------------------------------------------------------------------- explain


@pytest.fixture
def rules_file(tmp_path: Path) -> Path:
    path = tmp_path / "rules.yaml"
    path.write_text(CATALOG)
    return path


def explain(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, list[str]]:
    code = main(["explain", *argv])
    return code, capsys.readouterr().out.splitlines()


def test_explain_detects_the_task_and_shows_scores_and_order(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = explain(
        capsys, "--rules", str(rules_file), "--model", "auto", "Fix this Python traceback"
    )
    assert code == 0
    assert lines[0] == "requested:   auto"
    assert lines[1] == "resolved:    auto (virtual model)"
    assert lines[2] == "strategy:    balanced (from the virtual model)"
    assert lines[3].startswith("task:        coding (detected from the prompt; scores: chat ")
    assert "coding" in lines[3].split("scores:")[1]
    # explain has no live facts and takes every key as present. Balanced, coding, by hand:
    # fast@p3 = 0.4 * (6-1)/9 + 0.3 * (0.018-0.001)/(0.018-0.00002) + 0.2 * 1 + 0.1 = 0.806
    first = next(line for line in lines if line.startswith("  1. "))
    assert first.split()[1] == "fast@p3"
    assert "coding quality 6" in first
    assert "score 0.806" in first
    assert first.endswith("<- first: best score 0.81 of 7")
    assert "dropped:" not in lines


def test_explain_with_constraints_lists_what_was_dropped(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = explain(
        capsys,
        "--rules",
        str(rules_file),
        "--model",
        "auto",
        "--strategy",
        "cost_optimized",
        "--task-type",
        "chat",
        "--max-cost",
        "0.001",
        "--max-latency-ms",
        "850",
    )
    assert code == 0
    assert "strategy:    cost_optimized (from the request)" in lines
    assert "task:        chat (from the request)" in lines
    assert "constraints: max cost $0.001/1k in, $0.001/1k out; max latency 850ms" in lines
    candidates = [line.split()[1] for line in lines if line.startswith("  ") and ". " in line[:6]]
    assert candidates == ["cheap@p1", "fast@p3"]
    assert "  - twin@p3: prior latency 900ms over cap 850ms" in lines
    assert (
        "  - coder@p2: input $0.003/1k over cap $0.001, output $0.015/1k over cap $0.001" in lines
    )


def test_explain_reports_errors(rules_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = explain(capsys, "--rules", str(rules_file), "--model", "cb:nope")
    assert code == 1
    assert lines[0].startswith("error 404: The virtual model 'cb:nope'")
    code, lines = explain(
        capsys, "--rules", str(rules_file), "--model", "cheap", "--max-cost", "0.00001"
    )
    assert code == 1
    assert lines[0].startswith("error 400: no deployment of 'cheap'")
    code, lines = explain(
        capsys, "--rules", str(rules_file), "--model", "cheap", "--max-cost", "-1"
    )
    assert code == 1
    assert "max_cost_per_1k_tokens" in lines[0]


def test_explain_single_model_and_route(
    rules_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, lines = explain(capsys, "--rules", str(rules_file), "--model", "legacy-1")
    assert code == 0
    assert lines[1] == "resolved:    cheap (rewritten by a route)"
    assert lines[3] == "task:        not needed by this plan"
    assert "[fallback]" in next(line for line in lines if line.startswith("  2. "))


# --------------------------------------------------------------------------- properties

PRICES = (0.0, 0.0001, 0.0005, 0.001)
PROVIDERS = ("a", "b", "c")


@st.composite
def catalogs(draw: st.DrawFn) -> tuple[dict[str, Any], FakeView]:
    models: dict[str, Any] = {}
    for m in range(draw(st.integers(1, 6))):
        providers = draw(st.lists(st.sampled_from(PROVIDERS), min_size=1, max_size=3, unique=True))
        quality = draw(st.dictionaries(st.sampled_from(TASK_TYPES), st.integers(0, 10), min_size=1))
        deployments = []
        for p in providers:
            dep: dict[str, Any] = {
                "provider": p,
                "input_cost_per_1k": draw(st.sampled_from(PRICES)),
                "output_cost_per_1k": draw(st.sampled_from(PRICES)),
            }
            latency = draw(st.sampled_from((None, 100, 300, 500)))
            if latency is not None:
                dep["latency_ms"] = latency
            deployments.append(dep)
        models[f"m{m}"] = {"quality": quality, "deployments": deployments}
    doc = {
        "version": 1,
        "providers": {
            p: {
                "type": "openai",
                "base_url": f"http://127.0.0.1:{i + 1}/v1",
                "api_key_env": f"K_{p}",
            }
            for i, p in enumerate(PROVIDERS)
        },
        "models": models,
        "virtual_models": {"v": {"strategy": "balanced"}},
    }
    live = st.sampled_from((None, 100.0, 200.0, 400.0))
    ratio = st.sampled_from((None, 0.5, 0.9, 1.0))
    view = FakeView(
        no_key=frozenset(draw(st.lists(st.sampled_from(PROVIDERS), max_size=1))),
        open=frozenset(draw(st.lists(st.sampled_from(PROVIDERS), max_size=2))),
        p95={p: v for p in PROVIDERS if (v := draw(live)) is not None},
        success={p: v for p in PROVIDERS if (v := draw(ratio)) is not None},
    )
    return doc, view


def _facts(dep: Deployment, view: FakeView) -> tuple[float, float, float | None]:
    latency = view.p95.get(dep.provider, dep.latency_ms if dep.latency_ms is not None else math.inf)
    return dep.input_cost_per_1k + dep.output_cost_per_1k, latency, view.success.get(dep.provider)


@settings(max_examples=150, deadline=None)
@given(
    catalogs(),
    st.sampled_from(STRATEGIES),
    st.sampled_from(TASK_TYPES),
    st.sampled_from((None, 0.0005, 0.001)),
)
def test_every_strategy_orders_exactly_the_eligible_deployments(
    catalog: tuple[dict[str, Any], FakeView], strategy: str, task: str, cap: float | None
) -> None:
    doc, view = catalog
    rules = parse_rules(doc)
    prefs: dict[str, Any] = {"routing_strategy": strategy, "task_type": task}
    if cap is not None:
        prefs["max_cost_per_1k_tokens"] = cap
    declared = [(m, d) for m in rules.models.values() for d in m.deployments]
    eligible = [
        (m, d)
        for m, d in declared
        if d.provider not in view.no_key
        and (cap is None or (d.input_cost_per_1k <= cap and d.output_cost_per_1k <= cap))
    ]
    try:
        p = plan("v", view, rules, **prefs)
    except InvalidRequest:
        assert not eligible
        return
    keys = order(p)
    # A permutation of the eligible deployments; everything else rejected once.
    assert sorted(keys) == sorted(d.key for _, d in eligible)
    assert {r.deployment for r in p.rejected} == {d.key for _, d in declared} - set(keys)
    assert [c.deployment.key for c in p.blocked] == [
        k for k in keys if k.split("@")[1] in view.open
    ]
    # Deterministic, with or without the memo and the compiled tables.
    assert order(plan("v", view, rules, **prefs)) == keys
    assert order(plan("v", view, parse_rules(doc), **prefs)) == keys
    if not eligible:
        return
    by_key = {d.key: (m, d) for m, d in eligible}
    first_model, first = by_key[keys[0]]
    price, latency, success = _facts(first, view)
    facts = [_facts(d, view) for _, d in eligible]
    quality = [m.quality.get(task, 0.0) for m, _ in eligible]
    if strategy == "cost_optimized":
        assert price == min(f[0] for f in facts)
    elif strategy == "performance_first":
        assert latency == min(f[1] for f in facts)
    elif strategy == "reliability_first":
        best = max(1.0 if f[2] is None else f[2] for f in facts)
        assert (1.0 if success is None else success) == best
    elif strategy == "task_specific":
        assert first_model.quality.get(task, 0.0) == max(quality)
    elif len(eligible) == 1:
        assert p.scores == ()  # one candidate: nothing to score
    else:
        scores = balanced_scores(
            quality,
            [f[0] for f in facts],
            [f[1] for f in facts],
            [1.0 if f[2] is None else f[2] for f in facts],
            rules.defaults.weights,
        )
        assert p.scores[0] == max(scores)
        assert sorted(p.scores, reverse=True) == list(p.scores)
    # The whole order: the documented keys, then declaration order (a stable sort).
    ratio = [1.0 if f[2] is None else f[2] for f in facts]
    criteria: dict[str, list[tuple[float, ...]]] = {
        "cost_optimized": [(f[0], -q) for f, q in zip(facts, quality, strict=True)],
        "performance_first": [(f[1], f[0]) for f in facts],
        "reliability_first": [(-r, f[2] is None, f[1]) for f, r in zip(facts, ratio, strict=True)],
        "task_specific": [(-q, f[0]) for f, q in zip(facts, quality, strict=True)],
    }
    if strategy in criteria:
        ranks = criteria[strategy]
        expected = sorted(range(len(eligible)), key=ranks.__getitem__)
        assert keys == [eligible[i][1].key for i in expected]
