"""Routing micro-benchmark: what ``plan_route`` costs per request with 50 models.

The catalog is built through ``parse_rules`` (the same validation a rules file
gets) and mixes three provider types, one- and two-deployment models, aliases
and a few non-matching routes ahead of the one that matches, so the timed call
walks the realistic path: route matching, virtual-model expansion to every
model, per-deployment availability checks and, as strategies land in the
router, their ordering. The call stays generic: ``plan_route(rules, name,
headers, RequestPrefs(), StaticView())``.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from typing import Any

from proxy.config.check import parse_rules
from proxy.config.model import RuleSet
from proxy.core.candidates import StaticView
from proxy.core.prefs import RequestPrefs
from proxy.core.router import plan_route

CATALOG_SIZE = 50
PROVIDER_TYPES = ("openai", "anthropic", "gemini")
VIRTUAL_MODEL = "auto"
HEADERS = {"content-type": "application/json", "x-team": "platform"}
BATCH = 200  # calls per timed batch: perf_counter_ns overhead is amortized over these
WARMUP_CALLS = 2_000


@dataclass(frozen=True, slots=True)
class RoutingResult:
    models: int
    deployments: int
    calls: int
    median_us: float
    p90_us: float


def catalog_document(size: int = CATALOG_SIZE) -> dict[str, Any]:
    """A rules document with ``size`` models and the virtual model ``auto`` over all of them."""
    providers = {
        f"{kind}-{i}": {"type": kind, "base_url": f"http://127.0.0.1:{19000 + i}/v1"}
        for i, kind in enumerate(PROVIDER_TYPES)
    }
    names = list(providers)
    models: dict[str, Any] = {}
    for i in range(size):
        base = {
            "context_window": 32_000 * (1 + i % 4),
            "quality": {"chat": i % 10, "coding": (i * 3) % 10, "analysis": (i * 7) % 10},
            "aliases": [f"m{i:02d}-latest"],
        }
        prices = {"input_cost_per_1k": 0.0001 * (i + 1), "output_cost_per_1k": 0.0004 * (i + 1)}
        if i % 5 == 0:  # every fifth model is served by two upstreams
            base["deployments"] = [
                {"provider": names[i % 3], "latency_ms": 100 + i, **prices},
                {"provider": names[(i + 1) % 3], "latency_ms": 150 + i, **prices},
            ]
        else:
            base.update(provider=names[i % 3], latency_ms=100 + 10 * i, **prices)
        models[f"m{i:02d}"] = base
    return {
        "version": 1,
        "providers": providers,
        "models": models,
        "virtual_models": {
            VIRTUAL_MODEL: {"strategy": "balanced"},
            "cb:cost-optimal": {"strategy": "cost_optimized"},
            "cb:coding": {"strategy": "task_specific", "task_type": "coding"},
        },
        "routes": [
            {"match": {"model": "gpt-3.5-*"}, "rewrite": {"model": "m01"}},
            {"match": {"model": "claude-2*"}, "rewrite": {"model": "m02"}},
            {"match": {"model": "a*", "headers": {"x-team": "platform"}}, "fallbacks": ["m03"]},
        ],
        "defaults": {"strategy": "balanced"},
    }


def build_catalog(size: int = CATALOG_SIZE) -> RuleSet:
    return parse_rules(catalog_document(size), source="<bench catalog>")


def time_plan_route(rules: RuleSet, requested: str, calls: int) -> RoutingResult:
    """Median and p90 of per-call time over batches of ``BATCH`` calls."""
    prefs = RequestPrefs()
    view = StaticView()
    plan = plan_route(rules, requested, HEADERS, prefs, view)  # fails loudly before timing
    for _ in range(WARMUP_CALLS):
        plan_route(rules, requested, HEADERS, prefs, view)
    per_call_ns: list[float] = []
    clock = time.perf_counter_ns
    for _ in range(max(1, calls // BATCH)):
        started = clock()
        for _ in range(BATCH):
            plan_route(rules, requested, HEADERS, prefs, view)
        per_call_ns.append((clock() - started) / BATCH)
    deciles = statistics.quantiles(per_call_ns, n=10) if len(per_call_ns) > 1 else per_call_ns
    return RoutingResult(
        models=len(rules.models),
        deployments=len(plan.candidates) + len(plan.rejected),
        calls=len(per_call_ns) * BATCH,
        median_us=statistics.median(per_call_ns) / 1000,
        p90_us=deciles[-1] / 1000,
    )
