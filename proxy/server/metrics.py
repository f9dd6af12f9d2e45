"""Every Prometheus metric the proxy exports, on an injected registry.

Names are public contract (docs/architecture.md, 'Metrics'): the alert rules in
deploy/prometheus and the dashboard in deploy/grafana read them. Label values
come only from small fixed sets (upstream and model names from the rules,
outcome, code class, reason): never from free text, so cardinality is bounded
by the rules file.

Hot path: the per-request counters and histograms are ``LeanCounter`` and
``LeanHistogram``: plain attribute updates without prometheus_client's lock
and checks (the proxy runs on one event loop thread, so nothing races), read
by a collector at scrape time. Their exposition is the standard one (`_total`,
`_bucket`/`_sum`/`_count`). Children for a label set are bound once and cached.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString as _float_to_go

# prometheus_client's formatter for bucket bounds ("0.005", "1.0", "+Inf"), typed.
_go_float: Callable[[float], str] = _float_to_go

# Buckets in seconds: LLM calls range from tens of ms (embeddings) to minutes (long streams).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
# The proxy's own overhead should be well under a millisecond.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)


# The label values every series is created with at 0 (``Metrics.init_series``), so that
# ``increase()`` and ``rate()`` in deploy/prometheus/alerts.yml see the first event: a
# series born with its first increment has no earlier sample to grow from.
ENDPOINTS = ("chat", "completions", "embeddings")  # proxy.server.app.ENDPOINT_NAMES
CODE_CLASSES = ("2xx", "3xx", "4xx", "5xx")
STREAM_VALUES = ("false", "true")
TOKEN_KINDS = ("prompt", "completion")
# An attempt's outcome: proxy.core.outcome.Outcome, plus proxy.server.exchange.LOCAL_FAILURE.
UPSTREAM_OUTCOMES = ("success", "failure", "rate_limited", "ignored", "local_failure")
# Why a candidate was skipped without I/O (proxy.server.forward).
REJECTION_REASONS = ("breaker_open", "rate_limited")
HEDGE_RESULTS = ("won", "lost", "failed")
# Mid-stream continuation (proxy.server.continuation): how, and how it ended ("none": no
# candidate was tried, e.g. the stream was ineligible or the retry budget was spent).
CONTINUATION_METHODS = ("prefill", "restart", "none")
CONTINUATION_RESULTS = ("continued", "mismatch", "failed", "ineligible")
# Series labelled by model are created ahead only for a catalog up to this many models and
# deployments: a sidecar's catalog has tens; a shared catalog of thousands would export
# tens of thousands of zeros. Beyond it those series appear on first use, as before.
MODEL_SERIES_MAX = 500


class BreakerView(Protocol):
    """What the breaker gauges read at scrape time; the core's breaker registry provides it."""

    def breaker_gauges(self) -> Iterable[tuple[str, int, float, float]]:
        """(upstream, state value, error rate 0..1 or -1, p95 latency ms or -1) per upstream."""
        ...

    def breaker_counters(self) -> Iterable[tuple[str, int]]:
        """(upstream, calls the breaker would have rejected in monitor-only mode) per upstream."""
        ...


class DeploymentBreakerView(Protocol):
    """The deployment breakers (docs/breaker.md, 'Keys'), read at scrape time."""

    def deployment_gauges(self) -> Iterable[tuple[str, str, int, float, float]]:
        """(upstream, model, state value, error rate or -1, p95 ms or -1) per deployment."""
        ...


