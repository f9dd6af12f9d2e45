"""Ordering strategies: how the router ranks the deployments that survived its filters.

Pure and synchronous; the router (proxy.core.router) resolves names, filters and
assembles the plan, and hands each group of candidates to ``Ranker.ordered``.

Orders (ties, finally, by declaration order: a model's deployments as listed,
a virtual model's candidates as listed, else catalog order):

- ``cost_optimized``: lowest input + output price per 1k; ties by quality
  (for the task type when it is known without detection, else the model's
  mean rating).
- ``performance_first``: lowest latency, i.e. the upstream's live p95, else
  the rules' prior, else unknown (last); ties by price.
- ``reliability_first``: highest live success ratio in the breaker window.
  An upstream with no calls in the window counts as 1.0 (an idle upstream is
  presumed healthy, so traffic can move to it) but ranks after a measured
  1.0; then ties by latency.
- ``task_specific``: highest quality for the task type (0 when the model does
  not rate it); ties by price.
- ``balanced``: highest score
  ``(wq*Q + wc*C + wl*L + wr*R) / (wq + wc + wl + wr)`` with the weights of
  ``defaults.weights``; each term is min-max normalised to 0..1 over the
  candidates being ordered: Q quality for the task, C cheapness
  ``(max - price) / (max - min)``, L speed likewise over latencies (unknown
  latency scores 0), R success ratio (unmeasured: 1.0). A term whose values
  are all equal gives every candidate 1; equal scores go by declaration order.

Invariants:
- Each order is a sequence of stable sorts, least significant key first, so
  declaration order decides whatever is left tied: the same inputs give the
  same order.
- ``balanced_scores`` is the reference formula; ``Ranker.balanced`` computes
  the same sums in the same order (with the rules-only terms cached in the
  pool), so its scores equal the reference exactly.
- Orders are memoised per pool on everything they depend on: (strategy, task,
  each upstream's p95 and success ratio, surviving deployments). The memo is
  bounded by ``ORDER_MEMO_SIZE`` and cleared, not evicted, when full.
- A latency of ``UNKNOWN_LATENCY`` sorts last and scores 0 on speed; an
  unmeasured success ratio counts as ``UNMEASURED_SUCCESS``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from operator import itemgetter

from proxy.config.model import TaskType, Weights
from proxy.core.candidates import Candidate, UpstreamStats
from proxy.core.tasks import detect_task

ORDER_MEMO_SIZE = 64  # per pool; live facts are few values per provider, so orders repeat
UNMEASURED_SUCCESS = 1.0
UNKNOWN_LATENCY = math.inf


@dataclass(frozen=True, slots=True)
class Pool:
    """The deployments a name stands for, in declaration order, with their static facts.

    Per-candidate facts are parallel tuples so that filters and sort keys are
    list comprehensions and ``__getitem__`` lookups, not attribute chains.
    """

    cands: tuple[Candidate, ...]
    keys: tuple[str, ...]  # deployment keys
    ins: tuple[float, ...]  # input price per 1k
    outs: tuple[float, ...]  # output price per 1k
    prices: tuple[float, ...]  # input + output per 1k
    priors: tuple[float, ...]  # latency prior in ms; UNKNOWN_LATENCY when the rules give none
    windows: tuple[float, ...]  # context window; inf when unknown
    quality: Mapping[str | None, tuple[float, ...]]  # task type -> rating; None -> mean rating
    # The units live facts are kept for: deployment keys (breakers are per deployment),
    # distinct, in order of first appearance.
    providers: tuple[str, ...]
    reps: tuple[Candidate, ...]  # the first candidate of each of those units
    pidx: tuple[int, ...]  # per candidate: the index of its unit in ``providers``
    models: int  # distinct models
    min_window: float  # the smallest known context window; inf when none is known
    everything: tuple[int, ...]  # range(len(cands)): "no candidate dropped"
    # Balanced terms that depend only on the rules, filled on first use (see Ranker.balanced).
    static: dict[object, tuple[float, ...]] = field(default_factory=dict, compare=False)
    # Orders of the whole pool by (strategy, task, live facts): see Ranker.ordered.
    # The last live facts asked for the pool: (LiveView, its epoch, facts per unit).
    live: list[tuple[object, object, tuple[UpstreamStats, ...]]] = field(
        default_factory=list, compare=False
    )
    memo: dict[object, Ordered] = field(default_factory=dict, compare=False)


def _normalised(values: Sequence[float], higher_is_better: bool) -> list[float]:
    """Min-max to 0..1 over the finite values; all equal -> 1; non-finite -> 0."""
    finite = [v for v in values if v < math.inf]
    if not finite:
        return [1.0] * len(values)
    lo, hi = min(finite), max(finite)
    span = hi - lo
    if span <= 0:
        return [1.0 if v < math.inf else 0.0 for v in values]
    if higher_is_better:
        return [(v - lo) / span for v in values]
    return [(hi - v) / span if v < math.inf else 0.0 for v in values]


def _unit_weights(weights: Weights) -> tuple[float, float, float, float]:
    """The weights divided by their sum, so that a score is in 0..1."""
    total = weights.quality + weights.cost + weights.latency + weights.reliability
    if total <= 0:
        return 0.0, 0.0, 0.0, 0.0
    return (
        weights.quality / total,
        weights.cost / total,
        weights.latency / total,
        weights.reliability / total,
    )


def _static_terms(
    quality: Sequence[float], prices: Sequence[float], wq: float, wc: float
) -> tuple[float, ...]:
    nq = _normalised(quality, True)
    nc = _normalised(prices, False)
    return tuple(wq * q + wc * c for q, c in zip(nq, nc, strict=True))


def _add_terms(base: Sequence[float], weight: float, terms: Sequence[float]) -> list[float]:
    return [b + weight * t for b, t in zip(base, terms, strict=True)]


def balanced_scores(
    quality: Sequence[float],
    prices: Sequence[float],
    latencies: Sequence[float],
    success: Sequence[float],
    weights: Weights,
) -> list[float]:
    """The ``balanced`` score of each candidate (see the module docstring), 0..1.

    The router computes the same sums in the same order (cached in parts), so
    its scores equal these exactly.
    """
    wq, wc, wl, wr = _unit_weights(weights)
    scores = _add_terms(_static_terms(quality, prices, wq, wc), wl, _normalised(latencies, False))
    return _add_terms(scores, wr, _normalised(success, True))


def _ms(value: float) -> str:
    return f"{value:.0f}ms"


@dataclass(frozen=True, slots=True)
class Ordered:
    """Some of a pool's candidates in a strategy's order."""

    cands: tuple[Candidate, ...]
    keys: tuple[str, ...]
    reason: str  # why the first is first
    scores: tuple[float, ...]  # balanced only, in order


class Ranker:
    """One request's ordering: the task found lazily; the caller fills the live facts."""

    __slots__ = ("messages", "stats", "task", "task_source", "weights")

    def __init__(
        self,
        task: TaskType | None,
        task_source: str,
        messages: Sequence[Mapping[str, object]],
        weights: Weights,
    ) -> None:
        self.task = task
        self.task_source = task_source
        self.messages = messages
        self.weights = weights
        # Per deployment key; every unit of a pool is in here before the pool is ordered.
        self.stats: dict[str, UpstreamStats] = {}

    def needed_task(self, pool: Pool) -> TaskType | None:
        """The task type, detected if still unknown, unless ratings cannot differ (one model)."""
        if self.task is None and pool.models > 1:
            self.task = detect_task(self.messages)
            self.task_source = "detected"
        return self.task

    def latencies(self, pool: Pool, idx: Sequence[int]) -> Sequence[float]:
        """Per candidate: its upstream's live p95, else its prior, else UNKNOWN_LATENCY."""
        stats = self.stats
        measured = [stats[p].latency_ms for p in pool.providers]
        priors = pool.priors
        if all(m is None for m in measured):
            return priors if idx is pool.everything else [priors[i] for i in idx]
        pidx = pool.pidx
        both = [(measured[pidx[i]], priors[i]) for i in idx]
        return [prior if live is None else live for live, prior in both]

    def successes(self, pool: Pool, idx: Sequence[int]) -> list[float | None]:
        stats, pidx = self.stats, pool.pidx
        ratios = [stats[p].success_ratio for p in pool.providers]
        return [ratios[pidx[i]] for i in idx]

    def balanced(self, pool: Pool, idx: Sequence[int], task: TaskType | None) -> list[float]:
        """``balanced_scores`` over ``idx``: the same sums in the same order, with the
        terms that depend only on the rules cached in the pool."""
        wq, wc, wl, wr = _unit_weights(self.weights)
        full = idx is pool.everything
        rating = pool.quality[task]
        if full:
            base = pool.static.get(task)
            if base is None:
                base = pool.static[task] = _static_terms(rating, pool.prices, wq, wc)
        else:
            base = _static_terms([rating[i] for i in idx], [pool.prices[i] for i in idx], wq, wc)
        lat = self.latencies(pool, idx)
        speed: Sequence[float]
        if full and lat is pool.priors:  # nothing measured: the speed term is static too
            cached = pool.static.get("speed")
            if cached is None:
                cached = pool.static["speed"] = tuple(_normalised(lat, False))
            speed = cached
        else:
            speed = _normalised(lat, False)
        # Success ratios are per upstream: normalise the few upstream values, then spread.
        stats = self.stats
        ratios = [stats[p].success_ratio for p in pool.providers]
        present = ratios if full else [ratios[j] for j in {pool.pidx[i] for i in idx}]
        known = [UNMEASURED_SUCCESS if r is None else r for r in present]
        lo, hi = min(known), max(known)
        if lo == hi:  # all equal: the term is 1 for everyone
            return [b + wl * s + wr for b, s in zip(base, speed, strict=True)]
        per_upstream = [((UNMEASURED_SUCCESS if r is None else r) - lo) / (hi - lo) for r in ratios]
        pidx = pool.pidx
        rel = [per_upstream[pidx[i]] for i in idx]
        return [b + wl * s + wr * r for b, s, r in zip(base, speed, rel, strict=True)]

    def ordered(self, strategy: str, pool: Pool, idx: Sequence[int]) -> Ordered:
        """``order``, memoised on everything the order depends on: the strategy, the
        task, each upstream's live latency and success ratio, and which deployments
        survived the filters."""
        needs_task = strategy == "balanced" or strategy == "task_specific"
        task = self.needed_task(pool) if needs_task and len(idx) > 1 else self.task
        stats = self.stats
        key = (
            strategy,
            task,
            tuple([stats[p].latency_ms for p in pool.providers]),
            tuple([stats[p].success_ratio for p in pool.providers]),
            None if idx is pool.everything else tuple(idx),
        )
        memo = pool.memo
        hit = memo.get(key)
        if hit is None:
            if len(memo) >= ORDER_MEMO_SIZE:
                memo.clear()  # live values moved on; the old orders are not coming back soon
            hit = memo[key] = self.order(strategy, pool, idx, task)
        return hit

    def order(
        self, strategy: str, pool: Pool, idx: Sequence[int], task: TaskType | None
    ) -> Ordered:
        """``idx`` ordered by the strategy, with the reason the first is first."""
        n = len(idx)
        if n <= 1:
            cands = tuple([pool.cands[i] for i in idx])
            keys = tuple([pool.keys[i] for i in idx])
            return Ordered(cands, keys, "only candidate" if n else "", ())
        scores: tuple[float, ...] = ()
        prices = pool.prices if idx is pool.everything else [pool.prices[i] for i in idx]
        positions = list(range(n))
        # Each order is a sequence of stable sorts, least significant key first, so
        # declaration order (the order of idx) decides what is left tied.
        if strategy == "balanced":
            values = self.balanced(pool, idx, task)
            positions.sort(key=values.__getitem__, reverse=True)  # reverse keeps stability
            scores = itemgetter(*positions)(values)
            reason = f"best score {scores[0]:.2f} of {n}"
        elif strategy == "cost_optimized":
            rating = pool.quality[task]
            positions.sort(key=lambda k: -rating[idx[k]])
            positions.sort(key=prices.__getitem__)
            reason = f"cheapest of {n}"
        elif strategy == "performance_first":
            lat = self.latencies(pool, idx)
            positions.sort(key=prices.__getitem__)
            positions.sort(key=lat.__getitem__)
            reason = self._fastest_reason(pool, idx[positions[0]], lat[positions[0]], n)
        elif strategy == "reliability_first":
            lat = self.latencies(pool, idx)
            raw = self.successes(pool, idx)
            ratio = [UNMEASURED_SUCCESS if r is None else r for r in raw]
            positions.sort(key=lat.__getitem__)
            positions.sort(key=lambda k: raw[k] is None)
            positions.sort(key=ratio.__getitem__, reverse=True)
            top = raw[positions[0]]
            reason = (
                f"most reliable {top * 100:.1f}% of {n}"
                if top is not None
                else f"most reliable (no data) of {n}"
            )
        else:  # task_specific
            rating = pool.quality[task]
            positions.sort(key=prices.__getitem__)
            positions.sort(key=lambda k: rating[idx[k]], reverse=True)
            if task is None:  # one model: ratings cannot differ, price decides
                reason = f"cheapest of {n}"
            else:
                reason = f"best {task} quality {rating[idx[positions[0]]]:g}"
        order = tuple([idx[k] for k in positions])
        pick = itemgetter(*order)  # one C call per output tuple
        return Ordered(pick(pool.cands), pick(pool.keys), reason, scores)

    def _fastest_reason(self, pool: Pool, i: int, latency: float, n: int) -> str:
        if latency == UNKNOWN_LATENCY:
            return f"cheapest of {n}, no latency known"
        measured = self.stats[pool.providers[pool.pidx[i]]].latency_ms is not None
        return f"fastest {'p95' if measured else 'prior'} {_ms(latency)} of {n}"
