"""The wire formats by the rules' ``provider.type``: one table, so no shell module names a format.

An OpenAI-compatible upstream needs no translation: its replies and streams are relayed as bytes
(``translator`` is None). Every other format has a translator that parses and re-emits.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.base import ProviderAdapter, RequestAdapter
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter

TRANSLATORS: Mapping[str, ProviderAdapter] = MappingProxyType(
    {"anthropic": AnthropicAdapter(), "gemini": GeminiAdapter()}
)
ADAPTERS: Mapping[str, RequestAdapter] = MappingProxyType(
    {"openai": OpenAIAdapter(), **TRANSLATORS}
)


def adapter(provider_type: str) -> RequestAdapter:
    """Requests out and errors classified, for every format (the rules checked the type)."""
    return ADAPTERS[provider_type]


def translator(provider_type: str) -> ProviderAdapter | None:
    """The reply and stream translator, or None where the upstream already speaks OpenAI."""
    return TRANSLATORS.get(provider_type)
