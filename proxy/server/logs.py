"""Logging setup: text for people, JSON lines for log pipelines.

Nothing on the request path formats a message unless the level is enabled
(%-style arguments are formatted lazily by the logging module).

No provider key reaches a log line: ``SecretsFilter`` sits on the proxy's
loggers (a filter on a logger sees its records before any handler, pytest's
caplog included) and redacts the message, the structured ``cb`` fields and a
traceback with the redactor of every running proxy (proxy.core.secrets).
"""

from __future__ import annotations

import logging
import sys
import weakref
from typing import Any, Protocol

import orjson

from proxy.core.secrets import Redactor

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s %(message)s"
# Loggers whose records can carry upstream text. A logger's filters do not run for records of
# its children, so each is named; every proxy module logs on one of the cb_proxy ones.
PROXY_LOGGERS = (
    "cb_proxy",
    "cb_proxy.forward",
    "cb_proxy.route",
    "cb_proxy.admin",
    "cb_proxy.health",
    "cb_proxy.lifecycle",
    "aiohttp.server",
    "aiohttp.web",
)


class HasRedactor(Protocol):
    redactor: Redactor


class SecretsFilter(logging.Filter):
    """Redacts provider keys from records; holds its proxies weakly (one per running state)."""

    def __init__(self) -> None:
        super().__init__("cb_proxy_secrets")
        self.sources: weakref.WeakSet[Any] = weakref.WeakSet()

    def filter(self, record: logging.LogRecord) -> bool:
        redactors = [s.redactor for s in list(self.sources) if s.redactor]
        if not redactors:
            return True
        message = record.getMessage()
        clean = message
        for redactor in redactors:
            clean = redactor.redact_text(clean)
        if clean is not message:
            record.msg, record.args = clean, None
        extra = getattr(record, "cb", None)
        if isinstance(extra, dict):
            for redactor in redactors:
                extra = redactor.redact_json(extra)
            record.cb = extra
        if record.exc_info and not record.exc_text:
            text = logging.Formatter().formatException(record.exc_info)
            for redactor in redactors:
                text = redactor.redact_text(text)
            record.exc_text = text
        if record.exc_text:
            for redactor in redactors:
                record.exc_text = redactor.redact_text(record.exc_text)
        return True


SECRETS_FILTER = SecretsFilter()


def guard_secrets(source: HasRedactor) -> None:
    """Redact ``source.redactor``'s keys from the proxy's log lines while ``source`` lives."""
    SECRETS_FILTER.sources.add(source)
    for name in PROXY_LOGGERS:
        logger = logging.getLogger(name)
        if SECRETS_FILTER not in logger.filters:
            logger.addFilter(SECRETS_FILTER)


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": round(record.created, 3),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        extra = getattr(record, "cb", None)
        if isinstance(extra, dict):
            payload.update(extra)
        if record.exc_info:  # the secrets filter leaves a redacted exc_text
            payload["exc"] = record.exc_text or self.formatException(record.exc_info)
        return orjson.dumps(payload, default=str).decode()


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a second line per request; ours is enough.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