class _BreakerCollector(Collector):
    """Reads breaker state lazily at scrape time (docs/breaker.md: no timers needed)."""

    def __init__(
        self,
        source: Callable[[], BreakerView | None],
        deployments: Callable[[], DeploymentBreakerView | None],
    ) -> None:
        self._source = source
        self._deployments = deployments

    def collect(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        state = GaugeMetricFamily(
            "circuit_breaker_state",
            "Breaker state per upstream: 0 closed, 1 half-open, 2 open.",
            labels=["upstream"],
        )
        rate = GaugeMetricFamily(
            "circuit_breaker_error_rate",
            "Failure ratio 0..1 over the breaker window; -1 below min_throughput.",
            labels=["upstream"],
        )
        p95 = GaugeMetricFamily(
            "circuit_breaker_latency_p95",
            "p95 upstream latency in milliseconds over the breaker window; -1 with no data.",
            labels=["upstream"],
        )
        would_block = CounterMetricFamily(
            "circuit_breaker_would_block",
            "Monitor-only mode: calls the breaker would have rejected.",
            labels=["upstream"],
        )
        view = self._source()
        if view is not None:
            for upstream, state_value, error_rate, latency in view.breaker_gauges():
                state.add_metric([upstream], state_value)
                rate.add_metric([upstream], error_rate)
                p95.add_metric([upstream], latency)
            for upstream, count in view.breaker_counters():
                would_block.add_metric([upstream], count)
        # The deployment level: the upstream's label plus the model's, both from the rules.
        d_state = GaugeMetricFamily(
            "circuit_breaker_deployment_state",
            "Breaker state per deployment (model on upstream): 0 closed, 1 half-open, 2 open.",
            labels=["upstream", "model"],
        )
        d_rate = GaugeMetricFamily(
            "circuit_breaker_deployment_error_rate",
            "Failure ratio 0..1 of one deployment over its breaker window; -1 below "
            "min_throughput.",
            labels=["upstream", "model"],
        )
        d_p95 = GaugeMetricFamily(
            "circuit_breaker_deployment_latency_p95",
            "p95 time to first token of one deployment in milliseconds; -1 with no data.",
            labels=["upstream", "model"],
        )
        deployments = self._deployments()
        if deployments is not None:
            for (
                upstream,
                model,
                state_value,
                error_rate,
                latency,
            ) in deployments.deployment_gauges():
                d_state.add_metric([upstream, model], state_value)
                d_rate.add_metric([upstream, model], error_rate)
                d_p95.add_metric([upstream, model], latency)
        return [state, rate, p95, would_block, d_state, d_rate, d_p95]

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []


class CounterChild:
    __slots__ = ("value",)

    def __init__(self) -> None:
        self.value = 0.0

    def inc(self, amount: float = 1.0) -> None:
        self.value += amount


class HistogramChild:
    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last slot is +Inf
        self.sum = 0.0

    def observe(self, value: float) -> None:
        # Prometheus buckets are upper-inclusive (le): bisect_left finds the first bound >= value.
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


class _LeanFamily(Collector):
    """A labelled metric family whose children are plain objects, exported at scrape time."""

    def __init__(
        self, name: str, documentation: str, labelnames: Sequence[str], registry: CollectorRegistry
    ) -> None:
        self.name = name
        self.documentation = documentation
        self.labelnames = tuple(labelnames)
        self._children: dict[tuple[str, ...], CounterChild | HistogramChild] = {}
        registry.register(self)

    def describe(self) -> Iterable[Metric]:
        return [self._family()]

    def _family(self) -> Metric:
        raise NotImplementedError


class LeanCounter(_LeanFamily):
    def labels(self, *values: str) -> CounterChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = CounterChild()
        return child  # type: ignore[return-value]

    def inc(self, amount: float = 1.0) -> None:
        self.labels().inc(amount)

    def _family(self) -> CounterMetricFamily:
        return CounterMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        for values, child in self._children.items():
            family.add_metric(list(values), child.value)  # type: ignore[union-attr]
        return [family]


class LeanHistogram(_LeanFamily):
    def __init__(
        self,
        name: str,
        documentation: str,
        labelnames: Sequence[str],
        registry: CollectorRegistry,
        buckets: Sequence[float],
    ) -> None:
        self.bounds = tuple(float(b) for b in buckets)
        super().__init__(name, documentation, labelnames, registry)

    def labels(self, *values: str) -> HistogramChild:
        child = self._children.get(values)
        if child is None:
            if len(values) != len(self.labelnames):
                raise ValueError(f"{self.name}: expected labels {self.labelnames}, got {values}")
            child = self._children[values] = HistogramChild(self.bounds)
        return child  # type: ignore[return-value]

    def observe(self, value: float) -> None:
        self.labels().observe(value)

    def _family(self) -> HistogramMetricFamily:
        return HistogramMetricFamily(self.name, self.documentation, labels=self.labelnames)

    def collect(self) -> Iterable[Metric]:
        family = self._family()
        edges = [*(_go_float(b) for b in self.bounds), "+Inf"]
        for values, child in self._children.items():
            counts = child.counts  # type: ignore[union-attr]
            cumulative, running = [], 0
            for edge, count in zip(edges, counts, strict=True):
                running += count
                cumulative.append((edge, float(running)))
            family.add_metric(list(values), cumulative, child.sum)  # type: ignore[union-attr]
        return [family]


class Metrics:
    """All metric objects; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._breaker_view: BreakerView | None = None
        self._deployment_view: DeploymentBreakerView | None = None
        r.register(_BreakerCollector(lambda: self._breaker_view, lambda: self._deployment_view))

        self.requests = LeanCounter(
            "cb_proxy_requests_total",
            "Client requests by endpoint, requested model (from the rules) and status class.",
            ["endpoint", "model", "code_class"],
            r,
        )
        self.request_duration = LeanHistogram(
            "cb_proxy_request_duration_seconds",
            "Client request duration, until the last byte was sent.",
            ["endpoint", "stream"],
            r,
            REQUEST_BUCKETS,
        )
        self.in_flight = Gauge(
            "cb_proxy_in_flight_requests", "Client requests being served.", registry=r
        )
        self.upstream_calls = LeanCounter(
            "cb_proxy_upstream_calls_total",
            "Upstream attempts by outcome (success, failure, rate_limited, ignored).",
            ["upstream", "provider", "model", "outcome"],
            r,
        )
        self.upstream_duration = LeanHistogram(
            "cb_proxy_upstream_duration_seconds",
            "Upstream attempt duration, until its last byte.",
            ["upstream"],
            r,
            REQUEST_BUCKETS,
        )
        self.time_to_first_token = LeanHistogram(
            "cb_proxy_time_to_first_token_seconds",
            "Time from sending upstream to the response headers (plain) "
            "or the first content event (stream).",
            ["upstream"],
            r,
            TTFT_BUCKETS,
        )
        self.overhead = LeanHistogram(
            "cb_proxy_overhead_seconds",
            "The proxy's own time per request: total minus time spent waiting on upstreams.",
            (),
            r,
            OVERHEAD_BUCKETS,
        )
        self.transitions = Counter(
            "circuit_breaker_transitions_total",
            "Breaker state transitions.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.deployment_transitions = Counter(
            "circuit_breaker_deployment_transitions_total",
            "Deployment breaker state transitions.",
            ["upstream", "model", "from_state", "to_state"],
            registry=r,
        )
        self.fallbacks = LeanCounter(
            "cb_proxy_fallbacks_total",
            "Requests served by a candidate other than the first: "
            "which upstream stood in for which.",
            ["primary", "served_by"],
            r,
        )
        self.retries = LeanCounter(
            "cb_proxy_retries_total",
            "Retries on the same deployment.",
            ["upstream"],
            r,
        )
        self.hedges = LeanCounter(
            "cb_proxy_hedges_total",
            "Hedged streams by the request's first upstream and how the hedge ended "
            "(won: it served; lost: the first attempt did; failed: neither).",
            ["upstream", "result"],
            r,
        )
        self.continuations = LeanCounter(
            "cb_proxy_stream_continuations_total",
            "Committed streams that failed and were continued (or not) on another candidate, "
            "by the failed stream's upstream, method and result.",
            ["upstream", "method", "result"],
            r,
        )
        self.rejections = LeanCounter(
            "cb_proxy_rejections_total",
            "Candidates skipped without upstream I/O, by reason (breaker_open, rate_limited, ...).",
            ["upstream", "reason"],
            r,
        )
        self.tokens = LeanCounter(
            "cb_proxy_tokens_total",
            "Tokens accounted, by provider, model and kind (prompt, completion).",
            ["provider", "model", "kind"],
            r,
        )
        self.cost = LeanCounter(
            "cb_proxy_cost_usd_total",
            "Cost in USD from the rules' price table.",
            ["provider", "model"],
            r,
        )
        self.health_checks = Counter(
            "cb_proxy_health_checks_total",
            "Active health checks by result (pass, fail, ignored, skipped).",
            ["upstream", "result"],
            registry=r,
        )
        self.rules_reloads = Counter(
            "cb_proxy_rules_reloads_total",
            "Rules file reloads by result (ok, error).",
            ["result"],
            registry=r,
        )
        for result in ("ok", "error"):  # both series exist from the start, at 0, for alerts
            self.rules_reloads.labels(result)
        self.rules_info = Gauge(
            "cb_proxy_rules_loaded_timestamp_seconds",
            "Unix time the rules in force were loaded.",
            registry=r,
        )

    def bind_breakers(
        self, view: BreakerView, deployments: DeploymentBreakerView | None = None
    ) -> None:
        self._breaker_view = view
        self._deployment_view = deployments

    def init_series(
        self,
        upstreams: Iterable[str],
        transitions: Iterable[tuple[str, str]],
        deployments: Sequence[tuple[str, str, str]],
        models: Sequence[str],
    ) -> None:
        """Create at 0 every series the alerts and the dashboard read, for these label values.

        ``upstreams``: the provider names; ``transitions``: every (from, to) state pair the
        breaker can take; ``deployments``: (provider name, provider type, model) per
        deployment; ``models``: the names a request is counted under (models and virtual
        models). Idempotent: run at start and again after each reload, for new names.
        """
        upstreams = list(upstreams)
        transitions = list(transitions)
        for upstream in upstreams:
            for source, target in transitions:
                self.transitions.labels(upstream, source, target)
            for reason in REJECTION_REASONS:
                self.rejections.labels(upstream, reason)
            self.retries.labels(upstream)
            for result in HEDGE_RESULTS:
                self.hedges.labels(upstream, result)
            for method in CONTINUATION_METHODS:
                for outcome in CONTINUATION_RESULTS:
                    self.continuations.labels(upstream, method, outcome)
            self.upstream_duration.labels(upstream)
            self.time_to_first_token.labels(upstream)
            for served_by in upstreams:
                self.fallbacks.labels(upstream, served_by)
        for endpoint in ENDPOINTS:
            for stream in STREAM_VALUES:
                self.request_duration.labels(endpoint, stream)
        self.overhead.labels()
        if len(deployments) > MODEL_SERIES_MAX or len(models) > MODEL_SERIES_MAX:
            return
        for provider, provider_type, model in deployments:
            for source, target in transitions:
                self.deployment_transitions.labels(provider, model, source, target)
            for outcome in UPSTREAM_OUTCOMES:
                self.upstream_calls.labels(provider, provider_type, model, outcome)
            for kind in TOKEN_KINDS:
                self.tokens.labels(provider, model, kind)
            self.cost.labels(provider, model)
        for model in models:
            for endpoint in ENDPOINTS:
                for code_class in CODE_CLASSES:
                    self.requests.labels(endpoint, model, code_class)
