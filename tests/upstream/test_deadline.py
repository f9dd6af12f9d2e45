"""proxy.upstream.deadline: guards swept by a Watchdog behave like ``asyncio.timeout``.

Deadlines are in loop time and the tick is small. A body that "hangs until the
deadline" waits on an Event nobody sets: the deadline is what ends it. Where
the module claims ``asyncio.timeout``'s semantics, the same scenario runs
under ``asyncio.timeout_at`` as the reference.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Callable

import pytest

from proxy.upstream.deadline import Guard, Watchdog

TICK = 0.01
LATE = 2.0  # "at most a tick late", with room for a loaded 2-core machine
WAIT = 5.0


@pytest.fixture
async def dog() -> AsyncIterator[Watchdog]:
    watchdog = Watchdog(tick=TICK)
    yield watchdog
    watchdog.close()


async def forever() -> None:
    await asyncio.Event().wait()


def now() -> float:
    return asyncio.get_running_loop().time()


def current() -> asyncio.Task[object]:
    task = asyncio.current_task()
    assert task is not None
    return task


Scope = Callable[[float | None], contextlib.AbstractAsyncContextManager[object]]


def watchdog_scope(dog: Watchdog) -> Scope:
    @contextlib.asynccontextmanager
    async def scope(when: float | None) -> AsyncIterator[object]:
        with dog.guard(when) as guard:
            yield guard

    return scope


def asyncio_scope(when: float | None) -> contextlib.AbstractAsyncContextManager[object]:
    return asyncio.timeout_at(when)


@pytest.fixture(params=["watchdog", "asyncio.timeout"])
def scope(request: pytest.FixtureRequest, dog: Watchdog) -> Scope:
    """The guard under test, and asyncio.timeout_at as the reference it claims to match."""
    return watchdog_scope(dog) if request.param == "watchdog" else asyncio_scope


# -- firing --------------------------------------------------------------------------------


async def test_an_expired_guard_turns_the_cancellation_into_timeout_error(dog: Watchdog) -> None:
    when = now() + 0.05
    with pytest.raises(TimeoutError), dog.guard(when) as guard:
        await forever()
    fired_at = now()
    assert guard.expired()
    assert when <= fired_at < when + LATE
    assert current().cancelling() == 0  # the guard's own request was taken back


async def test_guards_never_fire_early(dog: Watchdog) -> None:
    async def timed(offset: float) -> tuple[float, float]:
        when = now() + offset
        with contextlib.suppress(TimeoutError), dog.guard(when):
            await forever()
        return when, now()

    results = await asyncio.gather(*(timed(k * 0.007) for k in range(12)))
    for when, fired_at in results:
        assert when <= fired_at < when + LATE


async def test_a_deadline_already_past_fires_at_the_next_sweep(dog: Watchdog) -> None:
    with pytest.raises(TimeoutError), dog.guard(now() - 1.0):
        await forever()


async def test_a_guard_whose_body_finishes_in_time_changes_nothing(dog: Watchdog) -> None:
    done = asyncio.get_running_loop().create_future()
    asyncio.get_running_loop().call_soon(done.set_result, "ok")
    with dog.guard(now() + 30) as guard:
        assert await done == "ok"
    assert not guard.expired()
    assert current().cancelling() == 0


async def test_no_deadline_never_fires(dog: Watchdog) -> None:
    """``when=None`` rides through sweeps that end another guard's deadline."""
    released = asyncio.Event()

    async def patient() -> bool:
        with dog.guard(None) as guard:
            await released.wait()
        return guard.expired()

    task = asyncio.create_task(patient())
    with pytest.raises(TimeoutError), dog.guard(now() + 0.03):
        await forever()
    released.set()
    assert await task is False


async def test_a_guard_cancels_only_its_own_task(dog: Watchdog) -> None:
    bystander_done = asyncio.Event()

    async def bystander() -> str:
        await bystander_done.wait()
        return "untouched"

    other = asyncio.create_task(bystander())
    with pytest.raises(TimeoutError), dog.guard(now() + 0.02):
        await forever()
    bystander_done.set()
    assert await other == "untouched"


async def test_a_guard_left_in_time_is_not_fired_later(dog: Watchdog) -> None:
    when = now() + 0.02
    with dog.guard(when) as left_early:
        pass
    # Another guard expiring later proves sweeps ran past the first deadline.
    with pytest.raises(TimeoutError), dog.guard(when + 0.03):
        await forever()
    assert now() > when
    assert not left_early.expired()
    assert current().cancelling() == 0


