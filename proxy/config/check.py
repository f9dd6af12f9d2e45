"""Validation of a rules document: every problem, with its path, at once.

``proxy.config.model`` declares the rules (keys, types, ranges, defaults);
this module checks a decoded YAML document against that declaration and
builds the ``RuleSet``. The import goes one way: check -> model -> spec.

The checker walks the decoded YAML once, collecting "path: message" problems
(unknown keys with a suggestion, wrong types, ranges, references, collisions)
without stopping at the first; only a document with no problem at all becomes
a ``RuleSet``.

Why a hand-written validator rather than pydantic v2 or msgspec: measured
with ``python -m bench.rules_load`` (50,000 models, 13.8 MB of YAML), YAML
decoding is most of a load (about 8 s with libyaml, 31 to 47 s pure Python)
while validation is about 1 s here and about 0.5 s for a pydantic model
that checks less (no cross-references, collisions, URLs, headers or indexes);
so a library would save a few percent of the load while costing the
messages: pydantic reports ``Extra inputs are not permitted`` with no
did-you-mean, ``Input should be ...`` instead of the contract's wording, and
the cross-reference problems would still be a second hand-written pass. The
checker is table-driven instead: allowed keys, ranges and cross-field rules
come from the declaration (``declared``, ``keys_of``), never from literals.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar
from urllib.parse import urlsplit

import yaml

from proxy.config.model import (
    HEDGE_AUTO,
    HOUR_MS,
    MODEL_ENDPOINTS,
    MODEL_IN_PATH_TYPES,
    MODEL_PATH_PREFIX,
    PROVIDER_TYPES,
    QUALITY,
    STRATEGIES,
    SUPPORTED_VERSION,
    TASK_TYPES,
    AdaptiveDeadline,
    BreakerOverrides,
    CostCap,
    Defaults,
    Deployment,
    HealthCheck,
    HedgeAfter,
    HedgePolicy,
    Model,
    ModelEndpoint,
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
from proxy.config.spec import Int, Num, Spec, declared, keys_of, kind_of

ROOT_PATH = "<root>"
SUGGESTION_CUTOFF = 0.6
ENV_VAR_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
# RFC 9110 section 5.6.2: a field name is a token.
HEADER_NAME_RE = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+\Z")
HEADER_VALUE_FORBIDDEN = frozenset("\r\n\x00")
# An upstream model name is an identifier: never a control character (C0, DEL, C1).
CONTROL_CHAR_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Where the name is a URL path segment (MODEL_IN_PATH_TYPES), also nothing that would end
# or split the segment (RFC 3986 section 3.3: '/', '?', '#'), nor ':' (the method follows
# it: 'models/{model}:generateContent'), nor whitespace, nor a dot segment ('..').
PATH_MODEL_FORBIDDEN = (("/", "'/'"), ("?", "'?'"), ("#", "'#'"), (":", "':'"), ("..", "'..'"))
# Path segments are shown bare unless that would be ambiguous to a reader.
PLAIN_PATH_KEY_RE = re.compile(r"[^\s\"'\[\]]+\Z")

# The YAML keys (contract: extend, never rename), from the model's dataclass
# fields wherever a section's keys are exactly its fields.
TOP_LEVEL_KEYS = ("version", "providers", "models", "virtual_models", "routes", "defaults")
PROVIDER_KEYS = keys_of(Provider, exclude=("name",))
TIMEOUT_KEYS = keys_of(Timeouts)
BREAKER_KEYS = keys_of(BreakerOverrides)
HEALTH_CHECK_KEYS = keys_of(HealthCheck)
DEPLOYMENT_KEYS = keys_of(Deployment, exclude=("model",))
# A model holds the deployment keys (inherited by its deployments) and its own.
MODEL_KEYS = (
    *DEPLOYMENT_KEYS,
    "deployments",
    "quality",
    "aliases",
    "description",
    "endpoints",
    "continuation",
)
VIRTUAL_MODEL_KEYS = keys_of(VirtualModel, exclude=("name",))
COST_CAP_KEYS = keys_of(CostCap)
ROUTE_KEYS = ("match", "rewrite", "fallbacks", "continuation", "hedge_after_ms")
# hedge_after_ms: a number of ms in this range, or "auto".
HEDGE_AFTER_SPEC = Num(gt=0, le=HOUR_MS, doc="hedge after this many ms without a first token")
MATCH_KEYS = ("model", "headers")
REWRITE_KEYS = ("model",)
DEFAULTS_KEYS = keys_of(Defaults)
WEIGHT_KEYS = keys_of(Weights)
RETRY_KEYS = keys_of(RetryPolicy)
# The numeric keys of each section, with their Spec.
DEPLOYMENT_SPECS = declared(Deployment)
VIRTUAL_MODEL_SPECS = declared(VirtualModel)
COST_CAP_SPECS = declared(CostCap)
WEIGHT_SPECS = declared(Weights)
HEALTH_CHECK_SPECS = declared(HealthCheck)
VERSION_SPEC = Int()

_STRATEGY_BY_NAME: dict[str, Strategy] = {s: s for s in STRATEGIES}
_TASK_TYPE_BY_NAME: dict[str, TaskType] = {t: t for t in TASK_TYPES}
_ENDPOINT_BY_NAME: dict[str, ModelEndpoint] = {e: e for e in MODEL_ENDPOINTS}
_PROVIDER_TYPE_BY_NAME: dict[str, ProviderType] = {p: p for p in PROVIDER_TYPES}


# --------------------------------------------------------------------------- validation


def _join(path: str, key: str) -> str:
    segment = key if PLAIN_PATH_KEY_RE.match(key) else repr(key)
    return f"{path}.{segment}" if path else segment


def _suggestion(word: str, options: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(options), n=1, cutoff=SUGGESTION_CUTOFF)
    return f", did you mean {close[0]!r}?" if close else ""


class _Checker:
    """Collects problems; each check returns the converted value or None."""

    def __init__(self) -> None:
        self.problems: list[str] = []
        self._seen: set[str] = set()

    def add(self, path: str, message: str) -> None:
        # Once: a model-level value is checked for each of its deployments.
        problem = f"{path or ROOT_PATH}: {message}"
        if problem not in self._seen:
            self._seen.add(problem)
            self.problems.append(problem)

    def mapping(self, path: str, value: object, allowed: tuple[str, ...] | None) -> _Map | None:
        """A mapping with string keys; ``allowed`` None = free keys (names)."""
        if not isinstance(value, dict):
            self.add(path, f"expected a mapping, got {kind_of(value)}")
            return None
        items: dict[str, object] = {}
        for key, item in value.items():
            if not isinstance(key, str):
                self.add(_join(path, str(key)), f"keys must be strings, got {kind_of(key)}")
            elif allowed is not None and key not in allowed:
                hint = _suggestion(key, allowed) or f" (expected one of: {', '.join(allowed)})"
                self.add(_join(path, key), "unknown key" + hint)
            else:
                items[key] = item
        return _Map(self, path, items)

    def list_(self, path: str, value: object) -> list[object] | None:
        if not isinstance(value, list):
            self.add(path, f"expected a list, got {kind_of(value)}")
            return None
        return value

    def string(self, path: str, value: object) -> str | None:
        if not isinstance(value, str):
            self.add(path, f"expected a string, got {kind_of(value)}")
            return None
        if not value.strip():
            self.add(path, "must not be empty")
            return None
        return value

    def scalar(self, path: str, value: object, spec: Spec) -> float | None:
        """A number or integer within the declared range (an int stays an int)."""
        problem = spec.problem(value)
        if problem is not None:
            self.add(path, problem)
            return None
        assert isinstance(value, int | float)  # spec.problem accepted it
        return value if spec.kind == "integer" else float(value)

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

    def scalar(self, key: str, spec: Spec, *, required: bool = False) -> float | None:
        value = self.get(key, required=required)
        return None if value is None else self.ck.scalar(self.at(key), value, spec)

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
        ck.add(m.at("description"), f"expected a string, got {kind_of(value)}")
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
    if not url.isascii() or any(c.isspace() or not c.isprintable() for c in url):
        # The path goes on the request line as it is: a space would split it and non-ASCII
        # cannot be sent; the user percent-encodes (RFC 3986) rather than the proxy guessing.
        ck.add(
            m.at("base_url"),
            "must be ASCII without spaces or control characters (percent-encode the path)",
        )
        return None
    return url.rstrip("/")


def _latin1(text: str) -> bool:
    try:
        text.encode("latin-1")
    except UnicodeEncodeError:
        return False
    return True


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
            ck.add(path, f"expected a string, got {kind_of(value)}")
        elif HEADER_VALUE_FORBIDDEN.intersection(text):
            ck.add(path, "header value must not contain CR, LF or NUL")
        elif not _latin1(text):
            # HTTP/1.1 header bytes are ISO-8859-1 (RFC 9110 section 5.5): other text cannot go
            # on the wire as it is.
            ck.add(path, "header value must be Latin-1 text (encode anything else yourself)")
        else:
            headers[name] = text
    return MappingProxyType(headers)


_Section = TypeVar(
    "_Section", Timeouts, BreakerOverrides, RetryPolicy, HedgePolicy, AdaptiveDeadline
)


def _numeric_section(ck: _Checker, m: _Map, key: str, cls: type[_Section]) -> _Section:
    """A section made only of declared numeric keys (timeouts, breaker, retry).

    Ranges come from each field's Spec, then the declared cross-field rules:
    ``at_most`` is checked when the key itself is given, against the other's
    given or default value (``timeouts.connect: must not exceed total (10)``);
    ``at_least`` when either key is given and both have a value (a breaker
    override left out has none: the runtime settles it, see
    ``CircuitBreakerConfig.with_overrides``). A key whose own value is invalid
    takes part in no cross-field rule (its problem is already reported).
    """
    specs = declared(cls)
    section = m.sub(key, keys_of(cls))
    if section is None:
        return cls()
    values: dict[str, Any] = {
        name: value
        for name, d in specs.items()
        if (value := section.scalar(name, d.spec)) is not None
    }
    result = cls(**values)
    invalid = {name for name in section.items if section.given(name) and name not in values}
    for name, d in specs.items():
        other = d.spec.at_most or d.spec.at_least
        if other is None or name in invalid or other in invalid:
            continue
        mine, theirs = getattr(result, name), getattr(result, other)
        if mine is None or theirs is None:
            continue
        given = name in values or other in values
        if d.spec.at_most is not None and name in values and mine > theirs:
            section.ck.add(section.at(name), f"must not exceed {other} ({theirs:g})")
        elif d.spec.at_least is not None and given and mine < theirs:
            section.ck.add(section.at(name), f"must be >= {other}")
    return result


def _parse_health_check(ck: _Checker, m: _Map) -> HealthCheck:
    section = m.sub("health_check", HEALTH_CHECK_KEYS)
    if section is None:
        return HealthCheck()
    path = section.string("path")
    if path is not None and not path.startswith("/"):
        ck.add(section.at("path"), "must start with '/'")
        path = None
    return HealthCheck(
        path=path, interval=section.scalar("interval", HEALTH_CHECK_SPECS["interval"].spec)
    )


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
        timeouts=_numeric_section(ck, m, "timeouts", Timeouts),
        breaker=_numeric_section(ck, m, "breaker", BreakerOverrides),
        health_check=_parse_health_check(ck, m),
        prefill=_flag(ck, m, "prefill"),
    )


# --------------------------------------------------------------------------- models


@dataclass(slots=True)
class _Names:
    """Every declared name, for reference checks (declared = referable, even if invalid)."""

    providers: set[str] = field(default_factory=set)
    models: set[str] = field(default_factory=set)
    virtual: set[str] = field(default_factory=set)
    index: dict[str, str] = field(default_factory=dict)  # model name or alias -> canonical
    # provider name -> type, for the providers whose body parsed (upstream model checks)
    provider_types: dict[str, ProviderType] = field(default_factory=dict)

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


def upstream_model_problem(model: str, provider_type: ProviderType) -> str | None:
    """None when ``model`` can be sent to a ``provider_type`` upstream, else why not."""
    if CONTROL_CHAR_RE.search(model):
        return "must not contain control characters"
    if provider_type not in MODEL_IN_PATH_TYPES:
        return None
    name = model.removeprefix(MODEL_PATH_PREFIX)
    found = [shown for text, shown in PATH_MODEL_FORBIDDEN if text in name]
    if any(c.isspace() for c in name):
        found.append("whitespace")
    if not name or name == ".":
        found.append("no name" if not name else "only '.'")
    if not found:
        return None
    return (
        f"{model!r} goes in the URL path of a {provider_type} upstream, so it must not "
        f"contain {', '.join(found)}"
    )


def _check_upstream_model(
    ck: _Checker, path: str, deployment: Deployment, names: _Names, given: bool
) -> bool:
    """``given``: upstream_model is written at ``path``; else the model's name stands for it."""
    provider_type = names.provider_types.get(deployment.provider)
    if provider_type is None:  # the provider's own problems are reported
        return True
    problem = upstream_model_problem(deployment.upstream_model, provider_type)
    if problem is None:
        return True
    if given:
        ck.add(path, problem)
    else:
        ck.add(path, f"the model's name is its upstream model (no upstream_model given): {problem}")
    return False


