"""Mid-stream continuation, the pure part: transcript, matcher, splicer (proxy/core)."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.core.continuation import (
    Method,
    Mismatch,
    Splicer,
    Transcript,
    eligible_request,
    metadata_chunk,
    prefill_body,
    read_transcript,
)
from proxy.core.usage import Usage


def chunk(delta: dict[str, Any], *, finish: str | None = None, **top: Any) -> bytes:
    obj = {
        "id": top.pop("id", "chatcmpl-first"),
        "object": "chat.completion.chunk",
        "created": top.pop("created", 111),
        "model": top.pop("model", "gpt-4o"),
        "choices": [
            {
                "index": top.pop("index", 0),
                "delta": delta,
                "logprobs": top.pop("logprobs", None),
                "finish_reason": finish,
            }
        ],
        **top,
    }
    return b"data: " + orjson.dumps(obj) + b"\n\n"


def stream_of(*texts: str) -> bytes:
    return chunk({"role": "assistant", "content": ""}) + b"".join(
        chunk({"content": t}) for t in texts
    )


def payloads(data: bytes) -> list[dict[str, Any]]:
    out = []
    for event in data.split(b"\n\n"):
        if event:
            assert event.startswith(b"data: ")
            out.append(orjson.loads(event[6:]))
    return out


def texts(data: bytes) -> str:
    return "".join(c["delta"].get("content") or "" for p in payloads(data) for c in p["choices"])


# -- transcript ---------------------------------------------------------------------------


def test_transcript_recovers_text_and_identity() -> None:
    t = read_transcript(stream_of("Hello", " wor", "ld"))
    assert t == Transcript("Hello world", "chatcmpl-first", 111, "gpt-4o")
    assert t.continuable


@pytest.mark.parametrize(
    ("data", "why"),
    [
        (
            stream_of("a") + chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function"}]}),
            "tool_call",
        ),
        (stream_of("a") + chunk({"content": "b"}, index=1), "second_choice"),
        (
            stream_of("a") + chunk({"content": "b"}, logprobs={"content": [], "refusal": None}),
            "logprobs",
        ),
        (stream_of("a") + chunk({"refusal": "no"}), "refusal"),
        (stream_of("a") + chunk({}, finish="stop"), "finished"),
        (stream_of("a") + b"data: {not json\n\n", "unreadable"),
        (stream_of("a") + b"data: [DONE]\n\n", "ended"),
        (b"", "unreadable"),
    ],
)
def test_transcript_says_why_it_cannot_be_continued(data: bytes, why: str) -> None:
    t = read_transcript(data)
    assert t.ineligible == why
    assert not t.continuable


def test_eligible_request() -> None:
    assert eligible_request({"messages": []})
    assert eligible_request({"n": 1})
    assert not eligible_request({"n": 2})
    assert not eligible_request({"logprobs": True})
    assert not eligible_request({"top_logprobs": 3})


def test_prefill_body_appends_the_sent_text_without_trailing_whitespace() -> None:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    out = prefill_body(body, "Hello wor ", prefix_flag=False)
    assert out["messages"][-1] == {"role": "assistant", "content": "Hello wor"}
    assert body["messages"] == [{"role": "user", "content": "hi"}]  # not mutated
    flagged = prefill_body(body, "Hello", prefix_flag=True)
    assert flagged["messages"][-1] == {"role": "assistant", "content": "Hello", "prefix": True}


# -- splicer ------------------------------------------------------------------------------

SENT = Transcript("mock reply 7: alpha be", "chatcmpl-first", 111, "gpt-4o")


def continuation(*pieces: str, finish: str = "stop", usage: dict[str, int] | None = None) -> bytes:
    top: dict[str, Any] = {"id": "msg_other", "created": 999, "model": "claude"}
    data = chunk({"role": "assistant", "content": ""}, **top)
    data += b"".join(chunk({"content": p}, **top) for p in pieces)
    data += chunk({}, finish=finish, **top)
    if usage is not None:
        data += (
            b"data: "
            + orjson.dumps(
                {
                    "id": "x",
                    "object": "chat.completion.chunk",
                    "created": 5,
                    "model": "y",
                    "choices": [],
                    "usage": usage,
                }
            )
            + b"\n\n"
        )
    return data + b"data: [DONE]\n\n"


def test_prefill_splice_rewrites_identity_and_drops_the_role() -> None:
    s = Splicer(SENT, Method.PREFILL, Usage())
    out = s.feed(continuation("ta", " gamma"))
    assert s.done
    assert s.finished
    chunks = payloads(out)
    assert all(
        (c["id"], c["created"], c["model"]) == ("chatcmpl-first", 111, "gpt-4o") for c in chunks
    )
    assert all("role" not in ch["delta"] for c in chunks for ch in c["choices"])
    assert texts(out) == "ta gamma"
    assert [ch["finish_reason"] for c in chunks for ch in c["choices"]][-1] == "stop"
    assert b"[DONE]" not in out


def test_prefill_drops_leading_whitespace_when_trailing_whitespace_was_sent() -> None:
    sent = Transcript("Hello ", "id", 1, "m")
    s = Splicer(sent, Method.PREFILL, Usage())
    assert texts(s.feed(continuation(" ", " world"))) == "world"
    s2 = Splicer(Transcript("Hello", "id", 1, "m"), Method.PREFILL, Usage())
    assert texts(s2.feed(continuation(" world"))) == " world"


def test_restart_sends_only_the_rest_after_matching() -> None:
    s = Splicer(SENT, Method.RESTART, Usage())
    out = s.feed(continuation("mock", " reply", " 7:", " alpha", " beta", " gamma"))
    assert texts(out) == "ta gamma"
    assert SENT.text + texts(out) == "mock reply 7: alpha beta gamma"


def test_restart_matching_ignores_whitespace_differences() -> None:
    s = Splicer(SENT, Method.RESTART, Usage())
    out = s.feed(continuation("mock  reply\n7:", "alpha ", "beta gamma"))
    assert texts(out) == "ta gamma"


def test_restart_after_sent_trailing_space_does_not_double_it() -> None:
    sent = Transcript("one two ", "id", 1, "m")
    s = Splicer(sent, Method.RESTART, Usage())
    assert texts(s.feed(continuation("one", " two", " three"))) == "three"


@pytest.mark.parametrize(
    "pieces",
    [("mock", " reply", " 8:"), ("something", " else"), ("mock", " reply")],
)
def test_restart_mismatch_raises_before_anything_is_sent(pieces: tuple[str, ...]) -> None:
    s = Splicer(SENT, Method.RESTART, Usage())
    with pytest.raises(Mismatch):
        s.feed(continuation(*pieces))
    assert s.sent_chars == 0


def test_a_tool_call_in_the_continuation_is_a_mismatch() -> None:
    s = Splicer(SENT, Method.PREFILL, Usage())
    with pytest.raises(Mismatch):
        s.feed(chunk({"tool_calls": [{"index": 0, "id": "c", "type": "function"}]}))


def test_usage_is_the_sum_of_every_attempt() -> None:
    s = Splicer(SENT, Method.PREFILL, Usage(10, 5))
    out = s.feed(
        continuation(" x", usage={"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15})
    )
    usage = [c["usage"] for c in payloads(out) if not c["choices"]]
    assert usage == [{"prompt_tokens": 22, "completion_tokens": 8, "total_tokens": 30}]


def test_metadata_chunk_has_no_choices() -> None:
    data = metadata_chunk(SENT, {"continuation": {"method": "prefill"}})
    (obj,) = payloads(data)
    assert obj["choices"] == []
    assert obj["id"] == "chatcmpl-first"
    assert obj["circuit_breaker"] == {"continuation": {"method": "prefill"}}


@given(
    words=st.lists(st.text(alphabet="abc ", min_size=1, max_size=5), min_size=1, max_size=12),
    cut=st.integers(min_value=0, max_value=12),
    split=st.integers(min_value=1, max_value=40),
)
def test_restart_always_completes_the_answer_exactly(
    words: list[str], cut: int, split: int
) -> None:
    """Whatever was sent of an answer, sent + spliced rest == the answer (bytes split anywhere)."""
    answer = "".join(words)
    sent = "".join(words[: min(cut, len(words))])
    s = Splicer(Transcript(sent, "id", 1, "m"), Method.RESTART, Usage())
    data = continuation(*words)
    out = b"".join(s.feed(data[i : i + split]) for i in range(0, len(data), split)) + s.close()
    rest = texts(out)
    if sent and sent[-1].isspace():
        assert sent + rest == sent + answer[len(sent) :].lstrip()
    else:
        assert sent + rest == answer


def test_an_event_that_is_not_json_is_a_mismatch_not_a_crash() -> None:
    # A broken event followed by a good one in the same read: the relay's cheap check sees
    # only the last event, so the splicer must refuse the broken one itself.
    s = Splicer(SENT, Method.PREFILL, Usage())
    with pytest.raises(Mismatch, match="not JSON"):
        s.feed(b'data: {"choices": [oops\n\n' + continuation("ta", " gamma"))
