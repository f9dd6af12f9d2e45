"""The requests in flight on a listener, and the end of the grace period.

``lifecycle.serve`` drains in three steps (docs/architecture.md, 'Shutdown'):
accept for the propagation delay, let the work in flight finish, and at the
end of the grace period ``expire``: every handler still running is cancelled
once, and the cancellation is answered instead of cutting the connection. A
plain request gets a 503 (``guarded`` in ``app``); a committed stream gets one
in-band error event and the end of its body (``streaming``).

Invariants:
- ``expire`` cancels each tracked handler task at most once, and only a
  cancellation it made is claimed: ``claim`` takes it back (``Task.uncancel``),
  so any other cancellation (a client gone, the loop stopping) propagates.
- ``wait_idle`` returns as soon as no handler is tracked; it never polls.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from aiohttp import web

from proxy.core.errors import ServiceUnavailable

# The `error.code` of what a request or stream cut by the end of the grace period gets.
SHUTTING_DOWN_CODE = "proxy_shutting_down"

Task = asyncio.Task[Any]


def shutting_down() -> ServiceUnavailable:
    return ServiceUnavailable(
        "the proxy is shutting down and its grace period ended before this request finished; "
        "retry it",
        code=SHUTTING_DOWN_CODE,
    )


class Drain:
    """Handler tasks in flight; cheap on the hot path (a set add and discard)."""

    __slots__ = ("_cancelled", "_idle", "_tasks", "expired")

    def __init__(self) -> None:
        self._tasks: set[Task] = set()
        self._cancelled: set[Task] = set()
        self._idle: asyncio.Event | None = None  # made by wait_idle: no loop needed before
        self.expired = False

    def __len__(self) -> int:
        return len(self._tasks)

    def enter(self) -> Task | None:
        task = asyncio.current_task()
        if task is not None:
            self._tasks.add(task)
        return task

    def leave(self, task: Task | None) -> None:
        if task is not None:
            self._tasks.discard(task)
        if not self._tasks and self._idle is not None:
            self._idle.set()

    async def wait_idle(self, until: float) -> bool:
        """Wait until no handler runs, or the loop time ``until``; True if none runs."""
        if not self._tasks:
            return True
        self._idle = asyncio.Event()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout_at(until):
                await self._idle.wait()
        return not self._tasks

    def expire(self) -> int:
        """The grace period is over: cancel every handler still running (once each)."""
        self.expired = True
        fresh = self._tasks - self._cancelled
        for task in fresh:
            task.cancel()
        self._cancelled |= fresh
        return len(fresh)

    def claim(self) -> bool:
        """In an ``except CancelledError``: was it ``expire``'s? Then it is taken back."""
        task = asyncio.current_task()
        if task is None or task not in self._cancelled:
            return False
        self._cancelled.discard(task)
        task.uncancel()
        return True


DRAIN: web.AppKey[Drain] = web.AppKey("drain", Drain)
