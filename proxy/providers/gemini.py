"""OpenAI chat completions and embeddings <-> Gemini (docs/wire-formats.md, 'OpenAI to Gemini').

Request invariants:
- system/developer messages become ``systemInstruction`` parts (one per
  message); ``user``/``assistant``/``tool`` become ``user``/``model``/``user``
  turns, consecutive turns of one role merged; empty text parts and turns
  left empty are dropped (Gemini rejects them);
- a tool message becomes a ``functionResponse`` whose name comes from the
  matching assistant call earlier in the list (unknown id: 400);
- tool schemas are reduced to Gemini's OpenAPI subset (module ``gemini_schema``):
  local ``$ref`` inlined, ``oneOf`` read as ``anyOf``, ``const`` as a
  one-value enum, type lists as ``type`` + ``nullable``, unknown keywords and
  unsupported ``format`` values dropped, ``required`` limited to declared
  properties; a parameterless object schema is left out;
- https image URLs become ``fileData`` with a MIME type guessed from the path
  (``image/jpeg`` when the path says nothing); ``data:`` URLs ``inlineData``;
- ``logprobs``, ``top_logprobs``, ``logit_bias``, audio output, legacy
  ``functions`` and token-array embedding inputs are a 400 naming the field;
  ``user``, ``parallel_tool_calls``, ``store``, ``metadata``,
  ``service_tier``, ``reasoning_effort`` are accepted and dropped.

Thought signatures (Gemini 3 rejects a function call sent back without
one): a ``functionCall`` part's ``thoughtSignature`` travels inside the
OpenAI tool-call id, which clients echo verbatim:
``call_<hex>`` + ``SIGNATURE_MARK`` + the signature in unpadded base64url.
Translating the assistant message back restores it exactly (standard base64,
padded). A model turn whose calls carry no signature (history from another
provider) gets Google's documented placeholder on its first call. Signatures
on text parts are optional for Gemini and are not kept.

Blocked prompts (no candidates, ``promptFeedback.blockReason``) are a 400
``content_filter`` error, stream or not, like OpenAI's own content-policy
rejections; blocked output is ``finish_reason: content_filter``.

Stream invariants (on top of base.py's): no ``[DONE]`` upstream; a choice is
finished at its ``finishReason``, the stream when every choice seen has
finished; ``finish`` then emits the usage chunk (only with ``include_usage``)
and ``[DONE]``. Each function call arrives whole and becomes one tool-call
delta with its own per-choice index, id, type, name and full arguments.
``usageMetadata`` repeats in every chunk: the last one wins, never a sum.
"""

from __future__ import annotations

import base64
import mimetypes
import re
import secrets
import struct
import time
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

import orjson

from proxy.config.model import MODEL_PATH_PREFIX, Deployment, Provider
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
from proxy.providers.gemini_schema import MAX_REF_DEPTH as MAX_REF_DEPTH
from proxy.providers.gemini_schema import gemini_schema as gemini_schema
from proxy.providers.openai import exact_bytes
from proxy.providers.stream_base import SSEStreamTranslator

UPSTREAM = "Gemini"
API_PREFIX = "/v1beta/models"
SIGNATURE_MARK = "__sig_"
# Google's documented placeholder for function calls the model did not make
# itself (thought-signatures guide, 'history from other models').
FOREIGN_SIGNATURE = "skip_thought_signature_validator"
DEFAULT_IMAGE_MIME = "image/jpeg"
TOOL_CONFIG_MODES = {"none": "NONE", "auto": "AUTO", "required": "ANY", "function": "ANY"}
FINISH_FILTERED = frozenset(
    {
        "SAFETY",
        "RECITATION",
        "BLOCKLIST",
        "PROHIBITED_CONTENT",
        "SPII",
        "OTHER",
        "LANGUAGE",
        "IMAGE_SAFETY",
        "IMAGE_PROHIBITED_CONTENT",
        "IMAGE_RECITATION",
        "IMAGE_OTHER",
    }
)
CONTEXT_WINDOW_MARKERS = ("input token count", "maximum number of tokens")
QUOTA_MARKERS = ("perday", "per day", "credits are depleted", "billing account")
API_KEY_MARKERS = ("api_key_invalid", "api key not valid", "api key expired")
STATUS_OF = {
    "INVALID_ARGUMENT": 400,
    "FAILED_PRECONDITION": 400,
    "UNAUTHENTICATED": 401,
    "PERMISSION_DENIED": 403,
    "NOT_FOUND": 404,
    "RESOURCE_EXHAUSTED": 429,
    "CANCELLED": 499,
    "INTERNAL": 500,
    "UNAVAILABLE": 503,
    "DEADLINE_EXCEEDED": 504,
}
RETRY_DELAY_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)s\s*$")
_STD_TO_URL = str.maketrans("+/", "-_")
_URL_TO_STD = str.maketrans("-_", "+/")


