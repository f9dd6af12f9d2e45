"""The OpenAI byte relay: commit point, usage, terminal marker, errors, any byte split."""

from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.outcome import Outcome
from proxy.providers.base import StreamError
from proxy.providers.openai import OpenAIStreamRelay


def chunk(delta: dict[str, object], finish: str | None = None, usage: object = None) -> bytes:
    obj = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        obj["usage"] = usage
    return b"data: " + orjson.dumps(obj) + b"\n\n"


USAGE_CHUNK = (
    b"data: "
    + orjson.dumps(
        {
            "id": "chatcmpl-1",
            "object": "chat.completion.chunk",
            "created": 1,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10},
        }
    )
    + b"\n\n"
)
ROLE = chunk({"role": "assistant", "content": ""})
HELLO = chunk({"content": "Hello"})
WORLD = chunk({"content": " world"})
STOP = chunk({}, finish="stop")
DONE = b"data: [DONE]\n\n"
FULL = ROLE + HELLO + WORLD + STOP + USAGE_CHUNK + DONE


def run(relay: OpenAIStreamRelay, pieces: list[bytes]) -> bytes:
    out = b"".join(relay.feed(p) for p in pieces)
    return out + relay.finish()


def test_holds_role_chunk_until_first_content() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    assert relay.feed(ROLE) == b""
    assert not relay.has_content
    assert relay.feed(HELLO) == ROLE + HELLO
    assert relay.has_content


def test_usage_is_read_and_kept_when_the_client_asked() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    assert run(relay, [FULL]) == FULL
    assert relay.usage is not None
    assert (relay.usage.prompt_tokens, relay.usage.completion_tokens) == (7, 3)
    assert relay.finished


def test_usage_chunk_the_proxy_asked_for_is_dropped() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    assert run(relay, [FULL]) == ROLE + HELLO + WORLD + STOP + DONE
    assert relay.usage is not None
    assert relay.usage.total_tokens == 10


def test_error_event_before_content_raises_for_failover() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    relay.feed(ROLE)
    with pytest.raises(StreamError) as info:
        relay.feed(b'data: {"error": {"message": "overloaded", "type": "server_error"}}\n\n')
    assert info.value.info.outcome is Outcome.FAILURE


def test_error_event_after_content_raises_too() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    relay.feed(ROLE + HELLO)
    with pytest.raises(StreamError):
        relay.feed(b'data: {"error": {"message": "boom"}}\n\n')


def test_cut_stream_without_terminal_marker_is_an_error() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    relay.feed(ROLE + HELLO)
    with pytest.raises(StreamError) as info:
        relay.finish()
    assert info.value.info.body["error"]["code"] == "upstream_stream_truncated"


def test_finish_reason_without_done_gets_done_appended() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    out = run(relay, [ROLE + HELLO + STOP])
    assert out == ROLE + HELLO + STOP + DONE


def test_crlf_framing_is_normalised() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    crlf = FULL.replace(b"\n", b"\r\n")
    assert run(relay, [crlf]) == FULL


def test_keepalive_comments_pass_through_unchanged() -> None:
    relay = OpenAIStreamRelay(strip_usage=False)
    out = run(relay, [ROLE, b": keep-alive\n\n", HELLO, STOP, DONE])
    assert out == ROLE + b": keep-alive\n\n" + HELLO + STOP + DONE


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(min_value=0, max_value=len(FULL)), max_size=12), st.booleans())
def test_any_byte_split_gives_the_same_client_stream(cuts: list[int], strip: bool) -> None:
    points = sorted(set(cuts))
    pieces = [FULL[a:b] for a, b in zip([0, *points], [*points, len(FULL)], strict=True)]
    whole = OpenAIStreamRelay(strip_usage=strip)
    split = OpenAIStreamRelay(strip_usage=strip)
    assert run(split, pieces) == run(whole, [FULL])
    assert split.usage == whole.usage


