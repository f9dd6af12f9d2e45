"""Egress through an HTTP proxy: HTTPS_PROXY, HTTP_PROXY and NO_PROXY (docs/upstream.md).

Semantics are those of Go's ``golang.org/x/net/http/httpproxy`` (which curl and
Python's urllib mostly share):

- ``HTTPS_PROXY`` is used for https upstreams, ``HTTP_PROXY`` for http ones;
  the upper-case name wins over the lower-case one when both are set;
- a proxy URL without a scheme is ``http://``; user information in it becomes
  a ``Proxy-Authorization: Basic`` header on the CONNECT request; a TLS
  connection to the proxy itself (``https://`` proxy URL) is not supported and
  refused at start;
- ``NO_PROXY`` is a comma-separated list: ``*`` bypasses the proxy for every
  host; ``example.com`` and ``.example.com`` match that domain and its
  subdomains; an IP address or CIDR block matches addresses; an entry may end
  in ``:port`` to match that port only. Unlike Go, loopback hosts are not
  exempt by themselves (as in curl and urllib): list them in ``NO_PROXY``.

Both schemes go through a CONNECT tunnel (RFC 9110 section 9.3.6), also for
plain-http upstreams, instead of absolute-form requests: the bytes on the
tunnel are exactly what a direct connection carries, so framing, pooling per
upstream origin and the resend rule need no second code path. A proxy that
only allows CONNECT to port 443 (squid's default) must allow the http
upstreams' ports, or those upstreams belong in ``NO_PROXY``.
"""

from __future__ import annotations

import base64
import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network


class EgressConfigError(ValueError):
    """A proxy variable this client cannot use; the message names it."""


@dataclass(frozen=True, slots=True)
class ProxyRoute:
    """Where to open the TCP connection, and the CONNECT request's extra header."""

    host: str
    port: int
    authorization: str | None = None  # a Proxy-Authorization value

    def __repr__(self) -> str:  # never the credentials in a log line
        return f"ProxyRoute({self.host}:{self.port})"


@dataclass(frozen=True, slots=True)
class _Bypass:
    domain: str | None  # lower-case, without a leading dot
    network: IPNetwork | None
    port: int | None

    def matches(self, host: str, ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None,
                port: int) -> bool:  # fmt: skip
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return ip is not None and ip in self.network
        domain = self.domain or ""
        return host == domain or host.endswith("." + domain)


def _env(environ: Mapping[str, str], name: str) -> str:
    return (environ.get(name) or environ.get(name.lower()) or "").strip()


def _route(value: str, name: str) -> ProxyRoute | None:
    if not value:
        return None
    parts = urlsplit(value if "://" in value else "http://" + value)
    if parts.scheme.lower() != "http":
        raise EgressConfigError(
            f"{name}: only http:// proxies are supported (CONNECT over plain TCP), got "
            f"{parts.scheme}://"
        )
    if not parts.hostname:
        raise EgressConfigError(f"{name}: no host in the proxy URL")
    try:
        port = parts.port or 80
    except ValueError:
        raise EgressConfigError(f"{name}: bad port in the proxy URL") from None
    auth = None
    if parts.username is not None:
        user_pass = f"{unquote(parts.username)}:{unquote(parts.password or '')}"
        auth = "Basic " + base64.b64encode(user_pass.encode()).decode("ascii")
    return ProxyRoute(parts.hostname, port, auth)


def _bypass(entry: str) -> _Bypass | None:
    entry = entry.strip().lower()
    if not entry:
        return None
    port: int | None = None
    host = entry
    if entry.startswith("["):  # [v6]:port or [v6]
        inner, _, after = entry[1:].partition("]")
        host = inner
        if after.startswith(":") and after[1:].isdigit():
            port = int(after[1:])
    elif entry.count(":") == 1:
        name, _, port_text = entry.partition(":")
        if port_text.isdigit():
            host, port = name, int(port_text)
    try:
        return _Bypass(None, ipaddress.ip_network(host, strict=False), port)
    except ValueError:
        pass
    return _Bypass(host.lstrip(".").removeprefix("*."), None, port)


class EgressProxies:
    """The egress proxy settings read from an environment mapping, once."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.https = _route(_env(environ, "HTTPS_PROXY"), "HTTPS_PROXY")
        self.http = _route(_env(environ, "HTTP_PROXY"), "HTTP_PROXY")
        entries = [e for e in _env(environ, "NO_PROXY").split(",") if e.strip()]
        self.bypass_all = any(e.strip() == "*" for e in entries)
        self._bypass = [b for e in entries if e.strip() != "*" and (b := _bypass(e))]
        self._cache: dict[tuple[str, str, int], ProxyRoute | None] = {}

    @property
    def enabled(self) -> bool:
        return (self.https is not None or self.http is not None) and not self.bypass_all

    def route(self, scheme: str, host: str, port: int) -> ProxyRoute | None:
        """The proxy for this upstream origin, or None to connect directly."""
        key = (scheme, host, port)
        if key in self._cache:
            return self._cache[key]
        found = self._lookup(scheme, host.lower().rstrip("."), port)
        self._cache[key] = found
        return found

    def _lookup(self, scheme: str, host: str, port: int) -> ProxyRoute | None:
        route = self.https if scheme == "https" else self.http
        if route is None or self.bypass_all:
            return None
        try:
            ip: ipaddress.IPv4Address | ipaddress.IPv6Address | None = ipaddress.ip_address(host)
        except ValueError:
            ip = None
        if any(b.matches(host, ip, port) for b in self._bypass):
            return None
        return route