def _new_token() -> str:
    return secrets.token_hex(12)


# --- thought signatures in tool-call ids ------------------------------------


def tool_call_id(token: str, signature: str | None) -> str:
    base = f"call_{token}"
    if not signature:
        return base
    return base + SIGNATURE_MARK + signature.translate(_STD_TO_URL).rstrip("=")


def signature_of(call_id: str) -> str | None:
    """The thought signature carried by a tool-call id made by ``tool_call_id``, if any."""
    _, mark, encoded = call_id.partition(SIGNATURE_MARK)
    if not mark or not encoded:
        return None
    std = encoded.translate(_URL_TO_STD)
    return std + "=" * (-len(std) % 4)


# --- request: fields and tools ----------------------------------------------


def _reject_unsupported(body: JSONDict) -> None:
    for name in ("logprobs", "top_logprobs", "logit_bias"):
        if body.get(name):
            raise UnsupportedParameter(f"Gemini upstreams do not support '{name}'", param=name)
    shapes.reject_audio(body, "Gemini upstreams here produce text only")
    shapes.reject_legacy_functions(body)


def _function_declarations(tools: Any) -> list[JSONDict]:
    out: list[JSONDict] = []
    for k, fn in enumerate(shapes.function_tools(tools, UPSTREAM)):
        decl: JSONDict = {"name": fn.get("name", "")}
        if fn.get("description"):
            decl["description"] = fn["description"]
        params = fn.get("parameters")
        if isinstance(params, dict):
            cleaned = gemini_schema(params, f"tools[{k}].function.parameters")
            # Gemini rejects an OBJECT without properties: no parameters instead.
            if cleaned.get("properties") or cleaned.get("type") not in (None, "OBJECT"):
                decl["parameters"] = cleaned
        out.append(decl)
    return out


def _tool_config(choice: Any) -> JSONDict:
    mode, name = shapes.tool_choice_of(choice)
    config: JSONDict = {"mode": TOOL_CONFIG_MODES[mode]}
    if mode == "function":
        config["allowedFunctionNames"] = [name]
    return {"functionCallingConfig": config}


# --- request: messages ------------------------------------------------------


def _media_part(url: str, param: str, default_mime: str) -> JSONDict:
    if url.startswith("data:"):
        mime, data = shapes.split_data_url(url, param)
        return {"inlineData": {"mimeType": mime, "data": data}}
    if url.startswith(("https://", "http://")):
        path = url.split("?", 1)[0].split("#", 1)[0]
        mime = mimetypes.guess_type(path)[0] or default_mime
        return {"fileData": {"mimeType": mime, "fileUri": url}}
    raise InvalidRequest("media URLs must be https:// or data: URLs", param=param)


def _parts(content: Any, param: str) -> list[JSONDict]:
    return [
        {"text": part.value}
        if part.kind == "text"
        else _media_part(part.value, part.param, DEFAULT_IMAGE_MIME)
        for part in shapes.content_parts(content, param, UPSTREAM)
    ]


