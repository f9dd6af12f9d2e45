"""The mock upstream's OpenAI wire format: chat, legacy completions, embeddings, models.

Replies follow the official OpenAPI spec and docs/wire-formats.md: a stream is
``data: <json>\\n\\n`` events only, ``role`` once in the first delta, each tool
call's ``id``/``type``/``name`` once in its first delta, a final chunk with
``finish_reason``, a usage chunk only when ``stream_options.include_usage``,
then ``data: [DONE]``. Non-stream replies always carry ``usage``.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.mock.common import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    FILLER_WORDS,
    INVALID_JSON,
    MAX_TOOL_ARGUMENTS,
    MAX_TOOL_CALLS,
    MODEL_CREATED,
    JSONDict,
    JsonReply,
    MockFormat,
    MockRequest,
    Reply,
    Route,
    StreamReply,
    ToolCall,
    continued_pieces,
    count_words,
    dumps,
    embedding_base64,
    embedding_vector,
    fragments,
    reply_words,
    stable_id,
    stream_pieces,
    truncate,
)
from proxy.mock.schema import UnsupportedSchema, instance_of

DEFAULT_MODELS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small")
ROLES = frozenset({"system", "developer", "user", "assistant", "tool", "function"})
SYSTEM_FINGERPRINT = "fp_mock"
DONE_EVENT = b"data: [DONE]\n\n"
# status -> (error.type, error.code, message), after the bodies api.openai.com sends.
ERRORS: dict[int, tuple[str, str | None, str]] = {
    400: ("invalid_request_error", None, "Invalid request."),
    401: ("invalid_request_error", "invalid_api_key", "Incorrect API key provided."),
    403: ("request_forbidden", "unsupported_country_region_territory", "Request forbidden."),
    404: ("invalid_request_error", "model_not_found", "The model does not exist."),
    408: ("timeout", None, "Request timed out."),
    409: ("invalid_request_error", "conflict", "Conflict."),
    429: ("requests", "rate_limit_exceeded", "Rate limit reached for requests."),
    500: ("server_error", None, "The server had an error while processing your request."),
    502: ("server_error", None, "Bad gateway."),
    503: ("server_error", None, "The engine is currently overloaded, please try again later."),
    504: ("server_error", None, "Gateway timeout."),
}


def error_body(status: int, message: str | None = None, *, param: str | None = None) -> JSONDict:
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    kind, code, default_message = ERRORS.get(status, (default_type, None, f"HTTP {status}"))
    return {
        "error": {"message": message or default_message, "type": kind, "param": param, "code": code}
    }


def message_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return " ".join(
            str(p.get("text", ""))
            for p in content
            if isinstance(p, dict) and p.get("type") == "text"
        )
    return ""


class OpenAIFormat(MockFormat):
    name: ClassVar[str] = "openai"

    def routes(self) -> Sequence[Route]:
        return (
            Route("POST", "/v1/chat/completions", self.chat),
            Route("POST", "/v1/completions", self.completions),
            Route("POST", "/v1/embeddings", self.embeddings),
            Route("GET", "/v1/models", self.list_models),
        )

    def error(self, status: int, message: str | None = None) -> JsonReply:
        return JsonReply(status, error_body(status, message))

    def _invalid(self, message: str, param: str | None = None) -> JsonReply:
        return JsonReply(400, error_body(400, message, param=param))

    def rate_limited(self, retry_after: str | None) -> JsonReply:
        headers = {"x-ratelimit-limit-requests": "60", "x-ratelimit-remaining-requests": "0"}
        if retry_after is not None:
            headers["x-ratelimit-reset-requests"] = f"{retry_after}s"
        message = "Rate limit reached for requests. Please try again later."
        return JsonReply(429, error_body(429, message), headers)

    def quota_exhausted(self) -> JsonReply:
        message = "You exceeded your current quota, please check your plan and billing details."
        body = {
            "error": {
                "message": message,
                "type": "insufficient_quota",
                "param": None,
                "code": "insufficient_quota",
            }
        }
        return JsonReply(429, body)

    def in_band_error(self) -> bytes:
        return _data(error_body(503))

    def bare_end(self) -> bytes:
        return DONE_EVENT

    def authorize(self, req: MockRequest) -> JsonReply | None:
        key = self.options.require_key
        if key is None:
            return None
        auth = req.headers.get("Authorization", "")
        if not auth:
            return self.error(
                401, "You didn't provide an API key. Use 'Authorization: Bearer YOUR_KEY'."
            )
        if auth != f"Bearer {key}":
            return self.error(401, "Incorrect API key provided.")
        return None

    def not_found(self, req: MockRequest) -> JsonReply:
        body = error_body(404, f"Invalid URL ({req.method} {req.path})")
        body["error"]["code"] = None
        return JsonReply(404, body)

    def _headers(self) -> dict[str, str]:
        return {
            "x-request-id": f"req_mock{self.options.name}{self._serial}",
            "openai-processing-ms": "1",
        }

    def _common(self, req: MockRequest, *, needs: str) -> JsonReply | tuple[JSONDict, str]:
        body = req.body
        if body is INVALID_JSON or not isinstance(body, dict):
            return self._invalid("We could not parse the JSON body of your request.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            return self._invalid("you must provide a model parameter", "model")
        if needs not in body:
            return self._invalid(f"Missing required parameter: '{needs}'.", needs)
        missing = self.unknown_model(model)
        return missing if missing is not None else (body, model)

    # -- chat ------------------------------------------------------------------

    def chat(self, req: MockRequest) -> Reply:
        checked = self._common(req, needs="messages")
        if isinstance(checked, JsonReply):
            return checked
        body, model = checked
        problem = _check_messages(body["messages"])
        if problem is not None:
            return self._invalid(problem, "messages")
        options = _chat_options(body)
        if isinstance(options, _Refusal):
            return self._invalid(options.message, options.param)
        messages: list[JSONDict] = body["messages"]
        prompt = next(
            (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        word = prompt.split()[0] if prompt.split() else "mock"
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        words, cut = truncate(reply_words(prompt, self.options.words), limit)
        try:
            calls = self._tool_calls(body, messages, prompt, options.tool_choice, word)
            pieces = _content_pieces(options.response_format, words, word)
        except UnsupportedSchema as exc:
            param = "tools" if options.response_format is None else "response_format"
            return self._invalid(f"The mock cannot honour this schema: {exc}", param)
        prefill = _prefill(messages)
        if calls:
            choice = _Choice(None, calls, "tool_calls")
            tokens = sum(count_words(c.arguments_json) for c in calls)
        elif prefill is not None and options.response_format is None:
            # DeepSeek/Mistral's partial assistant turn: the answer goes on after its text.
            pieces = continued_pieces(words, prefill)
            choice, tokens = _Choice(pieces, [], "length" if cut else "stop"), len(pieces)
        elif options.response_format is not None:
            choice, tokens = _Choice(pieces, [], "stop"), len(pieces)
        else:
            choice, tokens = _Choice(pieces, [], "length" if cut else "stop"), len(words)
        prompt_tokens = sum(count_words(message_text(m.get("content"))) for m in messages)
        completion_tokens = tokens * options.n
        reply = _Chat(
            ident=f"chatcmpl-mock{self.next_serial()}",
            created=int(time.time()),
            model=model,
            choices=[choice] * options.n,
            top_logprobs=options.top_logprobs,
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )
        if not self.wants_stream(req):
            return JsonReply(200, reply.completion(), self._headers())
        return StreamReply(reply.events(_include_usage(body)), headers=self._headers())

    def _tool_calls(
        self,
        body: JSONDict,
        messages: list[JSONDict],
        prompt: str,
        choice: str | None,
        word: str,
    ) -> list[ToolCall]:
        """The calls the reply makes: ``choice`` is None/"auto", "none", "required" or a name."""
        functions = _functions(body)
        if not functions or choice == "none":
            return []
        if choice in (None, "auto") and messages[-1].get("role") != "user":
            return []
        if choice not in (None, "auto", "required"):
            functions = [f for f in functions if f.get("name") == choice]
        limit = 1 if body.get("parallel_tool_calls") is False else MAX_TOOL_CALLS
        calls = []
        for i, f in enumerate(functions[:limit]):
            schema = f.get("parameters") or {"type": "object", "properties": {}}
            args = instance_of(schema, word=word, top_level_optional=MAX_TOOL_ARGUMENTS)
            if not isinstance(args, dict):
                raise UnsupportedSchema(f"the parameters of {f.get('name')!r} are not an object")
            calls.append(
                ToolCall(stable_id("call_", prompt, i, f.get("name")), str(f["name"]), args)
            )
        return calls

    # -- legacy completions -----------------------------------------------------

    def completions(self, req: MockRequest) -> Reply:
        checked = self._common(req, needs="prompt")
        if isinstance(checked, JsonReply):
            return checked
        body, model = checked
        raw = body["prompt"]
        prompt = (
            " ".join(p for p in raw if isinstance(p, str)) if isinstance(raw, list) else str(raw)
        )
        words, cut = truncate(reply_words(prompt, self.options.words), body.get("max_tokens"))
        finish = "length" if cut else "stop"
        usage = {
            "prompt_tokens": count_words(prompt),
            "completion_tokens": len(words),
            "total_tokens": count_words(prompt) + len(words),
        }
        ident, created = f"cmpl-mock{self.next_serial()}", int(time.time())

        def completion(choices: list[JSONDict], **extra: Any) -> JSONDict:
            return {
                "id": ident,
                "object": "text_completion",
                "created": created,
                "model": model,
                "system_fingerprint": SYSTEM_FINGERPRINT,
                "choices": choices,
                **extra,
            }

        def choice(text: str, finish_reason: str | None) -> list[JSONDict]:
            return [{"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}]

        if not self.wants_stream(req):
            reply = completion(choice(" ".join(words), finish), usage=usage)
            return JsonReply(200, reply, self._headers())
        include_usage = _include_usage(body)
        extra: JSONDict = {"usage": None} if include_usage else {}
        pieces = [*((p, None) for p in stream_pieces(words)), ("", finish)]
        events = [_data(completion(choice(text, fin), **extra)) for text, fin in pieces]
        if include_usage:
            events.append(_data(completion([], usage=usage)))
        events.append(DONE_EVENT)
        return StreamReply(events, headers=self._headers())

    # -- embeddings and models --------------------------------------------------

    def embeddings(self, req: MockRequest) -> Reply:
        checked = self._common(req, needs="input")
        if isinstance(checked, JsonReply):
            return checked
        body, model = checked
        inputs = _embedding_inputs(body["input"])
        if not inputs:
            return self._invalid("'input' must be a non-empty string or array.", "input")
        dims = body.get("dimensions", DEFAULT_EMBEDDING_DIMENSIONS)
        if not isinstance(dims, int) or isinstance(dims, bool) or dims < 1:
            return self._invalid("'dimensions' must be a positive integer.", "dimensions")
        encoding = body.get("encoding_format", "float")
        if encoding not in ("float", "base64"):
            return self._invalid(
                "'encoding_format' must be 'float' or 'base64'.", "encoding_format"
            )
        data = []
        for index, text in enumerate(inputs):
            vector = embedding_vector(text, dims)
            data.append(
                {
                    "object": "embedding",
                    "index": index,
                    "embedding": embedding_base64(vector) if encoding == "base64" else vector,
                }
            )
        tokens = sum(count_words(t) for t in inputs)
        self.next_serial()
        reply = {
            "object": "list",
            "data": data,
            "model": model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }
        return JsonReply(200, reply, self._headers())

    def list_models(self, req: MockRequest) -> Reply:
        data = [
            {"id": m, "object": "model", "created": MODEL_CREATED, "owned_by": "mock"}
            for m in self.listed_models(DEFAULT_MODELS)
        ]
        return JsonReply(200, {"object": "list", "data": data}, self._headers())


@dataclass(frozen=True)
class _Choice:
    pieces: list[str] | None  # the content, token by token; None when the reply calls tools
    calls: list[ToolCall]
    finish: str

    @property
    def text(self) -> str | None:
        return None if self.pieces is None else "".join(self.pieces)


@dataclass(frozen=True)
class _Chat:
    """One chat reply (``n`` choices), rendered whole or as stream chunks."""

    ident: str
    created: int
    model: str
    choices: list[_Choice]
    top_logprobs: int | None  # None: no logprobs asked for
    usage: JSONDict

    def _envelope(self, obj: str, choices: list[JSONDict]) -> JSONDict:
        return {
            "id": self.ident,
            "object": obj,
            "created": self.created,
            "model": self.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": choices,
        }

    def _logprobs(self, tokens: Sequence[str]) -> JSONDict | None:
        if self.top_logprobs is None:
            return None
        return {
            "content": [token_logprob(t, self.top_logprobs) for t in tokens],
            "refusal": None,
        }

    def completion(self) -> JSONDict:
        choices = []
        for index, choice in enumerate(self.choices):
            message: JSONDict = {
                "role": "assistant",
                "content": choice.text,
                "refusal": None,
                "annotations": [],
            }
            if choice.calls:
                message["tool_calls"] = [
                    {
                        "id": c.call_id,
                        "type": "function",
                        "function": {"name": c.name, "arguments": c.arguments_json},
                    }
                    for c in choice.calls
                ]
            choices.append(
                {
                    "index": index,
                    "message": message,
                    "logprobs": self._logprobs(choice.pieces or []),
                    "finish_reason": choice.finish,
                }
            )
        return {**self._envelope("chat.completion", choices), "usage": self.usage}

    def events(self, include_usage: bool) -> list[bytes]:
        events: list[bytes] = []
        for index, choice in enumerate(self.choices):

            def chunk(
                delta: JSONDict,
                finish_reason: str | None = None,
                logprobs: JSONDict | None = None,
                index: int = index,
            ) -> bytes:
                body = {
                    "index": index,
                    "delta": delta,
                    "logprobs": logprobs,
                    "finish_reason": finish_reason,
                }
                obj = self._envelope("chat.completion.chunk", [body])
                if include_usage:
                    obj["usage"] = None
                return _data(obj)

            if choice.calls:
                events.extend(_tool_call_chunks(choice.calls, chunk))
            else:
                events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
                events.extend(
                    chunk({"content": piece}, None, self._logprobs([piece]))
                    for piece in choice.pieces or []
                )
            events.append(chunk({}, choice.finish))
        if include_usage:
            events.append(
                _data({**self._envelope("chat.completion.chunk", []), "usage": self.usage})
            )
        events.append(DONE_EVENT)
        return events


MAX_CHOICES = 16
MAX_TOP_LOGPROBS = 20


@dataclass(frozen=True)
class _Refusal:
    message: str
    param: str


@dataclass(frozen=True)
class _ChatOptions:
    n: int
    top_logprobs: int | None
    # None: plain text; {}: any JSON object; else the JSON schema the content must satisfy
    response_format: JSONDict | None
    tool_choice: str | None  # None/"auto", "none", "required", or the forced function's name


def _chat_options(body: JSONDict) -> _ChatOptions | _Refusal:
    """What the request asks of the reply, or why the mock cannot honour it (a 400)."""
    n = body.get("n")
    if n is None:
        n = 1
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return _Refusal(f"Invalid value for 'n': expected an integer >= 1, got {n!r}.", "n")
    if n > MAX_CHOICES:
        return _Refusal(f"Invalid value for 'n': the mock returns at most {MAX_CHOICES}.", "n")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        return _Refusal("Invalid type for 'logprobs': expected a boolean.", "logprobs")
    top = body.get("top_logprobs")
    if top is not None:
        if not isinstance(top, int) or isinstance(top, bool) or not 0 <= top <= MAX_TOP_LOGPROBS:
            return _Refusal(
                f"Invalid value for 'top_logprobs': expected an integer 0..{MAX_TOP_LOGPROBS}.",
                "top_logprobs",
            )
        if logprobs is not True:
            return _Refusal("'top_logprobs' requires 'logprobs' to be true.", "top_logprobs")
    modalities = body.get("modalities")
    if body.get("audio") is not None or (isinstance(modalities, list) and "audio" in modalities):
        return _Refusal("The mock does not produce audio output.", "modalities")
    response_format = _response_format(body.get("response_format"))
    if isinstance(response_format, _Refusal):
        return response_format
    tool_choice = _tool_choice(body)
    if isinstance(tool_choice, _Refusal):
        return tool_choice
    return _ChatOptions(
        n=n,
        top_logprobs=(top or 0) if logprobs else None,
        response_format=response_format,
        tool_choice=tool_choice,
    )


def _response_format(raw: Any) -> JSONDict | _Refusal | None:
    if raw is None:
        return None
    kind = raw.get("type") if isinstance(raw, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {}
    if kind == "json_schema":
        spec = raw.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str):
            return _Refusal(
                "Missing required parameter: 'response_format.json_schema.name'.",
                "response_format.json_schema",
            )
        schema = spec.get("schema", {})
        if not isinstance(schema, dict):
            return _Refusal(
                "Invalid type for 'response_format.json_schema.schema': expected an object.",
                "response_format.json_schema.schema",
            )
        return schema or {"type": "object"}
    return _Refusal(
        f"Invalid value for 'response_format.type': {kind!r}; the mock supports "
        "'text', 'json_object' and 'json_schema'.",
        "response_format",
    )


def _functions(body: JSONDict) -> list[JSONDict]:
    tools = body.get("tools")
    if not isinstance(tools, list):
        return []
    return [
        t["function"]
        for t in tools
        if isinstance(t, dict)
        and isinstance(t.get("function"), dict)
        and isinstance(t["function"].get("name"), str)
    ]


def _tool_choice(body: JSONDict) -> str | _Refusal | None:
    choice = body.get("tool_choice")
    if choice is None:
        return None
    names = {f["name"] for f in _functions(body)}
    if not names:
        return _Refusal(
            "Invalid value for 'tool_choice': 'tool_choice' is only allowed when 'tools' "
            "are specified.",
            "tool_choice",
        )
    if choice in ("none", "auto", "required"):
        return str(choice)
    if isinstance(choice, dict) and choice.get("type") == "function":
        name = (choice.get("function") or {}).get("name")
        if name in names:
            return str(name)
        return _Refusal(
            f"Invalid value for 'tool_choice': no function named {name!r} in 'tools'.",
            "tool_choice",
        )
    return _Refusal(
        "Invalid value for 'tool_choice': expected 'none', 'auto', 'required' or "
        '{"type": "function", "function": {"name": ...}}.',
        "tool_choice",
    )


def _content_pieces(response_format: JSONDict | None, words: list[str], word: str) -> list[str]:
    """The reply content token by token: the words, or JSON meeting the response format."""
    if response_format is None:
        return stream_pieces(words)
    if response_format:
        value = instance_of(response_format, word=word)
    else:
        value = {"answer": " ".join(words)}
    return fragments(dumps(value).decode())


def token_logprob(token: str, top: int) -> JSONDict:
    """A ChatCompletionTokenLogprob: a stable logprob, then ``top`` alternatives (best first)."""
    logprob = -round((zlib.crc32(token.encode()) % 1000) / 1000 + 0.001, 4)
    alternatives = [token, *(f" {w}" for w in FILLER_WORDS if f" {w}" != token)]
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [
            {"token": t, "logprob": round(logprob - i, 4), "bytes": list(t.encode())}
            for i, t in enumerate(alternatives[:top])
        ],
    }


def _data(obj: JSONDict) -> bytes:
    return b"data: " + dumps(obj) + b"\n\n"


def _include_usage(body: JSONDict) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _tool_call_chunks(calls: list[ToolCall], chunk: Callable[[JSONDict], bytes]) -> list[bytes]:
    events: list[bytes] = []
    for index, call in enumerate(calls):
        opening: JSONDict = {
            "index": index,
            "id": call.call_id,
            "type": "function",
            "function": {"name": call.name, "arguments": ""},
        }
        delta: JSONDict = {"tool_calls": [opening]}
        if index == 0:
            delta = {"role": "assistant", "content": None, "refusal": None, **delta}
        events.append(chunk(delta))
        for fragment in fragments(call.arguments_json):
            events.append(
                chunk({"tool_calls": [{"index": index, "function": {"arguments": fragment}}]})
            )
    return events


def _embedding_inputs(raw: Any) -> list[str]:
    if isinstance(raw, str):
        return [raw] if raw else []
    if isinstance(raw, list) and raw and all(isinstance(x, int) for x in raw):
        return [" ".join(map(str, raw))]  # one pre-tokenized input
    if isinstance(raw, list):
        return [
            x if isinstance(x, str) else " ".join(map(str, x))
            for x in raw
            if isinstance(x, (str, list)) and x
        ]
    return []


def _prefill(messages: list[JSONDict]) -> str | None:
    """The text of a final assistant message marked ``"prefix": true``, else None."""
    last = messages[-1]
    if last.get("role") == "assistant" and last.get("prefix") is True:
        return message_text(last.get("content"))
    return None


def _check_messages(messages: Any) -> str | None:
    """The checks api.openai.com makes that a translating proxy could trip."""
    if not isinstance(messages, list) or not messages:
        return "'messages' must be a non-empty array."
    pending: set[str] = set()
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ROLES:
            return f"Invalid value for 'messages[{i}].role'."
        role = message["role"]
        if role == "tool":
            # Any JSON may arrive here (the fuzz suite sends it): a list id is not hashable.
            if (
                not isinstance(message.get("tool_call_id"), str)
                or message["tool_call_id"] not in pending
            ):
                return (
                    "Invalid parameter: messages with role 'tool' must be a response to a "
                    f"preceeding message with 'tool_calls' (messages[{i}])."
                )
            pending.discard(message["tool_call_id"])
            continue
        if pending:
            return (
                "An assistant message with 'tool_calls' must be followed by tool messages "
                "responding to each 'tool_call_id'. The following tool_call_ids did not have "
                f"response messages: {', '.join(sorted(pending))}"
            )
        calls = message.get("tool_calls") if role == "assistant" else None
        if isinstance(calls, list):
            pending = {str(c.get("id")) for c in calls if isinstance(c, dict)}
    if pending:
        return f"tool_call_ids without response messages: {', '.join(sorted(pending))}"
    return None
