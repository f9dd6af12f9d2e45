"""Validation of a rules document: every problem, with its path, at once.

``proxy.config.model`` holds the frozen model and re-exports ``parse_rules`` and
``load_rules`` from here. The checker walks the decoded YAML once, collecting
"path: message" problems (unknown keys with a suggestion, wrong types, ranges,
references, collisions) without stopping at the first; only a document with
no problem at all becomes a ``RuleSet``.
"""

from __future__ import annotations

import difflib
import math
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any
from urllib.parse import urlsplit

import yaml

from proxy.config.model import (
    PROVIDER_TYPES,
    STRATEGIES,
    TASK_TYPES,
    BreakerOverrides,
    CostCap,
    Defaults,
    Deployment,
    HealthCheck,
    Model,
    Provider,
    ProviderType,
    RetryPolicy,
    Route,
    RulesError,
    RuleSet,
    Strategy,
    TaskType,
    Timeouts,
    VirtualModel,
    Weights,
)

SUPPORTED_VERSION = 1
QUALITY_MIN = 0.0
QUALITY_MAX = 10.0
# Upper bounds that catch typos (an extra zero) without limiting real setups.
MAX_ATTEMPTS_LIMIT = 20
MAX_SAME_DEPLOYMENT_RETRIES = 5
MAX_RETRY_WAIT_SECONDS = 60.0
ROOT_PATH = "<root>"
SUGGESTION_CUTOFF = 0.6
ENV_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# RFC 9110 section 5.6.2: a field name is a token.
HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
HEADER_VALUE_FORBIDDEN = frozenset("\r\n\x00")
# Path segments are shown bare unless that would be ambiguous to a reader.
PLAIN_PATH_KEY_RE = re.compile(r"[^\s\"'\[\]]+\Z")

# The YAML keys (contract: extend, never rename).
TOP_LEVEL_KEYS = ("version", "providers", "models", "virtual_models", "routes", "defaults")
PROVIDER_KEYS = (
    "type",
    "base_url",
    "api_key_env",
    "headers",
    "timeouts",
    "breaker",
    "health_check",
)
TIMEOUT_KEYS = ("connect", "first_token", "idle", "total")
BREAKER_KEYS = (
    "failure_threshold",
    "failure_rate",
    "min_throughput",
    "window_seconds",
    "open_seconds",
    "max_open_seconds",
    "half_open_probes",
    "slow_call_ms",
    "max_half_open_seconds",
)
HEALTH_CHECK_KEYS = ("path", "interval")
DEPLOYMENT_KEYS = (
    "provider",
    "upstream_model",
    "input_cost_per_1k",
    "output_cost_per_1k",
    "latency_ms",
    "context_window",
)
MODEL_KEYS = (*DEPLOYMENT_KEYS, "deployments", "quality", "aliases", "description")
VIRTUAL_MODEL_KEYS = (
    "strategy",
    "task_type",
    "candidates",
    "max_cost_per_1k_tokens",
    "max_latency_ms",
    "fallback_models",
    "description",
)
COST_CAP_KEYS = ("input", "output")
ROUTE_KEYS = ("match", "rewrite", "fallbacks")
MATCH_KEYS = ("model", "headers")
REWRITE_KEYS = ("model",)
DEFAULTS_KEYS = ("strategy", "fallback_models", "weights", "retry", "response_metadata")
WEIGHT_KEYS = ("quality", "cost", "latency", "reliability")
RETRY_KEYS = (
    "max_attempts",
    "same_deployment_retries",
    "max_retry_wait",
    "backoff_ms",
    "max_backoff_ms",
    "budget_ratio",
)

_STRATEGY_BY_NAME: dict[str, Strategy] = {s: s for s in STRATEGIES}
_TASK_TYPE_BY_NAME: dict[str, TaskType] = {t: t for t in TASK_TYPES}
_PROVIDER_TYPE_BY_NAME: dict[str, ProviderType] = {p: p for p in PROVIDER_TYPES}


# --------------------------------------------------------------------------- validation


def _join(path: str, key: str) -> str:
    segment = key if PLAIN_PATH_KEY_RE.match(key) else repr(key)
    return f"{path}.{segment}" if path else segment


def _kind(value: object) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


def _suggestion(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=SUGGESTION_CUTOFF)
    return f", did you mean {close[0]!r}?" if close else ""