def _model_parts(msg: JSONDict, i: int, call_names: dict[str, str]) -> list[JSONDict]:
    parts = _parts(msg.get("content"), f"messages[{i}].content")
    calls: list[JSONDict] = []
    for call_id, fn in shapes.assistant_tool_calls(msg, i):
        name = fn.get("name", "")
        call_names[call_id] = name
        part: JSONDict = {
            "functionCall": {"name": name, "args": shapes.parse_arguments(fn.get("arguments"))}
        }
        signature = signature_of(call_id)
        if signature:
            part["thoughtSignature"] = signature
        calls.append(part)
    if calls and not any("thoughtSignature" in c for c in calls):
        calls[0]["thoughtSignature"] = FOREIGN_SIGNATURE
    return parts + calls


def _append(contents: list[JSONDict], role: str, parts: list[JSONDict]) -> None:
    if not parts:
        return
    if contents and contents[-1]["role"] == role:
        contents[-1]["parts"].extend(parts)
    else:
        contents.append({"role": role, "parts": parts})


def _generation_config(body: JSONDict) -> JSONDict:
    config: JSONDict = {}
    pairs = (
        ("maxOutputTokens", shapes.max_tokens_of(body)),
        ("temperature", body.get("temperature")),
        ("topP", body.get("top_p")),
        ("candidateCount", body.get("n")),
        ("seed", body.get("seed")),
        ("presencePenalty", body.get("presence_penalty")),
        ("frequencyPenalty", body.get("frequency_penalty")),
    )
    for key, value in pairs:
        if value is not None:
            config[key] = value
    stop = shapes.stop_sequences(body)
    if stop is not None:
        config["stopSequences"] = stop
    response_format = body.get("response_format")
    if isinstance(response_format, dict):
        kind = response_format.get("type")
        if kind in ("json_object", "json_schema"):
            config["responseMimeType"] = "application/json"
        spec = response_format.get("json_schema")
        if (
            kind == "json_schema"
            and isinstance(spec, dict)
            and isinstance(spec.get("schema"), dict)
        ):
            config["responseSchema"] = gemini_schema(
                spec["schema"], "response_format.json_schema.schema"
            )
    return config


def translate_request(body: JSONDict) -> JSONDict:
    """The Gemini generateContent body for an OpenAI chat completions body."""
    _reject_unsupported(body)
    system: list[JSONDict] = []
    contents: list[JSONDict] = []
    call_names: dict[str, str] = {}
    for i, role, msg in shapes.chat_messages(body):
        if role in ("system", "developer"):
            text = shapes.text_of(msg.get("content"), f"messages[{i}].content")
            if text:
                system.append({"text": text})
        elif role == "user":
            _append(contents, "user", _parts(msg.get("content"), f"messages[{i}].content"))
        elif role == "assistant":
            _append(contents, "model", _model_parts(msg, i, call_names))
        elif role == "tool":
            call_id = msg.get("tool_call_id")
            name = call_names.get(call_id) if isinstance(call_id, str) else None
            if name is None:
                raise InvalidRequest(
                    "tool message answers no earlier assistant tool call",
                    param=f"messages[{i}].tool_call_id",
                )
            output = shapes.text_of(msg.get("content"), f"messages[{i}].content")
            response = {"functionResponse": {"name": name, "response": {"output": output}}}
            _append(contents, "user", [response])
    payload: JSONDict = {"contents": contents}
    if system:
        payload["systemInstruction"] = {"parts": system}
    if body.get("tools"):
        payload["tools"] = [{"functionDeclarations": _function_declarations(body["tools"])}]
        if body.get("tool_choice") is not None:
            payload["toolConfig"] = _tool_config(body["tool_choice"])
    config = _generation_config(body)
    if config:
        payload["generationConfig"] = config
    return payload


