"""The per-request routing extension and the request facts routing reads.

The body's ``circuit_breaker`` object is validated here into
``RequestPrefs``; a bad value is a 400 naming the key (docs/rules.md, the request extension).
The prompt's size is estimated here too, for context-window checks.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from proxy.config.model import STRATEGIES, TASK_TYPES, CostCap, Strategy, TaskType
from proxy.core.errors import InvalidRequest
from proxy.core.tasks import message_text
from proxy.core.usage import CHARS_PER_TOKEN

EXTENSION_KEY = "circuit_breaker"
EXTENSION_KEYS = frozenset(
    {"routing_strategy", "task_type", "max_cost_per_1k_tokens", "max_latency_ms", "fallback_models"}
)


@dataclass(frozen=True, slots=True)
class RequestPrefs:
    """The per-request ``circuit_breaker`` extension, validated."""

    routing_strategy: Strategy | None = None
    task_type: TaskType | None = None
    max_cost: CostCap | None = None
    max_latency_ms: float | None = None
    fallback_models: tuple[str, ...] = ()


NO_PREFS = RequestPrefs()


def _param(key: str) -> str:
    return f"{EXTENSION_KEY}.{key}"


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_prefs(raw: object) -> RequestPrefs:
    """Validate the extension object; InvalidRequest (400) naming the key otherwise."""
    if raw is None:
        return NO_PREFS
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{EXTENSION_KEY}' must be an object", param=EXTENSION_KEY)
    unknown = sorted(set(raw) - EXTENSION_KEYS)
    if unknown:
        raise InvalidRequest(
            f"unknown key '{unknown[0]}' in '{EXTENSION_KEY}'; "
            f"known keys: {', '.join(sorted(EXTENSION_KEYS))}",
            param=_param(unknown[0]),
        )
    strategy = raw.get("routing_strategy")
    if strategy is not None and strategy not in STRATEGIES:
        raise InvalidRequest(
            f"routing_strategy must be one of {', '.join(STRATEGIES)}",
            param=_param("routing_strategy"),
        )
    task = raw.get("task_type")
    if task is not None and task not in TASK_TYPES:
        raise InvalidRequest(
            f"task_type must be one of {', '.join(TASK_TYPES)}", param=_param("task_type")
        )
    cap = raw.get("max_cost_per_1k_tokens")
    max_cost: CostCap | None = None
    if cap is not None:
        if _is_number(cap) and cap >= 0:
            max_cost = CostCap(float(cap), float(cap))
        elif (
            isinstance(cap, dict)
            and set(cap) <= {"input", "output"}
            and cap
            and all(_is_number(v) and v >= 0 for v in cap.values())
        ):
            inf = float("inf")
            max_cost = CostCap(float(cap.get("input", inf)), float(cap.get("output", inf)))
        else:
            raise InvalidRequest(
                "max_cost_per_1k_tokens must be a non-negative number or {input, output}",
                param=_param("max_cost_per_1k_tokens"),
            )
    latency = raw.get("max_latency_ms")
    if latency is not None and not (_is_number(latency) and latency > 0):
        raise InvalidRequest(
            "max_latency_ms must be a positive number", param=_param("max_latency_ms")
        )
    fallbacks = raw.get("fallback_models", ())
    if not isinstance(fallbacks, list | tuple) or not all(isinstance(m, str) for m in fallbacks):
        raise InvalidRequest(
            "fallback_models must be a list of model names", param=_param("fallback_models")
        )
    return RequestPrefs(
        routing_strategy=strategy,
        task_type=task,
        max_cost=max_cost,
        max_latency_ms=float(latency) if latency is not None else None,
        fallback_models=tuple(fallbacks),
    )


def _chars(value: object) -> int:
    """Characters of a prompt-like value: a string, text parts, or (for a batch) the longest."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list) and value:
        if all(isinstance(v, int) for v in value):  # a pre-tokenized prompt
            return len(value) * CHARS_PER_TOKEN
        return max(_chars(v) for v in value)
    return 0


def estimate_prompt_tokens(body: Mapping[str, object]) -> int:
    """Tokens of a request's prompt, estimated as characters / 4 (rounded up).

    Chat: the text of every message. Completions and embeddings: the longest
    prompt or input of a batch, since each item is limited on its own.
    """
    messages = body.get("messages")
    if isinstance(messages, list):
        chars = 0
        for message in messages:
            if isinstance(message, dict):
                content = message.get("content")
                chars += len(content) if isinstance(content, str) else len(message_text(content))
    else:
        chars = _chars(body.get("prompt", body.get("input")))
    return -(-chars // CHARS_PER_TOKEN)


def routing_inputs(body: Mapping[str, object]) -> tuple[Sequence[Mapping[str, object]], int]:
    """What ``plan_route`` needs from a request body: messages (for task detection) and
    the estimated prompt tokens (for context windows)."""
    messages = body.get("messages")
    if isinstance(messages, list):
        return messages, estimate_prompt_tokens(body)
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return ({"role": "user", "content": prompt},), estimate_prompt_tokens(body)
    return (), estimate_prompt_tokens(body)
