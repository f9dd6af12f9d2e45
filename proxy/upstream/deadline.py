"""Deadlines for upstream calls, checked by one periodic sweep instead of a timer each.

``asyncio.timeout`` schedules a timer handle on entry and on every
``reschedule``; a proxy that pushes an idle deadline forward at every stream
chunk and sets a deadline per phase of every request pays for that on the hot
path. Here a guard is a plain object with a ``when``; one ``Watchdog`` per
event loop looks every ``tick`` seconds at the guards that may be due and
cancels the task of any whose deadline passed, which the guard turns into
``TimeoutError`` on exit, exactly like ``asyncio.timeout``.

The sweep is O(due), not O(active): guards are filed in a timing wheel, one
slot per ``tick`` of loop time (slot ``floor(when / tick)``), and a sweep
looks only at the slots whose time has come. Pushing a deadline *later* is an
attribute write (``guard.when = ...``): the guard stays in its old slot, and
the sweep that reaches it finds it not yet due and files it again where its
deadline now is (lazy re-filing; a stream that gets a chunk every second is
re-filed once per idle period, not once per chunk). Pushing a deadline
*earlier* than the slot it is filed in, or from ``None`` to a time, goes
through ``reschedule`` (or the inlined ``if when < guard.filed_at:
guard.refile()``), which files it again at once.

Invariants:
- A deadline fires at most ``tick`` late and never early: every sweep reaches
  at least one new slot and every slot up to ``floor(now / tick)``; a guard
  is fired only when ``when <= now``, and one found not due is filed in a
  slot no later than its deadline's (at the latest the next one swept).
- A guard cancels only its own task, only while the task is inside it, and
  turns only that cancellation into ``TimeoutError`` (``Task.uncancel``
  tells it apart from a cancellation that came from elsewhere, such as a
  client disconnect).
- The sweep runs only while guards are active.
- A guard is in at most one slot, and in none once it exits: leaving is O(1)
  and nothing of an exited guard is held.
"""

from __future__ import annotations

import asyncio
import math
from types import TracebackType

DEFAULT_TICK = 0.05  # seconds: upstream timeouts are whole seconds; 50 ms late is noise
_NOT_FILED = math.inf  # filed_at of a guard in no slot: any deadline is earlier


class Guard:
    """A deadline for the current task; pushing it later is an attribute write."""

    __slots__ = ("_dog", "_expired", "_slot", "_task", "filed_at", "when")

    def __init__(self, dog: Watchdog, when: float | None) -> None:
        self._dog = dog
        self.when = when  # loop time, or None for no deadline
        self._task: asyncio.Task[object] | None = None
        self._expired = False
        self._slot: int | None = None  # the wheel slot it is filed in
        # The start of that slot in loop time (inf when in none): a deadline earlier than
        # this must be filed again (refile), a later one is found by the sweep.
        self.filed_at = _NOT_FILED

    def reschedule(self, when: float | None) -> None:
        self.when = when
        if when is not None and when < self.filed_at and self._task is not None:
            self._dog.file(self)

    def refile(self) -> None:
        """File the guard again after ``when`` was moved before ``filed_at`` by hand."""
        if self._task is not None:
            self._dog.file(self)

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
        task = self._task
        self._task = None  # outside the guard: never fired again, and the task is not held
        if (
            self._expired
            and task is not None
            # Take our cancel request back however the body ended, as asyncio.timeout does:
            # left behind, it keeps the task "cancelling" and turns its next deadline into
            # a CancelledError. So uncancel() comes before the exception type test.
            and task.uncancel() == 0
            and exc_type is asyncio.CancelledError
        ):
            raise TimeoutError from exc

    def fire(self) -> None:
        if not self._expired and self._task is not None:
            self._expired = True
            self._task.cancel()


class Watchdog:
    """The active guards of one event loop in a timing wheel, swept every ``tick`` seconds."""

    def __init__(self, tick: float = DEFAULT_TICK) -> None:
        self._tick = tick
        self._slots: dict[int, set[Guard]] = {}  # slot number -> the guards filed there
        self._active = 0  # guards entered and not exited (filed or not)
        self._swept = -1  # the last slot a sweep looked at
        self._handle: asyncio.TimerHandle | None = None

    def guard(self, when: float | None) -> Guard:
        return Guard(self, when)

    def add(self, guard: Guard) -> None:
        self._active += 1
        if guard.when is not None:
            self.file(guard)
        if self._handle is None:
            loop = asyncio.get_running_loop()
            self._handle = loop.call_at(loop.time() + self._tick, self._sweep)

    def file(self, guard: Guard) -> None:
        """(Re)file an active guard with a deadline in the slot of its deadline."""
        when = guard.when
        assert when is not None
        self._unfile(guard)
        slot = math.floor(when / self._tick)
        if slot <= self._swept:
            slot = self._swept + 1  # already past: the next sweep looks at it
        bucket = self._slots.get(slot)
        if bucket is None:
            self._slots[slot] = {guard}
        else:
            bucket.add(guard)
        guard._slot = slot
        guard.filed_at = slot * self._tick

    def _unfile(self, guard: Guard) -> None:
        slot = guard._slot
        if slot is None:
            return
        guard._slot = None
        guard.filed_at = _NOT_FILED
        bucket = self._slots.get(slot)
        if bucket is not None:
            bucket.discard(guard)
            if not bucket:
                del self._slots[slot]

    def discard(self, guard: Guard) -> None:
        if guard._task is None:
            return  # never entered, or already left
        self._active -= 1
        self._unfile(guard)

    def filed(self) -> int:
        """How many guards are in the wheel (tests and diagnostics)."""
        return sum(len(bucket) for bucket in self._slots.values())

    def _sweep(self) -> None:
        self._handle = None
        if not self._active:
            return
        loop = asyncio.get_running_loop()
        now = loop.time()
        slots = self._slots
        first = self._swept + 1
        # Every slot up to now's, and at least one new one (float rounding never stalls it).
        last = max(math.floor(now / self._tick), first)
        self._swept = last
        if last - first >= len(slots):
            due = sorted(s for s in slots if s <= last)  # a long gap: walk the filed slots only
        else:
            due = [s for s in range(first, last + 1) if s in slots]
        for slot in due:
            for guard in slots.pop(slot):
                guard._slot = None
                guard.filed_at = _NOT_FILED
                when = guard.when
                if when is None:
                    continue  # no deadline now: filed again by reschedule when it gets one
                if when <= now:
                    guard.fire()
                else:
                    self.file(guard)  # pushed later since it was filed
        self._handle = loop.call_at(now + self._tick, self._sweep)

    def close(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
