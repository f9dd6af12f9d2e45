"""The proxy's error tree, rendered as OpenAI error JSON in one place.

Every error a client can see is a ``ProxyError``. Each class carries the HTTP
status and the OpenAI ``error.type`` the SDKs expect, so the middleware in
``app`` never has to guess:

    ProxyError                      500 server_error
    ├── InvalidRequest              400 invalid_request_error
    │   ├── UnsupportedParameter    400 invalid_request_error (code unsupported_parameter)
    │   ├── RequestTimeout          408 invalid_request_error (client stopped sending)
    │   ├── ExpectationFailed       417 invalid_request_error (an Expect other than 100-continue)
    │   └── HeadersTooLarge         431 invalid_request_error (header line or count over limit)
    ├── AuthenticationFailed        401 authentication_error
    ├── PermissionDenied            403 permission_error
    ├── ModelNotFound               404 invalid_request_error (code model_not_found)
    ├── NotFound                    404 invalid_request_error
    ├── MethodNotAllowed            405 invalid_request_error
    ├── PayloadTooLarge             413 invalid_request_error
    ├── UnsupportedMediaType        415 invalid_request_error (a compressed request body)
    ├── RateLimited                 429 rate_limit_error
    ├── UpstreamError               502 server_error   (connect refused, reset, bad reply)
    ├── ServiceUnavailable          503 server_error   (every candidate's breaker open)
    │   └── ProxyOverloaded         503 server_error   (code proxy_overloaded, Retry-After)
    ├── UpstreamTimeout             504 server_error   (a per-phase timeout fired)
    └── UpstreamHTTPError           the upstream's own status and body, passed through

Upstream transport errors are mapped to this tree in one place: ``proxy.upstream.errors``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson

JSONDict = dict[str, Any]
OVERLOAD_RETRY_AFTER_SECONDS = 1.0  # ProxyOverloaded's Retry-After


class ProxyError(Exception):
    """Base of every client-visible error."""

    status: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"
    default_code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code if code is not None else self.default_code
        self.headers: dict[str, str] = dict(headers or {})

    @property
    def http_status(self) -> int:
        return self.status

    def to_dict(self) -> JSONDict:
        return {
            "error": {
                "message": self.message,
                "type": self.error_type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        return orjson.dumps(self.to_dict())


class InvalidRequest(ProxyError):
    status = 400
    error_type = "invalid_request_error"


class UnsupportedParameter(InvalidRequest):
    default_code = "unsupported_parameter"


class RequestTimeout(InvalidRequest):
    """The client stopped sending in the middle of a request (RFC 9110 section 15.5.9)."""

    status = 408
    default_code = "request_timeout"


class HeadersTooLarge(InvalidRequest):
    """A header line over the limit, or too many headers (RFC 6585 section 5)."""

    status = 431
    default_code = "request_header_fields_too_large"


class ExpectationFailed(InvalidRequest):
    """An ``Expect`` other than ``100-continue`` (RFC 9110 section 10.1.1)."""

    status = 417
    default_code = "expectation_failed"


class AuthenticationFailed(ProxyError):
    status = 401
    error_type = "authentication_error"
    default_code = "invalid_api_key"


class PermissionDenied(ProxyError):
    status = 403
    error_type = "permission_error"


class ModelNotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "model_not_found"


class NotFound(ProxyError):
    status = 404
    error_type = "invalid_request_error"
    default_code = "not_found"


class MethodNotAllowed(ProxyError):
    status = 405
    error_type = "invalid_request_error"
    default_code = "method_not_allowed"


class PayloadTooLarge(ProxyError):
    status = 413
    error_type = "invalid_request_error"
    default_code = "request_too_large"


class UnsupportedMediaType(ProxyError):
    status = 415
    error_type = "invalid_request_error"
    default_code = "unsupported_media_type"


class RateLimited(ProxyError):
    status = 429
    error_type = "rate_limit_error"
    default_code = "rate_limit_exceeded"


class UpstreamError(ProxyError):
    status = 502
    error_type = "server_error"
    default_code = "upstream_error"


class ServiceUnavailable(ProxyError):
    status = 503
    error_type = "server_error"
    default_code = "service_unavailable"


class ProxyOverloaded(ServiceUnavailable):
    """The proxy's own limits or resources, not an upstream: retry shortly.

    Admission control (CB_MAX_IN_FLIGHT) and local failures (out of descriptors,
    buffers, memory or pooled connections) answer with it. It carries ``Retry-After``
    (and ``retry-after-ms``) of ``OVERLOAD_RETRY_AFTER_SECONDS``: capacity frees as
    requests in flight end, which is usually well within a second.
    """

    default_code = "proxy_overloaded"

    def __init__(self, message: str, *, headers: Mapping[str, str] | None = None) -> None:
        wait = OVERLOAD_RETRY_AFTER_SECONDS
        hint = {"Retry-After": str(math.ceil(wait)), "retry-after-ms": str(math.ceil(wait * 1000))}
        super().__init__(message, headers={**hint, **(headers or {})})


class UpstreamTimeout(ProxyError):
    status = 504
    error_type = "server_error"
    default_code = "upstream_timeout"


class UpstreamHTTPError(ProxyError):
    """An upstream's error response relayed to the client with its own status.

    ``body`` is the OpenAI-shaped error JSON to send (already translated for
    Anthropic and Gemini upstreams).
    """

    def __init__(
        self,
        upstream_status: int,
        body: JSONDict,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        err = body.get("error") if isinstance(body.get("error"), dict) else {}
        message = str(err.get("message", "upstream error")) if err else "upstream error"
        super().__init__(message, headers=headers)
        self.upstream_status = upstream_status
        self.body = body

    @property
    def http_status(self) -> int:
        return self.upstream_status

    def to_dict(self) -> JSONDict:
        return self.body


def error_body(status: int, message: str, *, code: str | None = None) -> JSONDict:
    """An OpenAI error object for an upstream reply whose body is not usable JSON."""
    kind = {
        400: "invalid_request_error",
        401: "authentication_error",
        403: "permission_error",
        404: "invalid_request_error",
        409: "invalid_request_error",
        413: "invalid_request_error",
        422: "invalid_request_error",
        429: "rate_limit_error",
    }.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": None, "code": code}}
