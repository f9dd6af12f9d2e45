"""The proxy's live state, shared by the API and admin apps.

``rules`` is swapped by reference on reload: a request reads it once when it
starts and keeps that RuleSet until it ends, so requests in flight keep the
rules they started with.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from aiohttp import web

from proxy.config.check import load_rules
from proxy.config.model import BreakerOverrides, Deployment, Provider, RetryPolicy, RuleSet
from proxy.config.settings import Settings
from proxy.core.breaker import (
    TRANSITIONS,
    CircuitBreaker,
    CircuitBreakerConfig,
    State,
)
from proxy.core.breaker_registry import BreakerRegistry
from proxy.core.deadlines import FirstTokenTimes
from proxy.core.ratelimit import RateLimitGate
from proxy.core.secrets import NO_SECRETS, Redactor
from proxy.core.usage import UsageTotals
from proxy.providers.base import Usage
from proxy.server.logs import guard_secrets
from proxy.server.metrics import MODEL_SERIES_MAX, Metrics
from proxy.upstream.client import UpstreamPool
from proxy.upstream.deadline import Watchdog

LOG = logging.getLogger("cb_proxy")
# How long the router may reuse the live facts it read (a breaker transition ends it sooner).
LIVE_FACTS_SECONDS = 0.1
RETRY_BUDGET_FLOOR = 3  # retries in flight allowed however few requests are active
UNKNOWN_MODEL = "unknown"  # a request counted before its model was resolved
# Every real (from, to) breaker transition, as metric label values.
BREAKER_TRANSITIONS = tuple(
    dict.fromkeys((s.value, t.value) for (s, _), t in TRANSITIONS.items() if s is not t)
)
# Reads and checks a rules file (path, CB_RULES_MAX_BYTES); a reload runs it off the loop.
RulesLoader = Callable[[Path, int | None], RuleSet]


def load_rules_file(path: Path, max_bytes: int | None) -> RuleSet:
    return load_rules(path, max_bytes=max_bytes)


@dataclass(slots=True)
class RequestInfo:
    """What the middleware needs to know about a request once its handler is done."""

    request_id: str
    model: str = UNKNOWN_MODEL  # a model name from the rules, never free text (metric label)
    stream: bool = False
    upstream_seconds: float | None = None


REQUEST_INFO = web.RequestKey("cb_info", RequestInfo)


def provider_keys(rules: RuleSet, environ: Mapping[str, str]) -> dict[str, str | None]:
    """Provider name -> key from its ``api_key_env`` (None when unset or not configured).

    A key goes into a request head verbatim: surrounding whitespace (a Secret made with
    ``echo``) is dropped, and a key that still holds anything but visible ASCII is refused,
    since CR or LF in it would end the header early (header injection). Never log the value.
    """
    keys: dict[str, str | None] = {}
    for name, p in rules.providers.items():
        raw = environ.get(p.api_key_env) if p.api_key_env else None
        key = raw.strip() if raw else None
        if key and not (key.isascii() and key.isprintable()):
            LOG.error(
                "provider %s: %s holds characters an HTTP header cannot carry; ignoring it",
                name,
                p.api_key_env,
            )
            key = None
        keys[name] = key or None
    return keys


def provider_overrides(rules: RuleSet) -> dict[str, BreakerOverrides]:
    """Each provider breaker's settings: the provider's, without the slow-call rule.

    Slow calls and stalls are a model's trouble (docs/breaker.md, 'Keys'): they count on the
    deployment breakers, which take the same section whole (``deployment_overrides``).
    """
    return {name: replace(p.breaker, slow_call_ms=None) for name, p in rules.providers.items()}


def deployments_of(rules: RuleSet) -> dict[str, Deployment]:
    """Every deployment of the rules by its key (``model@provider``): the deployment breakers."""
    return {d.key: d for m in rules.models.values() for d in m.deployments}


def deployment_overrides(rules: RuleSet) -> dict[str, BreakerOverrides]:
    """A deployment breaker runs on its provider's ``breaker`` section."""
    return {key: rules.providers[d.provider].breaker for key, d in deployments_of(rules).items()}