async def test_many_guards_in_one_sweep_each_fire_their_own_task(dog: Watchdog) -> None:
    when = now() + 0.02

    async def one() -> str:
        try:
            with dog.guard(when):
                await forever()
        except TimeoutError:
            return "timeout" if current().cancelling() == 0 else "leftover cancel request"
        return "not fired"

    assert await asyncio.gather(*(one() for _ in range(50))) == ["timeout"] * 50


def test_a_guard_needs_a_running_task() -> None:
    async def outside_a_task() -> None:
        loop = asyncio.get_running_loop()
        result = loop.create_future()

        def callback() -> None:  # a plain callback: a running loop, but no task
            try:
                Watchdog(tick=TICK).guard(None).__enter__()
            except RuntimeError as exc:
                result.set_result(str(exc))
            else:
                result.set_result("entered")

        loop.call_soon(callback)
        assert "task" in await result

    asyncio.run(outside_a_task())


# -- reschedule ----------------------------------------------------------------------------


async def test_reschedule_later_moves_the_deadline(dog: Watchdog) -> None:
    first = now() + 0.02
    later = first + 0.1

    async def body() -> None:
        with dog.guard(first) as guard:
            guard.reschedule(later)
            await forever()

    with pytest.raises(TimeoutError):
        await body()
    assert now() >= later


async def test_reschedule_earlier_moves_the_deadline(dog: Watchdog) -> None:
    start = now()

    async def body() -> None:
        with dog.guard(start + 60) as guard:
            guard.reschedule(start + 0.02)
            await forever()

    with pytest.raises(TimeoutError):
        await body()
    assert now() - start < 60


async def test_reschedule_to_none_disarms_it(dog: Watchdog) -> None:
    first = now() + 0.02
    proceed = asyncio.Event()

    async def disarmed() -> bool:
        with dog.guard(first) as guard:
            guard.reschedule(None)
            await proceed.wait()
        return guard.expired()

    task = asyncio.create_task(disarmed())
    # A guard expiring after ``first`` proves sweeps passed the disarmed deadline.
    with pytest.raises(TimeoutError), dog.guard(first + 0.03):
        await forever()
    proceed.set()
    assert await task is False


async def test_push_forward_at_every_step_like_an_idle_timer(dog: Watchdog) -> None:
    """The forward.py pattern: the deadline moves on at each chunk, fires after the last."""
    idle = 0.05
    chunks: asyncio.Queue[int] = asyncio.Queue()
    received = []

    async def consume() -> None:
        with dog.guard(now() + idle) as gap:
            while True:
                received.append(await chunks.get())
                gap.reschedule(now() + idle)

    task = asyncio.create_task(consume())
    for n in range(5):
        chunks.put_nowait(n)
    with pytest.raises(TimeoutError):
        await task
    assert received == [0, 1, 2, 3, 4]


# -- cancellation from elsewhere, and the uncancel bookkeeping -----------------------------


async def test_an_outside_cancel_stays_cancelled_error(scope: Scope) -> None:
    inside = asyncio.Event()

    async def body() -> None:
        async with scope(now() + 60):
            inside.set()
            await forever()

    task = asyncio.create_task(body())
    await inside.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert task.cancelled()


async def test_an_outside_cancel_in_the_same_sweep_as_the_expiry_stays_cancelled_error() -> None:
    """Both cancel requests land before the task runs again: the outside one must win."""
    loop = asyncio.get_running_loop()
    dog = Watchdog(tick=0.5)  # long enough that the first sweep cannot pass before it is met
    inside = asyncio.Event()
    guards: list[Guard] = []
    seen: list[int] = []

    async def body() -> None:
        try:
            with dog.guard(now()) as guard:  # due at once: the first sweep fires it
                guards.append(guard)
                inside.set()
                await forever()
        except asyncio.CancelledError:
            seen.append(current().cancelling())  # what is left: the outside request only
            raise

    try:
        task = asyncio.create_task(body())
        await inside.wait()
        sweep = dog._handle
        assert sweep is not None
        assert not guards[0].expired()
        loop.call_at(sweep.when(), task.cancel)  # the same loop iteration as that sweep
        with pytest.raises(asyncio.CancelledError):
            await task
        assert guards[0].expired()
        assert seen == [1]
    finally:
        dog.close()


async def test_reference_asyncio_timeout_in_the_same_coincidence() -> None:
    loop = asyncio.get_running_loop()
    inside = asyncio.Event()
    seen: list[int] = []
    when = now() + 0.05

    async def body() -> None:
        try:
            async with asyncio.timeout_at(when):
                inside.set()
                await forever()
        except asyncio.CancelledError:
            seen.append(current().cancelling())
            raise

    task = asyncio.create_task(body())
    await inside.wait()
    loop.call_at(when, task.cancel)  # the same loop iteration as the timeout's own handle
    with pytest.raises(asyncio.CancelledError):
        await task
    assert seen == [1]