DELTA_VALUES = st.one_of(
    st.none(),
    st.text(max_size=5),
    st.lists(st.fixed_dictionaries({"index": st.integers(0, 2)}), max_size=2),
    st.fixed_dictionaries({"name": st.text(max_size=3)}),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(
            [
                "role",
                "content",
                "refusal",
                "reasoning_content",
                "reasoning",
                "tool_calls",
                "function_call",
                "audio",
            ]
        ),
        DELTA_VALUES,
        max_size=4,
    ),
    st.one_of(st.none(), st.sampled_from(["stop", "length", "tool_calls"])),
    st.booleans(),
)
def test_the_byte_level_commit_hint_agrees_with_parsing(
    delta: dict[str, object], finish: str | None, spaced: bool
) -> None:
    import json

    from proxy.providers.openai import CONTENT_HINT, _has_content

    chunk = {"id": "c", "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]}
    text = json.dumps(chunk) if spaced else orjson.dumps(chunk).decode()
    event = b"data: " + text.encode()
    assert bool(CONTENT_HINT.search(event)) == _has_content(chunk)


BATCH_EVENTS = [
    ROLE.rstrip(b"\n"),
    HELLO.rstrip(b"\n"),
    STOP.rstrip(b"\n"),
    USAGE_CHUNK.rstrip(b"\n"),
    chunk({"content": None}).rstrip(b"\n"),
    chunk({"reasoning": "hm"}).rstrip(b"\n"),
    b'data: {"choices": [{"delta": {"content": "x"}}]}',
    b'data: {"error":{"message":"boom"}}',
    b'data: {"choices":[{"delta":{"content":"data: [DONE] \\"error\\""}}]}',
    b'data: {"a":"\\"content\\":\\"x"}',
    b"data: [DONE]",
    b": keep-alive",
    b"event: x\ndata: {}",
    b'data: {"choices":[{"delta":{"content":',
    b'"z"}}]}',
    b"",
    b"\n",
]


def _batch_outcome(relay: OpenAIStreamRelay, batches: list[bytes], one_scan: bool) -> object:
    out: list[object] = []
    try:
        for batch in batches:
            if relay.has_content:
                out.append(relay._after_commit(batch))
            elif one_scan:
                out.append(relay._before_commit(batch))
            else:
                out.append(relay._before_commit_events(batch))
    except StreamError as exc:
        out.append(("error", exc.info.body))
    return out, relay.usage, relay.has_content, relay.finished, relay.saw_finish, relay.held


@settings(max_examples=400, deadline=None)
@given(
    st.lists(
        st.lists(st.sampled_from(BATCH_EVENTS), min_size=1, max_size=6), min_size=1, max_size=3
    ),
    st.booleans(),
)
def test_one_scan_before_commit_agrees_with_event_by_event(
    batches: list[list[bytes]], strip: bool
) -> None:
    """The one-scan pre-commit path holds, commits and forwards exactly as parsing each
    event does (blank-line runs, markers and hints spanning events included)."""
    whole = [b"".join(event + b"\n\n" for event in batch) for batch in batches]
    fast = _batch_outcome(OpenAIStreamRelay(strip_usage=strip), whole, one_scan=True)
    slow = _batch_outcome(OpenAIStreamRelay(strip_usage=strip), whole, one_scan=False)
    assert fast == slow


def _content(text: str, finish: str | None = None) -> bytes:
    obj = {
        "id": "c",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}],
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def test_done_without_a_finish_reason_is_truncated_after_the_content() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    out = relay.feed(_content("Hello") + _content(" world") + b"data: [DONE]\n\n")
    assert out == _content("Hello") + _content(" world")  # delivered, the bare end is not
    with pytest.raises(StreamError) as info:
        relay.finish()
    assert info.value.info.body["error"]["code"] == "upstream_stream_truncated"


def test_done_without_a_finish_reason_before_any_content_fails_the_attempt() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    assert relay.feed(b"data: [DONE]\n\n") == b""
    assert not relay.has_content
    with pytest.raises(StreamError):
        relay.finish()


def test_done_after_a_finish_reason_is_complete() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    data = _content("Hi") + _content("", "stop") + b"data: [DONE]\n\n"
    assert relay.feed(data) == data
    assert relay.finish() == b""


def test_a_malformed_event_after_the_commit_point_fails_after_what_came_before() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    assert relay.feed(_content("Hi")) == _content("Hi")
    out = relay.feed(_content(" there") + b'data: {"id":"c","choices":[{"del\n\n')
    assert out == _content(" there")
    with pytest.raises(StreamError) as info:
        relay.feed(_content("more"))
    assert info.value.info.body["error"]["code"] == "upstream_malformed_event"


def test_comments_after_the_commit_point_are_not_malformed() -> None:
    relay = OpenAIStreamRelay(strip_usage=True)
    relay.feed(_content("Hi"))
    assert relay.feed(b": keep-alive\n\n" + _content("!")) == b": keep-alive\n\n" + _content("!")
