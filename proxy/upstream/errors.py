"""The upstream client's exceptions, and the one map from them to outcomes and client errors.

Every way an upstream call can fail without an HTTP reply is one of these
classes; ``failure`` turns any of them (and a deadline's ``TimeoutError``)
into the ``Outcome`` the breaker records and the ``ProxyError`` the client
sees. Nothing else in the proxy translates transport errors (docs/upstream.md):

    TransportError                 base of the client's errors
    ├── UpstreamFault              the upstream's failure: Outcome.FAILURE
    │   ├── ConnectFailed          refused, unreachable, DNS, TLS, egress proxy   502
    │   │   └── ConnectTimeout     no connection within the connect timeout       504
    │   ├── Disconnected           closed before the response head was complete   502
    │   │   └── MalformedHead      a head llhttp refuses, or framing we refuse    502
    │   ├── PayloadError           the body ended early or is malformed           502
    │   └── ResponseTooLarge       a bound exceeded (head, one SSE event, body)   502
    │       ├── HeaderTooLarge     (also a Disconnected: no head was returned)
    │       ├── EventTooLarge
    │       └── BodyTooLarge
    └── LocalFailure               the proxy's own resources: no outcome (``local``), 503
        ├── PoolExhausted          no free connection to the host within the connect timeout
        └── LocalResourceError     EMFILE, ENFILE, ENOBUFS, ENOMEM opening a socket

A local failure never counts against an upstream's breaker: the upstream did
nothing wrong, and opening its breaker would turn our own overload into an
outage report. Its ``Failure`` has ``local=True`` and no breaker outcome: the
attempt releases its permit (a probe slot returns), the attempt metric counts
it as ``local_failure``, and the attempt loop moves on to the next candidate
(another host may have a free connection).
"""

from __future__ import annotations

import errno
from dataclasses import dataclass

from proxy.core.errors import ProxyError, ProxyOverloaded, UpstreamError, UpstreamTimeout
from proxy.core.outcome import Outcome
from proxy.core.sse import EventTooLarge as SSEEventTooLarge

# errno values that mean the proxy itself ran out of something, not that the peer failed.
# Out of descriptors, buffers or memory: this process's (or host's) limits, never a sign that
# the upstream is down. EADDRNOTAVAIL is not here: besides ephemeral-port exhaustion it is what
# an unroutable address family gives (an IPv6 upstream in a pod without IPv6), which is the
# upstream's (or its DNS's) problem and must be able to open its breaker.
LOCAL_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


class TransportError(Exception):
    """Base of the upstream client's errors."""


class UpstreamFault(TransportError):
    """A failure of the upstream (or the path to it): counts against its breaker."""


class ConnectFailed(UpstreamFault):
    """No connection: refused, unreachable, DNS or TLS failure, the egress proxy said no."""


class ConnectTimeout(ConnectFailed):
    pass


class Disconnected(UpstreamFault):
    """The connection ended before the response head was complete.

    ``request_written``: the request's bytes were handed to the socket;
    ``response_started``: at least one response byte arrived. The pool's resend
    rule (``proxy.upstream.client``) reads both.
    """

    def __init__(
        self, message: str, *, request_written: bool = True, response_started: bool = False
    ) -> None:
        super().__init__(message)
        self.request_written = request_written
        self.response_started = response_started


class MalformedHead(Disconnected):
    """A response head the parser refuses (or framing this client refuses)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, response_started=True)


class PayloadError(UpstreamFault):
    """The response body ended early or was malformed."""


class ResponseTooLarge(UpstreamFault):
    """A part of the reply is over its configured bound (docs/upstream.md, 'Limits')."""


class HeaderTooLarge(ResponseTooLarge, MalformedHead):
    pass


class EventTooLarge(ResponseTooLarge):
    pass


class BodyTooLarge(ResponseTooLarge):
    pass


class LocalFailure(TransportError):
    """The proxy's own limits or resources: never counted against the upstream."""


class PoolExhausted(LocalFailure):
    pass