@pytest.mark.parametrize("fire_first", [True, False])
async def test_expiry_and_outside_cancel_on_a_guard_fired_by_hand(
    dog: Watchdog, fire_first: bool
) -> None:
    """The same coincidence staged in both orders: fire() and cancel() before the task runs."""
    inside = asyncio.Event()
    guards: list[Guard] = []
    seen: list[int] = []

    async def body() -> None:
        try:
            with dog.guard(now() + 60) as guard:
                guards.append(guard)
                inside.set()
                await forever()
        except asyncio.CancelledError:
            seen.append(current().cancelling())
            raise

    task = asyncio.create_task(body())
    await inside.wait()
    if fire_first:
        guards[0].fire()
        task.cancel()
    else:
        task.cancel()
        guards[0].fire()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert guards[0].expired()
    assert seen == [1]


async def test_a_swallowed_expiry_leaves_no_cancel_request_behind(scope: Scope) -> None:
    """If the body catches the cancellation, the guard still takes its request back.

    Otherwise the task's ``cancelling()`` stays above zero and the next deadline in the
    same task comes out as CancelledError instead of TimeoutError.
    """
    async with scope(now() + 0.02):
        with contextlib.suppress(asyncio.CancelledError):
            await forever()
    assert current().cancelling() == 0
    with pytest.raises(TimeoutError):
        async with scope(now() + 0.02):
            await forever()


async def test_a_later_expiry_in_the_same_task_is_still_a_timeout(dog: Watchdog) -> None:
    for _ in range(3):
        with pytest.raises(TimeoutError), dog.guard(now() + 0.01):
            await forever()
    assert current().cancelling() == 0


# -- nesting -------------------------------------------------------------------------------


async def test_inner_expiry_is_the_inner_guards_timeout_only(scope: Scope) -> None:
    async with scope(now() + 60) as outer:
        with pytest.raises(TimeoutError):
            async with scope(now() + 0.02):
                await forever()
        # The outer guard is untouched and the task can go on waiting inside it.
        done = asyncio.get_running_loop().create_future()
        asyncio.get_running_loop().call_soon(done.set_result, None)
        await done
    assert not _expired(outer)
    assert current().cancelling() == 0


async def test_outer_expiry_passes_through_the_inner_guard(scope: Scope) -> None:
    seen_inside: list[type[BaseException]] = []

    async def body() -> None:
        async with scope(now() + 0.02):
            try:
                async with scope(now() + 60):
                    await forever()
            except BaseException as exc:
                seen_inside.append(type(exc))
                raise

    with pytest.raises(TimeoutError):
        await body()
    assert seen_inside == [asyncio.CancelledError]
    assert current().cancelling() == 0


async def test_both_expired_in_one_sweep_the_outer_one_reports_it(dog: Watchdog) -> None:
    when = now() + 0.02
    seen_inside: list[type[BaseException]] = []
    outer, inner = dog.guard(when), dog.guard(when)

    async def body() -> None:
        with outer:
            try:
                with inner:
                    await forever()
            except BaseException as exc:
                seen_inside.append(type(exc))
                raise

    with pytest.raises(TimeoutError):
        await body()
    assert inner.expired()
    assert outer.expired()
    assert seen_inside == [asyncio.CancelledError]
    assert current().cancelling() == 0


def _expired(scope_value: object) -> bool:
    if isinstance(scope_value, Guard):
        return scope_value.expired()
    assert isinstance(scope_value, asyncio.Timeout)
    return scope_value.expired()


# -- the sweep itself ----------------------------------------------------------------------


async def next_tick_after(dog: Watchdog) -> None:
    """Wait until just after the currently scheduled sweep has run."""
    handle = dog._handle
    assert handle is not None
    loop = asyncio.get_running_loop()
    passed = loop.create_future()
    loop.call_at(handle.when() + TICK / 10, passed.set_result, None)
    await passed


async def test_the_sweep_runs_only_while_guards_are_active(dog: Watchdog) -> None:
    assert dog._handle is None  # nothing scheduled before the first guard
    with dog.guard(now() + 60):
        assert dog._handle is not None
        await next_tick_after(dog)
        assert dog._handle is not None  # still active: still swept
    assert dog._handle is not None  # one last sweep is already scheduled...
    await next_tick_after(dog)
    assert dog._handle is None  # ...and it finds nothing and does not reschedule


async def test_the_sweep_restarts_for_a_guard_after_it_stopped(dog: Watchdog) -> None:
    with dog.guard(None):
        pass
    await next_tick_after(dog)
    assert dog._handle is None
    with pytest.raises(TimeoutError), dog.guard(now() + 0.02):
        await forever()
    await next_tick_after(dog)
    assert dog._handle is None


