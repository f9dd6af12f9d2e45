"""The incremental SSE parser: line endings, splits anywhere, UTF-8, comments, end of stream."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.core.sse import SSEEvent, SSEParser, format_event


def feed_all(chunks: list[bytes], *, close: bool = True) -> list[SSEEvent]:
    parser = SSEParser()
    events: list[SSEEvent] = []
    for chunk in chunks:
        events.extend(parser.feed(chunk))
    if close:
        events.extend(parser.close())
    return events


def split_at(data: bytes, points: list[int]) -> list[bytes]:
    cuts = sorted({p % (len(data) + 1) for p in points})
    pieces, start = [], 0
    for cut in cuts:
        pieces.append(data[start:cut])
        start = cut
    pieces.append(data[start:])
    return pieces


def test_events_in_one_read() -> None:
    stream = b'data: {"a":1}\n\nevent: message_stop\ndata: {"type":"message_stop"}\n\n'
    assert SSEParser().feed(stream) == [
        SSEEvent(None, '{"a":1}'),
        SSEEvent("message_stop", '{"type":"message_stop"}'),
    ]


def test_crlf_and_lone_cr_line_endings() -> None:
    stream = b"data: one\r\n\r\ndata: two\r\rdata: three\n\n"
    assert [e.data for e in SSEParser().feed(stream)] == ["one", "two", "three"]


def test_crlf_split_between_reads_is_one_line_end() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: x\r") == []
    # The LF completes the CRLF above; only the next CRLF is the blank line.
    assert parser.feed(b"\n") == []
    assert parser.feed(b"\r\n") == [SSEEvent(None, "x")]


def test_multi_line_data_is_joined_with_lf() -> None:
    stream = b"data: first\ndata:second\ndata:  third\n\n"
    # One leading space is removed, further spaces are data.
    assert SSEParser().feed(stream) == [SSEEvent(None, "first\nsecond\n third")]


def test_comments_and_other_fields_are_dropped() -> None:
    stream = b": keep-alive\n\nid: 7\nretry: 100\nfoo: bar\n: note\ndata: x\n\n:ping\n\n"
    assert SSEParser().feed(stream) == [SSEEvent(None, "x")]


def test_event_without_data_is_not_dispatched_and_resets_type() -> None:
    stream = b"event: ping\n\ndata: y\n\n"
    assert SSEParser().feed(stream) == [SSEEvent(None, "y")]


def test_field_without_colon_and_empty_data() -> None:
    stream = b"data\n\ndata:\ndata:\n\n"
    assert SSEParser().feed(stream) == [SSEEvent(None, ""), SSEEvent(None, "\n")]


def test_utf8_split_inside_a_character() -> None:
    raw = "data: héllo ✓ 🎉\n\n".encode()
    emoji_at = raw.index("🎉".encode())
    parser = SSEParser()
    assert parser.feed(raw[: emoji_at + 2]) == []
    assert parser.feed(raw[emoji_at + 2 :]) == [SSEEvent(None, "héllo ✓ 🎉")]


def test_every_byte_split_gives_the_same_events() -> None:
    stream = 'event: a\r\ndata: é✓\r\n\r\n: c\ndata: {"k": 1}\rdata: 2\r\r'.encode()
    expected = feed_all([stream])
    assert expected == [SSEEvent("a", "é✓"), SSEEvent(None, '{"k": 1}\n2')]
    for i in range(len(stream) + 1):
        for j in range(i, len(stream) + 1):
            assert feed_all([stream[:i], stream[i:j], stream[j:]]) == expected


def test_leading_bom_is_ignored_once() -> None:
    stream = b"\xef\xbb\xbfdata: a\n\n\xef\xbb\xbfdata: b\n\n"
    events = feed_all([stream[:2], stream[2:]])
    assert events[0] == SSEEvent(None, "a")
    assert len(events) == 1  # a second BOM is part of a field name, which is then unknown


def test_invalid_utf8_becomes_replacement_character() -> None:
    assert SSEParser().feed(b"data: a\xffb\n\n") == [SSEEvent(None, "a\ufffdb")]


def test_close_dispatches_an_event_missing_its_blank_line() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: done\n") == []
    assert parser.close() == [SSEEvent(None, "done")]


def test_close_dispatches_a_last_line_without_newline() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\ndata: [DONE]") == [SSEEvent(None, "1")]
    assert parser.close() == [SSEEvent(None, "[DONE]")]


def test_close_with_nothing_pending() -> None:
    parser = SSEParser()
    assert parser.feed(b"data: 1\n\n: trailing comment\n") == [SSEEvent(None, "1")]
    assert parser.close() == []


def test_empty_feed() -> None:
    assert SSEParser().feed(b"") == []


def test_format_event_is_exact() -> None:
    assert format_event('{"a":"é"}') == b'data: {"a":"\xc3\xa9"}\n\n'
    assert format_event("[DONE]") == b"data: [DONE]\n\n"


event_text = st.text(
    alphabet=st.characters(exclude_categories=["Cs"], exclude_characters="\r\n"),
    max_size=20,
)


@settings(max_examples=150, deadline=None)
@given(
    events=st.lists(st.tuples(st.none() | st.sampled_from(["a", "b"]), event_text), max_size=6),
    endings=st.lists(st.sampled_from(["\n", "\r\n", "\r"]), min_size=1, max_size=4),
    points=st.lists(st.integers(min_value=0, max_value=10_000), max_size=8),
    comments=st.booleans(),
)
def test_property_any_split_and_line_ending(
    events: list[tuple[str | None, str]], endings: list[str], points: list[int], comments: bool
) -> None:
    text = ""
    for k, (name, data) in enumerate(events):
        eol = endings[k % len(endings)]
        if comments:
            text += f": keep-alive{eol}"
        if name is not None:
            text += f"event: {name}{eol}"
        text += f"data: {data}{eol}{eol}"
    stream = text.encode()
    expected = [SSEEvent(name, data) for name, data in events]
    assert feed_all(split_at(stream, points)) == expected