def _deployment_fields(m: _Map) -> dict[str, Any]:
    """The deployment-level fields given in ``m`` (shared by model and deployment level)."""
    values: dict[str, Any] = {"upstream_model": m.string("upstream_model")}
    for name, d in DEPLOYMENT_SPECS.items():
        values[name] = m.scalar(name, d.spec)
    return {key: value for key, value in values.items() if value is not None}


def _parse_quality(ck: _Checker, m: _Map) -> Mapping[str, float]:
    section = m.sub("quality", TASK_TYPES)
    quality: dict[str, float] = {}
    if section is not None:
        for task in section.items:
            score = section.scalar(task, QUALITY)
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
    model_given = "upstream_model" in inherited
    if m.given("provider"):
        provider = m.string("provider")
        if provider is None or not _check_provider(ck, m.at("provider"), provider, names):
            return ()
        deployment = Deployment(model=name, provider=provider, **base)
        where = m.at("upstream_model") if model_given else m.path
        if not _check_upstream_model(ck, where, deployment, names, model_given):
            return ()
        return (deployment,)
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
        deployment = Deployment(model=name, provider=provider, **{**base, **own})
        if "upstream_model" in own:
            where, given = d.at("upstream_model"), True
        else:
            where, given = (m.at("upstream_model"), True) if model_given else (d.path, False)
        if _check_upstream_model(ck, where, deployment, names, given):
            deployments.append(deployment)
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
        endpoints=_parse_endpoints(ck, m),
        continuation=_flag(ck, m, "continuation"),
    )


