"""Sliding window of call counts and latencies for one breaker: pure, synchronous.

The window covers the last ``size`` whole seconds as a ring of 1 s buckets and
keeps running totals, so adding a call and reading a rate are O(1); the clock
is whatever ``now`` the caller passes (the breaker's injected clock).

Invariants, true between any two calls:

1. The ring holds exactly the buckets for seconds (head - size, head]; older
   seconds have been evicted from the totals. ``head`` is None only when empty.
2. ``calls``, ``failures`` and ``slow`` equal the sums over the buckets, and
   ``failures <= calls``, ``slow <= calls``.
3. The combined histogram equals the sum of the buckets' sparse histograms and
   the sample count equals its total.
4. ``p95()`` is -1 with no samples, otherwise the midpoint of the log-scale bin
   holding the 95th-percentile sample: within about 5 % of the true value.
5. Time moving backwards never evicts: a ``now`` before ``head`` lands in the
   current bucket.
"""

from __future__ import annotations

import math
from bisect import bisect_left
from itertools import accumulate

# p95 comes from a log-scale histogram: bin i holds [R^i, R^(i+1)) ms, so the
# reported value is within about 5 % of the true one, and reading it is a
# cumulative sum over a fixed, small array.
LATENCY_BIN_RATIO = 1.1
LATENCY_BINS = 150  # 1.1^150 ms is about 27 minutes: beyond any upstream timeout
LATENCY_QUANTILE = 0.95

_LOG_RATIO = math.log(LATENCY_BIN_RATIO)
_MAX_BIN_MS = LATENCY_BIN_RATIO ** (LATENCY_BINS - 1)
_BIN_VALUES = tuple(LATENCY_BIN_RATIO ** (i + 0.5) for i in range(LATENCY_BINS))


class Bucket:
    """Counts for one second of the window."""

    __slots__ = ("calls", "failures", "latency", "slow")

    def __init__(self) -> None:
        self.calls = 0
        self.failures = 0
        self.slow = 0
        self.latency: dict[int, int] = {}  # histogram bin -> samples; sparse, few bins per second

    def reset(self) -> None:
        self.calls = self.failures = self.slow = 0
        self.latency = {}


def latency_bin(ms: float) -> int:
    if not ms >= LATENCY_BIN_RATIO:  # also catches NaN
        return 0
    if ms >= _MAX_BIN_MS:
        return LATENCY_BINS - 1
    return int(math.log(ms) / _LOG_RATIO)


class Window:
    """Sliding counts over the last ``size`` whole seconds, with running totals."""

    __slots__ = (
        "_head",
        "_hist",
        "_p95",
        "_ring",
        "_samples",
        "_size",
        "calls",
        "failures",
        "slow",
    )

    def __init__(self, seconds: float) -> None:
        self._size = max(1, math.ceil(seconds))
        self._ring = [Bucket() for _ in range(self._size)]
        self._hist = [0] * LATENCY_BINS  # sum of the buckets' sparse histograms
        self._head: int | None = None  # newest second held; None = empty
        self._samples = 0
        self._p95: float | None = None  # cached until the histogram changes
        self.calls = self.failures = self.slow = 0

    def clear(self) -> None:
        for bucket in self._ring:
            bucket.reset()
        self._hist[:] = [0] * LATENCY_BINS
        self._head = None
        self._samples = 0
        self._p95 = None
        self.calls = self.failures = self.slow = 0

    def roll(self, now: float) -> Bucket:
        """Evict the seconds that left the window at ``now``; return the current bucket."""
        sec = math.floor(now)
        head = self._head
        if head is None or sec - head >= self._size:
            if head is not None:
                self.clear()
            self._head = head = sec
        elif sec > head:
            for s in range(head + 1, sec + 1):
                self._evict(self._ring[s % self._size])
            self._head = head = sec
        return self._ring[head % self._size]

    def _evict(self, bucket: Bucket) -> None:
        if not bucket.calls:
            return
        self.calls -= bucket.calls
        self.failures -= bucket.failures
        self.slow -= bucket.slow
        if bucket.latency:
            for index, count in bucket.latency.items():
                self._hist[index] -= count
                self._samples -= count
            self._p95 = None
        bucket.reset()

    def add(self, now: float, failed: bool, slow: bool, latency_ms: float | None) -> None:
        bucket = self.roll(now)
        bucket.calls += 1
        self.calls += 1
        if failed:
            bucket.failures += 1
            self.failures += 1
        if slow:
            bucket.slow += 1
            self.slow += 1
        if latency_ms is not None:
            index = latency_bin(latency_ms)
            bucket.latency[index] = bucket.latency.get(index, 0) + 1
            self._hist[index] += 1
            self._samples += 1
            self._p95 = None

    def p95(self) -> float:
        if not self._samples:
            return -1.0
        if self._p95 is None:
            self._p95 = self.quantile(LATENCY_QUANTILE)
        return self._p95

    @property
    def samples(self) -> int:
        """Latency samples in the window."""
        return self._samples

    def quantile(self, q: float) -> float:
        """The ``q`` quantile (0 < q <= 1) of the latencies in the window, like ``p95``."""
        if not self._samples:
            return -1.0
        rank = max(1, math.ceil(q * self._samples))
        value: float = _BIN_VALUES[bisect_left(list(accumulate(self._hist)), rank)]
        return value
