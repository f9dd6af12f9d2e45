"""How one upstream attempt ended, in the breaker's terms (docs/breaker.md, 'Outcomes').

Every attempt has exactly one outcome. The classification of HTTP replies
lives here so the OpenAI, Anthropic and Gemini adapters agree on it; each
adapter only adds what its own error bodies say (Anthropic's 529 and
credit-balance errors, Gemini's RESOURCE_EXHAUSTED ...).
"""

from __future__ import annotations

import enum


class Outcome(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"  # counts against the upstream
    RATE_LIMITED = "rate_limited"  # closes the (upstream, model) gate; not a failure
    IGNORED = "ignored"  # caller fault or client cancellation: no retry, no fallback


# Quick, passing failures worth one retry on the same deployment (docs/breaker.md).
_TRANSIENT_STATUSES = frozenset({500, 502, 503, 529})
# Codes that mean 'the account is out of money', which no waiting fixes.
QUOTA_CODES = frozenset({"insufficient_quota", "billing_hard_limit_reached", "billing_not_active"})


def classify_status(
    status: int, error_code: str | None = None, *, client_key: bool = False
) -> Outcome:
    """Outcome of an HTTP reply from its status and the error body's code.

    ``client_key`` is True when the credential came from the client rather than
    the proxy: then 401/403 are the caller's problem, not the upstream's.
    """
    if 200 <= status < 300:
        return Outcome.SUCCESS
    if status == 429:
        return Outcome.FAILURE if error_code in QUOTA_CODES else Outcome.RATE_LIMITED
    if status in (401, 403):
        return Outcome.IGNORED if client_key else Outcome.FAILURE
    if status in (402, 408) or status >= 500:
        return Outcome.FAILURE
    return Outcome.IGNORED


def is_transient(status: int) -> bool:
    """A quick failure worth one retry on the same deployment (docs/breaker.md)."""
    return status in _TRANSIENT_STATUSES


def breaker_outcomes(outcome: Outcome, provider_level: bool) -> tuple[Outcome, Outcome]:
    """(provider breaker's, deployment breaker's) outcome of one attempt (docs/breaker.md, 'Keys').

    A provider-level failure (the path to the upstream or the proxy's credential: connect
    refused, DNS, TLS, a reset before any reply, 401/403 on the proxy's key, quota) counts on
    the provider breaker only, so a provider that comes back does not find each of its models
    still open. Any other failure is the model's: the provider answered, which says its
    transport works (a success there), and the deployment breaker counts the failure. A rate
    limit says nothing about the transport; ignored outcomes count nowhere.
    """
    if outcome is Outcome.SUCCESS or outcome is Outcome.IGNORED:
        return outcome, outcome
    if outcome is Outcome.RATE_LIMITED:
        return Outcome.IGNORED, outcome
    if provider_level:
        return Outcome.FAILURE, Outcome.IGNORED
    return Outcome.SUCCESS, Outcome.FAILURE
