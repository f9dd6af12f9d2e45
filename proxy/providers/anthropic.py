"""OpenAI chat completions <-> Anthropic Messages (docs/wire-formats.md, 'OpenAI to Anthropic').

Request invariants:
- ``system``/``developer`` messages are lifted from anywhere in the list into
  the top-level ``system``, joined with LF;
- consecutive messages of one role become one message; ``tool`` messages
  become ``tool_result`` blocks of a user message, always ahead of its other
  blocks; empty text blocks and messages left empty are dropped; the text of
  a final assistant (prefill) message loses its trailing whitespace, which
  Anthropic rejects;
- tool-call ids are rewritten by one pure function (``anthropic_tool_id``)
  on the call and on its result, so they always match ``^[a-zA-Z0-9_-]+$``
  and still match each other;
- fields Anthropic cannot honour (``n`` > 1, ``logprobs``, ``top_logprobs``,
  non-zero penalties, ``logit_bias``, audio output, legacy ``functions``)
  are a 400 naming the field; their explicit defaults are accepted;
- accepted and dropped without effect: ``seed``, ``store``, ``metadata``,
  ``service_tier``, ``reasoning_effort``, ``prediction``, ``modalities``
  ``["text"]``, ``stream_options`` (the caller reads ``include_usage``);
- ``response_format`` is best effort: Anthropic has no JSON mode in
  ``2023-06-01``, so ``json_object`` and ``json_schema`` add an instruction
  (with the schema) to ``system``.

Stream invariants (on top of base.py's): the role chunk is held until the
first content (text, tool call or finish reason) and sent together with it;
tool calls get a per-choice running index (never Anthropic's block index) and
their ``id``/``type``/``name`` once, then only argument fragments from
``input_json_delta`` (``content_block_start``'s ``input: {}`` is ignored);
``message_stop`` emits the usage chunk (only with ``include_usage``) and
``[DONE]``, so ``finish`` has nothing left to send; an ``error`` event raises
``StreamError``, or, if content was produced by the same ``feed`` call, is
kept and raised by the next ``feed``/``finish`` so no content is lost.
"""

from __future__ import annotations

import hashlib
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import orjson

from proxy.config.model import Deployment, Provider
from proxy.core.errors import InvalidRequest, UnsupportedParameter, error_body
from proxy.core.outcome import Outcome
from proxy.core.ratelimit import parse_retry_after
from proxy.core.sse import SSEEvent
from proxy.providers import openai_shapes as shapes
from proxy.providers.base import (
    DONE,
    Endpoint,
    ErrorInfo,
    JSONDict,
    StreamError,
    UpstreamRequest,
    Usage,
)
from proxy.providers.openai import exact_bytes
from proxy.providers.stream_base import SSEStreamTranslator

UPSTREAM = "Anthropic"
ANTHROPIC_VERSION = "2023-06-01"
MESSAGES_PATH = "/v1/messages"
MODELS_PATH = "/v1/models"
DEFAULT_MAX_TOKENS = 4096
TOOL_ID_PATTERN = re.compile(r"^[a-zA-Z0-9_-]+$")
TOOL_ID_BAD_CHARS = re.compile(r"[^a-zA-Z0-9_-]")
STOP_REASONS = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}
TOOL_CHOICE_TYPES = {"auto": "auto", "required": "any", "none": "none", "function": "tool"}
# Anthropic's error types and the HTTP status each stands for (errors page);
# used for in-stream ``error`` events, which carry no status of their own.
ERROR_TYPE_STATUS = {
    "invalid_request_error": 400,
    "authentication_error": 401,
    "billing_error": 402,
    "permission_error": 403,
    "not_found_error": 404,
    "request_too_large": 413,
    "rate_limit_error": 429,
    "api_error": 500,
    "timeout_error": 504,
    "overloaded_error": 529,
}
CONTEXT_WINDOW_MARKERS = ("prompt is too long", "exceed context limit", "context window")
CREDIT_MARKERS = ("credit balance is too low",)
OVERLOADED_CLIENT_STATUS = 503  # OpenAI clients know 503, not Anthropic's 529
JSON_OBJECT_INSTRUCTION = "Respond with a single valid JSON object and nothing else."
JSON_SCHEMA_INSTRUCTION = (
    "Respond with a single valid JSON object and nothing else. It must match this JSON Schema: "
)