def translate_embeddings(body: JSONDict, upstream_model: str) -> tuple[str, JSONDict]:
    """(method, body) for an OpenAI embeddings body: embedContent for a string, else a batch."""
    inputs = body.get("input")
    extra: JSONDict = {}
    dimensions = body.get("dimensions")
    if dimensions is not None:
        if not isinstance(dimensions, int) or isinstance(dimensions, bool) or dimensions < 1:
            raise InvalidRequest(
                "'dimensions' must be a positive integer", param="dimensions", code="invalid_type"
            )
        extra["outputDimensionality"] = dimensions
    if isinstance(inputs, str):
        return "embedContent", {"content": {"parts": [{"text": inputs}]}, **extra}
    if not isinstance(inputs, list) or not inputs or not all(isinstance(t, str) for t in inputs):
        raise UnsupportedParameter(
            "Gemini upstreams embed text only: 'input' must be a string or an array of strings",
            param="input",
        )
    model = f"models/{upstream_model}"
    requests = [{"model": model, "content": {"parts": [{"text": t}]}, **extra} for t in inputs]
    return "batchEmbedContents", {"requests": requests}


# --- responses --------------------------------------------------------------


def path_segment(model: str) -> str:
    """The model as one URL path segment (RFC 3986 section 3.3), percent-encoded as UTF-8.

    ``cb-proxy check`` already refuses what would split or end the segment ('/', '?',
    '#', ':', '..', whitespace, control characters: proxy.config.check); what is left
    outside the unreserved set (a non-ASCII letter, '%', '@' ...) is encoded here.
    """
    return quote(model, safe="")


def finish_reason(reason: str, has_calls: bool) -> str:
    """The OpenAI ``finish_reason`` of a Gemini candidate.

    A reply that carries function calls finishes with ``tool_calls`` whatever Gemini's
    reason (STOP, an unknown future value, none at all), so clients run the calls;
    only MAX_TOKENS (``length``) and the safety reasons (``content_filter``) keep their
    own meaning, since the calls of a cut or blocked reply may be incomplete.
    """
    if reason == "MAX_TOKENS":
        return "length"
    if reason in FINISH_FILTERED:
        return "content_filter"
    if has_calls:
        return "tool_calls"
    return "stop"  # MALFORMED_FUNCTION_CALL and future reasons: never leak raw values


def usage_of(meta: Any) -> Usage:
    if not isinstance(meta, dict):
        return Usage()
    completion = (meta.get("candidatesTokenCount") or 0) + (meta.get("thoughtsTokenCount") or 0)
    return Usage(int(meta.get("promptTokenCount") or 0), int(completion))


def _usage_dict(meta: Any) -> JSONDict:
    usage = usage_of(meta)
    meta = meta if isinstance(meta, dict) else {}
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.total_tokens,
        "prompt_tokens_details": {"cached_tokens": int(meta.get("cachedContentTokenCount") or 0)},
        "completion_tokens_details": {"reasoning_tokens": int(meta.get("thoughtsTokenCount") or 0)},
    }


def _failure(message: str) -> StreamError:
    return shapes.upstream_failure(f"Gemini API returned {message}")


def _blocked(feedback: JSONDict) -> StreamError:
    reason = feedback.get("blockReason")
    text = f"Gemini API blocked the prompt (blockReason {reason})"
    return StreamError(
        ErrorInfo(Outcome.IGNORED, 400, error_body(400, text, code="content_filter"))
    )


def _load(body: bytes | str, what: str) -> JSONDict:
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        raise _failure(f"a malformed {what}") from None
    if not isinstance(obj, dict):
        raise _failure(f"a malformed {what}")
    return obj


def _candidate_parts(candidate: JSONDict) -> list[JSONDict]:
    content = candidate.get("content")
    parts = content.get("parts") if isinstance(content, dict) else None
    # 'thought' parts are reasoning summaries, not answer text.
    return [p for p in parts or () if isinstance(p, dict) and not p.get("thought")]


def _call_delta(call: JSONDict, signature: Any, token: str) -> JSONDict:
    call_id = tool_call_id(token, signature if isinstance(signature, str) else None)
    return shapes.tool_call(call_id, call.get("name", ""), call.get("args"))


def _embedding(values: Any, base64_out: bool) -> Any:
    floats = [float(v) for v in values or ()]
    if not base64_out:
        return floats
    return base64.b64encode(struct.pack(f"<{len(floats)}f", *floats)).decode()


