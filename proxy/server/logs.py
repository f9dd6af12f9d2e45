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


def _text_value(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, dict):
        return ",".join(f"{k}={_text_value(v)}" for k, v in value.items())
    text = str(value)
    return repr(text) if not text or any(c.isspace() for c in text) else text


class TextFormatter(logging.Formatter):
    """``TEXT_FORMAT``, then a record's structured ``cb`` fields when they hold lists.

    The JSON format carries them as keys; here the scalar fields follow on one indented
    line (``key=value``) and each list of records (a route plan's ``candidates`` and
    ``rejected``) gets one indented line per item, so the debug line of a request shows
    the whole plan and every rejection, as in JSON.
    """

    def __init__(self) -> None:
        super().__init__(TEXT_FORMAT)

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        extra = getattr(record, "cb", None)
        if not isinstance(extra, dict) or not any(isinstance(v, list) for v in extra.values()):
            return text  # one-line records (admin, health) say it all in their message
        scalars = []
        lines = [text]
        lists: list[tuple[str, list[object]]] = []
        for key, value in extra.items():
            if isinstance(value, list):
                lists.append((key, value))
            else:
                scalars.append(f"{key}={_text_value(value)}")
        if scalars:
            lines.append("  " + " ".join(scalars))
        for key, items in lists:
            if not items:
                lines.append(f"  {key}: none")
            for n, item in enumerate(items, start=1):
                if isinstance(item, dict):
                    fields = " ".join(f"{k}={_text_value(v)}" for k, v in item.items())
                else:
                    fields = _text_value(item)
                lines.append(f"  {key}[{n}] {fields}")
        return "\n".join(lines)


def setup_logging(level: str, fmt: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else TextFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log would add a second line per request; ours is enough.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