# --- request -------------------------------------------------------------


def anthropic_tool_id(tool_id: str) -> str:
    """A tool-call id Anthropic accepts; the same input always gives the same output.

    Valid ids pass unchanged; others have bad characters replaced and a short
    hash of the original appended, so two ids differing only in replaced
    characters stay distinct.
    """
    if TOOL_ID_PATTERN.match(tool_id):
        return tool_id
    digest = hashlib.blake2s(tool_id.encode(), digest_size=4).hexdigest()
    return f"{TOOL_ID_BAD_CHARS.sub('_', tool_id)}_{digest}"


def _reject_unsupported(body: JSONDict) -> None:
    n = body.get("n")
    if n is not None and n != 1:
        raise UnsupportedParameter(
            "Anthropic upstreams return one choice: 'n' must be 1", param="n"
        )
    if body.get("logprobs"):
        raise UnsupportedParameter("Anthropic upstreams do not return logprobs", param="logprobs")
    if body.get("top_logprobs"):
        raise UnsupportedParameter(
            "Anthropic upstreams do not return logprobs", param="top_logprobs"
        )
    for name in ("presence_penalty", "frequency_penalty"):
        if body.get(name):
            raise UnsupportedParameter(f"Anthropic upstreams do not support '{name}'", param=name)
    if body.get("logit_bias"):
        raise UnsupportedParameter(
            "Anthropic upstreams do not support 'logit_bias'", param="logit_bias"
        )
    shapes.reject_audio(body, "Anthropic upstreams do not produce audio")
    shapes.reject_legacy_functions(body)


def _image_block(url: str, param: str) -> JSONDict:
    if url.startswith("data:"):
        mime, data = shapes.split_data_url(url, param)
        return {"type": "image", "source": {"type": "base64", "media_type": mime, "data": data}}
    if url.startswith(("https://", "http://")):
        return {"type": "image", "source": {"type": "url", "url": url}}
    raise InvalidRequest("image URLs must be https:// or data: URLs", param=param)


def _file_block(data_url: str, param: str) -> JSONDict:
    mime, data = shapes.split_data_url(data_url, param)
    return {"type": "document", "source": {"type": "base64", "media_type": mime, "data": data}}


def _content_blocks(content: Any, param: str) -> list[JSONDict]:
    """OpenAI message content -> Anthropic blocks, empty text dropped."""
    blocks: list[JSONDict] = []
    for part in shapes.content_parts(content, param, UPSTREAM):
        if part.kind == "text":
            blocks.append({"type": "text", "text": part.value})
        elif part.kind == "image_url":
            blocks.append(_image_block(part.value, part.param))
        else:
            blocks.append(_file_block(part.value, part.param))
    return blocks


def _assistant_blocks(msg: JSONDict, i: int) -> list[JSONDict]:
    blocks = _content_blocks(msg.get("content"), f"messages[{i}].content")
    for call_id, fn in shapes.assistant_tool_calls(msg, i):
        blocks.append(
            {
                "type": "tool_use",
                "id": anthropic_tool_id(call_id),
                "name": fn.get("name", ""),
                "input": shapes.parse_arguments(fn.get("arguments")),
            }
        )
    return blocks


def _tool_result(msg: JSONDict, i: int) -> JSONDict:
    call_id = msg.get("tool_call_id")
    if not isinstance(call_id, str):
        raise InvalidRequest(
            "tool messages need a tool_call_id", param=f"messages[{i}].tool_call_id"
        )
    block: JSONDict = {"type": "tool_result", "tool_use_id": anthropic_tool_id(call_id)}
    text = shapes.text_of(msg.get("content"), f"messages[{i}].content")
    if text:  # an empty string would be an empty text block
        block["content"] = text
    block["is_error"] = False  # OpenAI tool messages carry no error flag
    return block


