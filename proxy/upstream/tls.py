"""Trust for https upstreams: the system's CAs plus ``SSL_CERT_FILE`` / ``SSL_CERT_DIR``.

Invariants:
- The two variables add CAs to the system's; they never replace them.
- They are read from the environment the proxy was started with (a mapping handed
  in, so tests inject theirs), not from the process environment OpenSSL would read.
- A file that cannot be loaded is a ``TLSConfigError``: a start-up error, never a
  failure of every https upstream.
- SNI is always sent: the pool passes ``server_hostname`` with this context.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping

__all__ = ["TLSConfigError", "system_ssl_context"]


class TLSConfigError(ValueError):
    """``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` cannot be loaded; the message names the variable."""


def system_ssl_context(environ: Mapping[str, str]) -> ssl.SSLContext:
    """The system's CAs, plus ``SSL_CERT_FILE`` / ``SSL_CERT_DIR`` from ``environ``.

    OpenSSL reads those two variables itself, but only from the process
    environment and only instead of its default bundle; loading them here
    adds them to the system CAs and honours the environment the proxy was
    started with (tests inject theirs). A file that cannot be loaded is a
    ``TLSConfigError``: a start-up error, never a failure of every https upstream.
    """
    context = ssl.create_default_context()
    cafile = environ.get("SSL_CERT_FILE") or None
    capath = environ.get("SSL_CERT_DIR") or None
    if cafile or capath:
        try:
            context.load_verify_locations(cafile=cafile, capath=capath)
        except (OSError, ssl.SSLError) as exc:
            names = " / ".join(
                f"{name}={value!r}"
                for name, value in (("SSL_CERT_FILE", cafile), ("SSL_CERT_DIR", capath))
                if value
            )
            raise TLSConfigError(f"{names}: cannot load the CA certificates: {exc}") from exc
    return context
