"""Anthropic Messages clients (``POST /v1/messages``) <-> the internal OpenAI chat format.

The proxy routes every request in OpenAI chat format (rules, breakers, failover,
cost). An Anthropic SDK app's request is translated to that body here, routed
like ``/v1/chat/completions``, and the OpenAI-format reply or stream is turned
back into Anthropic's shapes (docs/wire-formats.md, 'Anthropic SDK apps').

Request (``to_chat``): ``system`` (string or text blocks) becomes the first
message; text and image blocks (base64 and url sources) become content parts;
``tool_use`` blocks become ``tool_calls`` (input re-encoded as a JSON string);
``tool_result`` blocks become ``role: tool`` messages ahead of the rest of the
user turn; tools, ``tool_choice`` (auto/any/tool/none,
``disable_parallel_tool_use``), ``stop_sequences``, ``metadata.user_id``,
``temperature`` and ``top_p`` map to their OpenAI fields. ``thinking`` and
``top_k`` are validated but have no OpenAI field: they are not forwarded;
``thinking``/``redacted_thinking`` blocks of earlier turns are dropped.

Reply (``to_message``) and stream (``AnthropicSSEWriter``): ``reasoning_content``
(the field OpenAI-compatible reasoning servers use) becomes a ``thinking`` block
(``reasoning_signature`` its ``signature_delta``), content a ``text`` block,
each tool call a ``tool_use`` block with ``input_json_delta`` fragments; the
finish reason becomes ``stop_reason`` (``stop`` -> ``end_turn``, ``length`` ->
``max_tokens``, ``tool_calls`` -> ``tool_use``, ``content_filter`` ->
``refusal``); usage becomes ``input_tokens`` (without cached reads),
``cache_read_input_tokens`` and ``output_tokens``. The event order is
Anthropic's: ``message_start``, ``ping``, per block ``content_block_start`` /
``content_block_delta``... / ``content_block_stop``, ``message_delta`` (stop
reason and usage), ``message_stop``; an error is one ``event: error``.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import orjson

from proxy.core.errors import InvalidRequest, ProxyError, UnsupportedParameter
from proxy.providers.base import DONE, JSONDict

ANTHROPIC_VERSION_HEADER = "anthropic-version"
MODEL_CREATED_AT = "2024-01-01T00:00:00Z"
FINISH_TO_STOP = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
TOOL_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
IMAGE_TYPES = frozenset({"image/jpeg", "image/png", "image/gif", "image/webp"})
# HTTP status -> Anthropic's error type (their errors page); 5xx not listed: api_error.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "timeout_error",
    413: "request_too_large",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "overloaded_error",
    504: "timeout_error",
    529: "overloaded_error",
}
# Fields of a Messages request that count_tokens reads.
COUNT_FIELDS = ("model", "messages", "system", "tools", "tool_choice", "thinking")


# --- errors --------------------------------------------------------------


def error_type(status: int) -> str:
    return ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def error_payload(status: int, message: str) -> JSONDict:
    """Anthropic's error shape: ``{"type": "error", "error": {"type", "message"}}``."""
    return {"type": "error", "error": {"type": error_type(status), "message": message}}


def error_of(err: ProxyError) -> JSONDict:
    """A proxy error (an upstream's relayed error included) in Anthropic's shape."""
    return error_payload(err.http_status, err.message)


def openai_error_to_anthropic(body: Mapping[str, Any], status: int = 500) -> JSONDict:
    """An OpenAI ``{"error": {...}}`` object (an in-band stream error) in Anthropic's shape."""
    err = body.get("error")
    err = err if isinstance(err, dict) else {}
    message = str(err.get("message") or "upstream error")
    kind = err.get("type")
    code = err.get("code")
    if code in ("overloaded_error", "proxy_overloaded", "proxy_shutting_down"):
        return error_payload(529, message)
    if kind == "rate_limit_error":
        return error_payload(429, message)
    if kind == "invalid_request_error":
        return error_payload(400, message)
    return error_payload(status, message)


