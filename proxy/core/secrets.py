"""Provider keys redacted from anything an upstream can make the proxy repeat.

An upstream may echo the proxy's key back: whole (a debug header, a compatible
server echoing request headers), partly, or masked the way OpenAI's 401 does
("Incorrect API key provided: sk-abc***xyz"). ``Redactor`` is built once per
set of keys (each rules load) and finds, in bytes or text, case-insensitively:

- any run of at least ``MIN_RUN`` characters of a key (the whole key included);
- a masked form: a mask (``***``, ``...``, ``…``) with, right next to it, a
  visible head that starts a key or a visible tail that ends one, at least
  ``MIN_MASK_PART`` characters of it; the whole token goes (head, mask, tail).

Each found span becomes ``[redacted]``.

Invariants (and why the search is only ``bytes.find`` calls, at C speed):
- Every run of ``MIN_RUN`` or more characters of a key holds one of its
  aligned grams, ``key[p:p + GRAM]`` for p = 0, STRIDE, 2 * STRIDE, ...
  (GRAM + STRIDE - 1 == MIN_RUN): a window of MIN_RUN characters starting at s
  holds the gram at the first aligned p >= s, which ends by s + MIN_RUN.
- So the search is one ``find`` per gram over the lower-cased data, and a hit
  is grown left and right along that key; a run shorter than MIN_RUN is dropped.
  Text without a hit costs ``len(key) / STRIDE`` finds per key and no Python
  work per byte (bench/secrets.py measures it).
- Keys are ASCII (``provider_keys`` refuses anything else), so lower-casing
  the data's ASCII letters keeps every offset, in bytes and in text alike.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

REDACTED = "[redacted]"
MIN_RUN = 8  # the shortest run of a key's characters that counts as a leak
GRAM = 5  # aligned gram length; GRAM + STRIDE - 1 == MIN_RUN
STRIDE = 4
MIN_KEY = 8  # shorter values (unset, placeholders) are not treated as secrets
MIN_MASK_PART = 3  # a masked form shows at least this much of the key's head or tail
MASKS = (b"***", b"...", "\u2026".encode())
# Shortest text that can leak anything: a run of MIN_RUN, or a mask with a 3-character head.
MIN_LEAK = min(MIN_RUN, MIN_MASK_PART + 3)
# Below this size, every MIN_RUN-window is looked up in a set instead (cost per byte, not per
# gram: cheaper for header values and log lines, whatever the number of keys).
WINDOW_SCAN_MAX = 256
_MASK_CHARS = frozenset(b"*.\xe2\x80\xa6")  # '…' is e2 80 a6 in UTF-8
_TOKEN_LIMIT = 512  # a masked token's head or tail is never longer than this


class Redactor:
    """Finds and replaces provider keys; built once per key set, shared read-only."""

    __slots__ = ("_grams", "_heads", "_key_chars", "_keys", "_runs", "_tails")

    def __init__(self, keys: Iterable[str | None]) -> None:
        lowered = sorted(
            {k.strip().lower().encode() for k in keys if k and len(k.strip()) >= MIN_KEY},
            key=len,
            reverse=True,
        )
        self._keys: tuple[bytes, ...] = tuple(lowered)
        grams: dict[bytes, list[tuple[bytes, int]]] = {}
        for key in lowered:
            for pos in range(0, len(key) - GRAM + 1, STRIDE):
                grams.setdefault(key[pos : pos + GRAM], []).append((key, pos))
        self._grams = tuple((gram, tuple(places)) for gram, places in grams.items())
        self._runs = frozenset(
            k[i : i + MIN_RUN] for k in lowered for i in range(len(k) - MIN_RUN + 1)
        )
        # Characters a masked form's visible head or tail may hold: those of the keys.
        self._key_chars = frozenset(b"".join(lowered)) - _MASK_CHARS
        self._heads = frozenset(k[:n] for k in lowered for n in range(MIN_MASK_PART, len(k) + 1))
        self._tails = frozenset(k[-n:] for k in lowered for n in range(MIN_MASK_PART, len(k) + 1))

    def __bool__(self) -> bool:
        return bool(self._keys)

    def __repr__(self) -> str:
        return f"Redactor({len(self._keys)} keys)"  # never the keys themselves

    # -- finding ---------------------------------------------------------------------------

    def spans(self, data: bytes) -> list[tuple[int, int]]:
        """The merged ``(start, end)`` spans of ``data`` that leak a key."""
        if not self._keys or len(data) < MIN_LEAK:
            return []
        low = data.lower()
        found: list[tuple[int, int]] = []
        if len(low) <= WINDOW_SCAN_MAX:
            runs = self._runs
            found.extend(
                (i, i + MIN_RUN)
                for i in range(len(low) - MIN_RUN + 1)
                if low[i : i + MIN_RUN] in runs
            )
        else:
            self._find_grams(low, found)
        for mask in MASKS:
            at = low.find(mask)
            while at >= 0:
                span = self._masked(low, at, len(mask))
                if span is not None:
                    found.append(span)
                at = low.find(mask, at + 1)
        return _merge(found)

    def has_whole_key(self, data: bytes) -> bool:
        """Does ``data`` hold a whole key, in any case? One ``find`` per key (success bodies)."""
        if not self._keys:
            return False
        low = data.lower()
        return any(key in low for key in self._keys)

    def _find_grams(self, low: bytes, found: list[tuple[int, int]]) -> None:
        for gram, places in self._grams:
            at = low.find(gram)
            while at >= 0:
                for key, pos in places:
                    span = _grow(low, at, key, pos)
                    if span is not None:
                        found.append(span)
                at = low.find(gram, at + 1)

    def _masked(self, low: bytes, at: int, width: int) -> tuple[int, int] | None:
        start, end = at, at + width
        while start > 0 and low[start - 1] in _MASK_CHARS:
            start -= 1
        while end < len(low) and low[end] in _MASK_CHARS:
            end += 1
        head_start = start
        limit = max(0, start - _TOKEN_LIMIT)
        while head_start > limit and low[head_start - 1] in self._key_chars:
            head_start -= 1
        tail_end = end
        limit = min(len(low), end + _TOKEN_LIMIT)
        while tail_end < limit and low[tail_end] in self._key_chars:
            tail_end += 1
        head, tail = low[head_start:start], low[end:tail_end]
        if head in self._heads or tail in self._tails:
            return head_start, tail_end
        return None

    # -- replacing -------------------------------------------------------------------------

    def redact_bytes(self, data: bytes) -> bytes:
        spans = self.spans(data)
        if not spans:
            return data
        out: list[bytes] = []
        last = 0
        marker = REDACTED.encode()
        for start, end in spans:
            out.append(data[last:start])
            out.append(marker)
            last = end
        out.append(data[last:])
        return b"".join(out)

    def redact_success(self, data: bytes) -> bytes:
        """A success body: the full scan only when a whole key is in it (docs/architecture.md)."""
        return self.redact_bytes(data) if self.has_whole_key(data) else data

    def redact_text(self, text: str) -> str:
        if not self._keys or not text:
            return text
        # surrogatepass: log lines may hold lone surrogates; keys are ASCII, so a span never
        # cuts a multi-byte character and the result decodes back.
        raw = text.encode("utf-8", "surrogatepass")
        cleaned = self.redact_bytes(raw)
        return text if cleaned is raw else cleaned.decode("utf-8", "surrogatepass")

    def redact_json(self, value: Any) -> Any:
        """A copy of parsed JSON with every string (keys of objects too) redacted."""
        if not self._keys:
            return value
        if isinstance(value, str):
            return self.redact_text(value)
        if isinstance(value, dict):
            return {self.redact_text(str(k)): self.redact_json(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.redact_json(v) for v in value]
        return value

    def redact_headers(self, headers: Mapping[str, str]) -> dict[str, str]:
        """Header values redacted; a header whose name leaks a key is dropped."""
        out: dict[str, str] = {}
        for name, value in headers.items():
            if self._keys and self.spans(name.encode("latin-1", "replace")):
                continue
            out[name] = self.redact_text(value)
        return out


NO_SECRETS = Redactor(())


def _grow(low: bytes, at: int, key: bytes, pos: int) -> tuple[int, int] | None:
    """The run around ``low[at:at + GRAM] == key[pos:pos + GRAM]`` that matches ``key``."""
    left = 0
    while left < pos and at - left > 0 and low[at - left - 1] == key[pos - left - 1]:
        left += 1
    right = GRAM
    while pos + right < len(key) and at + right < len(low) and low[at + right] == key[pos + right]:
        right += 1
    if left + right < MIN_RUN:
        return None
    return at - left, at + right


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    if len(spans) < 2:
        return spans
    spans.sort()
    merged = [spans[0]]
    for start, end in spans[1:]:
        last_start, last_end = merged[-1]
        if start <= last_end:
            merged[-1] = (last_start, max(last_end, end))
        else:
            merged.append((start, end))
    return merged