def _parse_endpoints(ck: _Checker, m: _Map) -> tuple[ModelEndpoint, ...]:
    """``endpoints``: a non-empty list of distinct MODEL_ENDPOINTS; absent = any endpoint."""
    names = m.names("endpoints")
    if names is None:
        return ()
    if not names:
        ck.add(m.at("endpoints"), "must not be empty (leave it out to allow every endpoint)")
    known = [_ENDPOINT_BY_NAME[n] for n in names if n in _ENDPOINT_BY_NAME]
    for i, n in enumerate(names):
        if n not in _ENDPOINT_BY_NAME:
            ck.choice(f"{m.at('endpoints')}[{i}]", n, MODEL_ENDPOINTS, "endpoint")
    return tuple(known)


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
            cap.scalar(key, COST_CAP_SPECS[key].spec) if v is not None else None
            for key, v in zip(COST_CAP_KEYS, given, strict=True)
        ]
        if caps[0] is None or caps[1] is None:
            return None
        return CostCap(input=caps[0], output=caps[1])
    if isinstance(value, bool) or not isinstance(value, int | float):
        ck.add(path, f"expected a number or a mapping {{input, output}}, got {kind_of(value)}")
        return None
    number = ck.scalar(path, value, COST_CAP_SPECS["input"].spec)
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
        max_latency_ms=m.scalar("max_latency_ms", VIRTUAL_MODEL_SPECS["max_latency_ms"].spec),
        fallback_models=names.check_models(ck, m, "fallback_models", allow_virtual=True),
        description=_description(ck, m),
        hedge_after_ms=_hedge_after(ck, m),
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
    if not any(r.given(key) for key in ROUTE_KEYS[1:]):
        ck.add(path, "a route needs 'rewrite', 'fallbacks', 'continuation' or 'hedge_after_ms'")
    return Route(
        model_glob=glob,
        headers=headers,
        rewrite_model=rewrite_model,
        fallbacks=fallbacks,
        continuation=_flag(ck, r, "continuation"),
        hedge_after_ms=_hedge_after(ck, r),
    )


