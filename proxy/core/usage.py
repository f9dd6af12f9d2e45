"""Tokens and cost per request, and running totals since start.

Cost is computed from the rules' price table (USD per 1k tokens) and the
upstream's reported usage; when an upstream reports none, the caller passes an
estimate and marks it so (``estimated``), which the totals keep apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from proxy.config.model import Deployment

# A rough, conservative estimate used only when an upstream reports no usage:
# about four characters per token for English text (OpenAI's rule of thumb).
CHARS_PER_TOKEN = 4


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


def cost_usd(deployment: Deployment, usage: Usage) -> float:
    return (
        usage.prompt_tokens * deployment.input_cost_per_1k
        + usage.completion_tokens * deployment.output_cost_per_1k
    ) / 1000.0


def estimate_tokens(chars: int) -> int:
    return (chars + CHARS_PER_TOKEN - 1) // CHARS_PER_TOKEN


@dataclass(slots=True)
class ModelTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost_usd: float = 0.0
    estimated_requests: int = 0


@dataclass(slots=True)
class UsageTotals:
    """Totals since start, per (provider, model); read by ``GET /api/usage``."""

    by_model: dict[tuple[str, str], ModelTotals] = field(default_factory=dict)

    def add(self, deployment: Deployment, usage: Usage, *, estimated: bool = False) -> float:
        cost = cost_usd(deployment, usage)
        key = (deployment.provider, deployment.model)
        totals = self.by_model.get(key)
        if totals is None:
            totals = self.by_model[key] = ModelTotals()
        totals.requests += 1
        totals.prompt_tokens += usage.prompt_tokens
        totals.completion_tokens += usage.completion_tokens
        totals.cost_usd += cost
        if estimated:
            totals.estimated_requests += 1
        return cost

    def snapshot(self) -> dict[str, object]:
        rows = [
            {
                "provider": provider,
                "model": model,
                "requests": t.requests,
                "prompt_tokens": t.prompt_tokens,
                "completion_tokens": t.completion_tokens,
                "cost_usd": round(t.cost_usd, 10),
                "estimated_requests": t.estimated_requests,
            }
            for (provider, model), t in sorted(self.by_model.items())
        ]
        return {
            "total_requests": sum(t.requests for t in self.by_model.values()),
            "total_prompt_tokens": sum(t.prompt_tokens for t in self.by_model.values()),
            "total_completion_tokens": sum(t.completion_tokens for t in self.by_model.values()),
            "total_cost_usd": round(sum(t.cost_usd for t in self.by_model.values()), 10),
            "by_model": rows,
        }
