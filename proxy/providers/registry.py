"""The wire formats by the rules' ``provider.type``: one table, so no shell module names a format.

An OpenAI-compatible upstream needs no translation: its replies and streams are relayed as bytes
(``translator`` is None). Every other format has a translator that parses and re-emits. A client
of another wire format whose upstream speaks it too gets a byte relay (``native``).
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType

from proxy.providers.anthropic import AnthropicAdapter
from proxy.providers.anthropic_native import AnthropicPassthrough
from proxy.providers.base import NativeAdapter, ProviderAdapter, RequestAdapter
from proxy.providers.gemini import GeminiAdapter
from proxy.providers.openai import OpenAIAdapter

TRANSLATORS: Mapping[str, ProviderAdapter] = MappingProxyType(
    {"anthropic": AnthropicAdapter(), "gemini": GeminiAdapter()}
)
ADAPTERS: Mapping[str, RequestAdapter] = MappingProxyType(
    {"openai": OpenAIAdapter(), **TRANSLATORS}
)

# (client wire format, upstream provider type) -> the passthrough between them.
NATIVE: Mapping[tuple[str, str], NativeAdapter] = MappingProxyType(
    {("anthropic", "anthropic"): AnthropicPassthrough()}
)


def adapter(provider_type: str) -> RequestAdapter:
    """Requests out and errors classified, for every format (the rules checked the type)."""
    return ADAPTERS[provider_type]


def translator(provider_type: str) -> ProviderAdapter | None:
    """The reply and stream translator, or None where the upstream already speaks OpenAI."""
    return TRANSLATORS.get(provider_type)


def native(wire: str, provider_type: str) -> NativeAdapter | None:
    """The byte relay for a ``wire``-format client on this upstream, or None: translate."""
    return NATIVE.get((wire, provider_type))
