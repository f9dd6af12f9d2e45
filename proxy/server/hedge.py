"""Hedged first token: a second walker when the first candidate is slow to start.

docs/breaker.md, 'Hedging'. A stream whose route or virtual model sets
``hedge_after_ms`` starts as usual; when no candidate has committed (sent its
first content) after the delay, and another candidate is left, a second walker
takes the next candidate. The first attempt to reach its commit point wins
(``Race.claim``) and every other is cancelled at once. Invariants:

- At most one attempt commits: ``claim`` is synchronous and the first caller
  wins; a later caller is cancelled before it writes a byte.
- A hedge holds a retry-budget slot (``ProxyState.retries_in_flight``) while it
  runs, and is not started when the budget is spent: hedges are retries.
- The losing attempt's outcome (docs/breaker.md): it was cancelled, so nothing
  is known of how it would have ended, except when it had the head start and
  still produced no first token before an attempt sent after it did. That is a
  slow first token, a failure of its deployment. A hedge that loses to the
  attempt it was racing is ignored.
- When the walkers are cancelled (the client went away, or the grace period
  ended), the one holding a committed stream ends it as a plain stream would,
  and its response is the request's.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Protocol

from aiohttp import web

from proxy.config.model import HedgeAfter
from proxy.core.errors import ProxyError
from proxy.core.router import RoutePlan
from proxy.server.exchange import Exchange, Race


class Walker(Protocol):
    async def walk(self) -> web.StreamResponse | None: ...

    def can_go_on(self) -> bool: ...

    def final_error(self) -> ProxyError: ...


def hedge_setting(plan: RoutePlan) -> HedgeAfter:
    """The request's ``hedge_after_ms``: its route's, else its virtual model's."""
    if plan.route is not None and plan.route.hedge_after_ms is not None:
        return plan.route.hedge_after_ms
    return plan.virtual.hedge_after_ms if plan.virtual is not None else None


async def run_hedged(ex: Exchange, walk: Walker, delay: float) -> web.StreamResponse:
    """Walk with one walker, and a second one after ``delay`` seconds without a commit."""
    state = ex.state
    upstream = ex.plan.candidates[0].provider.name
    race = Race(lambda result: state.metrics.hedges.labels(upstream, result).inc())
    ex.race = race
    first = asyncio.create_task(walk.walk())
    race.tasks.append(first)
    pending: set[asyncio.Task[web.StreamResponse | None]] = {first}
    hedge: asyncio.Task[web.StreamResponse | None] | None = None
    holding = False

    def release() -> None:
        # The hedge's budget slot returns once the race is decided or the hedge ends: a
        # winner streaming for minutes must not hold it.
        nonlocal holding
        if holding:
            holding = False
            state.retries_in_flight -= 1

    race.on_decided = release
    failure: BaseException | None = None
    try:
        done, pending = await asyncio.wait(pending, timeout=delay)
        if (
            not done
            and race.winner is None
            and walk.can_go_on()
            and state.retries_in_flight < state.retry_budget(ex.rules.defaults.retry)
        ):
            state.retries_in_flight += 1
            holding = True
            hedge = race.hedge = asyncio.create_task(walk.walk())
            hedge.add_done_callback(lambda _: release())
            race.tasks.append(hedge)
            pending.add(hedge)
        pending |= done
        while pending:
            done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task.cancelled():
                    continue  # the race's loser: its attempt recorded itself
                error = task.exception()
                if error is not None:
                    # A caller fault from one walker: the other may still answer.
                    failure = failure or error
                    continue
                response = task.result()
                if response is not None:
                    return response
        if hedge is not None:
            race.on_result("failed")
        if failure is not None:
            raise failure
        raise walk.final_error()
    except asyncio.CancelledError:
        # The handler was cancelled: the walkers stop too; a committed stream ends itself
        # (proxy.server.streaming) and its response is still the answer.
        for task in race.tasks:
            task.cancel()
        for task in race.tasks:
            with contextlib.suppress(BaseException):
                response = await task
                if response is not None:
                    return response
        raise
    finally:
        for task in race.tasks:
            if not task.done():
                task.cancel()
        for task in race.tasks:
            with contextlib.suppress(BaseException):
                await task
        release()