# --- errors -----------------------------------------------------------------


def _retry_delay(details: list[Any]) -> float | None:
    """google.rpc.RetryInfo's ``retryDelay`` ("37s"), Gemini's usual way to say when."""
    for detail in details:
        delay = detail.get("retryDelay") if isinstance(detail, dict) else None
        match = RETRY_DELAY_PATTERN.match(delay) if isinstance(delay, str) else None
        if match:
            return float(match.group(1))
    return None


def classify(
    status: int,
    grpc_status: str,
    message: str,
    details: list[Any],
    retry_after: float | None = None,
) -> ErrorInfo:
    """A Gemini error (HTTP or in-stream) -> outcome and the OpenAI error for the client.

    ``retry_after`` is the reply's Retry-After header in seconds, if any;
    otherwise the RetryInfo detail is used.
    """
    text = f"Gemini API error ({grpc_status or status}): {message}"
    haystack = (message + " " + orjson.dumps(details).decode()).lower()
    if retry_after is None:
        retry_after = _retry_delay(details)
    if any(m in haystack for m in API_KEY_MARKERS):
        # Google answers a bad key with 400 INVALID_ARGUMENT: it is the proxy's key.
        body = error_body(401, text, code="invalid_api_key")
        return ErrorInfo(Outcome.FAILURE, 401, body)
    if status == 429 or grpc_status == "RESOURCE_EXHAUSTED":
        if any(m in haystack for m in QUOTA_MARKERS):
            return shapes.quota_exhausted(text, retry_after)
        return shapes.rate_limited(text, retry_after)
    if grpc_status == "FAILED_PRECONDITION":
        # Region or billing set-up of the proxy's project, not the caller's request.
        return ErrorInfo(Outcome.FAILURE, status, error_body(status, text, code=grpc_status))
    lowered = message.lower()
    if status == 400 and "exceed" in lowered and any(m in lowered for m in CONTEXT_WINDOW_MARKERS):
        return shapes.context_window_exceeded(text)
    return shapes.status_error(status, text, grpc_status, retry_after)


def _error_parts(obj: Any) -> tuple[int | None, str, str, list[Any]] | None:
    if isinstance(obj, list) and obj:  # streamGenerateContent wraps errors in an array
        obj = obj[0]
    err = obj.get("error") if isinstance(obj, dict) else None
    if not isinstance(err, dict):
        return None
    code = err.get("code")
    details = err.get("details")
    return (
        code if isinstance(code, int) else None,
        str(err.get("status") or ""),
        str(err.get("message") or ""),
        details if isinstance(details, list) else [],
    )


# --- stream -----------------------------------------------------------------


