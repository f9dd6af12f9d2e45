"""The rules file: YAML -> validated, frozen ``RuleSet``.

This module is the one declaration of the rules: every key is a dataclass
field (its name is the YAML key), and every numeric key carries its type,
range, default and meaning as a ``Spec`` (proxy/config/spec.py). The checker
(proxy/config/check.py) and the runtime breaker settings
(proxy/core/breaker.py) are both built from it; docs/rules.md is its reference.

Contract (see docs/rules.md):

- Every key is known. An unknown key is an error with its path and, when a
  known key is close, a suggestion (``models.gpt-4o.deployments[1].prvider:
  unknown key, did you mean 'provider'?``). Nothing is silently ignored, and
  duplicate YAML keys are a syntax error rather than "last one wins".
- Every problem is reported at once: parsing never stops at the first one, and
  a broken entry does not cascade into "unknown name" problems elsewhere (a
  declared name stays referable even when its body is invalid).
- A RuleSet is immutable once built (frozen dataclasses, read-only mappings)
  and carries the lookup tables the hot path needs: ``model_index`` (name and
  alias -> canonical name) and route globs compiled when a ``Route`` is
  constructed, so a request does dictionary lookups and precompiled regex
  matches only.
- Normalisation done here, once: ``base_url`` has no trailing slash, route
  header names are lower-case, a short-form model becomes one Deployment, a
  long-form deployment inherits unset fields from its model, a virtual
  model's ``candidates`` are canonical model names (aliases resolved).
- In YAML, ``key: null`` (or an empty value) on an optional key means "not
  given".

The module is pure (no aiohttp, no I/O except ``load_rules`` and
``file_fingerprint``); the reload loop lives in the app shell.
"""

from __future__ import annotations

import fnmatch
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Final, Literal

from proxy.config.spec import Int, Num, Spec

ProviderType = Literal["openai", "anthropic", "gemini"]
Strategy = Literal[
    "cost_optimized", "performance_first", "balanced", "reliability_first", "task_specific"
]
TaskType = Literal["chat", "coding", "analysis", "creative"]
# The OpenAI endpoints a model serves (models.*.endpoints): /v1/chat/completions,
# /v1/completions, /v1/embeddings. The router never sends a request to a model that does
# not serve its endpoint.
ModelEndpoint = Literal["chat", "completions", "embeddings"]
MODEL_ENDPOINTS: tuple[ModelEndpoint, ...] = ("chat", "completions", "embeddings")

STRATEGIES: tuple[Strategy, ...] = (
    "cost_optimized",
    "performance_first",
    "balanced",
    "reliability_first",
    "task_specific",
)
TASK_TYPES: tuple[TaskType, ...] = ("chat", "coding", "analysis", "creative")
PROVIDER_TYPES: tuple[ProviderType, ...] = ("openai", "anthropic", "gemini")

# Provider types whose wire format puts the upstream model in the URL path (Gemini:
# /v1beta/models/{model}:generateContent); the others send it in the JSON body, where any
# name goes (OpenAI-compatible names such as 'meta-llama/Llama-3-70b' hold a '/').
MODEL_IN_PATH_TYPES: tuple[ProviderType, ...] = ("gemini",)
# Gemini's resource prefix: 'models/gemini-1.5-pro' is accepted and sent as 'gemini-1.5-pro'.
MODEL_PATH_PREFIX = "models/"

