"""Request + rules + live stats -> RoutePlan.

A RoutePlan is the ordered list of candidates (deployment, provider) the
forwarding loop walks, plus, for every deployment it did not pick, the reason.
The router is pure: the caller passes in the live facts (which providers have
a key, breaker state, latency and success ratio per deployment) through the
``LiveView`` protocol, so the same code answers a real request and
``cb-proxy explain``.

Order of resolution (rules-format.md): the first matching route rewrites the
requested model and adds its fallbacks; the resulting name is a model, an
alias or a virtual model; then come the request's own ``fallback_models``, the
virtual model's, the route's and the defaults', each deployment once.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Protocol

from proxy.errors import InvalidRequest, ModelNotFound
from proxy.rules import (
    STRATEGIES,
    TASK_TYPES,
    CostCap,
    Deployment,
    Model,
    Provider,
    RuleSet,
    Strategy,
    TaskType,
)

EXTENSION_KEY = "circuit_breaker"
EXTENSION_KEYS = frozenset(
    {"routing_strategy", "task_type", "max_cost_per_1k_tokens", "max_latency_ms", "fallback_models"}
)


@dataclass(frozen=True, slots=True)
class RequestPrefs:
    """The per-request ``circuit_breaker`` extension, validated."""

    routing_strategy: Strategy | None = None
    task_type: TaskType | None = None
    max_cost: CostCap | None = None
    max_latency_ms: float | None = None
    fallback_models: tuple[str, ...] = ()


NO_PREFS = RequestPrefs()


def _param(key: str) -> str:
    return f"{EXTENSION_KEY}.{key}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_prefs(raw: object) -> RequestPrefs:
    """Validate the extension object; InvalidRequest (400) naming the key otherwise."""
    if raw is None:
        return NO_PREFS
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{EXTENSION_KEY}' must be an object", param=EXTENSION_KEY)
    unknown = sorted(set(raw) - EXTENSION_KEYS)
    if unknown:
        raise InvalidRequest(
            f"unknown key '{unknown[0]}' in '{EXTENSION_KEY}'; "
            f"known keys: {', '.join(sorted(EXTENSION_KEYS))}",
            param=_param(unknown[0]),
        )
    strategy = raw.get("routing_strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise InvalidRequest(
            f"routing_strategy must be one of {', '.join(STRATEGIES)}",
            param=_param("routing_strategy"),
        )
    task = raw.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise InvalidRequest(
            f"task_type must be one of {', '.join(TASK_TYPES)}", param=_param("task_type")
        )
    cap = raw.get("max_cost_per_1k_tokens")
    max_cost: CostCap | None = None
    if cap is not None:
        if _is_number(cap) and cap >= 0:
            max_cost = CostCap(float(cap), float(cap))
        elif (
            isinstance(cap, dict)
            and set(cap) <= {"input", "output"}
            and cap
            and all(_is_number(v) and v >= 0 for v in cap.values())
        ):
            inf = float("inf")
            max_cost = CostCap(float(cap.get("input", inf)), float(cap.get("output", inf)))
        else:
            raise InvalidRequest(
                "max_cost_per_1k_tokens must be a non-negative number or {input, output}",
                param=_param("max_cost_per_1k_tokens"),
            )
    latency = raw.get("max_latency_ms")
    if latency is not None and not (_is_number(latency) and latency > 0):
        raise InvalidRequest(
            "max_latency_ms must be a positive number", param=_param("max_latency_ms")
        )
    fallbacks = raw.get("fallback_models", ())
    if not isinstance(fallbacks, list | tuple) or not all(isinstance(m, str) for m in fallbacks):
        raise InvalidRequest(
            "fallback_models must be a list of model names", param=_param("fallback_models")
        )
    return RequestPrefs(
        routing_strategy=strategy,
        task_type=task,
        max_cost=max_cost,
        max_latency_ms=float(latency) if latency is not None else None,
        fallback_models=tuple(fallbacks),
    )


class LiveView(Protocol):
    """Live facts about upstreams that routing depends on."""

    def has_key(self, provider: Provider) -> bool: ...

    def is_blocked(self, deployment: Deployment) -> bool:
        """True when the deployment's breaker is open (no probe allowed now)."""
        ...


class StaticView:
    """Every provider usable, no breaker open: for `explain` without live state and for tests."""

    def has_key(self, provider: Provider) -> bool:
        return True

    def is_blocked(self, deployment: Deployment) -> bool:
        return False


