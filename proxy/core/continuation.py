"""Mid-stream continuation: the pure part (docs/breaker.md, "Mid-stream continuation").

A committed OpenAI chat stream whose upstream fails can be finished by the next
candidate. This module holds what that takes and does no I/O:

- ``read_transcript``: the OpenAI-format bytes already written to the client ->
  what was sent (text, id, created, model) and whether it may be continued at all;
- ``prefill_body`` / ``restart_body``: the request for the continuing candidate;
- ``Splicer``: the continuing candidate's OpenAI chunks (already translated by
  its provider's stream translator) -> chunks of the client's one stream.

Invariants:
- Only a text-only answer of one choice is continued: a tool call, a second
  choice, logprobs, a refusal or reasoning in the transcript makes it
  ineligible, and so does a finish reason already sent (nothing is missing).
- The client sees one stream: every spliced chunk carries the transcript's
  ``id``, ``created`` and ``model`` and choice index 0, never a second role
  delta, and no ``[DONE]`` (the caller writes the end, after its metadata).
- Restart-and-match sends nothing until the new answer has repeated the text
  already sent (compared without whitespace); a divergence, a tool call or an
  end before that point raises ``Mismatch`` and nothing of the new answer is
  sent. After the match only the rest goes out.
- Whitespace is never doubled: a prefill carries the sent text without its
  trailing whitespace (Anthropic rejects it), and when that whitespace had
  already been sent, the continuation's leading whitespace is dropped; the same
  rule applies to the rest of a matched restart.
- Usage on the client's stream is the sum of every attempt's: the caller gives
  what earlier attempts billed (``prior``), and each usage the continuation
  reports is sent as ``prior`` plus it.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from proxy.core.sse import SSEParser, format_event
from proxy.core.usage import Usage

JSONDict = dict[str, Any]

DONE = "[DONE]"
# Delta keys that are not plain text: an answer that has streamed any of them is not continued.
NOT_TEXT_KEYS = (
    "tool_calls",
    "function_call",
    "refusal",
    "audio",
    "reasoning_content",
    "reasoning",
)


class Method(enum.Enum):
    PREFILL = "prefill"
    RESTART = "restart"


class Result(enum.Enum):
    CONTINUED = "continued"
    MISMATCH = "mismatch"  # a restart that did not repeat the text already sent
    FAILED = "failed"  # the continuing attempt failed too
    INELIGIBLE = "ineligible"  # the failed stream could not be continued at all


class Mismatch(Exception):
    """A restarted answer that does not begin with the text already sent."""


@dataclass(frozen=True, slots=True)
class Transcript:
    """What the client has been sent of one chat stream."""

    text: str = ""
    id: str = ""
    created: int = 0
    model: str = ""
    # Why it cannot be continued ("tool_call", "second_choice", ...); None = it can.
    ineligible: str | None = None

    @property
    def continuable(self) -> bool:
        return self.ineligible is None


def read_transcript(data: bytes) -> Transcript:
    """The transcript of ``data``, the OpenAI SSE bytes written to the client so far."""
    parser = SSEParser()
    events = parser.feed(data)
    events.extend(parser.close())
    text: list[str] = []
    ident, created, model = "", 0, ""
    for event in events:
        if event.data == DONE:
            return Transcript(ineligible="ended")
        try:
            obj = orjson.loads(event.data)
        except orjson.JSONDecodeError:
            return Transcript(ineligible="unreadable")
        if not isinstance(obj, dict):
            return Transcript(ineligible="unreadable")
        if not ident and isinstance(obj.get("id"), str):
            ident = obj["id"]
            stamp, name = obj.get("created"), obj.get("model")
            created = stamp if isinstance(stamp, int) else 0
            model = name if isinstance(name, str) else ""
        why = _not_text(obj.get("choices"), text)
        if why is not None:
            return Transcript(ineligible=why)
    if not ident:
        return Transcript(ineligible="unreadable")
    return Transcript("".join(text), ident, created, model)


def _not_text(choices: Any, text: list[str]) -> str | None:
    """Append the text of ``choices`` to ``text``; the reason it is not plain text, if any."""
    if not isinstance(choices, list):
        return None
    for choice in choices:
        if not isinstance(choice, dict):
            return "unreadable"
        if choice.get("index", 0) != 0:
            return "second_choice"
        if choice.get("logprobs") is not None:
            return "logprobs"
        if choice.get("finish_reason"):
            return "finished"
        delta = choice.get("delta")
        if not isinstance(delta, dict):
            return "unreadable"
        for key in NOT_TEXT_KEYS:
            if delta.get(key):
                return "tool_call" if key in ("tool_calls", "function_call") else key
        content = delta.get("content")
        if isinstance(content, str):
            text.append(content)
    return None


def eligible_request(body: Mapping[str, Any]) -> bool:
    """Can a stream of this OpenAI chat request be continued at all (judged before it starts)?"""
    n = body.get("n")
    if n is not None and n != 1:
        return False
    return not body.get("logprobs") and not body.get("top_logprobs")


def prefill_text(sent: str) -> str:
    """The assistant text a prefill carries: what was sent, without trailing whitespace."""
    return sent.rstrip()


def prefill_body(body: Mapping[str, Any], sent: str, *, prefix_flag: bool) -> JSONDict:
    """``body`` with a trailing assistant message holding the text already sent.

    ``prefix_flag`` adds ``"prefix": true`` to that message, the form OpenAI-compatible
    servers that continue a partial assistant turn (DeepSeek, Mistral) ask for. The
    Anthropic and Gemini translators turn a final assistant message into their own prefill.
    """
    message: JSONDict = {"role": "assistant", "content": prefill_text(sent)}
    if prefix_flag:
        message["prefix"] = True
    messages = body.get("messages")
    return {**body, "messages": [*(messages if isinstance(messages, list) else ()), message]}


def restart_body(body: Mapping[str, Any]) -> JSONDict:
    """The request that asks for the whole answer again: the original one."""
    return dict(body)


class _TextGate:
    """Decides which part of the continuation's text reaches the client (see the invariants)."""

    __slots__ = ("_pos", "_strip", "_trailing", "_want")

    def __init__(self, method: Method, sent: str) -> None:
        trailing = bool(sent) and sent[-1].isspace()
        self._trailing = trailing
        # Restart: the non-whitespace characters still to be repeated; prefill: none.
        self._want = "".join(sent.split()) if method is Method.RESTART else ""
        self._pos = 0
        self._strip = trailing and not self._want

    @property
    def matched(self) -> bool:
        return self._pos >= len(self._want)

    def feed(self, text: str) -> str:
        if not self.matched:
            want = self._want
            for i, ch in enumerate(text):
                if ch.isspace():
                    continue
                if ch != want[self._pos]:
                    raise Mismatch("the restarted answer differs from the text already sent")
                self._pos += 1
                if self._pos == len(want):
                    self._strip = self._trailing
                    return self.feed(text[i + 1 :])
            return ""
        if self._strip:
            text = text.lstrip()
            if text:
                self._strip = False
        return text