def _hedge_after(ck: _Checker, m: _Map) -> HedgeAfter:
    """``hedge_after_ms``: a number of ms, or "auto"; None when absent or invalid (reported)."""
    value = m.get("hedge_after_ms")
    if value is None:
        return None
    if value == HEDGE_AUTO:
        return HEDGE_AUTO
    if isinstance(value, str):
        ck.add(m.at("hedge_after_ms"), f"expected a number of ms or {HEDGE_AUTO!r}, got {value!r}")
        return None
    return m.scalar("hedge_after_ms", HEDGE_AFTER_SPEC)


def _flag(ck: _Checker, m: _Map, key: str) -> bool | None:
    """An optional true/false key; None when absent, null or invalid (reported)."""
    value = m.get(key)
    if value is not None and not isinstance(value, bool):
        ck.add(m.at(key), f"expected true or false, got {kind_of(value)}")
        return None
    return value


def _parse_weights(ck: _Checker, m: _Map) -> Weights:
    section = m.sub("weights", WEIGHT_KEYS)
    if section is None:
        return Weights()
    # A partial mapping means "only these matter": unlisted weights are 0, not the defaults.
    values = {key: section.scalar(key, WEIGHT_SPECS[key].spec) for key in section.items}
    if all(v is not None for v in values.values()) and not sum(v or 0.0 for v in values.values()):
        ck.add(section.path, "the weights must not all be 0")
    return Weights(**{key: values.get(key) or 0.0 for key in WEIGHT_KEYS})


