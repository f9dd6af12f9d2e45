"""Helpers that read OpenAI-format request pieces, for the translating adapters.

``anthropic`` and ``gemini`` both start from the client's OpenAI chat request
and both answer in OpenAI's shapes; what they read and build the same way
lives here, what differs (the upstream's own shapes) stays in each adapter.
The module also holds the few OpenAI reply pieces they build alike: the
assistant message, a tool call, and the error bodies of ``classify``.

Invariants:
- pure and synchronous: plain values in and out, no I/O, no aiohttp;
- a malformed piece raises ``InvalidRequest`` (or ``UnsupportedParameter``
  for a valid field the upstream cannot honour) naming the ``param`` path the
  caller passes in, so the client learns which field to fix;
- ``upstream`` (``"Anthropic"``, ``"Gemini"``) only words messages; the
  checks are the same for every upstream;
- the readers of lists are generators, so a caller that translates each item
  as it comes reports the first bad item, whichever check it fails.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Literal, NamedTuple

import orjson

from proxy.core.errors import InvalidRequest, UnsupportedParameter, error_body
from proxy.core.outcome import Outcome, classify_status, is_transient
from proxy.providers.base import ErrorInfo, JSONDict, StreamError

MESSAGE_ROLES = ("system", "developer", "user", "assistant", "tool")
DATA_URL_PREFIX = "data:"
LEGACY_FUNCTION_FIELDS = ("functions", "function_call")
ERROR_SNIPPET_BYTES = 200

ToolChoiceMode = Literal["auto", "required", "none", "function"]


class ContentPart(NamedTuple):
    """One usable part of a message's content: non-empty text, an image URL or a file data URL."""

    kind: Literal["text", "image_url", "file"]
    value: str
    param: str  # the part's path, e.g. messages[0].content[2]


# --- request: fields ------------------------------------------------------


def reject_audio(body: JSONDict, message: str) -> None:
    """Audio output (``audio`` or ``modalities`` naming audio) is a 400 with ``message``."""
    modalities = body.get("modalities")
    if modalities is not None and not (
        isinstance(modalities, list) and all(isinstance(m, str) for m in modalities)
    ):
        raise InvalidRequest(
            "'modalities' must be an array of strings", param="modalities", code="invalid_type"
        )
    if body.get("audio") or "audio" in (modalities or ()):
        raise UnsupportedParameter(message, param="modalities")


def reject_legacy_functions(body: JSONDict) -> None:
    for name in LEGACY_FUNCTION_FIELDS:
        if body.get(name) is not None:
            raise UnsupportedParameter(f"use 'tools' instead of the legacy '{name}'", param=name)


def max_tokens_of(body: JSONDict) -> Any:
    """The output-token limit: ``max_completion_tokens``, else the legacy ``max_tokens``."""
    max_tokens = body.get("max_completion_tokens")
    return body.get("max_tokens") if max_tokens is None else max_tokens


def stop_sequences(body: JSONDict) -> list[Any] | None:
    """``stop`` as a list (a lone string wrapped), or None when there is none."""
    stop = body.get("stop")
    if isinstance(stop, str):
        return [stop]
    if isinstance(stop, list) and stop:
        return stop
    return None


# --- request: messages ---------------------------------------------------


def chat_messages(body: JSONDict) -> Iterator[tuple[int, str, JSONDict]]:
    """(index, role, message) for each of ``messages``; any role not in MESSAGE_ROLES is a 400."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise InvalidRequest("messages must be an array", param="messages")
    for i, msg in enumerate(messages):
        role = msg.get("role") if isinstance(msg, dict) else None
        if role not in MESSAGE_ROLES:
            raise InvalidRequest(f"unsupported message role {role!r}", param=f"messages[{i}].role")
        yield i, role, msg


def split_data_url(url: str, param: str) -> tuple[str, str]:
    """``data:<mime>;base64,<data>`` -> (mime, data); anything else is a 400."""
    header, comma, data = url.partition(",")
    mime, _, encoding = header[len(DATA_URL_PREFIX) :].partition(";")
    if not comma or encoding != "base64" or not mime:
        raise InvalidRequest("data URLs must look like data:<mime>;base64,<data>", param=param)
    return mime, data


def text_of(content: Any, param: str) -> str:
    """The plain text of a system/tool message (string or text parts)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        texts: list[str] = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text":
                continue
            text = part.get("text")
            if text is not None and not isinstance(text, str):
                raise InvalidRequest(
                    "a text part's text must be a string", param=f"{param}[{j}].text"
                )
            texts.append(text or "")
        return "".join(texts)
    raise InvalidRequest("content must be a string or an array of text parts", param=param)


def content_parts(content: Any, param: str, upstream: str) -> Iterator[ContentPart]:
    """A message's content as its usable parts, in order.

    Empty text and earlier refusals (not model input) are left out. An image
    part yields its URL (not yet checked beyond being a string); a file part
    its ``file_data``, which must be a data: URL since neither upstream can
    fetch OpenAI file ids.
    """
    if content is None:
        return
    if isinstance(content, str):
        if content:
            yield ContentPart("text", content, param)
        return
    if not isinstance(content, list):
        raise InvalidRequest("content must be a string or an array of parts", param=param)
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        part_param = f"{param}[{j}]"
        if kind == "text":
            if part.get("text"):
                yield ContentPart("text", part["text"], part_param)
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, dict) else image
            if not isinstance(url, str):
                raise InvalidRequest("image_url.url must be a string", param=part_param)
            yield ContentPart("image_url", url, part_param)
        elif kind == "file":
            file = part.get("file")
            data_url = file.get("file_data") if isinstance(file, dict) else None
            if not isinstance(data_url, str) or not data_url.startswith(DATA_URL_PREFIX):
                raise UnsupportedParameter(
                    f"{upstream} upstreams take files inline only (file.file_data as a data: URL)",
                    param=part_param,
                )
            yield ContentPart("file", data_url, part_param)
        elif kind != "refusal":
            raise UnsupportedParameter(
                f"content part type {kind!r} is not supported by {upstream} upstreams",
                param=f"{part_param}.type",
            )