def _range_text(lo: float | None, lo_open: bool, hi: float | None) -> str:
    parts = []
    if lo is not None:
        parts.append(f"{'>' if lo_open else '>='} {lo:g}")
    if hi is not None:
        parts.append(f"<= {hi:g}")
    return " and ".join(parts)


class _Checker:
    """Collects problems; each check returns the converted value or None."""

    def __init__(self) -> None:
        self.problems: list[str] = []

    def add(self, path: str, message: str) -> None:
        self.problems.append(f"{path or ROOT_PATH}: {message}")

    def mapping(self, path: str, value: object, allowed: tuple[str, ...] | None) -> _Map | None:
        """A mapping with string keys; ``allowed`` None = free keys (names)."""
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping, got {_kind(value)}")
            return None
        items: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.add(_join(path, str(key)), f"keys must be strings, got {_kind(key)}")
            elif allowed is not None and key not in allowed:
                hint = _suggestion(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.add(_join(path, key), "unknown key" + hint)
            else:
                items[key] = item
        return _Map(self, path, items)

    def list_(self, path: str, value: object) -> list[object] | None:
        if not isinstance(value, list):
            self.add(path, f"expected a list, got {_kind(value)}")
            return None
        return value

    def string(self, path: str, value: object) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"expected a string, got {_kind(value)}")
            return None
        if not value.strip():
            self.add(path, "must not be empty")
            return None
        return value

    def number(
        self,
        path: str,
        value: object,
        lo: float | None = None,
        lo_open: bool = False,
        hi: float | None = None,
    ) -> float | None:
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.add(path, f"expected a number, got {_kind(value)}")
            return None
        try:
            number = float(value)
        except OverflowError:  # an int beyond float range
            number = math.inf
        if not math.isfinite(number):
            self.add(path, "must be a finite number")
            return None
        below = lo is not None and (number <= lo if lo_open else number < lo)
        if below or (hi is not None and number > hi):
            self.add(path, f"must be {_range_text(lo, lo_open, hi)}, got {value!r}")
            return None
        return number

    def integer(
        self, path: str, value: object, lo: int | None = None, hi: int | None = None
    ) -> int | None:
        if isinstance(value, bool) or not isinstance(value, int):
            self.add(path, f"expected an integer, got {_kind(value)}")
            return None
        if (lo is not None and value < lo) or (hi is not None and value > hi):
            self.add(path, f"must be {_range_text(lo, False, hi)}, got {value!r}")
            return None
        return value

    def choice(self, path: str, value: object, choices: Iterable[str], what: str) -> str | None:
        text = self.string(path, value)
        options = list(choices)
        if text is not None and text not in options:
            hint = _suggestion(text, options)
            self.add(path, f"unknown {what} {text!r}{hint} (expected one of: {', '.join(options)})")
            return None
        return text

    def names(self, path: str, value: object) -> tuple[str, ...] | None:
        """A list of non-empty, distinct strings."""
        items = self.list_(path, value)
        if items is None:
            return None
        names: list[str] = []
        ok = True
        for i, item in enumerate(items):
            name = self.string(f"{path}[{i}]", item)
            if name is None:
                ok = False
            elif name in names:
                self.add(f"{path}[{i}]", f"{name!r} is listed twice")
                ok = False
            else:
                names.append(name)
        return tuple(names) if ok else None


class _Map:
    """Typed access to one checked mapping; ``None`` from a getter = absent, null or invalid."""

    __slots__ = ("ck", "items", "path")

    def __init__(self, ck: _Checker, path: str, items: dict[str, object]) -> None:
        self.ck = ck
        self.path = path
        self.items = items

    def at(self, key: str) -> str:
        return _join(self.path, key)

    def given(self, key: str) -> bool:
        return self.items.get(key) is not None

    def get(self, key: str, *, required: bool = False) -> object:
        value = self.items.get(key)
        if value is None and required:
            self.ck.add(
                self.at(key),
                "required key is missing" if key not in self.items else "must not be null",
            )
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self.get(key, required=required)
        return None if value is None else self.ck.string(self.at(key), value)

    def number(
        self,
        key: str,
        lo: float | None = None,
        lo_open: bool = False,
        hi: float | None = None,
    ) -> float | None:
        value = self.get(key)
        return None if value is None else self.ck.number(self.at(key), value, lo, lo_open, hi)

    def integer(
        self, key: str, lo: int | None = None, hi: int | None = None, *, required: bool = False
    ) -> int | None:
        value = self.get(key, required=required)
        return None if value is None else self.ck.integer(self.at(key), value, lo, hi)

    def choice(
        self, key: str, choices: Iterable[str], what: str, *, required: bool = False
    ) -> str | None:
        value = self.get(key, required=required)
        return None if value is None else self.ck.choice(self.at(key), value, choices, what)

    def names(self, key: str) -> tuple[str, ...] | None:
        value = self.get(key)
        return None if value is None else self.ck.names(self.at(key), value)

    def sub(self, key: str, allowed: tuple[str, ...] | None) -> _Map | None:
        value = self.get(key)
        return None if value is None else self.ck.mapping(self.at(key), value, allowed)

    def sequence(self, key: str) -> list[object] | None:
        value = self.get(key)
        return None if value is None else self.ck.list_(self.at(key), value)