# --- request -------------------------------------------------------------


def _bad(message: str, param: str) -> InvalidRequest:
    return InvalidRequest(message, param=param, code="invalid_request_error")


def _text_of_blocks(value: Any, param: str) -> str:
    """A system prompt or tool result: a string or a list of text blocks, joined with LF."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise _bad(f"{param}: expected a string or a list of text blocks", param)
    texts = []
    for i, block in enumerate(value):
        if not isinstance(block, dict) or block.get("type") != "text":
            raise _bad(f"{param}.{i}: expected a text block", f"{param}.{i}")
        text = block.get("text")
        if not isinstance(text, str):
            raise _bad(f"{param}.{i}.text: expected a string", f"{param}.{i}.text")
        texts.append(text)
    return "\n".join(texts)


def _image_part(block: JSONDict, param: str) -> JSONDict:
    source = block.get("source")
    if not isinstance(source, dict):
        raise _bad(f"{param}.source: Field required", f"{param}.source")
    kind = source.get("type")
    if kind == "base64":
        media = source.get("media_type")
        data = source.get("data")
        if media not in IMAGE_TYPES or not isinstance(data, str):
            raise _bad(
                f"{param}.source: base64 images need media_type "
                f"({', '.join(sorted(IMAGE_TYPES))}) and data",
                f"{param}.source",
            )
        return {"type": "image_url", "image_url": {"url": f"data:{media};base64,{data}"}}
    if kind == "url" and isinstance(source.get("url"), str):
        return {"type": "image_url", "image_url": {"url": source["url"]}}
    raise _bad(f"{param}.source: expected a base64 or url source", f"{param}.source")


def _document_part(block: JSONDict, param: str) -> JSONDict:
    source = block.get("source")
    if (
        isinstance(source, dict)
        and source.get("type") == "base64"
        and isinstance(source.get("media_type"), str)
        and isinstance(source.get("data"), str)
    ):
        url = f"data:{source['media_type']};base64,{source['data']}"
        return {"type": "file", "file": {"file_data": url}}
    raise UnsupportedParameter(
        f"{param}.source: only base64 documents can be routed", param=f"{param}.source"
    )


def _tool_result(block: JSONDict, param: str) -> tuple[JSONDict, list[JSONDict]]:
    """A tool_result block -> the ``tool`` message and the image parts it carried."""
    call_id = block.get("tool_use_id")
    if not isinstance(call_id, str) or not call_id:
        raise _bad(f"{param}.tool_use_id: Field required", f"{param}.tool_use_id")
    content = block.get("content", "")
    images: list[JSONDict] = []
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                texts.append(part["text"])
            elif kind == "image":
                images.append(_image_part(part, f"{param}.content.{j}"))
            else:
                raise _bad(
                    f"{param}.content.{j}: expected a text or image block", f"{param}.content.{j}"
                )
        text = "\n".join(texts)
    elif isinstance(content, str):
        text = content
    else:
        raise _bad(f"{param}.content: expected a string or blocks", f"{param}.content")
    if block.get("is_error") and not text.startswith("Error"):
        text = f"Error: {text}" if text else "Error"
    return {"role": "tool", "tool_call_id": call_id, "content": text}, images


def _user_messages(content: Any, param: str) -> list[JSONDict]:
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise _bad(f"{param}: expected a string or a list of blocks", param)
    tools: list[JSONDict] = []
    parts: list[JSONDict] = []
    for j, block in enumerate(content):
        where = f"{param}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text":
            if not isinstance(block.get("text"), str):
                raise _bad(f"{where}.text: expected a string", f"{where}.text")
            if block["text"]:
                parts.append({"type": "text", "text": block["text"]})
        elif kind == "image":
            parts.append(_image_part(block, where))
        elif kind == "document":
            parts.append(_document_part(block, where))
        elif kind == "tool_result":
            message, images = _tool_result(block, where)
            tools.append(message)
            parts.extend(images)
        elif kind in ("thinking", "redacted_thinking"):
            continue
        else:
            raise UnsupportedParameter(
                f"{where}: content blocks of type {kind!r} cannot be routed", param=where
            )
    out = tools
    if parts:
        if all(p["type"] == "text" for p in parts):
            out.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
        else:
            out.append({"role": "user", "content": parts})
    return out


def _assistant_message(content: Any, param: str) -> JSONDict | None:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise _bad(f"{param}: expected a string or a list of blocks", param)
    texts: list[str] = []
    calls: list[JSONDict] = []
    for j, block in enumerate(content):
        where = f"{param}.{j}"
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "text" and isinstance(block.get("text"), str):
            texts.append(block["text"])
        elif kind == "tool_use":
            call_id, name = block.get("id"), block.get("name")
            if not isinstance(call_id, str) or not isinstance(name, str):
                raise _bad(f"{where}: tool_use blocks need an id and a name", where)
            arguments = block.get("input", {})
            calls.append(
                {
                    "id": call_id,
                    "type": "function",
                    "function": {"name": name, "arguments": orjson.dumps(arguments).decode()},
                }
            )
        elif kind in ("thinking", "redacted_thinking"):
            continue  # no OpenAI counterpart: the model's earlier reasoning stays out
        else:
            raise UnsupportedParameter(
                f"{where}: content blocks of type {kind!r} cannot be routed", param=where
            )
    if not texts and not calls:
        return None
    message: JSONDict = {"role": "assistant", "content": "".join(texts) if texts else None}
    if calls:
        message["tool_calls"] = calls
    return message


def _tools(tools: Any) -> list[JSONDict]:
    if not isinstance(tools, list):
        raise _bad("tools: expected a list", "tools")
    out = []
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            raise _bad(f"tools.{i}: expected an object", f"tools.{i}")
        if tool.get("type") not in (None, "custom"):
            raise UnsupportedParameter(
                f"tools.{i}: server tools ({tool.get('type')}) cannot be routed",
                param=f"tools.{i}.type",
            )
        name, schema = tool.get("name"), tool.get("input_schema")
        if not isinstance(name, str) or not name:
            raise _bad(f"tools.{i}.name: Field required", f"tools.{i}.name")
        if not isinstance(schema, dict):
            raise _bad(f"tools.{i}.input_schema: Field required", f"tools.{i}.input_schema")
        fn: JSONDict = {"name": name, "parameters": schema}
        if isinstance(tool.get("description"), str):
            fn["description"] = tool["description"]
        out.append({"type": "function", "function": fn})
    return out


def _tool_choice(choice: Any, body: JSONDict) -> None:
    if not isinstance(choice, dict) or not isinstance(choice.get("type"), str):
        raise _bad("tool_choice: expected an object with a type", "tool_choice")
    kind = choice["type"]
    if kind == "tool":
        if not isinstance(choice.get("name"), str):
            raise _bad("tool_choice.name: Field required", "tool_choice.name")
        body["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    elif kind in TOOL_CHOICES:
        body["tool_choice"] = TOOL_CHOICES[kind]
    else:
        raise _bad("tool_choice.type: expected auto, any, tool or none", "tool_choice.type")
    if choice.get("disable_parallel_tool_use") and kind != "none":
        body["parallel_tool_calls"] = False


def _number(body: Mapping[str, Any], key: str, low: float, high: float) -> float | None:
    value = body.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise _bad(f"{key}: expected a number from {low:g} to {high:g}", key)
    return float(value)


def _check_thinking(thinking: Any, max_tokens: int | None) -> None:
    if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
        raise _bad(
            "thinking: expected {type: enabled, budget_tokens} or {type: disabled}", "thinking"
        )
    if thinking["type"] == "enabled":
        budget = thinking.get("budget_tokens")
        if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1024:
            raise _bad(
                "thinking.budget_tokens: must be an integer >= 1024", "thinking.budget_tokens"
            )
        if max_tokens is not None and budget >= max_tokens:
            raise _bad("max_tokens must be greater than thinking.budget_tokens", "max_tokens")


def chat_messages(body: Mapping[str, Any]) -> list[JSONDict]:
    """``system`` + ``messages`` of a Messages request as OpenAI chat messages."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages: expected a non-empty list", "messages")
    out: list[JSONDict] = []
    system = body.get("system")
    if system is not None:
        text = _text_of_blocks(system, "system")
        if text:
            out.append({"role": "system", "content": text})
    for i, msg in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(msg, dict):
            raise _bad(f"{param}: expected an object", param)
        role = msg.get("role")
        if "content" not in msg:
            raise _bad(f"{param}.content: Field required", f"{param}.content")
        if role == "user":
            out.extend(_user_messages(msg["content"], f"{param}.content"))
        elif role == "assistant":
            assistant = _assistant_message(msg["content"], f"{param}.content")
            if assistant is not None:
                out.append(assistant)
        else:
            raise _bad(f"{param}.role: expected 'user' or 'assistant'", f"{param}.role")
    return out


