"""cb-proxy: an LLM sidecar reverse proxy speaking the OpenAI API.

The package root is also the circuit-breaker library for code that wants the breaker without the
proxy (docs/breaker.md, 'Library use')::

    from proxy import CircuitBreaker, CircuitBreakerConfig, registry

Importing it loads only the pure core: no aiohttp, no metrics.
"""

from proxy.core.breaker import (
    CircuitBreaker,
    CircuitBreakerConfig,
    CircuitOpenError,
    Mode,
    State,
)
from proxy.core.breaker_registry import BreakerRegistry, registry
from proxy.core.outcome import Outcome

__version__ = "0.1.0"

__all__ = [
    "BreakerRegistry",
    "CircuitBreaker",
    "CircuitBreakerConfig",
    "CircuitOpenError",
    "Mode",
    "Outcome",
    "State",
    "__version__",
    "registry",
]