def _description(ck: _Checker, m: _Map) -> str:
    value = m.get("description")
    if value is None:
        return ""
    if not isinstance(value, str):
        ck.add(m.at("description"), f"expected a string, got {_kind(value)}")
        return ""
    return value  # may be empty: a description is free text


def _named_entries(ck: _Checker, section: _Map | None) -> list[tuple[str, str, object]]:
    """(name, path, body) for each entry of a name -> body section."""
    if section is None:
        return []
    entries = []
    for name, body in section.items.items():
        path = section.at(name)
        if not name.strip():
            ck.add(path, "name must not be empty")
            continue
        entries.append((name, path, body))
    return entries


# --------------------------------------------------------------------------- providers


def _parse_base_url(ck: _Checker, m: _Map) -> str | None:
    url = m.string("base_url", required=True)
    if url is None:
        return None
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port out of range or not a number
    except ValueError as exc:
        ck.add(m.at("base_url"), f"not a valid URL: {exc}")
        return None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        ck.add(m.at("base_url"), f"must be an http:// or https:// URL, got {url!r}")
        return None
    if parts.query or parts.fragment:
        ck.add(m.at("base_url"), "must not have a query or fragment")
        return None
    return url.rstrip("/")


def _parse_headers(ck: _Checker, m: _Map) -> Mapping[str, str]:
    section = m.sub("headers", None)
    headers: dict[str, str] = {}
    if section is None:
        return MappingProxyType(headers)
    for name, value in section.items.items():
        path = section.at(name)
        if not HEADER_NAME_RE.match(name):
            ck.add(path, "not a valid HTTP header name")
            continue
        if any(name.lower() == seen.lower() for seen in headers):
            ck.add(path, f"header {name.lower()!r} is listed twice (names are case-insensitive)")
            continue
        text = value if isinstance(value, str) else None
        if text is None:
            ck.add(path, f"expected a string, got {_kind(value)}")
        elif HEADER_VALUE_FORBIDDEN.intersection(text):
            ck.add(path, "header value must not contain CR, LF or NUL")
        else:
            headers[name] = text
    return MappingProxyType(headers)


def _parse_timeouts(ck: _Checker, m: _Map) -> Timeouts:
    section = m.sub("timeouts", TIMEOUT_KEYS)
    if section is None:
        return Timeouts()
    given = {key: section.number(key, lo=0.0, lo_open=True) for key in TIMEOUT_KEYS}
    values = {key: value for key, value in given.items() if value is not None}
    timeouts = Timeouts(**values)
    for key in ("connect", "first_token", "idle"):
        if key in values and getattr(timeouts, key) > timeouts.total:
            ck.add(section.at(key), f"must not exceed total ({timeouts.total:g})")
    return timeouts


def _parse_breaker(ck: _Checker, m: _Map) -> BreakerOverrides:
    section = m.sub("breaker", BREAKER_KEYS)
    if section is None:
        return BreakerOverrides()
    result = BreakerOverrides(
        failure_threshold=section.integer("failure_threshold", lo=1),
        failure_rate=section.number("failure_rate", lo=0.0, lo_open=True, hi=1.0),
        min_throughput=section.integer("min_throughput", lo=1),
        window_seconds=section.number("window_seconds", lo=0.0, lo_open=True),
        open_seconds=section.number("open_seconds", lo=0.0, lo_open=True),
        max_open_seconds=section.number("max_open_seconds", lo=0.0, lo_open=True),
        half_open_probes=section.integer("half_open_probes", lo=1),
        slow_call_ms=section.number("slow_call_ms", lo=0.0),
        max_half_open_seconds=section.number("max_half_open_seconds", lo=0.0, lo_open=True),
    )
    if (
        result.open_seconds is not None
        and result.max_open_seconds is not None
        and result.max_open_seconds < result.open_seconds
    ):
        ck.add(section.at("max_open_seconds"), "must be >= open_seconds")
    return result