class GeminiStreamTranslator(SSEStreamTranslator):
    """Gemini streamGenerateContent?alt=sse -> OpenAI chat.completion.chunk payloads."""

    truncated_message = "Gemini stream ended without a finishReason"

    def __init__(
        self, client_model: str, include_usage: bool, created: int, new_token: Callable[[], str]
    ) -> None:
        super().__init__()
        self._model = client_model
        self._include_usage = include_usage
        self._created = created
        self._new_token = new_token
        self._id = ""
        self._prefix = ""  # the constant head of every chunk, built at first use
        self._suffix = '],"usage":null}' if include_usage else "]}"
        self._role_sent: set[int] = set()
        self._tool_count: dict[int, int] = {}  # choice -> tool calls so far
        self._seen: set[int] = set()  # choices that appeared
        self._done: set[int] = set()  # choices that got their finishReason
        self._meta: Any = None

    def _handle(self, event: SSEEvent, out: list[str]) -> None:
        self._chunk(event.data, out)

    def _closing(self, out: list[str]) -> None:
        if self._include_usage:
            chunk = self._base()
            chunk["choices"] = []
            chunk["usage"] = _usage_dict(self._meta)
            out.append(orjson.dumps(chunk).decode())
        out.append(DONE)

    def _chunk(self, data: str, out: list[str]) -> None:
        try:
            obj = _load(data, "stream event")
        except StreamError as exc:
            self._error = exc
            return
        error = _error_parts(obj)
        if error is not None:
            code, grpc_status, message, details = error
            status = code or STATUS_OF.get(grpc_status, 500)
            self._error = StreamError(classify(status, grpc_status, message, details))
            return
        if not self._id:
            self._id = f"chatcmpl-{obj.get('responseId') or self._new_token()}"
        if obj.get("usageMetadata") is not None:
            self._meta = obj["usageMetadata"]  # cumulative: the last one wins
            self.usage = usage_of(self._meta)
        candidates = obj.get("candidates") or ()
        feedback = obj.get("promptFeedback")
        if not candidates and isinstance(feedback, dict) and feedback.get("blockReason"):
            self._error = _blocked(feedback)
            return
        for candidate in candidates:
            if isinstance(candidate, dict):
                self._candidate(candidate, out)
        if self._seen and self._seen <= self._done:
            self.finished = True

    def _candidate(self, candidate: JSONDict, out: list[str]) -> None:
        index = int(candidate.get("index") or 0)  # proto3 JSON omits a 0 index
        if index in self._done:
            return
        self._seen.add(index)
        for part in _candidate_parts(candidate):
            if part.get("text"):
                self._emit(index, {"content": part["text"]}, out)
            elif isinstance(part.get("functionCall"), dict):
                call = _call_delta(
                    part["functionCall"], part.get("thoughtSignature"), self._new_token()
                )
                call = {"index": self._tool_count.get(index, 0), **call}
                self._tool_count[index] = call["index"] + 1
                self._emit(index, {"tool_calls": [call]}, out)
        reason = candidate.get("finishReason")
        if reason:
            self._done.add(index)
            mapped = finish_reason(reason, index in self._tool_count)
            self._emit(index, {}, out, mapped)

    def _base(self) -> JSONDict:
        return {
            "id": self._id,
            "object": "chat.completion.chunk",
            "created": self._created,
            "model": self._model,
        }

    def _emit(self, index: int, delta: JSONDict, out: list[str], finish: str | None = None) -> None:
        choice = {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}
        if index not in self._role_sent:
            self._role_sent.add(index)
            role = {"role": "assistant", "content": ""}
            out.append(
                self._dump({"index": index, "delta": role, "logprobs": None, "finish_reason": None})
            )
        out.append(self._dump(choice))
        self.has_content = True

    def _dump(self, choice: JSONDict) -> str:
        if not self._prefix:  # the id is known from the first upstream chunk on
            head = orjson.dumps(self._base()).decode()
            self._prefix = head[:-1] + ',"choices":['
        return self._prefix + orjson.dumps(choice).decode() + self._suffix


# --- adapter ----------------------------------------------------------------