class LocalResourceError(LocalFailure):
    pass


def from_os_error(exc: OSError, where: str) -> TransportError:
    """A socket error while connecting: ours (out of descriptors, buffers, memory) or theirs."""
    if exc.errno in LOCAL_ERRNOS:
        return LocalResourceError(f"the proxy cannot open a socket to {where}: {exc}")
    return ConnectFailed(f"cannot connect to {where}: {exc}")


@dataclass(frozen=True, slots=True)
class Failure:
    """What an upstream call's exception means: for the breaker, the client and the retry."""

    outcome: Outcome  # for a local failure: IGNORED, but see ``local``
    error: ProxyError
    transient: bool = False  # quick and passing: worth one retry on the same deployment
    local: bool = False  # the proxy's own failure: never recorded on the breaker
    # The path to the provider failed (no connection, no reply head): its provider breaker's
    # failure, not the model's (docs/breaker.md, 'Keys').
    transport: bool = False


def local_failure(error: ProxyError) -> Failure:
    """The proxy's own failure: no breaker outcome, the permit is released."""
    return Failure(Outcome.IGNORED, error, local=True)


def failure(exc: BaseException, upstream: str, *, doing: str = "") -> Failure:
    """Map an exception from an upstream call to its Failure.

    ``upstream`` names the deployment in the message; ``doing`` says what the
    call was waiting for when a deadline fired ("waiting for the first token").
    Exceptions that are no transport failure (a bug) are re-raised by the caller:
    this function only sees the ones listed in the module docstring,
    ``TimeoutError`` and ``OSError``.
    """
    if isinstance(exc, LocalFailure) or (
        # Out of buffers or memory while sending or reading: still ours, not the peer's.
        isinstance(exc, OSError) and exc.errno in LOCAL_ERRNOS
    ):
        return local_failure(ProxyOverloaded(f"the proxy could not call {upstream}: {exc}"))
    if isinstance(exc, ConnectTimeout):
        return Failure(
            Outcome.FAILURE,
            UpstreamTimeout(f"upstream {upstream} timed out connecting ({exc})"),
            transport=True,
        )
    if isinstance(exc, TimeoutError):
        return Failure(
            Outcome.FAILURE, UpstreamTimeout(f"upstream {upstream} timed out {doing}".rstrip())
        )
    if isinstance(exc, ResponseTooLarge | SSEEventTooLarge):
        return Failure(
            Outcome.FAILURE,
            UpstreamError(f"upstream {upstream} sent a reply over the proxy's limit: {exc}",
                          code="upstream_response_too_large"),
        )  # fmt: skip
    if isinstance(exc, MalformedHead):
        return Failure(
            Outcome.FAILURE,
            UpstreamError(f"upstream {upstream} sent a malformed reply: {exc}"),
            transport=True,
        )
    if isinstance(exc, ConnectFailed | Disconnected):
        # Refused, reset or closed before any reply: quick and transient, worth one retry on
        # the same deployment, but only if the request never left: a POST the upstream may
        # have read and worked on must not run (and be billed) twice there. It fails over.
        unsent = isinstance(exc, ConnectFailed) or not exc.request_written
        return Failure(
            Outcome.FAILURE,
            UpstreamError(f"upstream {upstream} unreachable: {exc}"),
            unsent,
            transport=True,
        )
    if isinstance(exc, PayloadError):
        return Failure(Outcome.FAILURE, UpstreamError(f"upstream {upstream} failed: {exc}"))
    if isinstance(exc, OSError):  # a socket error outside the client's own mapping
        return Failure(
            Outcome.FAILURE,
            UpstreamError(f"upstream {upstream} failed: {type(exc).__name__}: {exc}"),
            transport=True,
        )
    raise TypeError(f"not an upstream failure: {type(exc).__name__}") from exc


# Everything ``failure`` maps; callers catch exactly this tuple.
UPSTREAM_ERRORS: tuple[type[BaseException], ...] = (TransportError, SSEEventTooLarge, OSError)