def _parse_health_check(ck: _Checker, m: _Map) -> HealthCheck:
    section = m.sub("health_check", HEALTH_CHECK_KEYS)
    if section is None:
        return HealthCheck()
    path = section.string("path")
    if path is not None and not path.startswith("/"):
        ck.add(section.at("path"), "must start with '/'")
        path = None
    return HealthCheck(path=path, interval=section.number("interval", lo=0.0))


def _parse_provider(ck: _Checker, name: str, path: str, body: object) -> Provider | None:
    m = ck.mapping(path, body, PROVIDER_KEYS)
    if m is None:
        return None
    type_name = m.choice("type", PROVIDER_TYPES, "provider type", required=True)
    base_url = _parse_base_url(ck, m)
    api_key_env = m.string("api_key_env")
    if api_key_env is not None and not ENV_VAR_NAME_RE.match(api_key_env):
        ck.add(m.at("api_key_env"), f"{api_key_env!r} is not an environment variable name")
        api_key_env = None
    provider_type = _PROVIDER_TYPE_BY_NAME.get(type_name or "")
    return Provider(
        name=name,
        type=provider_type or "openai",
        base_url=base_url or "",
        api_key_env=api_key_env,
        headers=_parse_headers(ck, m),
        timeouts=_parse_timeouts(ck, m),
        breaker=_parse_breaker(ck, m),
        health_check=_parse_health_check(ck, m),
    )


# --------------------------------------------------------------------------- models


@dataclass(slots=True)
class _Names:
    """Every declared name, for reference checks (declared = referable, even if invalid)."""

    providers: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    virtual: set[str] = field(default_factory=set)
    index: dict[str, str] = field(default_factory=dict)  # model name or alias -> canonical

    def check_model(self, ck: _Checker, path: str, name: str, *, allow_virtual: bool) -> bool:
        if name in self.index or (allow_virtual and name in self.virtual):
            return True
        known = list(self.index) + (sorted(self.virtual) if allow_virtual else [])
        what = "model, alias or virtual model" if allow_virtual else "model or alias"
        ck.add(path, f"unknown {what} {name!r}{_suggestion(name, known)}")
        return False

    def check_models(
        self, ck: _Checker, m: _Map, key: str, *, allow_virtual: bool
    ) -> tuple[str, ...]:
        names = m.names(key) or ()
        ok = [
            self.check_model(ck, f"{m.at(key)}[{i}]", name, allow_virtual=allow_virtual)
            for i, name in enumerate(names)
        ]
        return names if all(ok) else ()


def _deployment_fields(m: _Map) -> dict[str, Any]:
    """The deployment-level fields given in ``m`` (shared by model and deployment level)."""
    values: dict[str, Any] = {
        "upstream_model": m.string("upstream_model"),
        "input_cost_per_1k": m.number("input_cost_per_1k", lo=0.0),
        "output_cost_per_1k": m.number("output_cost_per_1k", lo=0.0),
        "latency_ms": m.number("latency_ms", lo=0.0, lo_open=True),
        "context_window": m.integer("context_window", lo=1),
    }
    return {key: value for key, value in values.items() if value is not None}


def _parse_quality(ck: _Checker, m: _Map) -> Mapping[str, float]:
    section = m.sub("quality", TASK_TYPES)
    quality: dict[str, float] = {}
    if section is not None:
        for task in section.items:
            score = section.number(task, lo=QUALITY_MIN, hi=QUALITY_MAX)
            if score is not None:
                quality[task] = score
    return MappingProxyType(quality)