async def test_close_cancels_the_pending_sweep() -> None:
    dog = Watchdog(tick=60)
    with dog.guard(None):
        handle = dog._handle
        assert handle is not None
    dog.close()
    assert handle.cancelled()
    assert dog._handle is None


# -- the timing wheel: a sweep looks at the due guards only ---------------------------------


async def test_a_sweep_leaves_guards_far_from_due_alone(dog: Watchdog) -> None:
    """O(due), not O(active): guards filed far ahead are not even looked at by a sweep."""
    far = now() + 60
    with contextlib.ExitStack() as stack:
        guards = [stack.enter_context(dog.guard(far + i * TICK)) for i in range(200)]
        slots_before = {id(g): g._slot for g in guards}
        buckets_before = {slot: id(bucket) for slot, bucket in dog._slots.items()}
        for _ in range(3):
            await next_tick_after(dog)
        assert {id(g): g._slot for g in guards} == slots_before
        assert {slot: id(bucket) for slot, bucket in dog._slots.items()} == buckets_before
        assert dog.filed() == 200
    assert dog.filed() == 0
    assert dog._slots == {}


async def test_an_attribute_write_later_is_found_by_the_sweep_and_refiled(dog: Watchdog) -> None:
    start = now()
    first = start + 0.02
    later = start + 0.15

    async def body() -> Guard:
        with dog.guard(first) as guard:
            guard.when = later  # the relay's per-chunk write: no refiling here
            await forever()
        return guard  # pragma: no cover

    task = asyncio.create_task(body())
    # The sweep reaches the slot it was filed in (first) long before ``later``: found not due
    # there, refiled. Had it fired at its first slot, it would end before ``later``.
    with pytest.raises(TimeoutError):
        await task
    assert later <= now() < later + LATE


async def test_an_earlier_write_below_the_slot_is_refiled_at_once(dog: Watchdog) -> None:
    """The relay_rest pattern: the total deadline while writing, then the idle gap again."""
    start = now()

    async def body() -> None:
        with dog.guard(start + 60) as guard:
            assert guard.filed_at <= start + 60
            when = start + 0.03
            guard.when = when
            assert when < guard.filed_at
            guard.refile()
            assert guard.filed_at <= when
            await forever()

    with pytest.raises(TimeoutError):
        await body()
    assert start + 0.03 <= now() < start + 0.03 + LATE


async def test_a_guard_without_deadline_is_not_filed_until_it_gets_one(dog: Watchdog) -> None:
    start = now()

    async def body() -> None:
        with dog.guard(None) as guard:
            assert guard._slot is None
            assert dog.filed() == 0
            await asyncio.sleep(2 * TICK)
            guard.reschedule(start + 0.05)
            assert dog.filed() == 1
            await forever()

    with pytest.raises(TimeoutError):
        await body()
    assert start + 0.05 <= now() < start + 0.05 + LATE


async def test_a_deadline_already_past_on_entry_fires_at_the_next_sweep(dog: Watchdog) -> None:
    with dog.guard(now() + 60):  # keeps the sweep running and its slot cursor current
        await next_tick_after(dog)
        with pytest.raises(TimeoutError), dog.guard(now() - 10):
            await forever()


async def test_a_stalled_loop_catches_up_on_every_slot_it_missed(dog: Watchdog) -> None:
    start = now()

    async def one(delay: float) -> float:
        with contextlib.suppress(TimeoutError), dog.guard(start + delay):
            await forever()
        return now()

    tasks = [asyncio.create_task(one(d)) for d in (0.02, 0.04, 0.06, 60)]
    await asyncio.sleep(0)
    time.sleep(0.1)  # noqa: ASYNC251 -- the loop is blocked past three deadlines (many ticks)
    fired = await asyncio.wait_for(asyncio.gather(*tasks[:3]), WAIT)
    assert all(start + 0.1 <= t < start + 0.1 + LATE for t in fired)
    assert not tasks[3].done()
    tasks[3].cancel()


async def test_the_wheel_restarts_cleanly_after_an_idle_spell(dog: Watchdog) -> None:
    with dog.guard(None):
        pass
    await next_tick_after(dog)
    assert dog._handle is None
    await asyncio.sleep(5 * TICK)  # idle: the slot cursor falls behind
    when = now() + 0.02
    with pytest.raises(TimeoutError), dog.guard(when):
        await forever()
    assert when <= now() < when + LATE


async def test_an_exited_guard_holds_no_task_and_cannot_fire(dog: Watchdog) -> None:
    with dog.guard(now() + 0.01) as guard:
        pass
    assert guard._task is None
    assert guard._slot is None
    guard.fire()
    assert not guard.expired()
