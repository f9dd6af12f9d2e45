"""Shared pieces of the mock upstream's wire formats (``cb-proxy mock``).

Everything here is synchronous and deterministic: the same request always gets
the same reply text, token counts, tool-call ids and embedding vectors, so
tests can assert exact values. A wire format (``mock_openai``,
``mock_anthropic``, ``mock_gemini``) maps a parsed request to a ``Reply``; the
aiohttp shell in ``mock`` does the I/O and applies faults.

Conventions every format keeps:
- a token is a whitespace-separated word (of the request's text for input
  tokens, of the reply text for output tokens);
- the reply text is ``reply_text(last user text, words)``, cut to the request's
  output-token limit (then the stop reason is the format's "length");
- a ``StreamReply`` lists pre-framed events; its last ``terminal`` events are
  the end-of-stream marker, which ``cut_stream`` faults never send (with
  ``end_marker`` they send the format's bare end instead: ``bare_end``);
- a prefill (a request ending with an assistant turn: Anthropic always, OpenAI
  with ``"prefix": true``, Gemini a final ``model`` turn) continues the same
  answer from after that text (``continued_pieces``); the answer is still
  chosen by the last user text, so asking again gives the same words.
"""

from __future__ import annotations

import abc
import base64
import hashlib
import math
import re
import struct
import zlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import orjson

JSONDict = dict[str, Any]

DEFAULT_WORDS = 12
DEFAULT_EMBEDDING_DIMENSIONS = 8
MAX_TOOL_CALLS = 2
# Argument fragments this short split JSON tokens mid-way, as real streams do.
ARGUMENT_FRAGMENT_CHARS = 7
MAX_TOOL_ARGUMENTS = 4
REPLY_HEAD = ("mock", "reply")
FILLER_WORDS = ("lorem", "ipsum", "dolor", "sit", "amet")
# A fixed creation time keeps model listings byte-stable across runs.
MODEL_CREATED = 1_700_000_000


@dataclass(frozen=True)
class MockOptions:
    """How one mock upstream behaves (everything but faults, which change at run time)."""

    name: str = "mock"
    words: int = DEFAULT_WORDS
    latency_ms: float = 0.0
    tokens_per_second: float | None = None
    require_key: str | None = None
    # When set, only these models exist: others get the format's 404.
    models: tuple[str, ...] | None = None
    # Gemini 3 rejects a current-turn function call without its thoughtSignature.
    strict_thought_signatures: bool = False


@dataclass(frozen=True)
class MockRequest:
    method: str
    path: str
    match: Mapping[str, str]
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Any  # parsed JSON; INVALID_JSON when the body did not parse; None when empty


INVALID_JSON: Any = object()


@dataclass(frozen=True)
class JsonReply:
    status: int
    body: Any  # a JSON value; ``str`` or ``bytes`` are sent as they are
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamReply:
    events: Sequence[bytes]
    terminal: int = 1
    content_type: str = "text/event-stream"
    headers: Mapping[str, str] = field(default_factory=dict)


Reply = JsonReply | StreamReply
Handler = Callable[[MockRequest], Reply]


@dataclass(frozen=True)
class Route:
    method: str
    path: str
    handler: Handler


@dataclass(frozen=True)
class ToolCall:
    call_id: str
    name: str
    arguments: JSONDict

    @property
    def arguments_json(self) -> str:
        return orjson.dumps(self.arguments).decode()