def _parse_deployments(
    ck: _Checker, name: str, m: _Map, names: _Names, inherited: dict[str, Any]
) -> tuple[Deployment, ...]:
    base: dict[str, Any] = {"upstream_model": name, **inherited}
    if m.given("provider") and m.given("deployments"):
        ck.add(m.path, "give either 'provider' (one deployment) or 'deployments', not both")
        return ()
    if m.given("provider"):
        provider = m.string("provider")
        if provider is None or not _check_provider(ck, m.at("provider"), provider, names):
            return ()
        return (Deployment(model=name, provider=provider, **base),)
    if not m.given("deployments"):
        ck.add(m.path, "a model needs 'provider' or 'deployments'")
        return ()
    items = m.sequence("deployments")
    if items is None:
        return ()
    if not items:
        ck.add(m.at("deployments"), "must not be empty")
    deployments: list[Deployment] = []
    seen: set[str] = set()
    for i, item in enumerate(items):
        d = ck.mapping(f"{m.at('deployments')}[{i}]", item, DEPLOYMENT_KEYS)
        if d is None:
            continue
        own = _deployment_fields(d)
        provider = d.string("provider", required=True)
        if provider is None or not _check_provider(ck, d.at("provider"), provider, names):
            continue
        if provider in seen:
            ck.add(d.at("provider"), f"model {name!r} already has a deployment on {provider!r}")
            continue
        seen.add(provider)
        deployments.append(Deployment(model=name, provider=provider, **{**base, **own}))
    return tuple(deployments)


def _check_provider(ck: _Checker, path: str, provider: str, names: _Names) -> bool:
    if provider in names.providers:
        return True
    ck.add(path, f"unknown provider {provider!r}{_suggestion(provider, sorted(names.providers))}")
    return False


def _parse_model(ck: _Checker, name: str, path: str, body: object, names: _Names) -> Model | None:
    m = ck.mapping(path, body, MODEL_KEYS)
    if m is None:
        return None
    inherited = _deployment_fields(m)
    return Model(
        name=name,
        deployments=_parse_deployments(ck, name, m, names, inherited),
        context_window=inherited.get("context_window"),
        quality=_parse_quality(ck, m),
        aliases=m.names("aliases") or (),
        description=_description(ck, m),
    )


def _register_aliases(ck: _Checker, m_path: str, body: object, name: str, names: _Names) -> None:
    """Record the aliases of one model in ``names.index``, reporting every collision."""
    if not isinstance(body, dict) or not isinstance(body.get("aliases"), list):
        return
    for i, alias in enumerate(body["aliases"]):
        if not isinstance(alias, str) or not alias.strip():
            continue  # reported by _parse_model
        path = f"{_join(m_path, 'aliases')}[{i}]"
        if alias in names.models:
            ck.add(path, f"alias {alias!r} collides with the model of that name")
        elif alias in names.virtual:
            ck.add(path, f"alias {alias!r} collides with the virtual model of that name")
        elif alias in names.index and names.index[alias] != name:
            ck.add(path, f"alias {alias!r} is already an alias of model {names.index[alias]!r}")
        else:
            names.index[alias] = name


# --------------------------------------------------------------------------- virtual models


def _parse_cost_cap(ck: _Checker, m: _Map) -> CostCap | None:
    value = m.get("max_cost_per_1k_tokens")
    path = m.at("max_cost_per_1k_tokens")
    if value is None:
        return None
    if isinstance(value, dict):
        cap = ck.mapping(path, value, COST_CAP_KEYS)
        if cap is None:
            return None
        given = [cap.get(key, required=True) for key in COST_CAP_KEYS]
        caps = [
            cap.number(key, lo=0.0) if v is not None else None
            for key, v in zip(COST_CAP_KEYS, given, strict=True)
        ]
        if caps[0] is None or caps[1] is None:
            return None
        return CostCap(input=caps[0], output=caps[1])
    if isinstance(value, bool) or not isinstance(value, int | float):
        ck.add(path, f"expected a number or a mapping {{input, output}}, got {_kind(value)}")
        return None
    number = ck.number(path, value, lo=0.0)
    return CostCap(input=number, output=number) if number is not None else None


def _parse_virtual_model(
    ck: _Checker, name: str, path: str, body: object, names: _Names
) -> VirtualModel | None:
    m = ck.mapping(path, body, VIRTUAL_MODEL_KEYS)
    if m is None:
        return None
    strategy = _STRATEGY_BY_NAME.get(
        m.choice("strategy", STRATEGIES, "strategy", required=True) or ""
    )
    task_type = _TASK_TYPE_BY_NAME.get(m.choice("task_type", TASK_TYPES, "task type") or "")
    candidates: tuple[str, ...] | None = None
    if m.given("candidates"):
        listed = names.check_models(ck, m, "candidates", allow_virtual=False)
        if m.items.get("candidates") == []:
            ck.add(m.at("candidates"), "must not be empty (omit it to use every model)")
        canonical: list[str] = []
        for i, alias in enumerate(listed):
            target = names.index[alias]
            if target in canonical:
                ck.add(f"{m.at('candidates')}[{i}]", f"{alias!r} names model {target!r} again")
            else:
                canonical.append(target)
        candidates = tuple(canonical)
    return VirtualModel(
        name=name,
        strategy=strategy or "balanced",
        task_type=task_type,
        candidates=candidates,
        max_cost_per_1k_tokens=_parse_cost_cap(ck, m),
        max_latency_ms=m.number("max_latency_ms", lo=0.0, lo_open=True),
        fallback_models=names.check_models(ck, m, "fallback_models", allow_virtual=True),
        description=_description(ck, m),
    )