# --- request: tools -------------------------------------------------------


def parse_arguments(arguments: Any) -> JSONDict:
    """A tool call's ``arguments`` (JSON text) as an object; unusable text gives ``{}``."""
    if isinstance(arguments, dict):
        return arguments
    if not isinstance(arguments, str) or not arguments.strip():
        return {}
    try:
        parsed = orjson.loads(arguments)
    except orjson.JSONDecodeError:
        return {}
    return parsed if isinstance(parsed, dict) else {}


def assistant_tool_calls(msg: JSONDict, i: int) -> Iterator[tuple[str, JSONDict]]:
    """(id, function) of each tool call of assistant message ``i``; each needs both."""
    for k, call in enumerate(msg.get("tool_calls") or ()):
        fn = call.get("function") if isinstance(call, dict) else None
        if not isinstance(fn, dict) or not isinstance(call.get("id"), str):
            raise InvalidRequest(
                "tool calls need an id and a function", param=f"messages[{i}].tool_calls[{k}]"
            )
        yield call["id"], fn


def function_tools(tools: Any, upstream: str) -> Iterator[JSONDict]:
    """The ``function`` object of each entry of ``tools``; other tool types are a 400."""
    if not isinstance(tools, list):
        raise InvalidRequest("tools must be an array", param="tools")
    for k, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or tool.get("type") != "function":
            raise UnsupportedParameter(
                f"{upstream} upstreams take function tools only", param=f"tools[{k}].type"
            )
        yield fn


def tool_choice_of(choice: Any) -> tuple[ToolChoiceMode, Any]:
    """``tool_choice`` as (mode, function name); the name is None unless mode is function."""
    if choice == "auto":
        return "auto", None
    if choice == "required":
        return "required", None
    if choice == "none":
        return "none", None
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        return "function", choice["function"].get("name", "")
    raise InvalidRequest("unsupported tool_choice", param="tool_choice")


# --- reply pieces ---------------------------------------------------------


def tool_call(call_id: str, name: Any, arguments: Any) -> JSONDict:
    """An OpenAI tool call; ``arguments`` (an object, or nothing) is sent as JSON text."""
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps(arguments or {}).decode()},
    }


def assistant_message(texts: list[str], tool_calls: list[JSONDict]) -> JSONDict:
    """The reply message: ``content`` is null only for a reply made of tool calls alone."""
    message: JSONDict = {
        "role": "assistant",
        "content": "".join(texts) if texts or not tool_calls else None,
        "refusal": None,
    }
    if tool_calls:
        message["tool_calls"] = tool_calls
    return message


# --- errors ---------------------------------------------------------------


def json_or_none(body: bytes) -> Any:
    """The parsed body, or None when it is not JSON (an error body may be HTML or empty)."""
    try:
        return orjson.loads(body)
    except orjson.JSONDecodeError:
        return None


def http_error_text(status: int, body: bytes) -> str:
    """A message for an error reply with no usable error object: the status and a snippet."""
    snippet = body[:ERROR_SNIPPET_BYTES].decode("utf-8", "replace").strip()
    return f"HTTP {status}" + (f": {snippet}" if snippet else "")


def upstream_failure(message: str, code: str = "upstream_error") -> StreamError:
    """A 502 for an upstream reply the proxy cannot use (malformed, truncated)."""
    return StreamError(ErrorInfo(Outcome.FAILURE, 502, error_body(502, message, code=code)))


def quota_exhausted(text: str, retry_after: float | None = None) -> ErrorInfo:
    """Out of money or quota: OpenAI's own shape for it is 429 ``insufficient_quota``."""
    body = error_body(429, text, code="insufficient_quota")
    body["error"]["type"] = "insufficient_quota"
    return ErrorInfo(Outcome.FAILURE, 429, body, retry_after=retry_after)


def rate_limited(text: str, retry_after: float | None) -> ErrorInfo:
    body = error_body(429, text, code="rate_limit_exceeded")
    return ErrorInfo(Outcome.RATE_LIMITED, 429, body, retry_after=retry_after)


def context_window_exceeded(text: str) -> ErrorInfo:
    body = error_body(400, text, code="context_length_exceeded")
    return ErrorInfo(Outcome.IGNORED, 400, body, context_window=True)


def status_error(
    status: int, text: str, upstream_code: str, retry_after: float | None
) -> ErrorInfo:
    """Any other error, by its status; a 404 is the model's (OpenAI's ``model_not_found``)."""
    code = "model_not_found" if status == 404 else (upstream_code or None)
    return ErrorInfo(
        classify_status(status),
        status,
        error_body(status, text, code=code),
        retry_after=retry_after,
        transient=is_transient(status),
    )
