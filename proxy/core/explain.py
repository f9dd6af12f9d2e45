"""The facts behind a route plan, for ``cb-proxy explain`` and the debug log line."""

from __future__ import annotations

from dataclasses import dataclass

from proxy.core.candidates import Candidate
from proxy.core.router import UNRATED_QUALITY, RoutePlan


@dataclass(frozen=True, slots=True)
class CandidateFacts:
    """One candidate as the router saw it: for ``explain`` and the debug log."""

    candidate: Candidate
    role: str  # "primary" | "fallback"
    price_per_1k: float
    latency_ms: float | None
    latency_source: str  # "p95" | "prior" | "unknown"
    success_ratio: float | None  # None = not measured
    quality: float | None  # for the plan's task type; the mean rating when none
    score: float | None  # balanced only
    blocked: bool


def candidate_facts(plan: RoutePlan) -> list[CandidateFacts]:
    """The facts behind each candidate's place, from the plan's own snapshot of live stats."""
    facts = []
    for k, cand in enumerate(plan.candidates):
        dep = cand.deployment
        stats = plan.stats.get(dep.key)
        measured = stats.latency_ms if stats is not None else None
        if measured is not None:
            latency, source = measured, "p95"
        elif dep.latency_ms is not None:
            latency, source = dep.latency_ms, "prior"
        else:
            latency, source = None, "unknown"
        if plan.task_type is not None:
            quality: float | None = cand.quality.get(plan.task_type, UNRATED_QUALITY)
        elif cand.quality:
            quality = sum(cand.quality.values()) / len(cand.quality)
        else:
            quality = None
        facts.append(
            CandidateFacts(
                candidate=cand,
                role="primary" if k < plan.primary_count else "fallback",
                price_per_1k=dep.input_cost_per_1k + dep.output_cost_per_1k,
                latency_ms=latency,
                latency_source=source,
                success_ratio=stats.success_ratio if stats is not None else None,
                quality=quality,
                score=plan.scores[k] if k < len(plan.scores) else None,
                blocked=any(b is cand for b in plan.blocked),
            )
        )
    return facts


def plan_log_fields(plan: RoutePlan) -> dict[str, object]:
    """The full plan as JSON-ready fields, for the debug log line of a request."""
    cap = plan.max_cost
    return {
        "requested": plan.requested,
        "resolved": plan.resolved,
        "strategy": plan.strategy,
        "task_type": plan.task_type,
        "task_source": plan.task_source or None,
        "chosen": plan.candidates[0].deployment.key if plan.candidates else None,
        "reason": plan.reason,
        "prompt_tokens": plan.prompt_tokens,
        "max_cost_per_1k": None if cap is None else {"input": cap.input, "output": cap.output},
        "max_latency_ms": plan.max_latency_ms,
        "candidates": [
            {
                "deployment": f.candidate.deployment.key,
                "role": f.role,
                "price_per_1k": f.price_per_1k,
                "latency_ms": f.latency_ms,
                "latency_source": f.latency_source,
                "success_ratio": f.success_ratio,
                "quality": f.quality,
                "score": f.score,
                "blocked": f.blocked,
            }
            for f in candidate_facts(plan)
        ],
        "rejected": [{"deployment": r.deployment, "reason": r.reason} for r in plan.rejected],
    }