def _parse_defaults(ck: _Checker, root: _Map, names: _Names) -> Defaults:
    m = root.sub("defaults", DEFAULTS_KEYS)
    if m is None:
        return Defaults()
    strategy = _STRATEGY_BY_NAME.get(m.choice("strategy", STRATEGIES, "strategy") or "")
    metadata = m.get("response_metadata")
    if metadata is not None and not isinstance(metadata, bool):
        ck.add(m.at("response_metadata"), f"expected true or false, got {kind_of(metadata)}")
    return Defaults(
        strategy=strategy or "balanced",
        fallback_models=names.check_models(ck, m, "fallback_models", allow_virtual=True),
        weights=_parse_weights(ck, m),
        retry=_numeric_section(ck, m, "retry", RetryPolicy),
        response_metadata=metadata if isinstance(metadata, bool) else True,
        continuation=_flag(ck, m, "continuation") is not False,
        hedge=_numeric_section(ck, m, "hedge", HedgePolicy),
        first_token_deadline=_numeric_section(ck, m, "first_token_deadline", AdaptiveDeadline),
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
    version = root.scalar("version", VERSION_SPEC, required=True)
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
    names.provider_types.update((n, p.type) for n, p in providers.items() if p is not None)
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


class _RejectDuplicates(yaml.constructor.SafeConstructor):
    """Mixin for a safe loader: a duplicate key is an error instead of "last one wins"."""

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


class _StrictLoader(_RejectDuplicates, yaml.SafeLoader):
    """The pure-Python safe loader, strict about duplicates: its error texts are the contract."""


# libyaml parses a large file about 5x faster (bench/rules_load.py: 50,000 models in
# about 8 s instead of 31 to 47 s); its error texts differ, so a file it fails on is parsed
# again by the pure loader, whose message is reported. None when PyYAML lacks libyaml.
_FastStrictLoader: type[Any] | None = (
    type("_FastStrictLoader", (_RejectDuplicates, yaml.CSafeLoader), {})
    if getattr(yaml, "__with_libyaml__", False)
    else None
)


def _decode(text: str) -> object:
    if _FastStrictLoader is not None:
        try:
            return yaml.load(text, Loader=_FastStrictLoader)  # a safe loader: no arbitrary objects
        except yaml.YAMLError:
            pass  # parsed again below for the message
    return yaml.load(text, Loader=_StrictLoader)  # a SafeLoader: no arbitrary objects


def _read_bounded(path: Path, max_bytes: int | None, source: str) -> bytes:
    """The file's bytes; over ``max_bytes`` a RulesError before anything is read.

    The size is taken from the open file (not a separate stat of the path, which a
    ConfigMap swap could change in between), and the read itself stops one byte past the
    limit, so a file that grows while it is read is refused too.
    """
    try:
        with path.open("rb") as f:
            if max_bytes is None:
                return f.read()
            size = os.fstat(f.fileno()).st_size
            raw = f.read(max_bytes + 1) if size <= max_bytes else b""
    except OSError as exc:
        raise RulesError(
            [f"{ROOT_PATH}: cannot read the file: {exc.strerror or exc}"], source
        ) from exc
    if size > max_bytes or len(raw) > max_bytes:
        has = f"{size} bytes" if size > max_bytes else f"more than {max_bytes} bytes"
        limit = f"the limit of {max_bytes} (CB_RULES_MAX_BYTES)"
        raise RulesError([f"{ROOT_PATH}: the file has {has}, over {limit}"], source)
    return raw


def load_rules(path: str | Path, *, max_bytes: int | None = None) -> RuleSet:
    """Read, parse and validate a rules file; raise RulesError on any problem.

    ``max_bytes``: a larger file is refused before it is read (None = no limit; the
    CLI and the server pass ``CB_RULES_MAX_BYTES``, proxy/config/settings.py).
    """
    source = str(path)
    raw = _read_bounded(Path(path), max_bytes, source)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise RulesError([f"byte {exc.start}: the file is not valid UTF-8"], source) from exc
    try:
        data = _decode(text)
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