# --------------------------------------------------------------------------- routes, defaults


def _parse_match(ck: _Checker, r: _Map) -> tuple[str | None, tuple[tuple[str, str], ...]]:
    match = r.sub("match", MATCH_KEYS)
    if match is None:
        return None, ()
    glob = match.string("model")
    headers: list[tuple[str, str]] = []
    section = match.sub("headers", None)
    if section is not None:
        for header, pattern in section.items.items():
            path = section.at(header)
            lowered = header.lower()
            if not HEADER_NAME_RE.match(header):
                ck.add(path, "not a valid HTTP header name")
            elif any(lowered == seen for seen, _ in headers):
                ck.add(path, f"header {lowered!r} is listed twice (names are case-insensitive)")
            elif (text := ck.string(path, pattern)) is not None:
                headers.append((lowered, text))
    return glob, tuple(headers)


def _parse_route(ck: _Checker, path: str, item: object, names: _Names) -> Route | None:
    r = ck.mapping(path, item, ROUTE_KEYS)
    if r is None:
        return None
    glob, headers = _parse_match(ck, r)
    rewrite_model: str | None = None
    rewrite = r.sub("rewrite", REWRITE_KEYS)
    if rewrite is not None:
        rewrite_model = rewrite.string("model", required=True)
        if rewrite_model is not None:
            names.check_model(ck, rewrite.at("model"), rewrite_model, allow_virtual=True)
    fallbacks = names.check_models(ck, r, "fallbacks", allow_virtual=True)
    if not r.given("rewrite") and not r.given("fallbacks"):
        ck.add(path, "a route needs 'rewrite' and/or 'fallbacks'")
    return Route(model_glob=glob, headers=headers, rewrite_model=rewrite_model, fallbacks=fallbacks)


def _parse_weights(ck: _Checker, m: _Map) -> Weights:
    section = m.sub("weights", WEIGHT_KEYS)
    if section is None:
        return Weights()
    # A partial mapping means "only these matter": unlisted weights are 0, not the defaults.
    values = {key: section.number(key, lo=0.0) for key in section.items}
    if all(v is not None for v in values.values()) and not sum(v or 0.0 for v in values.values()):
        ck.add(section.path, "the weights must not all be 0")
    return Weights(**{key: values.get(key) or 0.0 for key in WEIGHT_KEYS})


def _parse_retry(ck: _Checker, m: _Map) -> RetryPolicy:
    section = m.sub("retry", RETRY_KEYS)
    if section is None:
        return RetryPolicy()
    values: dict[str, Any] = {
        "max_attempts": section.integer("max_attempts", lo=1, hi=MAX_ATTEMPTS_LIMIT),
        "same_deployment_retries": section.integer(
            "same_deployment_retries", lo=0, hi=MAX_SAME_DEPLOYMENT_RETRIES
        ),
        "max_retry_wait": section.number("max_retry_wait", lo=0.0, hi=MAX_RETRY_WAIT_SECONDS),
        "backoff_ms": section.number("backoff_ms", lo=0.0),
        "max_backoff_ms": section.number("max_backoff_ms", lo=0.0),
        "budget_ratio": section.number("budget_ratio", lo=0.0, hi=1.0),
    }
    policy = RetryPolicy(**{key: value for key, value in values.items() if value is not None})
    if policy.max_backoff_ms < policy.backoff_ms and (
        values["backoff_ms"] is not None or values["max_backoff_ms"] is not None
    ):
        ck.add(section.at("max_backoff_ms"), "must be >= backoff_ms")
    return policy


