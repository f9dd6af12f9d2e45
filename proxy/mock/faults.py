"""Fault control and request statistics of the mock upstream.

Invariants:
- Faults are taken in the order they were added; the first one whose scope
  (``path`` substring, exact ``model``, stream-only kinds only for streams)
  matches is applied, and its ``count`` (None = until cleared) goes down by one.
- In-stream kinds (``stall_stream``, ``cut_stream``, ``error_event``,
  ``malformed_event``) act after ``after_events`` events; ``reject_prefill``
  answers 400 only to a request ending with an assistant turn (a prefill).
- ``clear()`` removes every fault and releases every stalled request at once
  (they then complete normally); a stall never ends any other way except the
  client going away.
- ``in_flight`` counts requests between ``begin`` and ``end``; ``cancelled``
  counts those that ended because the client went away. A reset keeps
  ``in_flight`` (those requests are still running) and zeroes the rest.
- Waiters wake on every change and re-check their condition, so a wait never
  misses an update and never polls.
"""

from __future__ import annotations

import asyncio
import enum
from collections import Counter, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

JSONDict = dict[str, Any]

HISTORY_LENGTH = 200
# Headers worth showing a test: credentials, versions, and what the SDKs add.
RECORDED_HEADERS = (
    "authorization",
    "x-api-key",
    "x-goog-api-key",
    "anthropic-version",
    "anthropic-beta",
    "content-type",
    "accept",
    "user-agent",
    "openai-organization",
    "openai-project",
    "x-request-id",
)
CREDENTIAL_HEADERS = ("authorization", "x-api-key", "x-goog-api-key")


class FaultKind(enum.Enum):
    STATUS = "status"
    STALL = "stall"
    STALL_STREAM = "stall_stream"
    DROP = "drop"
    CUT_STREAM = "cut_stream"
    ERROR_EVENT = "error_event"
    SLOW_FIRST_TOKEN = "slow_first_token"
    RATE_LIMIT = "rate_limit"
    QUOTA = "quota"
    MALFORMED_EVENT = "malformed_event"
    REJECT_PREFILL = "reject_prefill"


# Applied before the reply is built; the rest act inside a stream after N events.
BEFORE_REPLY = frozenset(
    {
        FaultKind.STATUS,
        FaultKind.STALL,
        FaultKind.DROP,
        FaultKind.SLOW_FIRST_TOKEN,
        FaultKind.RATE_LIMIT,
        FaultKind.QUOTA,
    }
)
# Taken only by a request that ends with an assistant turn (a prefill): a 400.
ON_PREFILL = frozenset({FaultKind.REJECT_PREFILL})
IN_STREAM = frozenset(FaultKind) - BEFORE_REPLY - ON_PREFILL


class FaultSpecError(ValueError):
    """A fault spec that cannot be applied; the message names the field."""


@dataclass(frozen=True)
class Fault:
    kind: FaultKind
    status: int = 503
    retry_after: str | None = None
    retry_after_ms: str | None = None
    body: Any = None  # replaces the format's error body (a str is sent as text)
    headers: Mapping[str, str] = field(default_factory=dict)
    count: int | None = None
    after_events: int = 0
    ms: float = 0.0
    path: str | None = None
    model: str | None = None
    # cut_stream: first send the format's bare end event (no finish reason), then hang up.
    end_marker: bool = False

    def to_json(self) -> JSONDict:
        out = asdict(self)
        out["kind"] = self.kind.value
        out["headers"] = dict(self.headers)
        return out

    def response_headers(self) -> dict[str, str]:
        headers = dict(self.headers)
        if self.retry_after is not None:
            headers["retry-after"] = self.retry_after
        if self.retry_after_ms is not None:
            headers["retry-after-ms"] = self.retry_after_ms
        return headers


def parse_faults(payload: Any) -> list[Fault]:
    """A fault spec or a list of them (JSON values) into Faults; FaultSpecError on any problem."""
    specs = payload if isinstance(payload, list) else [payload]
    return [
        parse_fault(spec, where=f"[{i}]" if isinstance(payload, list) else "")
        for i, spec in enumerate(specs)
    ]