def _append(out: list[JSONDict], role: str, blocks: list[JSONDict]) -> None:
    if not blocks:
        return
    if not out or out[-1]["role"] != role:
        out.append({"role": role, "content": []})
    content: list[JSONDict] = out[-1]["content"]
    for block in blocks:
        if block["type"] == "tool_result":
            # Anthropic wants tool results ahead of anything else in the turn.
            at = 0
            while at < len(content) and content[at]["type"] == "tool_result":
                at += 1
            content.insert(at, block)
        else:
            content.append(block)


def _strip_prefill(out: list[JSONDict]) -> None:
    if not out or out[-1]["role"] != "assistant":
        return
    content = out[-1]["content"]
    last = content[-1]
    if last["type"] == "text":
        text = last["text"].rstrip()
        if text:
            content[-1] = {**last, "text": text}
        else:
            content.pop()
            if not content:
                out.pop()


def _tool_choice(choice: Any) -> JSONDict:
    mode, name = shapes.tool_choice_of(choice)
    out: JSONDict = {"type": TOOL_CHOICE_TYPES[mode]}
    if mode == "function":
        out["name"] = name
    return out


def _tools(tools: Any) -> list[JSONDict]:
    out: list[JSONDict] = []
    for fn in shapes.function_tools(tools, UPSTREAM):
        entry: JSONDict = {
            "name": fn.get("name", ""),
            "input_schema": fn.get("parameters") or {"type": "object", "properties": {}},
        }
        if fn.get("description"):
            entry["description"] = fn["description"]
        out.append(entry)
    return out


def _format_instruction(response_format: Any) -> str | None:
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "json_object":
        return JSON_OBJECT_INSTRUCTION
    if kind == "json_schema":
        spec = response_format.get("json_schema") or {}
        schema = spec.get("schema", {}) if isinstance(spec, dict) else {}
        return JSON_SCHEMA_INSTRUCTION + orjson.dumps(schema).decode()
    return None


def translate_request(body: JSONDict, upstream_model: str, stream: bool) -> JSONDict:
    """The Anthropic Messages request body for an OpenAI chat completions body."""
    _reject_unsupported(body)
    system: list[str] = []
    out: list[JSONDict] = []
    for i, role, msg in shapes.chat_messages(body):
        if role in ("system", "developer"):
            text = shapes.text_of(msg.get("content"), f"messages[{i}].content")
            if text:
                system.append(text)
        elif role == "user":
            _append(out, "user", _content_blocks(msg.get("content"), f"messages[{i}].content"))
        elif role == "assistant":
            _append(out, "assistant", _assistant_blocks(msg, i))
        elif role == "tool":
            _append(out, "user", [_tool_result(msg, i)])
    _strip_prefill(out)

    max_tokens = shapes.max_tokens_of(body)
    payload: JSONDict = {
        "model": upstream_model,
        "messages": out,
        "max_tokens": DEFAULT_MAX_TOKENS if max_tokens is None else max_tokens,
    }
    instruction = _format_instruction(body.get("response_format"))
    if instruction:
        system.append(instruction)
    if system:
        payload["system"] = "\n".join(system)
    temperature = body.get("temperature")
    if temperature is not None:
        if not isinstance(temperature, int | float):
            raise InvalidRequest("temperature must be a number", param="temperature")
        # OpenAI allows 0..2, Anthropic 0..1: clamp rather than reject.
        payload["temperature"] = min(max(float(temperature), 0.0), 1.0)
    if body.get("top_p") is not None:
        payload["top_p"] = body["top_p"]
    stop = shapes.stop_sequences(body)
    if stop is not None:
        payload["stop_sequences"] = stop
    if isinstance(body.get("user"), str):
        payload["metadata"] = {"user_id": body["user"]}
    if body.get("tools"):
        payload["tools"] = _tools(body["tools"])
        choice = body.get("tool_choice")
        tool_choice = _tool_choice(choice) if choice is not None else None
        if body.get("parallel_tool_calls") is False:
            tool_choice = tool_choice or {"type": "auto"}
            if tool_choice["type"] != "none":
                tool_choice["disable_parallel_tool_use"] = True
        if tool_choice is not None:
            payload["tool_choice"] = tool_choice
    if stream:
        payload["stream"] = True
    return payload