def _parse_defaults(ck: _Checker, root: _Map, names: _Names) -> Defaults:
    m = root.sub("defaults", DEFAULTS_KEYS)
    if m is None:
        return Defaults()
    strategy = _STRATEGY_BY_NAME.get(m.choice("strategy", STRATEGIES, "strategy") or "")
    metadata = m.get("response_metadata")
    if metadata is not None and not isinstance(metadata, bool):
        ck.add(m.at("response_metadata"), f"expected true or false, got {_kind(metadata)}")
    return Defaults(
        strategy=strategy or "balanced",
        fallback_models=names.check_models(ck, m, "fallback_models", allow_virtual=True),
        weights=_parse_weights(ck, m),
        retry=_parse_retry(ck, m),
        response_metadata=metadata if isinstance(metadata, bool) else True,
    )


# --------------------------------------------------------------------------- entry points


def _required_section(ck: _Checker, root: _Map, key: str) -> _Map | None:
    if not root.given(key):
        ck.add(root.at(key), "required section is missing")
        return None
    section = root.sub(key, None)
    if section is not None and not root.items[key]:
        ck.add(section.path, "must not be empty")
    return section


def parse_rules(data: object, source: str = "<rules>") -> RuleSet:
    """Validate a decoded YAML document; raise RulesError listing every problem."""
    ck = _Checker()
    root = ck.mapping("", data, TOP_LEVEL_KEYS)
    if root is None:
        raise RulesError(ck.problems, source)
    version = root.integer("version", required=True)
    if version is not None and version != SUPPORTED_VERSION:
        ck.add("version", f"unsupported version {version}, expected {SUPPORTED_VERSION}")

    provider_entries = _named_entries(ck, _required_section(ck, root, "providers"))
    model_entries = _named_entries(ck, _required_section(ck, root, "models"))
    virtual_entries = _named_entries(ck, root.sub("virtual_models", None))

    # Declare every name first so references can be checked in any order.
    names = _Names(
        providers={name for name, _, _ in provider_entries},
        models={name for name, _, _ in model_entries},
        virtual={name for name, _, _ in virtual_entries},
    )
    names.index.update((name, name) for name in names.models)
    for name, path, _ in virtual_entries:
        if name in names.models:
            ck.add(path, f"virtual model {name!r} collides with the model of that name")
    for name, path, body in model_entries:
        _register_aliases(ck, path, body, name, names)

    providers = {n: _parse_provider(ck, n, p, b) for n, p, b in provider_entries}
    models = {n: _parse_model(ck, n, p, b, names) for n, p, b in model_entries}
    virtual = {n: _parse_virtual_model(ck, n, p, b, names) for n, p, b in virtual_entries}
    routes = [
        _parse_route(ck, f"routes[{i}]", item, names)
        for i, item in enumerate(root.sequence("routes") or [])
    ]
    defaults = _parse_defaults(ck, root, names)
    if ck.problems:
        raise RulesError(ck.problems, source)
    # No problems means every entry parsed, so the filters below drop nothing.
    return RuleSet(
        version=SUPPORTED_VERSION,
        providers=MappingProxyType({n: p for n, p in providers.items() if p is not None}),
        models=MappingProxyType({n: m for n, m in models.items() if m is not None}),
        virtual_models=MappingProxyType({n: v for n, v in virtual.items() if v is not None}),
        routes=tuple(r for r in routes if r is not None),
        defaults=defaults,
        source=source,
        model_index=MappingProxyType(dict(names.index)),
    )


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that rejects duplicate keys instead of keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Hashable, Any]:
        seen: set[object] = set()
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue  # merged keys may legitimately be overridden
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, Hashable):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping",
                        node.start_mark,
                        f"found duplicate key {key!r}",
                        key_node.start_mark,
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def load_rules(path: str | Path) -> RuleSet:
    """Read, parse and validate a rules file; raise RulesError on any problem."""
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except OSError as exc:
        raise RulesError(
            [f"{ROOT_PATH}: cannot read the file: {exc.strerror or exc}"], source
        ) from exc
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([f"byte {exc.start}: the file is not valid UTF-8"], source) from exc
    try:
        data = yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ROOT_PATH
        problem = exc.problem or exc.context or "invalid YAML"
        raise RulesError([f"{where}: invalid YAML: {problem}"], source) from exc
    except yaml.YAMLError as exc:
        raise RulesError([f"{ROOT_PATH}: invalid YAML: {exc}"], source) from exc
    if data is None:
        raise RulesError([f"{ROOT_PATH}: the file is empty"], source)
    return parse_rules(data, source)