class MockFormat(abc.ABC):
    """One wire format: its routes, its error shapes, how it names models and keys."""

    name: ClassVar[str]

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self._serial = 0

    def next_serial(self) -> int:
        self._serial += 1
        return self._serial

    @abc.abstractmethod
    def routes(self) -> Sequence[Route]: ...

    # OpenAI and Anthropic name the model and ask for a stream in the JSON body;
    # a format that says so elsewhere (Gemini: in the path) overrides these.
    def model_of(self, req: MockRequest) -> str | None:
        model = req.body.get("model") if isinstance(req.body, dict) else None
        return model if isinstance(model, str) else None

    def wants_stream(self, req: MockRequest) -> bool:
        return isinstance(req.body, dict) and req.body.get("stream") is True

    @abc.abstractmethod
    def error(self, status: int, message: str | None = None) -> JsonReply:
        """The format's error body for ``status`` (a default message when none is given)."""

    @abc.abstractmethod
    def rate_limited(self, retry_after: str | None) -> JsonReply:
        """A true rate limit (not quota): 429 in the format's shape."""

    @abc.abstractmethod
    def quota_exhausted(self) -> JsonReply: ...

    @abc.abstractmethod
    def in_band_error(self) -> bytes:
        """An overload error as the format sends it inside a 200 stream."""

    def bare_end(self) -> bytes:
        """The format's end-of-stream event sent alone, without any finish reason."""
        return b""

    def malformed_event(self) -> bytes:
        """An event whose data is cut-off JSON, as a dying upstream may send."""
        return b'data: {"id": "cut-off", "choices": [{"delta": {"content": "x\n\n'

    def is_prefill(self, req: MockRequest) -> bool:
        """The request ends with an assistant turn (what ``reject_prefill`` refuses)."""
        messages = req.body.get("messages") if isinstance(req.body, dict) else None
        last = messages[-1] if isinstance(messages, list) and messages else None
        return isinstance(last, dict) and last.get("role") == "assistant"

    @abc.abstractmethod
    def authorize(self, req: MockRequest) -> JsonReply | None:
        """None when the credential is acceptable, else the format's auth error."""

    @abc.abstractmethod
    def not_found(self, req: MockRequest) -> JsonReply: ...

    def unknown_model(self, model: str) -> JsonReply | None:
        if self.options.models is None or model in self.options.models:
            return None
        return self.error(404, f"The model `{model}` does not exist")

    def listed_models(self, defaults: Sequence[str]) -> Sequence[str]:
        return self.options.models if self.options.models is not None else defaults


def count_words(text: str) -> int:
    return len(text.split())


def reply_words(prompt: str, words: int = DEFAULT_WORDS) -> list[str]:
    """The mock's answer to ``prompt``: exactly ``words`` words, stable across runs.

    ``mock reply <n>:`` where n is a checksum of the prompt, then the prompt's
    own words (or filler) repeated, so a relayed reply can be traced to its prompt.
    """
    head = [*REPLY_HEAD, f"{zlib.crc32(prompt.encode()) % 1000}:"]
    filler = prompt.split() or list(FILLER_WORDS)
    body = [filler[i % len(filler)] for i in range(max(0, words - len(head)))]
    return (head + body)[: max(1, words)]


def reply_text(prompt: str, words: int = DEFAULT_WORDS) -> str:
    return " ".join(reply_words(prompt, words))


def stream_pieces(words: Sequence[str]) -> list[str]:
    """Word-sized deltas whose concatenation is the reply text."""
    return [w if i == 0 else " " + w for i, w in enumerate(words)]


def continued_pieces(words: Sequence[str], prefill: str) -> list[str]:
    """The deltas that continue the answer ``words`` after the assistant text ``prefill``.

    When the answer begins with ``prefill`` (its trailing whitespace ignored), the rest of
    it, split before each word (a leading space kept, as a model continuing would send it);
    otherwise the whole answer, as a model ignoring the prefill would.
    """
    text = " ".join(words)
    head = prefill.rstrip()
    rest = text[len(head) :] if text.startswith(head) else text
    return re.findall(r"\s*\S+", rest)


def truncate(words: list[str], limit: Any) -> tuple[list[str], bool]:
    """Words cut to an output-token limit, and whether the limit was hit."""
    if isinstance(limit, int) and not isinstance(limit, bool) and 0 < limit < len(words):
        return words[:limit], True
    return words, False


def stable_id(prefix: str, *parts: object, length: int = 24) -> str:
    digest = hashlib.sha256("\x00".join(map(str, parts)).encode()).hexdigest()
    return prefix + digest[:length]


def fragments(text: str, size: int = ARGUMENT_FRAGMENT_CHARS) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)] or [""]


def embedding_vector(text: str, dimensions: int = DEFAULT_EMBEDDING_DIMENSIONS) -> list[float]:
    """A unit vector derived from a hash of ``text``, already rounded to float32.

    Rounding to float32 first makes the JSON floats and the base64 encoding agree exactly.
    """
    raw = b"".join(_hash_stream(text, 4 * dimensions))
    ints = struct.unpack(f"<{dimensions}I", raw[: 4 * dimensions])
    values = [i / 2**31 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return list(
        struct.unpack(
            f"<{dimensions}f", struct.pack(f"<{dimensions}f", *(v / norm for v in values))
        )
    )


def _hash_stream(text: str, needed: int) -> Iterator[bytes]:
    produced, counter = 0, 0
    while produced < needed:
        block = hashlib.sha256(f"{counter}:{text}".encode()).digest()
        produced += len(block)
        counter += 1
        yield block


def embedding_base64(vector: Sequence[float]) -> str:
    """Little-endian float32, as OpenAI's ``encoding_format: base64``."""
    return base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()


def dumps(obj: Any) -> bytes:
    return orjson.dumps(obj)