def add_usage(prior: Usage, usage: Any) -> JSONDict:
    """An OpenAI ``usage`` object (as the continuation reported it) plus ``prior``."""
    prompt = usage.get("prompt_tokens") if isinstance(usage, dict) else None
    completion = usage.get("completion_tokens") if isinstance(usage, dict) else None
    p = prior.prompt_tokens + (prompt if isinstance(prompt, int) else 0)
    c = prior.completion_tokens + (completion if isinstance(completion, int) else 0)
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}


class Splicer:
    """The continuing candidate's OpenAI SSE bytes -> bytes of the client's stream.

    ``feed`` returns whole ``data:`` events to write (possibly none); it raises
    ``Mismatch`` for a restart that does not repeat the sent text. ``done`` turns
    True at the continuation's ``[DONE]``, which is not passed on; ``finished`` once a
    finish reason went out. ``sent_text`` is the text this splice added.
    """

    __slots__ = ("_gate", "_parser", "_prior", "_transcript", "done", "finished", "sent_chars")

    def __init__(self, transcript: Transcript, method: Method, prior: Usage) -> None:
        self._transcript = transcript
        self._gate = _TextGate(method, transcript.text)
        self._parser = SSEParser()
        self._prior = prior
        self.done = False
        self.finished = False
        self.sent_chars = 0

    @property
    def matched(self) -> bool:
        """A restart has repeated the sent text (always True for a prefill)."""
        return self._gate.matched

    def feed(self, data: bytes) -> bytes:
        return self._events(self._parser.feed(data))

    def close(self) -> bytes:
        return self._events(self._parser.close())

    def _events(self, events: Sequence[Any]) -> bytes:
        out: list[bytes] = []
        for event in events:
            if self.done:
                break
            if event.data == DONE:
                self.done = True
                break
            try:
                obj = orjson.loads(event.data)
            except orjson.JSONDecodeError:
                # Unusable: the client's stream ends with the original failure, never a crash.
                raise Mismatch("the continuation sent an event that is not JSON") from None
            chunk = self._chunk(obj) if isinstance(obj, dict) else None
            if chunk is not None:
                out.append(format_event(orjson.dumps(chunk).decode()))
        return b"".join(out)

    def _chunk(self, obj: JSONDict) -> JSONDict | None:
        """One continuation chunk rewritten for the client, or None when nothing is left."""
        t = self._transcript
        choices = obj.get("choices")
        keep = False
        out_choices: list[JSONDict] = []
        for choice in choices if isinstance(choices, list) else ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            delta = dict(delta) if isinstance(delta, dict) else {}
            delta.pop("role", None)
            for key in NOT_TEXT_KEYS:
                # Reasoning is dropped: only the answer's text is spliced.
                if delta.pop(key, None) and key not in ("reasoning_content", "reasoning"):
                    raise Mismatch(f"the continuation answered with {key}")
            content = delta.get("content")
            if isinstance(content, str):
                text = self._gate.feed(content)
                if text:
                    delta["content"] = text
                    self.sent_chars += len(text)
                else:
                    delta.pop("content")
            reason = choice.get("finish_reason")
            if reason and not self._gate.matched:
                raise Mismatch("the restarted answer ended before the text already sent")
            if delta or reason:
                keep = True
                if reason:
                    self.finished = True
                out_choices.append({**choice, "index": 0, "delta": delta, "logprobs": None})
        usage = obj.get("usage")
        if usage:
            obj = {**obj, "usage": add_usage(self._prior, usage)}
            keep = True
        if not keep:
            return None
        return {**obj, "id": t.id, "created": t.created, "model": t.model, "choices": out_choices}


def metadata_chunk(transcript: Transcript, meta: Mapping[str, Any]) -> bytes:
    """The last chunk before ``[DONE]``: no choices, the ``circuit_breaker`` object."""
    chunk = {
        "id": transcript.id,
        "object": "chat.completion.chunk",
        "created": transcript.created,
        "model": transcript.model,
        "choices": [],
        "circuit_breaker": dict(meta),
    }
    return format_event(orjson.dumps(chunk).decode())