def first_token_timeouts(rules: RuleSet) -> dict[str, float]:
    """Each deployment's first-token timeout: its breaker judges stalls by it (docs/breaker.md)."""
    return {
        key: rules.providers[d.provider].timeouts.first_token
        for key, d in deployments_of(rules).items()
    }


@dataclass(eq=False)
class ProxyState:
    settings: Settings
    rules: RuleSet
    metrics: Metrics
    keys: dict[str, str | None] = field(default_factory=dict)
    # Finds the keys in what upstreams send back (proxy.core.secrets); rebuilt with the keys.
    redactor: Redactor = NO_SECRETS
    upstream: UpstreamPool | None = None  # the one upstream client (docs/upstream.md)
    usage: UsageTotals = field(default_factory=UsageTotals)
    api_listening: bool = False
    draining: bool = False
    in_flight: int = 0
    live_changes: int = 0  # bumped at every breaker transition and rules swap (``epoch``)
    retries_in_flight: int = 0
    max_in_flight: int = 0  # admission control (proxy.server.admission); 0 = no limit
    # Two levels (docs/breaker.md, 'Keys'): a breaker per provider (transport, credential) and
    # one per deployment, named ``model@provider`` (the model's own failures).
    breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    deployment_breakers: BreakerRegistry = field(default_factory=BreakerRegistry)
    gates: RateLimitGate = field(default_factory=RateLimitGate)
    # Streams' first-token times per deployment: adaptive deadlines, auto hedging.
    first_tokens: FirstTokenTimes = field(default_factory=FirstTokenTimes)
    breaker_defaults: CircuitBreakerConfig = field(default_factory=CircuitBreakerConfig)
    rng: random.Random = field(default_factory=random.Random)
    watchdog: Watchdog = field(default_factory=Watchdog)
    # Each rules reload attempt (True = swapped in), and a condition to wait on them.
    reload_results: list[bool] = field(default_factory=list)
    reloads: asyncio.Condition = field(default_factory=asyncio.Condition)
    # How a reload reads the file, in a worker thread (proxy.server.app.reload_rules_off_loop);
    # an injection point for tests that hold a reload in progress.
    rules_loader: RulesLoader = field(default_factory=lambda: load_rules_file)
    started_at: float = field(default_factory=time.time)
    _children: dict[tuple[str, str, int, str], tuple[Any, Any]] = field(default_factory=dict)
    _attempt_children: dict[tuple[str, str, str], tuple[Any, Any, Any]] = field(
        default_factory=dict
    )
    _usage_children: dict[tuple[str, str], tuple[Any, Any, Any]] = field(default_factory=dict)
    # Deployment breaker name -> (provider, model): its metric labels, values from the rules.
    _deployment_labels: dict[str, tuple[str, str]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.keys = provider_keys(self.rules, self.settings.environ)
        self.redactor = Redactor(self.keys.values())
        guard_secrets(self)  # the proxy's log lines go through self.redactor too
        self.breaker_defaults = CircuitBreakerConfig.from_env(self.settings.environ)
        defaults = self.rules.defaults
        self.first_tokens = FirstTokenTimes(defaults.first_token_deadline, defaults.hedge)
        self.breakers = BreakerRegistry(
            self.breaker_defaults,
            provider_overrides(self.rules),
            on_transition=self._on_transition,
        )
        self.deployment_breakers = BreakerRegistry(
            self.breaker_defaults,
            deployment_overrides(self.rules),
            first_token_seconds=first_token_timeouts(self.rules),
            on_transition=self._on_deployment_transition,
        )
        self._create_breakers()
        self.metrics.bind_breakers(self.breakers, self)
        self.metrics.in_flight.set_function(lambda: self.in_flight)

    def _create_breakers(self) -> None:
        # Every upstream gets its breaker (and its gauges) at load, not at first use,
        # so dashboards and alerts see idle upstreams too.
        for name in self.rules.providers:
            self.breakers.get_or_create(name)
        deployments = deployments_of(self.rules)
        if len(deployments) <= MODEL_SERIES_MAX:
            # A catalog over the cap gets its deployment breakers on first use instead.
            for dep in deployments.values():
                self.deployment_breaker(dep)
        self._init_series()

    def _init_series(self) -> None:
        """Every labelled series the alerts read, at 0, for the names in the rules in force."""
        rules = self.rules
        # A catalog over the cap has more deployments than models: none is listed then.
        small = len(rules.models) <= MODEL_SERIES_MAX
        self.metrics.init_series(
            upstreams=rules.providers,
            transitions=BREAKER_TRANSITIONS,
            deployments=[
                (d.provider, rules.providers[d.provider].type, d.model)
                for m in (rules.models.values() if small else ())
                for d in m.deployments
            ],
            models=[UNKNOWN_MODEL, *rules.models, *rules.virtual_models],
        )

    def _on_transition(self, name: str, source: State, target: State) -> None:
        self.live_changes += 1
        self.metrics.transitions.labels(name, source.value, target.value).inc()
        LOG.warning("breaker %s: %s -> %s", name, source.value, target.value)

    def _on_deployment_transition(self, name: str, source: State, target: State) -> None:
        self.live_changes += 1
        provider, model = self._deployment_labels.get(name, ("", name))
        self.metrics.deployment_transitions.labels(
            provider, model, source.value, target.value
        ).inc()
        LOG.warning("deployment breaker %s: %s -> %s", name, source.value, target.value)

    def breaker(self, provider: str) -> CircuitBreaker:
        return self.breakers.get_or_create(provider)

    def deployment_breaker(self, deployment: Deployment) -> CircuitBreaker:
        """The breaker of one model on one provider (created on first use)."""
        key = deployment.key
        breaker = self.deployment_breakers.get(key)
        if breaker is None:
            self._deployment_labels[key] = (deployment.provider, deployment.model)
            breaker = self.deployment_breakers.create(key)
        return breaker

    def deployments_on(self, provider: str) -> dict[str, CircuitBreaker]:
        """The deployment breakers of ``provider``'s models, by key."""
        return {
            key: breaker
            for key, breaker in self.deployment_breakers.get_all().items()
            if self._deployment_labels.get(key, ("", ""))[0] == provider
        }

    def deployment_facts(self, key: str) -> dict[str, Any]:
        """A deployment's labels and first-token figures, for the admin API."""
        provider, model = self._deployment_labels.get(key, ("", key))
        entry = self.rules.providers.get(provider)
        configured = entry.timeouts.first_token if entry is not None else 0.0
        snap = self.first_tokens.snapshot(key, configured)
        return {
            "upstream": provider,
            "model": model,
            "first_token": {
                "samples": snap.samples,
                "p50_ms": snap.p50_ms,
                "p95_ms": snap.p95_ms,
                "quantile_ms": snap.quantile_ms,
                "configured_deadline_ms": configured * 1000.0,
                # What the next stream to it waits for its first token (docs/breaker.md).
                "deadline_ms": self.first_tokens.deadline(key, configured) * 1000.0,
                "adaptive": snap.adaptive_ms is not None,
            },
        }

    def first_token_deadline(self, deployment: Deployment, configured: float) -> float:
        """Seconds a stream of ``deployment`` may wait for its first token (adaptive)."""
        return self.first_tokens.deadline(deployment.key, configured)

    def deployment_gauges(self) -> list[tuple[str, str, int, float, float]]:
        """(provider, model, state value, error rate, p95 ms) per deployment breaker."""
        labels = self._deployment_labels
        return [
            (*labels.get(name, ("", name)), state, rate, p95)
            for name, state, rate, p95 in self.deployment_breakers.breaker_gauges()
        ]

    def swap_rules(self, rules: RuleSet) -> None:
        keys = provider_keys(rules, self.settings.environ)
        self.breakers.configure(self.breaker_defaults, provider_overrides(rules))
        self.deployment_breakers.configure(
            self.breaker_defaults, deployment_overrides(rules), first_token_timeouts(rules)
        )
        self.first_tokens.configure(rules.defaults.first_token_deadline, rules.defaults.hedge)
        self.rules = rules
        self.keys = keys
        self.live_changes += 1
        self.redactor = Redactor(keys.values())
        self._create_breakers()

    def retry_budget(self, policy: RetryPolicy) -> float:
        """Retries (and hedges) in flight never exceed max(3, budget_ratio of active requests)
        (docs/breaker.md, 'Retries and failover')."""
        return max(RETRY_BUDGET_FLOOR, policy.budget_ratio * self.in_flight)

    def epoch(self) -> object:
        """Routing (LiveView): changes every LIVE_FACTS_SECONDS, at each transition and swap."""
        return (int(time.monotonic() / LIVE_FACTS_SECONDS), self.live_changes)

    def has_key(self, provider: Provider) -> bool:
        # A provider with no api_key_env (a local vLLM, a mock) needs no key.
        return provider.api_key_env is None or self.keys.get(provider.name) is not None

    def is_blocked(self, deployment: Deployment) -> bool:
        """Either of its breakers is open: its provider's or its own (docs/breaker.md, 'Keys')."""
        return not (
            self.breakers.get_or_create(deployment.provider).can_permit()
            and self.deployment_breaker(deployment).can_permit()
        )

    def record_attempt(
        self, provider: Provider, model: str, outcome: str, seconds: float, ttft: float | None
    ) -> None:
        """Count one upstream attempt; children bound once per label set."""
        key = (provider.name, model, outcome)
        children = self._attempt_children.get(key)
        if children is None:
            m = self.metrics
            children = (
                m.upstream_calls.labels(provider.name, provider.type, model, outcome),
                m.upstream_duration.labels(provider.name),
                m.time_to_first_token.labels(provider.name),
            )
            self._attempt_children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        if ttft is not None:
            children[2].observe(ttft)

    def record_request(self, endpoint: str, info: RequestInfo, status: int, seconds: float) -> None:
        """Count one finished client request; metric children are bound once per label set."""
        model = info.model
        stream = "true" if info.stream else "false"
        key = (endpoint, model, status // 100, stream)
        children = self._children.get(key)
        if children is None:
            m = self.metrics
            children = (
                m.requests.labels(endpoint, model, f"{status // 100}xx"),
                m.request_duration.labels(endpoint, stream),
            )
            self._children[key] = children
        children[0].inc()
        children[1].observe(seconds)
        upstream = info.upstream_seconds
        if upstream is not None:
            self.metrics.overhead.observe(max(0.0, seconds - upstream))

    def account(self, deployment: Deployment, usage: Usage, *, estimated: bool = False) -> float:
        """Add one request's tokens and cost to the totals and the metrics; return the cost."""
        cost = self.usage.add(deployment, usage, estimated=estimated)
        key = (deployment.provider, deployment.model)
        children = self._usage_children.get(key)
        if children is None:
            m = self.metrics
            children = (
                m.tokens.labels(deployment.provider, deployment.model, "prompt"),
                m.tokens.labels(deployment.provider, deployment.model, "completion"),
                m.cost.labels(deployment.provider, deployment.model),
            )
            self._usage_children[key] = children
        children[0].inc(usage.prompt_tokens)
        children[1].inc(usage.completion_tokens)
        children[2].inc(cost)
        return cost

    async def wait_reloads(self, count: int) -> list[bool]:
        """Wait until ``count`` reload attempts happened (for tests and the demo)."""
        async with self.reloads:
            await self.reloads.wait_for(lambda: len(self.reload_results) >= count)
            return list(self.reload_results)

    @property
    def ready(self) -> bool:
        return self.api_listening and not self.draining

    def latency_ms(self, deployment: Deployment) -> float | None:
        """Routing (LiveView): the upstream's live p95 in ms; None until measured."""
        p95 = self.deployment_breaker(deployment).latency_p95_ms()
        return p95 if p95 >= 0 else None

    def success_ratio(self, deployment: Deployment) -> float | None:
        """Routing (LiveView): success share in the breaker window; None until the window
        holds ``min_throughput`` calls, the sample the breaker itself judges a rate on
        (a single early failure must not reorder deployments)."""
        rate = self.deployment_breaker(deployment).error_rate()
        return 1.0 - rate if rate >= 0 else None