def parse_fault(spec: Any, *, where: str = "") -> Fault:
    if not isinstance(spec, dict):
        raise FaultSpecError(f"fault{where}: expected an object")
    unknown = set(spec) - set(Fault.__dataclass_fields__)
    if unknown:
        raise FaultSpecError(f"fault{where}: unknown keys {sorted(unknown)}")
    try:
        kind = FaultKind(spec.get("kind"))
    except ValueError:
        names = ", ".join(k.value for k in FaultKind)
        raise FaultSpecError(f"fault{where}.kind: expected one of {names}") from None
    status = spec.get("status", 503)
    if not _is_int(status) or not 100 <= status <= 599:
        raise FaultSpecError(f"fault{where}.status: expected an HTTP status")
    count = spec.get("count")
    if count is not None and (not _is_int(count) or count < 1):
        raise FaultSpecError(f"fault{where}.count: expected a positive integer or null")
    after = spec.get("after_events", 0)
    if not _is_int(after) or after < 0:
        raise FaultSpecError(f"fault{where}.after_events: expected a non-negative integer")
    ms = spec.get("ms", 0)
    if not isinstance(ms, (int, float)) or isinstance(ms, bool) or ms < 0:
        raise FaultSpecError(f"fault{where}.ms: expected a non-negative number")
    headers = spec.get("headers") or {}
    if not isinstance(headers, dict) or not all(isinstance(v, str) for v in headers.values()):
        raise FaultSpecError(f"fault{where}.headers: expected an object of strings")
    end_marker = spec.get("end_marker", False)
    if not isinstance(end_marker, bool):
        raise FaultSpecError(f"fault{where}.end_marker: expected true or false")
    for key in ("path", "model"):
        if spec.get(key) is not None and not isinstance(spec[key], str):
            raise FaultSpecError(f"fault{where}.{key}: expected a string")
    return Fault(
        kind=kind,
        status=status,
        retry_after=_header_value(spec.get("retry_after"), f"fault{where}.retry_after"),
        retry_after_ms=_header_value(spec.get("retry_after_ms"), f"fault{where}.retry_after_ms"),
        body=spec.get("body"),
        headers={str(k): v for k, v in headers.items()},
        count=count,
        after_events=after,
        ms=float(ms),
        path=spec.get("path"),
        model=spec.get("model"),
        end_marker=end_marker,
    )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _header_value(value: Any, where: str) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise FaultSpecError(f"{where}: expected a string or a number")
    return str(value)


@dataclass
class _Active:
    fault: Fault
    remaining: int | None


class FaultBoard:
    """The faults in force, and the event that releases stalled requests."""

    def __init__(self) -> None:
        self._active: list[_Active] = []
        self._release = asyncio.Event()

    def add(self, faults: Iterable[Fault]) -> None:
        self._active.extend(_Active(f, f.count) for f in faults)

    def take(
        self, path: str, model: str | None, *, stream: bool, kinds: frozenset[FaultKind]
    ) -> tuple[Fault, asyncio.Event] | None:
        """The first matching fault (consuming one of its uses) and the stall-release event."""
        for entry in self._active:
            fault = entry.fault
            if fault.kind not in kinds or (fault.kind in IN_STREAM and not stream):
                continue
            if fault.path is not None and fault.path not in path:
                continue
            if fault.model is not None and fault.model != model:
                continue
            if entry.remaining is not None:
                entry.remaining -= 1
                if entry.remaining == 0:
                    self._active.remove(entry)
            return fault, self._release
        return None

    def clear(self) -> None:
        self._active.clear()
        self._release.set()
        self._release = asyncio.Event()

    def snapshot(self) -> list[JSONDict]:
        return [{**e.fault.to_json(), "remaining": e.remaining} for e in self._active]


class MockStats:
    """What the mock has received, for tests and the control API."""

    def __init__(self) -> None:
        self.in_flight = 0
        self._changed = asyncio.Event()
        self.reset()

    def reset(self) -> None:
        self.requests = 0
        self.cancelled = 0
        self.by_path: Counter[str] = Counter()
        self.by_model: Counter[str] = Counter()
        self.last_body: Any = None
        self.last_headers: dict[str, str] = {}
        self.history: deque[JSONDict] = deque(maxlen=HISTORY_LENGTH)
        self._notify()

    def begin(
        self,
        path: str,
        model: str | None,
        stream: bool,
        body: Any,
        headers: Mapping[str, str],
        query_key: str | None = None,
    ) -> None:
        self.requests += 1
        self.in_flight += 1
        self.by_path[path] += 1
        if model is not None:
            self.by_model[model] += 1
        self.last_body = body
        self.last_headers = {h: headers[h] for h in RECORDED_HEADERS if h in headers}
        if query_key is not None:
            self.last_headers["key (query)"] = query_key
        credential = next((headers[h] for h in CREDENTIAL_HEADERS if h in headers), query_key)
        self.history.append(
            {"path": path, "model": model, "stream": stream, "credential": credential}
        )
        self._notify()

    def end(self, *, cancelled: bool) -> None:
        self.in_flight -= 1
        if cancelled:
            self.cancelled += 1
        self._notify()

    def snapshot(self) -> JSONDict:
        return {
            "requests": self.requests,
            "by_path": dict(self.by_path),
            "by_model": dict(self.by_model),
            "last_body": self.last_body,
            "last_headers": dict(self.last_headers),
            "in_flight": self.in_flight,
            "cancelled": self.cancelled,
            "history": list(self.history),
        }

    async def wait_until(self, condition: Callable[[MockStats], bool], seconds: float) -> bool:
        """True once ``condition(self)`` holds, False if ``seconds`` pass first."""
        try:
            async with asyncio.timeout(seconds):
                while not condition(self):
                    await self._changed.wait()
        except TimeoutError:
            return False
        return True

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()
