"""The proxy's live state, shared by the API and admin apps.

``rules`` is swapped by reference on reload: a request reads it once when it
starts and keeps that RuleSet until it ends, so requests in flight keep the
rules they started with.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web

from proxy.metrics import Metrics
from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import ProviderAdapter, RequestAdapter
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter
from proxy.rules import Deployment, Provider, RuleSet
from proxy.settings import Settings
from proxy.usage import UsageTotals

LOG = logging.getLogger("cb_proxy")
# Keys a handler sets on the aiohttp request for the middleware's accounting.
MODEL_LABEL_KEY = "cb_model"
STREAM_KEY = "cb_stream"
UPSTREAM_SECONDS_KEY = "cb_upstream_seconds"


def provider_keys(rules: RuleSet, environ: Mapping[str, str]) -> dict[str, str | None]:
    """Provider name -> key from its ``api_key_env`` (None when unset or not configured)."""
    return {
        name: (environ.get(p.api_key_env) or None) if p.api_key_env else None
        for name, p in rules.providers.items()
    }


@dataclass(eq=False)
class ProxyState:
    settings: Settings
    rules: RuleSet
    metrics: Metrics
    keys: dict[str, str | None] = field(default_factory=dict)
    session: aiohttp.ClientSession | None = None
    usage: UsageTotals = field(default_factory=UsageTotals)
    adapters: dict[str, RequestAdapter] = field(default_factory=dict)
    translators: dict[str, ProviderAdapter] = field(default_factory=dict)
    api_listening: bool = False
    draining: bool = False
    in_flight: int = 0
    started_at: float = field(default_factory=time.time)
    _children: dict[tuple[str, str, int, str], tuple[Any, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.translators = {"anthropic": AnthropicAdapter(), "gemini": GeminiAdapter()}
        self.adapters = {"openai": OpenAIAdapter(), **self.translators}
        self.keys = provider_keys(self.rules, self.settings.environ)

    def swap_rules(self, rules: RuleSet) -> None:
        keys = provider_keys(rules, self.settings.environ)
        self.rules = rules
        self.keys = keys

    def has_key(self, provider: Provider) -> bool:
        # A provider with no api_key_env (a local vLLM, a mock) needs no key.
        return provider.api_key_env is None or self.keys.get(provider.name) is not None

    def is_blocked(self, deployment: Deployment) -> bool:
        return False

    def record_request(
        self, endpoint: str, request: web.BaseRequest, status: int, seconds: float
    ) -> None:
        """Count one finished client request; metric children are bound once per label set."""
        model = request.get(MODEL_LABEL_KEY, "unknown")
        stream = "true" if request.get(STREAM_KEY) else "false"
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
        upstream = request.get(UPSTREAM_SECONDS_KEY)
        if upstream is not None:
            self.metrics.overhead.observe(max(0.0, seconds - upstream))

    @property
    def ready(self) -> bool:
        return self.api_listening and not self.draining
