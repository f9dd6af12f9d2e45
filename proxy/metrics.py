"""Every Prometheus metric the proxy exports, on an injected registry.

Names are public contract (design.md, 'Metrics'): the alert rules in
deploy/prometheus and the dashboard in deploy/grafana read them. Label values
come only from small fixed sets (upstream and model names from the rules,
outcome, code class, reason): never from free text, so cardinality is bounded
by the rules file.

Hot path: children for a label set are bound once and cached in a dict, so a
request pays a dict lookup, not prometheus_client's label resolution.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

# Buckets in seconds: LLM calls range from tens of ms (embeddings) to minutes (long streams).
REQUEST_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30)
# The proxy's own overhead should be well under a millisecond.
OVERHEAD_BUCKETS = (0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05)

# Breaker state gauge values (design.md): 0 closed, 1 half-open, 2 open.
STATE_VALUES = {"closed": 0, "half_open": 1, "open": 2, "forced_open": 2, "disabled": 0}


class BreakerView:
    """What the breaker gauges read at scrape time; implemented by the breaker registry."""

    def breaker_gauges(self) -> Iterable[tuple[str, int, float, float]]:
        """(upstream, state value, error rate 0..1 or -1, p95 latency ms or -1) per upstream."""
        return ()

    def breaker_counters(self) -> Iterable[tuple[str, int]]:
        """(upstream, calls the breaker would have rejected in monitor-only mode) per upstream."""
        return ()


class _BreakerCollector(Collector):
    """Reads breaker state lazily at scrape time (breaker.md: no timers needed)."""

    def __init__(self, source: Callable[[], BreakerView | None]) -> None:
        self._source = source

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
        return [state, rate, p95, would_block]

    def describe(self) -> Iterable[GaugeMetricFamily | CounterMetricFamily]:
        return []


class Metrics:
    """All metric objects; one instance per app, on its own registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._breaker_view: BreakerView | None = None
        r.register(_BreakerCollector(lambda: self._breaker_view))

        self.requests = Counter(
            "cb_proxy_requests_total",
            "Client requests by endpoint, requested model (from the rules) and status class.",
            ["endpoint", "model", "code_class"],
            registry=r,
        )
        self.request_duration = Histogram(
            "cb_proxy_request_duration_seconds",
            "Client request duration, until the last byte was sent.",
            ["endpoint", "stream"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.in_flight = Gauge(
            "cb_proxy_in_flight_requests", "Client requests being served.", registry=r
        )
        self.upstream_calls = Counter(
            "cb_proxy_upstream_calls_total",
            "Upstream attempts by outcome (success, failure, rate_limited, ignored).",
            ["upstream", "provider", "model", "outcome"],
            registry=r,
        )
        self.upstream_duration = Histogram(
            "cb_proxy_upstream_duration_seconds",
            "Upstream attempt duration, until its last byte.",
            ["upstream"],
            buckets=REQUEST_BUCKETS,
            registry=r,
        )
        self.time_to_first_token = Histogram(
            "cb_proxy_time_to_first_token_seconds",
            "Time from sending upstream to the response headers (plain) "
            "or the first content event (stream).",
            ["upstream"],
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.overhead = Histogram(
            "cb_proxy_overhead_seconds",
            "The proxy's own time per request: total minus time spent waiting on upstreams.",
            buckets=OVERHEAD_BUCKETS,
            registry=r,
        )
        self.transitions = Counter(
            "circuit_breaker_transitions_total",
            "Breaker state transitions.",
            ["upstream", "from_state", "to_state"],
            registry=r,
        )
        self.fallbacks = Counter(
            "cb_proxy_fallbacks_total",
            "Requests served by a candidate other than the first: "
            "which upstream stood in for which.",
            ["primary", "served_by"],
            registry=r,
        )
        self.retries = Counter(
            "cb_proxy_retries_total",
            "Retries on the same deployment.",
            ["upstream"],
            registry=r,
        )
        self.rejections = Counter(
            "cb_proxy_rejections_total",
            "Candidates skipped without upstream I/O, by reason (breaker_open, rate_limited, ...).",
            ["upstream", "reason"],
            registry=r,
        )
        self.tokens = Counter(
            "cb_proxy_tokens_total",
            "Tokens accounted, by provider, model and kind (prompt, completion).",
            ["provider", "model", "kind"],
            registry=r,
        )
        self.cost = Counter(
            "cb_proxy_cost_usd_total",
            "Cost in USD from the rules' price table.",
            ["provider", "model"],
            registry=r,
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
        self.rules_info = Gauge(
            "cb_proxy_rules_loaded_timestamp_seconds",
            "Unix time the rules in force were loaded.",
            registry=r,
        )

    def bind_breakers(self, view: BreakerView) -> None:
        self._breaker_view = view