# --- responses -----------------------------------------------------------


def _usage_dict(prompt: int, completion: int, cache_read: int) -> JSONDict:
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": cache_read},
    }


def prompt_tokens(usage: JSONDict) -> int:
    # Anthropic reports cached input apart from input_tokens; OpenAI's
    # prompt_tokens counts everything the model read (docs/wire-formats.md, Usage).
    return int(
        (usage.get("input_tokens") or 0)
        + (usage.get("cache_creation_input_tokens") or 0)
        + (usage.get("cache_read_input_tokens") or 0)
    )


def _malformed(what: str) -> StreamError:
    return shapes.upstream_failure(f"Anthropic API returned a malformed {what}")


def _parse_message(body: bytes, deployment: Deployment, client_model: str, now: int) -> JSONDict:
    try:
        msg = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _malformed("response body") from None
    if not isinstance(msg, dict):
        raise _malformed("response body")
    texts: list[str] = []
    tool_calls: list[JSONDict] = []
    for block in msg.get("content") or ():
        kind = block.get("type")
        if kind == "text":
            texts.append(block.get("text") or "")
        elif kind == "tool_use":
            tool_calls.append(
                shapes.tool_call(block.get("id", ""), block.get("name", ""), block.get("input"))
            )
    usage = msg.get("usage") or {}
    return {
        "id": f"chatcmpl-{msg.get('id', '')}",
        "object": "chat.completion",
        "created": now,
        "model": client_model,
        "choices": [
            {
                "index": 0,
                "message": shapes.assistant_message(texts, tool_calls),
                "logprobs": None,
                "finish_reason": STOP_REASONS.get(msg.get("stop_reason") or "", "stop"),
            }
        ],
        "usage": _usage_dict(
            prompt_tokens(usage),
            int(usage.get("output_tokens") or 0),
            int(usage.get("cache_read_input_tokens") or 0),
        ),
    }


# --- errors --------------------------------------------------------------


def classify(
    status: int, error_type: str, message: str, retry_after: float | None = None
) -> ErrorInfo:
    """An Anthropic error (HTTP or in-stream) -> outcome and the OpenAI error for the client.

    ``retry_after`` is the reply's Retry-After in seconds (in-stream errors have none).
    """
    lowered = message.lower()
    text = f"Anthropic API error ({error_type or status}): {message}"
    if status == 529 or error_type == "overloaded_error":
        body = error_body(OVERLOADED_CLIENT_STATUS, text, code=error_type or "overloaded_error")
        return ErrorInfo(
            Outcome.FAILURE,
            OVERLOADED_CLIENT_STATUS,
            body,
            retry_after=retry_after,
            transient=True,
        )
    if status == 402 or error_type == "billing_error" or any(m in lowered for m in CREDIT_MARKERS):
        return shapes.quota_exhausted(text)
    if status == 429 or error_type == "rate_limit_error":
        return shapes.rate_limited(text, retry_after)
    if status == 400 and any(m in lowered for m in CONTEXT_WINDOW_MARKERS):
        return shapes.context_window_exceeded(text)
    return shapes.status_error(status, text, error_type, retry_after)


def _error_fields(obj: Any) -> tuple[str, str] | None:
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return None
    return str(err.get("type") or ""), str(err.get("message") or "")


# --- stream --------------------------------------------------------------