def to_chat(body: Mapping[str, Any]) -> JSONDict:
    """A Messages request (``circuit_breaker`` already popped) -> the OpenAI chat body.

    InvalidRequest (a 400 the handler renders in Anthropic's shape) for a bad request.
    """
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _bad("model: Field required", "model")
    max_tokens = body.get("max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise _bad("max_tokens: Field required (an integer >= 1)", "max_tokens")
    chat: JSONDict = {"model": model, "messages": chat_messages(body), "max_tokens": max_tokens}
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise _bad("stream: expected a boolean", "stream")
    if stream:
        chat["stream"] = True
        chat["stream_options"] = {"include_usage": True}
    temperature = _number(body, "temperature", 0.0, 1.0)
    if temperature is not None:
        chat["temperature"] = temperature
    top_p = _number(body, "top_p", 0.0, 1.0)
    if top_p is not None:
        chat["top_p"] = top_p
    top_k = body.get("top_k")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 0):
        raise _bad("top_k: expected a non-negative integer", "top_k")
    stop = body.get("stop_sequences")
    if stop is not None:
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise _bad("stop_sequences: expected a list of strings", "stop_sequences")
        if stop:
            chat["stop"] = stop
    metadata = body.get("metadata")
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise _bad("metadata: expected an object", "metadata")
        if isinstance(metadata.get("user_id"), str):
            chat["user"] = metadata["user_id"]
    if body.get("thinking") is not None:
        _check_thinking(body["thinking"], max_tokens)
    tools = body.get("tools")
    if tools:
        chat["tools"] = _tools(tools)
    choice = body.get("tool_choice")
    if choice is not None:
        _tool_choice(choice, chat)
        if not tools:
            chat.pop("tool_choice")  # OpenAI rejects a tool_choice without tools
            chat.pop("parallel_tool_calls", None)
    return chat