class GeminiAdapter:
    """``ProviderAdapter`` for the Gemini API; ``clock`` and ``new_token`` are injectable."""

    def __init__(
        self,
        clock: Callable[[], float] = time.time,
        new_token: Callable[[], str] = _new_token,
    ) -> None:
        self._clock = clock
        self._new_token = new_token

    def _headers(self, provider: Provider, api_key: str | None) -> dict[str, str]:
        headers = dict(provider.headers)
        if api_key:
            headers["x-goog-api-key"] = api_key
        return headers

    def build_request(
        self,
        endpoint: Endpoint,
        body: JSONDict,
        provider: Provider,
        deployment: Deployment,
        api_key: str | None,
        stream: bool,
    ) -> UpstreamRequest:
        model = deployment.upstream_model.removeprefix(MODEL_PATH_PREFIX)
        base = f"{provider.base_url}{API_PREFIX}/{path_segment(model)}"
        if endpoint is Endpoint.CHAT:
            payload = translate_request(body)
            url = f"{base}:streamGenerateContent?alt=sse" if stream else f"{base}:generateContent"
        elif endpoint is Endpoint.EMBEDDINGS:
            method, payload = translate_embeddings(body, model)
            url = f"{base}:{method}"
        else:
            raise InvalidRequest(
                "Gemini upstreams do not serve legacy completions; "
                "they are only served by OpenAI-compatible upstreams",
                param="model",
                code="unsupported_endpoint",
            )
        headers = {"content-type": "application/json", **self._headers(provider, api_key)}
        return UpstreamRequest("POST", url, headers, exact_bytes(orjson.dumps(payload)))

    def parse_response(
        self,
        endpoint: Endpoint,
        body: bytes,
        deployment: Deployment,
        client_model: str,
        *,
        request_body: JSONDict | None = None,
    ) -> JSONDict:
        """A 2xx body -> the OpenAI object; ``request_body`` (the client's) picks base64 embeddings.

        Raises ``StreamError`` carrying an ``ErrorInfo`` for a malformed body or a
        blocked prompt (400 ``content_filter``, outcome IGNORED).
        """
        obj = _load(body, "response body")
        if endpoint is Endpoint.EMBEDDINGS:
            return self._embeddings(obj, client_model, request_body or {})
        candidates = obj.get("candidates") or []
        feedback = obj.get("promptFeedback")
        if not candidates:
            if isinstance(feedback, dict) and feedback.get("blockReason"):
                raise _blocked(feedback)
            raise _failure("no candidates")
        choices = []
        for position, candidate in enumerate(candidates):
            texts: list[str] = []
            calls: list[JSONDict] = []
            for part in _candidate_parts(candidate):
                if part.get("text"):
                    texts.append(part["text"])
                elif isinstance(part.get("functionCall"), dict):
                    signature = part.get("thoughtSignature")
                    calls.append(_call_delta(part["functionCall"], signature, self._new_token()))
            reason = candidate.get("finishReason") or ""
            choices.append(
                {
                    "index": int(candidate.get("index") or position),
                    "message": shapes.assistant_message(texts, calls),
                    "logprobs": None,
                    "finish_reason": finish_reason(reason, bool(calls)),
                }
            )
        return {
            "id": f"chatcmpl-{obj.get('responseId') or self._new_token()}",
            "object": "chat.completion",
            "created": int(self._clock()),
            "model": client_model,
            "choices": choices,
            "usage": _usage_dict(obj.get("usageMetadata")),
        }

    def _embeddings(self, obj: JSONDict, client_model: str, request_body: JSONDict) -> JSONDict:
        if isinstance(obj.get("embedding"), dict):
            vectors = [obj["embedding"].get("values")]
        elif isinstance(obj.get("embeddings"), list):
            vectors = [e.get("values") if isinstance(e, dict) else None for e in obj["embeddings"]]
        else:
            raise _failure("a malformed embeddings body")
        as_base64 = request_body.get("encoding_format") == "base64"
        # Gemini's embedding replies carry no token counts unless usageMetadata is present.
        tokens = usage_of(obj.get("usageMetadata")).prompt_tokens
        return {
            "object": "list",
            "data": [
                {"object": "embedding", "index": i, "embedding": _embedding(v, as_base64)}
                for i, v in enumerate(vectors)
            ],
            "model": client_model,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens},
        }

    def classify_error(self, status: int, headers: Mapping[str, str], body: bytes) -> ErrorInfo:
        parts = _error_parts(shapes.json_or_none(body))
        if parts is None:
            parts = (status, "", shapes.http_error_text(status, body), [])
        _, grpc_status, message, details = parts
        retry_after = parse_retry_after(headers, self._clock())
        return classify(status, grpc_status, message, details, retry_after)

    def stream_translator(
        self, endpoint: Endpoint, deployment: Deployment, client_model: str, include_usage: bool
    ) -> GeminiStreamTranslator:
        return GeminiStreamTranslator(
            client_model, include_usage, int(self._clock()), self._new_token
        )

    def health_request(self, provider: Provider, api_key: str | None) -> UpstreamRequest:
        path = provider.health_check.path or API_PREFIX
        return UpstreamRequest("GET", provider.base_url + path, self._headers(provider, api_key))
