"""proxy.core.secrets: every run of 8+ characters of a key, in any case, and masked forms."""

from __future__ import annotations

import string

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.secrets import MIN_RUN, REDACTED, Redactor

KEY = "sk-proj-AbCdEfGh0123456789xyzXYZ_secretTail"
OTHER = "AIzaSyD-9tSrke72PouQMnMX-a7eZSW0jkFMBWY"
ALPHABET = string.ascii_letters + string.digits + "_-"
FILLER = " the reply text (with punctuation!) and ünïcödé, ... *** " * 8  # > WINDOW_SCAN_MAX


def leaks(text: str, keys: list[str]) -> list[str]:
    """Every run of MIN_RUN characters of a key found in ``text``, case-insensitively."""
    low = text.lower()
    return [
        k[i : i + MIN_RUN]
        for k in keys
        for i in range(len(k) - MIN_RUN + 1)
        if k[i : i + MIN_RUN].lower() in low
    ]


def test_whole_keys_in_any_case_are_redacted() -> None:
    r = Redactor([KEY, OTHER, None])
    for text in (KEY, KEY.upper(), KEY.lower(), f"a {OTHER} b", f'{{"k":"{KEY}"}}'):
        assert leaks(r.redact_text(text), [KEY, OTHER]) == []
    assert r.redact_text(f"Bearer {KEY}.") == f"Bearer {REDACTED}."


def test_masked_forms_are_redacted_whole() -> None:
    r = Redactor([KEY])
    for masked in ("sk-pro***Tail", "sk-proj-****************************Tail", "sk-p...tail"):
        out = r.redact_text(f"Incorrect API key provided: {masked}. You can find ...")
        assert out == f"Incorrect API key provided: {REDACTED}. You can find ..."
    assert r.redact_text("****Tail") == REDACTED  # only the tail shown
    assert r.redact_text("wait... then foo***bar") == "wait... then foo***bar"  # not a key


def test_short_runs_and_short_keys_are_left_alone() -> None:
    r = Redactor([KEY, "short"])
    assert r.redact_text(KEY[3 : 3 + MIN_RUN - 1]) == KEY[3 : 3 + MIN_RUN - 1]
    assert r.redact_text("short") == "short"
    assert not Redactor(["", None, "tiny"])
    assert "sk-" not in repr(r)


def test_json_and_headers_are_redacted_keys_and_values() -> None:
    r = Redactor([KEY])
    assert r.redact_json({"a": [KEY, 1, None], KEY: {"b": KEY.upper()}}) == {
        "a": [REDACTED, 1, None],
        REDACTED: {"b": REDACTED},
    }
    assert r.redact_headers({"x-ratelimit-a": "9", "x-ratelimit-b": KEY, f"x-{KEY}": "1"}) == {
        "x-ratelimit-a": "9",
        "x-ratelimit-b": REDACTED,
    }


def test_success_bodies_get_the_full_scan_only_with_a_whole_key() -> None:
    r = Redactor([KEY])
    body = f"{FILLER} {KEY[2:20]} {FILLER}".encode()
    assert r.redact_success(body) is body  # a part alone: left (docs/architecture.md, Secrets)
    echoed = f"{FILLER} {KEY.upper()} and {KEY[2:20]} {FILLER}".encode()
    assert leaks(r.redact_success(echoed).decode(), [KEY]) == []


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.text(ALPHABET, min_size=8, max_size=60), min_size=1, max_size=3),
    picks=st.lists(st.tuples(st.integers(0, 2), st.integers(0, 60), st.integers(MIN_RUN, 60))),
    noise=st.text(max_size=80),
    long=st.booleans(),
    upper=st.booleans(),
)
def test_no_run_of_a_key_survives(
    keys: list[str], picks: list[tuple[int, int, int]], noise: str, long: bool, upper: bool
) -> None:
    """Both scans (windows for short text, aligned grams past WINDOW_SCAN_MAX) find every run."""
    parts = [noise]
    for which, start, length in picks:
        key = keys[which % len(keys)]
        start = min(start, len(key) - MIN_RUN)
        run = key[start : start + length]
        parts += [run.upper() if upper else run, noise]
    if long:
        parts.append(FILLER * 2)
    text = "".join(parts)
    assert leaks(Redactor(keys).redact_text(text), keys) == []
