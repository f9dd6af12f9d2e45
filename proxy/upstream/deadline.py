"""Deadlines for upstream calls, checked by one periodic sweep instead of a timer each.

``asyncio.timeout`` schedules a timer handle on entry and on every
``reschedule``; a proxy that pushes an idle deadline forward at every stream
chunk and sets a deadline per phase of every request pays for that on the hot
path. Here a guard is a plain object with a ``when``; one ``Watchdog`` per
event loop looks at the active guards every ``tick`` seconds and cancels the
task of any whose deadline passed, which the guard turns into ``TimeoutError``
on exit, exactly like ``asyncio.timeout``.

Invariants:
- A deadline fires at most ``tick`` late and never early.
- A guard cancels only its own task, only while the task is inside it, and
  turns only that cancellation into ``TimeoutError`` (``Task.uncancel``
  tells it apart from a cancellation that came from elsewhere, such as a
  client disconnect).
- The sweep runs only while guards are active.
"""

from __future__ import annotations

import asyncio
from types import TracebackType

DEFAULT_TICK = 0.05  # seconds: upstream timeouts are whole seconds; 50 ms late is noise


class Guard:
    """A deadline for the current task; ``reschedule`` is an attribute write."""

    __slots__ = ("_dog", "_expired", "_task", "when")

    def __init__(self, dog: Watchdog, when: float | None) -> None:
        self._dog = dog
        self.when = when  # loop time, or None for no deadline
        self._task: asyncio.Task[object] | None = None
        self._expired = False

    def reschedule(self, when: float | None) -> None:
        self.when = when

    def expired(self) -> bool:
        return self._expired

    def __enter__(self) -> Guard:
        task = asyncio.current_task()
        if task is None:
            raise RuntimeError("a deadline guard needs a running task")
        self._task = task
        self._dog.add(self)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._dog.discard(self)
        if (
            self._expired
            and self._task is not None
            # Take our cancel request back however the body ended, as asyncio.timeout does:
            # left behind, it keeps the task "cancelling" and turns its next deadline into
            # a CancelledError. So uncancel() comes before the exception type test.
            and self._task.uncancel() == 0
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def fire(self) -> None:
        if not self._expired and self._task is not None:
            self._expired = True
            self._task.cancel()


class Watchdog:
    """The active guards of one event loop, swept every ``tick`` seconds."""

    def __init__(self, tick: float = DEFAULT_TICK) -> None:
        self._tick = tick
        self._guards: set[Guard] = set()
        self._handle: asyncio.TimerHandle | None = None

    def guard(self, when: float | None) -> Guard:
        return Guard(self, when)

    def add(self, guard: Guard) -> None:
        self._guards.add(guard)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + self._tick, self._sweep)

    def discard(self, guard: Guard) -> None:
        self._guards.discard(guard)

    def _sweep(self) -> None:
        self._handle = None
        if not self._guards:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        for guard in [g for g in self._guards if g.when is not None and g.when <= now]:
            guard.fire()
        self._handle = loop.call_at(now + self._tick, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