# The one declaration of the rules' keys, types, ranges and defaults is this
# module: every numeric field carries its ``Spec`` (proxy/config/spec.py) and
# its default; docs/rules.md is the reference written from it.
SUPPORTED_VERSION = 1
WINDOW_SECONDS_MAX = 3600.0
# Sane maxima: a typo (an extra zero, seconds given as ms) is a check error, not a breaker that
# stays open for a year or a timer that never fires. Each is far beyond any real setting
# (docs/rules.md, "General rules": upper bounds).
DAY_SECONDS = 86_400.0  # timeouts, open periods, health-check interval
HOUR_MS = 3_600_000.0  # latencies in ms
# ``hedge_after_ms: auto``: the deployment's live p95 time to first token times ``hedge.factor``.
HEDGE_AUTO: Final = "auto"
HedgeAfter = float | Literal["auto"] | None
FACTOR_MAX = 100.0
SAMPLES_MAX = 100_000
# A retry backoff is waited inside one client request: a minute, like max_retry_wait.
RETRY_BACKOFF_MS_MAX = 60_000.0
COUNT_MAX = 1_000_000  # failure counts, calls in the window
PROBES_MAX = 1_000  # half-open trial calls let through at once
# The largest context windows are a few million tokens (Gemini 2M, Llama 4 Scout 10M).
CONTEXT_WINDOW_MAX = 100_000_000
# The dearest models cost well under 1 USD per 1k tokens; 1,000 USD is a slipped unit.
USD_PER_1K_MAX = 1_000.0
WEIGHT_MAX = 1_000.0  # balanced weights are relative: only their ratios matter
# models.*.quality: a score per task type (keys: TASK_TYPES).
QUALITY: Spec = Num(ge=0, le=10, doc="score per task type (chat, coding, analysis, creative)")