def count_body(body: Mapping[str, Any], upstream_model: str) -> JSONDict:
    """The body an Anthropic upstream's ``count_tokens`` takes."""
    out = {k: body[k] for k in COUNT_FIELDS if k in body}
    out["model"] = upstream_model
    return out


# --- replies -------------------------------------------------------------


def message_id(openai_id: Any) -> str:
    """Our ``chatcmpl-msg_...`` ids back to Anthropic's ``msg_...``; others get the prefix."""
    text = openai_id if isinstance(openai_id, str) and openai_id else os.urandom(12).hex()
    text = text.removeprefix("chatcmpl-")
    return text if text.startswith("msg_") else f"msg_{text}"


def _arguments(raw: Any) -> Any:
    if isinstance(raw, dict):
        return raw
    if isinstance(raw, str) and raw.strip():
        try:
            value = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return {}
        return value if isinstance(value, dict) else {}
    return {}


def usage_of(usage: Any, fallback_input: int = 0) -> JSONDict:
    """OpenAI usage -> Anthropic usage (``input_tokens`` excludes cached reads)."""
    if not isinstance(usage, dict):
        return {"input_tokens": fallback_input, "output_tokens": 0}
    prompt = int(usage.get("prompt_tokens") or 0)
    details = usage.get("prompt_tokens_details")
    cached = int(details.get("cached_tokens") or 0) if isinstance(details, dict) else 0
    return {
        "input_tokens": max(prompt - cached, 0),
        "output_tokens": int(usage.get("completion_tokens") or 0),
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
    }


