"""The rules file: YAML -> validated, frozen ``RuleSet``.

Contract (see docs/rules-format.md): every key is known, unknown keys are
errors with their path, every problem is reported at once, a RuleSet is
immutable once built and carries the lookup tables the hot path needs
(names and aliases -> model, compiled route globs), so a request does
dictionary lookups only.

PARSER: to be completed (parse_rules / load_rules). The dataclasses below are
the interface the rest of the proxy is written against: fields may be added,
never renamed.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

ProviderType = Literal["openai", "anthropic", "gemini"]
Strategy = Literal[
    "cost_optimized", "performance_first", "balanced", "reliability_first", "task_specific"
]
TaskType = Literal["chat", "coding", "analysis", "creative"]

STRATEGIES: tuple[Strategy, ...] = (
    "cost_optimized",
    "performance_first",
    "balanced",
    "reliability_first",
    "task_specific",
)
TASK_TYPES: tuple[TaskType, ...] = ("chat", "coding", "analysis", "creative")
PROVIDER_TYPES: tuple[ProviderType, ...] = ("openai", "anthropic", "gemini")


class RulesError(Exception):
    """A rules file with problems; ``problems`` lists each as 'path: message'."""

    def __init__(self, problems: list[str], source: str = "<rules>") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(problems))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase upstream timeouts in seconds (breaker.md, 'Retries and failover')."""

    connect: float = 5.0
    first_token: float = 30.0
    idle: float = 30.0
    total: float = 600.0


@dataclass(frozen=True, slots=True)
class BreakerOverrides:
    """Per-provider breaker settings given in the rules; None = use the env/default."""

    failure_threshold: int | None = None
    failure_rate: float | None = None
    min_throughput: int | None = None
    window_seconds: float | None = None
    open_seconds: float | None = None
    max_open_seconds: float | None = None
    half_open_probes: int | None = None
    slow_call_ms: float | None = None
    max_half_open_seconds: float | None = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str | None = None  # None = the provider type's models endpoint
    interval: float | None = None  # None = HEALTH_CHECK_INTERVAL


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    type: ProviderType
    base_url: str  # no trailing slash
    api_key_env: str | None
    headers: Mapping[str, str] = field(default_factory=dict)
    timeouts: Timeouts = field(default_factory=Timeouts)
    breaker: BreakerOverrides = field(default_factory=BreakerOverrides)
    health_check: HealthCheck = field(default_factory=HealthCheck)


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream serving one model: the unit the router orders and the breaker keys."""

    model: str  # the client-facing model name this deployment serves
    provider: str  # key into RuleSet.providers
    upstream_model: str
    input_cost_per_1k: float = 0.0
    output_cost_per_1k: float = 0.0
    latency_ms: float | None = None  # prior until measured
    context_window: int | None = None

    @property
    def key(self) -> str:
        """Stable id, e.g. 'claude-3-haiku@anthropic'; used in headers and logs."""
        return f"{self.model}@{self.provider}"


@dataclass(frozen=True, slots=True)
class Model:
    name: str
    deployments: tuple[Deployment, ...]
    context_window: int | None = None
    quality: Mapping[str, float] = field(default_factory=dict)
    aliases: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class CostCap:
    """Max USD per 1k tokens, for input and for output."""

    input: float
    output: float


@dataclass(frozen=True, slots=True)
class VirtualModel:
    name: str
    strategy: Strategy
    task_type: TaskType | None = None
    candidates: tuple[str, ...] | None = None  # None = every model in the catalog
    max_cost_per_1k_tokens: CostCap | None = None
    max_latency_ms: float | None = None
    fallback_models: tuple[str, ...] = ()
    description: str = ""


@dataclass(frozen=True, slots=True)
class Route:
    model_glob: str | None  # None = any model
    headers: tuple[tuple[str, str], ...]  # (lower-cased header name, glob)
    rewrite_model: str | None
    fallbacks: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Weights:
    quality: float = 0.4
    cost: float = 0.3
    latency: float = 0.2
    reliability: float = 0.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    max_attempts: int = 4
    same_deployment_retries: int = 1
    max_retry_wait: float = 3.0
    backoff_ms: float = 100.0
    max_backoff_ms: float = 500.0
    budget_ratio: float = 0.2


@dataclass(frozen=True, slots=True)
class Defaults:
    strategy: Strategy = "balanced"
    fallback_models: tuple[str, ...] = ()
    weights: Weights = field(default_factory=Weights)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    response_metadata: bool = True


@dataclass(frozen=True, slots=True)
class RuleSet:
    version: int
    providers: Mapping[str, Provider]
    models: Mapping[str, Model]
    virtual_models: Mapping[str, VirtualModel]
    routes: tuple[Route, ...]
    defaults: Defaults
    source: str = "<rules>"
    # name or alias -> canonical model name (models only; virtual models are looked up by name)
    model_index: Mapping[str, str] = field(default_factory=dict)

    def resolve_model(self, name: str) -> Model | None:
        canonical = self.model_index.get(name)
        return self.models.get(canonical) if canonical is not None else None


def parse_rules(data: object, source: str = "<rules>") -> RuleSet:
    """Validate a decoded YAML document; raise RulesError listing every problem."""
    raise NotImplementedError


def load_rules(path: str | Path) -> RuleSet:
    """Read, parse and validate a rules file; raise RulesError on any problem."""
    raise NotImplementedError