class AnthropicStreamTranslator(SSEStreamTranslator):
    """Anthropic Messages SSE -> OpenAI chat.completion.chunk payloads (one choice)."""

    truncated_message = "Anthropic stream ended before message_stop"

    def __init__(self, client_model: str, include_usage: bool, created: int) -> None:
        super().__init__()
        self._model = client_model
        self._include_usage = include_usage
        self._created = created
        self._id = "chatcmpl-"
        self._prefix = ""  # the constant head of every chunk, built at first use
        self._suffix = ',"logprobs":null,"finish_reason":null}]' + (
            ',"usage":null}' if include_usage else "}"
        )
        self._role_sent = False
        self._tool_index: dict[int, int] = {}  # Anthropic block index -> OpenAI tool index
        self._prompt = 0
        self._completion = 0
        self._cache_read = 0
        self._finish_sent = False
        self._stop_reason: str | None = None

    def _handle(self, event: SSEEvent, out: list[str]) -> None:
        self._event(event.event, event.data, out)

    # one upstream event -> zero or more payloads appended to ``out``
    def _event(self, name: str | None, data: str, out: list[str]) -> None:
        if self.finished:
            return
        try:
            obj = orjson.loads(data)
        except orjson.JSONDecodeError:
            self._error = _malformed("stream event")
            return
        if not isinstance(obj, dict):
            self._error = _malformed("stream event")
            return
        kind = obj.get("type") or name
        if kind == "content_block_delta":
            self._delta(obj, out)
        elif kind == "content_block_start":
            self._block_start(obj, out)
        elif kind == "message_start":
            msg = obj.get("message") or {}
            if msg.get("id"):
                self._id = f"chatcmpl-{msg['id']}"
            self._usage(msg.get("usage") or {})
        elif kind == "message_delta":
            self._usage(obj.get("usage") or {})
            reason = (obj.get("delta") or {}).get("stop_reason")
            if reason:
                self._stop_reason = reason
                self._send_finish(out)
        elif kind == "message_stop":
            if self._stop_reason is None:
                # An end without a stop reason is a generation that died (docs/breaker.md,
                # "Mid-stream continuation"): a cut stream, never a complete answer.
                self._error = shapes.upstream_failure(
                    "Anthropic stream ended without a stop_reason", code="upstream_stream_truncated"
                )
                return
            self._send_finish(out)
            self.finished = True
            self.usage = Usage(self._prompt, self._completion)
            if self._include_usage:
                out.append(self._usage_chunk())
            out.append(DONE)
        elif kind == "error":
            fields = _error_fields(obj) or ("api_error", "stream error")
            status = ERROR_TYPE_STATUS.get(fields[0], 500)
            self._error = StreamError(classify(status, fields[0], fields[1]))
        # ping, content_block_stop and event types added later carry nothing for OpenAI

    def _usage(self, usage: JSONDict) -> None:
        if "input_tokens" in usage:
            self._prompt = prompt_tokens(usage)
            self._cache_read = int(usage.get("cache_read_input_tokens") or 0)
        if usage.get("output_tokens") is not None:
            self._completion = int(usage["output_tokens"])  # a running total: keep the last
        self.usage = Usage(self._prompt, self._completion)

    def _block_start(self, obj: JSONDict, out: list[str]) -> None:
        block = obj.get("content_block") or {}
        kind = block.get("type")
        if kind == "text" and block.get("text"):
            self._emit({"content": block["text"]}, out)
        elif kind == "tool_use":
            index = len(self._tool_index)
            self._tool_index[int(obj.get("index", -1))] = index
            call = {
                "index": index,
                "id": block.get("id", ""),
                "type": "function",
                "function": {"name": block.get("name", ""), "arguments": ""},
            }
            self._emit({"tool_calls": [call]}, out)

    def _delta(self, obj: JSONDict, out: list[str]) -> None:
        delta = obj.get("delta") or {}
        kind = delta.get("type")
        if kind == "text_delta":
            if delta.get("text"):
                self._emit({"content": delta["text"]}, out)
        elif kind == "input_json_delta":
            index = self._tool_index.get(int(obj.get("index", -1)))
            if index is not None and delta.get("partial_json"):
                fragment = {"index": index, "function": {"arguments": delta["partial_json"]}}
                self._emit({"tool_calls": [fragment]}, out)
        elif kind in ("thinking_delta", "signature_delta"):
            # Extended thinking has no OpenAI counterpart, but the model is producing: that is
            # the commit point, so long thinking never runs into the first-token deadline.
            self._start(out)
        # citations_delta: no OpenAI counterpart

    def _send_finish(self, out: list[str]) -> None:
        if self._finish_sent:
            return
        self._finish_sent = True
        reason = STOP_REASONS.get(self._stop_reason or "", "stop")
        self._emit({}, out, finish_reason=reason)

    def _start(self, out: list[str]) -> None:
        """The first chunk, with the role, once; from here on the stream is committed."""
        self._prepare_prefix()
        if not self._role_sent:
            self._role_sent = True
            out.append(self._prefix + '{"role":"assistant","content":""}' + self._suffix)
        self.has_content = True

    def _emit(self, delta: JSONDict, out: list[str], finish_reason: str | None = None) -> None:
        self._prepare_prefix()
        self._start(out)
        suffix = self._suffix
        if finish_reason is not None:
            suffix = suffix.replace('"finish_reason":null', f'"finish_reason":"{finish_reason}"')
        out.append(self._prefix + orjson.dumps(delta).decode() + suffix)

    def _prepare_prefix(self) -> None:
        if not self._prefix:
            self._prefix = (
                '{"id":' + orjson.dumps(self._id).decode() + ',"object":"chat.completion.chunk",'
                f'"created":{self._created},"model":'
                + orjson.dumps(self._model).decode()
                + ',"choices":[{"index":0,"delta":'
            )

    def _usage_chunk(self) -> str:
        return orjson.dumps(
            {
                "id": self._id,
                "object": "chat.completion.chunk",
                "created": self._created,
                "model": self._model,
                "choices": [],
                "usage": _usage_dict(self._prompt, self._completion, self._cache_read),
            }
        ).decode()