def to_message(reply: Mapping[str, Any], model: str) -> JSONDict:
    """An OpenAI ``chat.completion`` -> an Anthropic ``message`` (``model``: the client's)."""
    choices = reply.get("choices")
    choice = choices[0] if isinstance(choices, list) and choices else {}
    msg = choice.get("message") if isinstance(choice, dict) else None
    msg = msg if isinstance(msg, dict) else {}
    content: list[JSONDict] = []
    reasoning = msg.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        signature = msg.get("reasoning_signature")
        content.append(
            {
                "type": "thinking",
                "thinking": reasoning,
                "signature": signature if isinstance(signature, str) else "",
            }
        )
    text = msg.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    for call in msg.get("tool_calls") or ():
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            content.append(
                {
                    "type": "tool_use",
                    "id": str(call.get("id") or f"toolu_{os.urandom(8).hex()}"),
                    "name": str(fn.get("name") or ""),
                    "input": _arguments(fn.get("arguments")),
                }
            )
    finish = choice.get("finish_reason") if isinstance(choice, dict) else None
    out: JSONDict = {
        "id": message_id(reply.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": FINISH_TO_STOP.get(finish or "stop", "end_turn"),
        "stop_sequence": None,
        "usage": usage_of(reply.get("usage")),
    }
    if isinstance(reply.get("circuit_breaker"), dict):
        out["circuit_breaker"] = reply["circuit_breaker"]
    return out


def models_list(openai_list: Mapping[str, Any]) -> JSONDict:
    """``GET /v1/models`` in Anthropic's shape (for a client sending ``anthropic-version``)."""
    data = [
        {
            "type": "model",
            "id": m["id"],
            "display_name": m.get("description") or m["id"],
            "created_at": MODEL_CREATED_AT,
        }
        for m in openai_list.get("data") or ()
        if isinstance(m, dict) and isinstance(m.get("id"), str)
    ]
    return {
        "data": data,
        "has_more": False,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
    }


# --- stream --------------------------------------------------------------


def sse(event: str, data: JSONDict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + orjson.dumps(data) + b"\n\n"


def error_event(payload: JSONDict) -> bytes:
    return sse("error", payload)


class AnthropicSSEWriter:
    """OpenAI SSE bytes (whole ``data:`` events, as the stream relay writes them) in,
    Anthropic Messages events out.

    ``feed`` takes bytes split anywhere; ``finish`` closes the message if the OpenAI
    stream ended without ``[DONE]`` (the relay raises for a cut stream before that);
    ``error`` turns an OpenAI error object into one ``event: error``.
    """

    def __init__(self, model: str, prompt_tokens: int = 0) -> None:
        self._model = model
        self._prompt_tokens = prompt_tokens
        self._buffer = b""
        self._started = False
        self._stopped = False
        self._block: str | None = None  # kind of the open block
        self._index = -1  # index of the last block started
        self._tools: dict[int, int] = {}  # OpenAI tool-call index -> block index
        self._stop_reason: str | None = None
        self._usage: JSONDict | None = None

    # bytes in, bytes out
    def feed(self, data: bytes) -> bytes:
        buffer = self._buffer + data
        *events, self._buffer = buffer.replace(b"\r\n", b"\n").split(b"\n\n")
        out: list[bytes] = []
        for raw in events:
            for line in raw.split(b"\n"):
                if line.startswith(b"data:"):
                    self._payload(line[5:].strip(), out)
        return b"".join(out)

    def finish(self) -> bytes:
        out: list[bytes] = []
        if self._buffer.strip():
            tail, self._buffer = self._buffer, b""
            for line in tail.split(b"\n"):
                if line.startswith(b"data:"):
                    self._payload(line[5:].strip(), out)
        self._end(out)
        return b"".join(out)

    def error(self, error: Mapping[str, Any]) -> bytes:
        self._stopped = True
        return error_event(openai_error_to_anthropic(error))

    # one OpenAI payload
    def _payload(self, payload: bytes, out: list[bytes]) -> None:
        if self._stopped or not payload:
            return
        if payload == DONE.encode():
            self._end(out)
            return
        chunk = orjson.loads(payload)
        if not isinstance(chunk, dict):
            return
        if "error" in chunk and "choices" not in chunk:
            out.append(self.error(chunk))
            return
        self._start(chunk, out)
        if isinstance(chunk.get("usage"), dict):
            self._usage = chunk["usage"]
        for choice in chunk.get("choices") or ():
            if not isinstance(choice, dict) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, dict):
                self._delta(delta, out)
            finish = choice.get("finish_reason")
            if finish:
                self._stop_reason = FINISH_TO_STOP.get(finish, "end_turn")
                self._close(out)

    def _start(self, chunk: JSONDict, out: list[bytes]) -> None:
        if self._started:
            return
        self._started = True
        message: JSONDict = {
            "id": message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self._model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {"input_tokens": self._prompt_tokens, "output_tokens": 0},
        }
        out.append(sse("message_start", {"type": "message_start", "message": message}))
        out.append(sse("ping", {"type": "ping"}))

    def _open(self, kind: str, block: JSONDict, out: list[bytes]) -> int:
        self._close(out)
        self._index += 1
        self._block = kind
        out.append(
            sse(
                "content_block_start",
                {"type": "content_block_start", "index": self._index, "content_block": block},
            )
        )
        return self._index

    def _close(self, out: list[bytes]) -> None:
        if self._block is not None:
            out.append(
                sse("content_block_stop", {"type": "content_block_stop", "index": self._index})
            )
            self._block = None

    def _send(self, index: int, delta: JSONDict, out: list[bytes]) -> None:
        out.append(
            sse(
                "content_block_delta",
                {"type": "content_block_delta", "index": index, "delta": delta},
            )
        )

    def _delta(self, delta: JSONDict, out: list[bytes]) -> None:
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            if self._block != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
            self._send(self._index, {"type": "thinking_delta", "thinking": reasoning}, out)
        signature = delta.get("reasoning_signature")
        if isinstance(signature, str) and signature:
            if self._block != "thinking":
                self._open("thinking", {"type": "thinking", "thinking": "", "signature": ""}, out)
            self._send(self._index, {"type": "signature_delta", "signature": signature}, out)
        text = delta.get("content")
        if isinstance(text, str) and text:
            if self._block != "text":
                self._open("text", {"type": "text", "text": ""}, out)
            self._send(self._index, {"type": "text_delta", "text": text}, out)
        for call in delta.get("tool_calls") or ():
            if not isinstance(call, dict):
                continue
            position = int(call.get("index", 0))
            fn = call.get("function")
            fn = fn if isinstance(fn, dict) else {}
            index = self._tools.get(position)
            if index is None:
                block = {
                    "type": "tool_use",
                    "id": str(call.get("id") or f"toolu_{os.urandom(8).hex()}"),
                    "name": str(fn.get("name") or ""),
                    "input": {},
                }
                index = self._tools[position] = self._open("tool_use", block, out)
            fragment = fn.get("arguments")
            if isinstance(fragment, str) and fragment:
                self._send(index, {"type": "input_json_delta", "partial_json": fragment}, out)

    def _end(self, out: list[bytes]) -> None:
        if self._stopped or not self._started:
            return
        self._stopped = True
        self._close(out)
        usage = usage_of(self._usage, self._prompt_tokens)
        out.append(
            sse(
                "message_delta",
                {
                    "type": "message_delta",
                    "delta": {
                        "stop_reason": self._stop_reason or "end_turn",
                        "stop_sequence": None,
                    },
                    "usage": usage,
                },
            )
        )
        out.append(sse("message_stop", {"type": "message_stop"}))