@dataclass(frozen=True, slots=True)
class Candidate:
    deployment: Deployment
    provider: Provider
    context_window: int | None


@dataclass(frozen=True, slots=True)
class Rejection:
    deployment: str
    reason: str


@dataclass(frozen=True, slots=True)
class RoutePlan:
    requested: str
    resolved: str  # the model or virtual model name after routes
    strategy: str
    candidates: tuple[Candidate, ...]
    rejected: tuple[Rejection, ...] = ()
    reason: str = ""
    task_type: str | None = None
    blocked: tuple[Candidate, ...] = field(default=())  # candidates whose breaker is open now

    def header(self) -> str:
        """The short ``x-cb-route`` value."""
        first = self.candidates[0].deployment.key if self.candidates else "-"
        parts = [f"strategy={self.strategy}"]
        if self.task_type:
            parts.append(f"task={self.task_type}")
        parts.append(f"chose={first}")
        if self.reason:
            parts.append(f"reason={self.reason}")
        return "; ".join(parts)


def _candidates_of(rules: RuleSet, name: str) -> list[Model]:
    """Models a name stands for: the model itself, or a virtual model's candidates."""
    model = rules.resolve_model(name)
    if model is not None:
        return [model]
    virtual = rules.virtual_models.get(name)
    if virtual is None:
        return []
    names = virtual.candidates if virtual.candidates is not None else tuple(rules.models)
    found = [rules.resolve_model(n) for n in names]
    return [m for m in found if m is not None]


def unknown_model_error(rules: RuleSet, name: str) -> ModelNotFound:
    known = sorted(rules.model_index)
    virtual = sorted(rules.virtual_models)
    return ModelNotFound(
        f"The model '{name}' does not exist in the proxy's rules. "
        f"Models: {', '.join(known) or 'none'}. Virtual models: {', '.join(virtual) or 'none'}.",
        param="model",
    )


def plan_route(
    rules: RuleSet,
    requested: str,
    headers: Mapping[str, str],
    prefs: RequestPrefs,
    live: LiveView,
) -> RoutePlan:
    """Resolve a request's model into an ordered candidate list."""
    route = rules.match_route(requested, headers)
    name = requested
    route_fallbacks: tuple[str, ...] = ()
    reason = ""
    if route is not None:
        if route.rewrite_model is not None:
            name = route.rewrite_model
            reason = f"route rewrote {requested} to {name}"
        route_fallbacks = route.fallbacks
    virtual = rules.virtual_models.get(name)
    primary = _candidates_of(rules, name)
    if not primary:
        raise unknown_model_error(rules, name)
    strategy: str = prefs.routing_strategy or (
        virtual.strategy if virtual is not None else rules.defaults.strategy
    )
    task = prefs.task_type or (virtual.task_type if virtual is not None else None)

    fallback_names: list[str] = list(prefs.fallback_models)
    if virtual is not None:
        fallback_names.extend(virtual.fallback_models)
    fallback_names.extend(route_fallbacks)
    fallback_names.extend(rules.defaults.fallback_models)

    candidates: list[Candidate] = []
    rejected: list[Rejection] = []
    blocked: list[Candidate] = []
    seen: set[str] = set()

    def consider(model: Model) -> None:
        for dep in model.deployments:
            if dep.key in seen:
                continue
            seen.add(dep.key)
            provider = rules.providers[dep.provider]
            cand = Candidate(dep, provider, dep.context_window or model.context_window)
            if not live.has_key(provider):
                rejected.append(Rejection(dep.key, f"no key ({provider.api_key_env} unset)"))
                continue
            # An open breaker does not remove the candidate: the forwarding loop skips it
            # without I/O, so the plan's order stays honest about which one was the first
            # choice (x-cb-fallback) and a half-open breaker can still get its probe.
            if live.is_blocked(dep):
                blocked.append(cand)
            candidates.append(cand)

    for model in primary:
        consider(model)
    for fallback in fallback_names:
        models = _candidates_of(rules, fallback)
        if not models:
            raise InvalidRequest(
                f"fallback model '{fallback}' does not exist in the proxy's rules",
                param=_param("fallback_models"),
            )
        for model in models:
            consider(model)
    return RoutePlan(
        requested=requested,
        resolved=name,
        strategy=strategy,
        candidates=tuple(candidates),
        rejected=tuple(rejected),
        reason=reason or ("as requested" if virtual is None else f"virtual model {name}"),
        task_type=task,
        blocked=tuple(blocked),
    )