# --- adapter -------------------------------------------------------------


def upstream_headers(provider: Provider, api_key: str | None) -> dict[str, str]:
    """The headers of every request to an Anthropic upstream: its version, the proxy's key."""
    headers = {"anthropic-version": ANTHROPIC_VERSION, **provider.headers}
    if api_key:
        headers["x-api-key"] = api_key
    return headers


class AnthropicAdapter:
    """``ProviderAdapter`` for Anthropic's Messages API; ``clock`` gives ``created``."""

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock

    def build_request(
        self,
        endpoint: Endpoint,
        body: JSONDict,
        provider: Provider,
        deployment: Deployment,
        api_key: str | None,
        stream: bool,
    ) -> UpstreamRequest:
        if endpoint is not Endpoint.CHAT:
            raise InvalidRequest(
                f"Anthropic upstreams serve chat completions only, not {endpoint.value}; "
                "legacy completions and embeddings need an OpenAI-compatible upstream",
                param="model",
                code="unsupported_endpoint",
            )
        payload = translate_request(body, deployment.upstream_model, stream)
        headers = {"content-type": "application/json", **upstream_headers(provider, api_key)}
        return UpstreamRequest(
            "POST", provider.base_url + MESSAGES_PATH, headers, exact_bytes(orjson.dumps(payload))
        )

    def parse_response(
        self,
        endpoint: Endpoint,
        body: bytes,
        deployment: Deployment,
        client_model: str,
        *,
        request_body: JSONDict | None = None,
    ) -> JSONDict:
        """A 2xx Messages body -> chat.completion; a malformed one raises ``StreamError``."""
        return _parse_message(body, deployment, client_model, int(self._clock()))

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorInfo:
        fields = _error_fields(shapes.json_or_none(body))
        if fields is None:
            fields = ("", shapes.http_error_text(status, body))
        return classify(status, fields[0], fields[1], parse_retry_after(headers, self._clock()))

    def stream_translator(
        self, endpoint: Endpoint, deployment: Deployment, client_model: str, include_usage: bool
    ) -> AnthropicStreamTranslator:
        return AnthropicStreamTranslator(client_model, include_usage, int(self._clock()))

    def health_request(self, provider: Provider, api_key: str | None) -> UpstreamRequest:
        path = provider.health_check.path or MODELS_PATH
        return UpstreamRequest("GET", provider.base_url + path, upstream_headers(provider, api_key))