class RulesError(Exception):
    """A rules file with problems; ``problems`` lists each as 'path: message'."""

    def __init__(self, problems: list[str], source: str = "<rules>") -> None:
        self.problems = problems
        self.source = source
        super().__init__(f"{source}: {len(problems)} problem(s):\n" + "\n".join(problems))


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Per-phase upstream timeouts in seconds (docs/breaker.md, 'Retries and failover')."""

    connect: Annotated[
        float,
        Num(
            gt=0,
            le=DAY_SECONDS,
            at_most="total",
            doc="seconds to open the connection (TCP and TLS)",
        ),
    ] = 5.0
    first_token: Annotated[
        float,
        Num(
            gt=0,
            le=DAY_SECONDS,
            at_most="total",
            doc="seconds until the response headers (plain) or the first content event (stream)",
        ),
    ] = 30.0
    idle: Annotated[
        float,
        Num(gt=0, le=DAY_SECONDS, at_most="total", doc="longest silence between two stream events"),
    ] = 30.0
    total: Annotated[float, Num(gt=0, le=DAY_SECONDS, doc="seconds for the whole attempt")] = 600.0


@dataclass(frozen=True, slots=True)
class BreakerOverrides:
    """Per-provider breaker settings given in the rules; None = use the env/default."""

    failure_threshold: Annotated[
        int | None,
        Int(
            ge=0,
            le=COUNT_MAX,
            default=5,
            doc="consecutive failures that open the breaker; 0 = rule off",
        ),
    ] = None
    failure_rate: Annotated[
        float | None,
        Num(gt=0, le=1, default=0.5, doc="failure ratio in the window that opens the breaker"),
    ] = None
    min_throughput: Annotated[
        int | None,
        Int(
            ge=1, le=COUNT_MAX, default=10, doc="calls in the window before failure_rate is judged"
        ),
    ] = None
    # The window is a ring of 1 s buckets allocated per breaker: at least one
    # bucket, and an hour at most (an extra zero must not allocate millions).
    window_seconds: Annotated[
        float | None,
        Num(ge=1, le=WINDOW_SECONDS_MAX, default=60.0, doc="length of the sliding window"),
    ] = None
    open_seconds: Annotated[
        float | None,
        Num(gt=0, le=DAY_SECONDS, default=10.0, doc="first open period; doubles per re-open"),
    ] = None
    max_open_seconds: Annotated[
        float | None,
        Num(
            gt=0,
            le=DAY_SECONDS,
            default=60.0,
            at_least="open_seconds",
            doc="cap on every open period, the first one included",
        ),
    ] = None
    half_open_probes: Annotated[
        int | None, Int(ge=1, le=PROBES_MAX, default=3, doc="trial calls let through in half-open")
    ] = None
    slow_call_ms: Annotated[
        float | None,
        Num(
            ge=0,
            le=HOUR_MS,
            default=0.0,
            doc="a first token slower than this counts as a failure; 0 = off",
        ),
    ] = None
    max_half_open_seconds: Annotated[
        float | None,
        Num(
            gt=0,
            le=DAY_SECONDS,
            default=120.0,
            doc="a probe in flight longer than this reopens the breaker",
        ),
    ] = None


@dataclass(frozen=True, slots=True)
class HealthCheck:
    path: str | None = None  # None = the provider type's models endpoint
    interval: Annotated[
        float | None,
        Num(
            ge=0,
            le=DAY_SECONDS,
            doc="seconds between active checks; 0 = off; unset = HEALTH_CHECK_INTERVAL",
        ),
    ] = None


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
    # Whether a stream continuation may send this upstream a trailing assistant message to
    # continue (docs/breaker.md, "Mid-stream continuation"); None = the type's own: true for
    # anthropic, false for openai (then the DeepSeek/Mistral ``prefix: true`` form) and gemini.
    prefill: bool | None = None


@dataclass(frozen=True, slots=True)
class Deployment:
    """One upstream serving one model: the unit the router orders and the breaker keys."""

    model: str  # the client-facing model name this deployment serves
    provider: str  # key into RuleSet.providers
    upstream_model: str
    input_cost_per_1k: Annotated[
        float, Num(ge=0, le=USD_PER_1K_MAX, doc="USD per 1k prompt tokens")
    ] = 0.0
    output_cost_per_1k: Annotated[
        float, Num(ge=0, le=USD_PER_1K_MAX, doc="USD per 1k completion tokens")
    ] = 0.0
    latency_ms: Annotated[
        float | None,
        Num(gt=0, le=HOUR_MS, doc="latency prior in ms, used until latency is measured"),
    ] = None
    context_window: Annotated[
        int | None, Int(ge=1, le=CONTEXT_WINDOW_MAX, doc="largest prompt in tokens")
    ] = None

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
    # The endpoints it serves (MODEL_ENDPOINTS); empty = not declared: any endpoint.
    endpoints: tuple[ModelEndpoint, ...] = ()
    # False: a stream of this model that fails mid-way is not continued, and this model does
    # not continue another's (docs/breaker.md, "Mid-stream continuation"); None = inherit.
    continuation: bool | None = None

    def serves(self, endpoint: str) -> bool:
        return not self.endpoints or endpoint in self.endpoints


@dataclass(frozen=True, slots=True)
class CostCap:
    """Max USD per 1k tokens, for input and for output."""

    input: Annotated[float, Num(ge=0, le=USD_PER_1K_MAX, doc="max USD per 1k prompt tokens")]
    output: Annotated[float, Num(ge=0, le=USD_PER_1K_MAX, doc="max USD per 1k completion tokens")]


@dataclass(frozen=True, slots=True)
class VirtualModel:
    name: str
    strategy: Strategy
    task_type: TaskType | None = None
    candidates: tuple[str, ...] | None = None  # None = every model in the catalog
    max_cost_per_1k_tokens: CostCap | None = None
    max_latency_ms: Annotated[
        float | None,
        Num(gt=0, le=HOUR_MS, doc="a deployment qualifies when its p95 latency is at most this"),
    ] = None
    fallback_models: tuple[str, ...] = ()
    description: str = ""
    # Hedged first token (docs/breaker.md, 'Hedging'): ms, or "auto"; None = no hedging.
    hedge_after_ms: HedgeAfter = None


def _compile_glob(pattern: str, *, ignore_case: bool = False) -> re.Pattern[str]:
    return re.compile(fnmatch.translate(pattern), re.IGNORECASE if ignore_case else 0)


@dataclass(frozen=True, slots=True)
class Route:
    """One routing rule. Globs are compiled here, at construction (= load) time.

    ``model_glob`` is matched case-sensitively with fnmatch semantics; header
    names are stored lower-cased and looked up that way, header values are
    globs matched case-sensitively. A listed header that is absent never
    matches, even for the glob ``*``.
    """

    model_glob: str | None  # None = any model
    headers: tuple[tuple[str, str], ...]  # (lower-cased header name, glob)
    rewrite_model: str | None
    fallbacks: tuple[str, ...] = ()
    continuation: bool | None = None  # None = defaults.continuation
    # Hedged first token (docs/breaker.md, 'Hedging'): ms, or "auto"; None = no hedging.
    hedge_after_ms: HedgeAfter = None
    _model_re: re.Pattern[str] | None = field(init=False, repr=False, compare=False)
    _header_res: tuple[tuple[str, re.Pattern[str]], ...] = field(
        init=False, repr=False, compare=False
    )

    def __post_init__(self) -> None:
        model_re = _compile_glob(self.model_glob) if self.model_glob is not None else None
        header_res = tuple((name.lower(), _compile_glob(glob)) for name, glob in self.headers)
        object.__setattr__(self, "_model_re", model_re)
        object.__setattr__(self, "_header_res", header_res)

    def matches(self, model: str, headers: Mapping[str, str]) -> bool:
        """``headers``: a case-insensitive mapping (aiohttp's CIMultiDictProxy) or
        a plain dict with lower-case keys."""
        if self._model_re is not None and self._model_re.match(model) is None:
            return False
        for name, value_re in self._header_res:
            value = headers.get(name)
            if value is None or value_re.match(value) is None:
                return False
        return True


@dataclass(frozen=True, slots=True)
class Weights:
    quality: Annotated[
        float, Num(ge=0, le=WEIGHT_MAX, doc="weight of the task's quality score")
    ] = 0.4
    cost: Annotated[float, Num(ge=0, le=WEIGHT_MAX, doc="weight of cheapness")] = 0.3
    latency: Annotated[float, Num(ge=0, le=WEIGHT_MAX, doc="weight of speed (p95 latency)")] = 0.2
    reliability: Annotated[float, Num(ge=0, le=WEIGHT_MAX, doc="weight of the success ratio")] = 0.1


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    # Upper bounds catch typos (an extra zero) without limiting real setups.
    max_attempts: Annotated[
        int, Int(ge=1, le=20, doc="attempts per request across all candidates")
    ] = 4
    same_deployment_retries: Annotated[
        int, Int(ge=0, le=5, doc="quick retries on the same deployment before failing over")
    ] = 1
    max_retry_wait: Annotated[
        float, Num(ge=0, le=60, doc="longest Retry-After (s) still retried on the same deployment")
    ] = 3.0
    backoff_ms: Annotated[
        float, Num(ge=0, le=RETRY_BACKOFF_MS_MAX, doc="smallest retry backoff (full jitter)")
    ] = 100.0
    max_backoff_ms: Annotated[
        float,
        Num(ge=0, le=RETRY_BACKOFF_MS_MAX, at_least="backoff_ms", doc="largest retry backoff"),
    ] = 500.0
    budget_ratio: Annotated[
        float, Num(ge=0, le=1, doc="retries in flight as a share of active requests (min 3)")
    ] = 0.2
    quick_failure_ms: Annotated[
        float,
        Num(
            ge=0,
            le=RETRY_BACKOFF_MS_MAX,
            doc="an attempt that failed later than this is never retried on the same deployment",
        ),
    ] = 2000.0


@dataclass(frozen=True, slots=True)
class HedgePolicy:
    """How ``hedge_after_ms: auto`` is worked out (docs/breaker.md, 'Hedging')."""

    factor: Annotated[
        float,
        Num(gt=0, le=FACTOR_MAX, doc="auto hedges after the p95 time to first token times this"),
    ] = 2.0
    min_ms: Annotated[
        float, Num(ge=0, le=HOUR_MS, doc="auto never hedges sooner than this many ms")
    ] = 250.0
    min_samples: Annotated[
        int,
        Int(ge=1, le=SAMPLES_MAX, doc="first tokens measured on a deployment before auto hedges"),
    ] = 20


@dataclass(frozen=True, slots=True)
class AdaptiveDeadline:
    """The first-token deadline each deployment earns from its history (docs/breaker.md)."""

    factor: Annotated[
        float,
        Num(ge=0, le=FACTOR_MAX, doc="deadline = the live quantile times this; 0 turns it off"),
    ] = 3.0
    quantile: Annotated[
        float, Num(gt=0, le=1, doc="which quantile of the live first-token times")
    ] = 0.99
    floor_ms: Annotated[
        float,
        # Not below 100 ms: sub-millisecond history (a cache) must not make every stream time out.
        Num(ge=100, le=HOUR_MS, doc="the adaptive deadline is never shorter than this"),
    ] = 2000.0
    min_samples: Annotated[
        int,
        Int(ge=1, le=SAMPLES_MAX, doc="first tokens measured before the deadline adapts"),
    ] = 20
    window_seconds: Annotated[
        float, Num(gt=0, le=DAY_SECONDS, doc="how far back first-token times count")
    ] = 300.0


@dataclass(frozen=True, slots=True)
class Defaults:
    strategy: Strategy = "balanced"
    fallback_models: tuple[str, ...] = ()
    weights: Weights = field(default_factory=Weights)
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    response_metadata: bool = True
    # A committed text stream that fails is continued on the next candidate (docs/breaker.md).
    continuation: bool = True
    hedge: HedgePolicy = field(default_factory=HedgePolicy)
    first_token_deadline: AdaptiveDeadline = field(default_factory=AdaptiveDeadline)


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

    def match_route(self, model: str, headers: Mapping[str, str]) -> Route | None:
        """The first route matching the requested model and headers, or None."""
        for route in self.routes:
            if route.matches(model, headers):
                return route
        return None

    def is_known_name(self, name: str) -> bool:
        """True for a model name, an alias or a virtual model name."""
        return name in self.model_index or name in self.virtual_models


Fingerprint = tuple[str, int, int, int, int]


def file_fingerprint(path: str | Path) -> Fingerprint | None:
    """A cheap value that changes when the effective content of ``path`` changes.

    Kubernetes mounts a ConfigMap as ``file -> ..data/file`` with ``..data`` a
    symlink it re-points atomically; os.stat follows the links (so inode and
    mtime are the new file's) and realpath shows the new target directory even
    when size and mtime happen to agree. None when missing or unreadable.
    """
    try:
        st = os.stat(path)
        real = os.path.realpath(path)
    except OSError:
        return None
    return (real, st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)


def format_problems(err: RulesError) -> str:
    """One problem per line, prefixed by the file name (for ``cb-proxy check``)."""
    return "\n".join(f"{err.source}: {problem}" for problem in err.problems)


__all__ = [
    "MODEL_ENDPOINTS",
    "MODEL_IN_PATH_TYPES",
    "MODEL_PATH_PREFIX",
    "PROVIDER_TYPES",
    "QUALITY",
    "STRATEGIES",
    "SUPPORTED_VERSION",
    "TASK_TYPES",
    "WINDOW_SECONDS_MAX",
    "BreakerOverrides",
    "CostCap",
    "Defaults",
    "Deployment",
    "HealthCheck",
    "Model",
    "ModelEndpoint",
    "Provider",
    "ProviderType",
    "RetryPolicy",
    "Route",
    "RuleSet",
    "RulesError",
    "Strategy",
    "TaskType",
    "Timeouts",
    "VirtualModel",
    "Weights",
    "file_fingerprint",
    "format_problems",
]
