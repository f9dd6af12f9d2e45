"""The mock upstream's OpenAI wire format: chat, legacy completions, embeddings, models.

Replies follow the official OpenAPI spec and docs/wire-formats.md: a stream is
``data: <json>\\n\\n`` events only, ``role`` once in the first delta, each tool
call's ``id``/``type``/``name`` once in its first delta, a final chunk with
``finish_reason``, a usage chunk only when ``stream_options.include_usage``,
then ``data: [DONE]``. Non-stream replies always carry ``usage``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.mock.common import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    INVALID_JSON,
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
    count_words,
    dumps,
    embedding_base64,
    embedding_vector,
    example_arguments,
    fragments,
    reply_words,
    stable_id,
    stream_pieces,
    truncate,
)

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
        messages: list[JSONDict] = body["messages"]
        prompt = next(
            (message_text(m.get("content")) for m in reversed(messages) if m.get("role") == "user"),
            "",
        )
        limit = body.get("max_completion_tokens", body.get("max_tokens"))
        words, cut = truncate(reply_words(prompt, self.options.words), limit)
        calls = self._tool_calls(body, messages, prompt)
        completion_tokens = (
            sum(count_words(c.arguments_json) for c in calls) if calls else len(words)
        )
        prompt_tokens = sum(count_words(message_text(m.get("content"))) for m in messages)
        reply = _Chat(
            ident=f"chatcmpl-mock{self.next_serial()}",
            created=int(time.time()),
            model=model,
            text=None if calls else " ".join(words),
            calls=calls,
            finish="tool_calls" if calls else ("length" if cut else "stop"),
            usage={
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        )
        if not self.wants_stream(req):
            return JsonReply(200, reply.completion(), self._headers())
        return StreamReply(reply.events(_include_usage(body)), headers=self._headers())

    def _tool_calls(self, body: JSONDict, messages: list[JSONDict], prompt: str) -> list[ToolCall]:
        tools = body.get("tools")
        choice = body.get("tool_choice")
        if (
            not isinstance(tools, list)
            or not tools
            or messages[-1].get("role") != "user"
            or choice == "none"
        ):
            return []
        functions = [
            t["function"]
            for t in tools
            if isinstance(t, dict) and isinstance(t.get("function"), dict)
        ]
        if isinstance(choice, dict):
            wanted = (choice.get("function") or {}).get("name")
            functions = [f for f in functions if f.get("name") == wanted]
        limit = 1 if body.get("parallel_tool_calls") is False else MAX_TOOL_CALLS
        return [
            ToolCall(
                stable_id("call_", prompt, i, f.get("name")),
                str(f.get("name")),
                example_arguments(f.get("parameters"), prompt),
            )
            for i, f in enumerate(functions[:limit])
        ]

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
class _Chat:
    """One chat reply, rendered whole or as stream chunks."""

    ident: str
    created: int
    model: str
    text: str | None
    calls: list[ToolCall]
    finish: str
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

    def completion(self) -> JSONDict:
        message: JSONDict = {
            "role": "assistant",
            "content": self.text,
            "refusal": None,
            "annotations": [],
        }
        if self.calls:
            message["tool_calls"] = [
                {
                    "id": c.call_id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": c.arguments_json},
                }
                for c in self.calls
            ]
        choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": self.finish}
        return {**self._envelope("chat.completion", [choice]), "usage": self.usage}

    def events(self, include_usage: bool) -> list[bytes]:
        def chunk(delta: JSONDict, finish_reason: str | None = None) -> bytes:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
            obj = self._envelope("chat.completion.chunk", [choice])
            if include_usage:
                obj["usage"] = None
            return _data(obj)

        events: list[bytes] = []
        if self.calls:
            events.extend(_tool_call_chunks(self.calls, chunk))
        else:
            events.append(chunk({"role": "assistant", "content": "", "refusal": None}))
            events.extend(
                chunk({"content": piece}) for piece in stream_pieces((self.text or "").split())
            )
        events.append(chunk({}, self.finish))
        if include_usage:
            events.append(
                _data({**self._envelope("chat.completion.chunk", []), "usage": self.usage})
            )
        events.append(DONE_EVENT)
        return events


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
