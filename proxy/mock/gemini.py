"""The mock upstream's Gemini API format (``/v1beta/models/{model}:{action}``).

Actions: ``generateContent``, ``streamGenerateContent`` (SSE with ``alt=sse``:
``data: <json>`` events separated by ``\\r\\n\\r\\n`` and no end marker other
than the last chunk's ``finishReason``; without ``alt=sse`` a JSON array),
``embedContent``, ``batchEmbedContents``; ``GET /v1beta/models`` lists models.

Every stream chunk repeats ``usageMetadata`` with running totals (summing them
is a bug the proxy must not have). Function calls arrive whole, all in one
chunk, the first carrying a ``thoughtSignature``. Errors are
``{"error": {"code", "message", "status"}}``. Credentials as Google checks
them: a missing key is 403 PERMISSION_DENIED, a wrong one 400 INVALID_ARGUMENT
with reason API_KEY_INVALID (Gemini has no 401 for API keys).
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from proxy.mock.common import (
    DEFAULT_EMBEDDING_DIMENSIONS,
    INVALID_JSON,
    MAX_TOOL_ARGUMENTS,
    MAX_TOOL_CALLS,
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
    embedding_vector,
    reply_words,
    stable_id,
    truncate,
)
from proxy.mock.schema import UnsupportedSchema, instance_of

DEFAULT_MODELS = ("gemini-2.0-flash", "gemini-2.5-pro", "text-embedding-004")
WORDS_PER_CHUNK = 3
MAX_CANDIDATES = 8  # generationConfig.candidateCount accepted by the mock
EVENT_END = b"\r\n\r\n"
STATUSES = {
    400: "INVALID_ARGUMENT",
    401: "UNAUTHENTICATED",
    403: "PERMISSION_DENIED",
    404: "NOT_FOUND",
    409: "ABORTED",
    429: "RESOURCE_EXHAUSTED",
    499: "CANCELLED",
    500: "INTERNAL",
    501: "NOT_IMPLEMENTED",
    503: "UNAVAILABLE",
    504: "DEADLINE_EXCEEDED",
}
# Proto JSON accepts both spellings of every field.
KNOWN_FIELDS = frozenset(
    {
        "contents", "tools", "toolConfig", "tool_config", "safetySettings", "safety_settings",
        "systemInstruction", "system_instruction", "generationConfig", "generation_config",
        "cachedContent", "cached_content", "labels", "model",
    }
)  # fmt: skip
# OpenAPI-subset keywords Gemini's ``parameters`` schema rejects.
REJECTED_SCHEMA_KEYS = frozenset(
    {"additionalProperties", "$ref", "$schema", "$defs", "definitions"}
)
MISSING_SIGNATURE = (
    "Function call is missing a thought_signature in functionCall parts. This is required for "
    "tools to work correctly. Additional data, function call `{name}`, position {position}."
)


def error_body(
    status: int, message: str | None = None, details: list[JSONDict] | None = None
) -> JSONDict:
    name = STATUSES.get(status, "INTERNAL" if status >= 500 else "FAILED_PRECONDITION")
    error: JSONDict = {"code": status, "message": message or f"mock {name}", "status": name}
    if details:
        error["details"] = details
    return {"error": error}


def _get(obj: Any, camel: str, snake: str) -> Any:
    return obj.get(camel, obj.get(snake)) if isinstance(obj, dict) else None


def _parts_text(parts: Any) -> str:
    if not isinstance(parts, list):
        return ""
    return " ".join(
        str(p["text"]) for p in parts if isinstance(p, dict) and isinstance(p.get("text"), str)
    )


def _has(parts: Any, key: str, snake: str) -> bool:
    return isinstance(parts, list) and any(_get(p, key, snake) is not None for p in parts)


class GeminiFormat(MockFormat):
    name: ClassVar[str] = "gemini"

    def routes(self) -> Sequence[Route]:
        return (
            Route("POST", "/v1beta/models/{name}", self.model_action),
            Route("GET", "/v1beta/models", self.list_models),
        )

    def _split(self, req: MockRequest) -> tuple[str, str]:
        model, _, action = req.match.get("name", "").partition(":")
        return model, action

    def model_of(self, req: MockRequest) -> str | None:
        return self._split(req)[0] or None

    def wants_stream(self, req: MockRequest) -> bool:
        return self._split(req)[1] == "streamGenerateContent"

    def error(self, status: int, message: str | None = None) -> JsonReply:
        return JsonReply(status, error_body(status, message))

    def rate_limited(self, retry_after: str | None) -> JsonReply:
        details = None
        if retry_after is not None and retry_after.replace(".", "", 1).isdigit():
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.RetryInfo",
                    "retryDelay": f"{retry_after}s",
                }
            ]
        return JsonReply(
            429, error_body(429, "Resource has been exhausted (e.g. check quota).", details)
        )

    def quota_exhausted(self) -> JsonReply:
        details = [
            {
                "@type": "type.googleapis.com/google.rpc.QuotaFailure",
                "violations": [{"quotaId": "mock"}],
            }
        ]
        message = "You exceeded your current quota, please check your plan and billing details."
        return JsonReply(429, error_body(429, message, details))

    def is_prefill(self, req: MockRequest) -> bool:
        contents = req.body.get("contents") if isinstance(req.body, dict) else None
        last = contents[-1] if isinstance(contents, list) and contents else None
        return isinstance(last, dict) and last.get("role") == "model"

    def in_band_error(self) -> bytes:
        return (
            b"data: "
            + dumps(error_body(503, "The model is overloaded. Please try again later."))
            + EVENT_END
        )

    def authorize(self, req: MockRequest) -> JsonReply | None:
        key = self.options.require_key
        if key is None:
            return None
        given = req.headers.get("x-goog-api-key") or req.query.get("key")
        if not given:
            return self.error(
                403,
                "Method doesn't allow unregistered callers (callers without established "
                "identity). Please use API Key or other form of API consumer identity to call "
                "this API.",
            )
        if given != key:
            details = [
                {
                    "@type": "type.googleapis.com/google.rpc.ErrorInfo",
                    "reason": "API_KEY_INVALID",
                    "domain": "googleapis.com",
                }
            ]
            return JsonReply(
                400, error_body(400, "API key not valid. Please pass a valid API key.", details)
            )
        return None

    def not_found(self, req: MockRequest) -> JsonReply:
        return self.error(404, f"Requested entity was not found: {req.path}")

    def unknown_model(self, model: str) -> JsonReply | None:
        missing = super().unknown_model(model)
        if missing is None:
            return None
        return self.error(
            404, f"models/{model} is not found for API version v1beta, or is not supported."
        )

    def list_models(self, req: MockRequest) -> Reply:
        models = [
            {
                "name": f"models/{m}",
                "version": "001",
                "displayName": m,
                "description": "mock model",
                "inputTokenLimit": 1_048_576,
                "outputTokenLimit": 8192,
                "supportedGenerationMethods": ["embedContent"]
                if "embedding" in m
                else ["generateContent", "countTokens"],
            }
            for m in self.listed_models(DEFAULT_MODELS)
        ]
        return JsonReply(200, {"models": models})

    def model_action(self, req: MockRequest) -> Reply:
        model, action = self._split(req)
        handlers = {
            "generateContent": self.generate,
            "streamGenerateContent": self.generate,
            "embedContent": self.embed,
            "batchEmbedContents": self.batch_embed,
        }
        handler = handlers.get(action)
        if handler is None:
            return self.not_found(req)
        if req.body is INVALID_JSON or not isinstance(req.body, dict):
            return self.error(400, "Invalid JSON payload received.")
        missing = self.unknown_model(model)
        return missing if missing is not None else handler(req, model, req.body)

    # -- generation -------------------------------------------------------------

    def generate(self, req: MockRequest, model: str, body: JSONDict) -> Reply:
        strict = self.options.strict_thought_signatures
        problem = validate_generate_request(body, strict_signatures=strict)
        if problem is not None:
            return self.error(400, problem)
        contents: list[JSONDict] = body["contents"]
        user_texts = [_parts_text(c["parts"]) for c in contents if c.get("role", "user") == "user"]
        prompt = next((t for t in reversed(user_texts) if t), "")
        system = _get(body, "systemInstruction", "system_instruction")
        prompt_tokens = sum(count_words(_parts_text(c["parts"])) for c in contents)
        prompt_tokens += count_words(_parts_text(_get(system, "parts", "parts")))
        config = _get(body, "generationConfig", "generation_config") or {}
        limit = _get(config, "maxOutputTokens", "max_output_tokens")
        words, cut = truncate(reply_words(prompt, self.options.words), limit)
        count = _get(config, "candidateCount", "candidate_count")
        count = 1 if count is None else count
        if (
            not isinstance(count, int)
            or isinstance(count, bool)
            or not 1 <= count <= MAX_CANDIDATES
        ):
            return self.error(
                400, f"* GenerationConfig.candidate_count: must be 1..{MAX_CANDIDATES} in the mock"
            )
        if _get(config, "responseLogprobs", "response_logprobs"):
            return self.error(400, "* GenerationConfig.response_logprobs: not produced by the mock")
        try:
            calls = self._tool_calls(body, contents[-1], prompt)
            json_text = _json_reply(config, words, prompt)
        except UnsupportedSchema as exc:
            return self.error(400, f"* the mock cannot honour this schema: {exc}")
        if json_text is not None and not calls:
            words, cut = [json_text], False
        reply = _Generation(
            model=model,
            response_id=stable_id("", self.options.name, self.next_serial(), prompt, length=20),
            prompt_tokens=prompt_tokens,
            finish="MAX_TOKENS" if cut and not calls else "STOP",
            candidates=count,
        )
        if calls:
            signature = hashlib.sha256(f"{model}:{prompt}".encode()).digest()
            parts: list[JSONDict] = [
                {"functionCall": {"name": c.name, "args": c.arguments}} for c in calls
            ]
            parts[0]["thoughtSignature"] = base64.b64encode(signature).decode()
            tokens = sum(count_words(c.arguments_json) for c in calls)
            chunks = [reply.chunk(parts, tokens, last=True)]
        elif not self.wants_stream(req):
            chunks = [reply.chunk([{"text": " ".join(words)}], len(words), last=True)]
        elif contents[-1].get("role") == "model":
            # A prefill: the answer goes on from after the final model turn's text.
            chunks = reply.piece_chunks(continued_pieces(words, _parts_text(contents[-1]["parts"])))
        else:
            chunks = reply.text_chunks(words)
        if not self.wants_stream(req):
            return JsonReply(200, chunks[0])
        if req.query.get("alt") != "sse":
            return JsonReply(200, chunks)
        # The final chunk (with finishReason) is the only end marker Gemini has.
        return StreamReply([b"data: " + dumps(c) + EVENT_END for c in chunks])

    def _tool_calls(self, body: JSONDict, last: JSONDict, prompt: str) -> list[ToolCall]:
        declarations = [
            d
            for tool in body.get("tools") or []
            if isinstance(tool, dict)
            for d in (_get(tool, "functionDeclarations", "function_declarations") or [])
            if isinstance(d, dict)
        ]
        config = (
            _get(
                _get(body, "toolConfig", "tool_config"),
                "functionCallingConfig",
                "function_calling_config",
            )
            or {}
        )
        answering = _has(last["parts"], "functionResponse", "function_response")
        mode = config.get("mode")
        if not declarations or mode == "NONE":
            return []
        if mode != "ANY" and (last.get("role", "user") != "user" or answering):
            return []  # AUTO calls on a user turn; ANY always calls
        allowed = _get(config, "allowedFunctionNames", "allowed_function_names")
        if isinstance(allowed, list):
            declarations = [d for d in declarations if d.get("name") in allowed]
        word = prompt.split()[0] if prompt.split() else "mock"
        calls = []
        for i, d in enumerate(declarations[:MAX_TOOL_CALLS]):
            schema = d.get("parameters", d.get("parametersJsonSchema"))
            args = instance_of(
                schema or {"type": "object"}, word=word, top_level_optional=MAX_TOOL_ARGUMENTS
            )
            if not isinstance(args, dict):
                raise UnsupportedSchema(f"the parameters of {d.get('name')!r} are not an object")
            calls.append(
                ToolCall(stable_id("", prompt, i, d.get("name")), str(d.get("name")), args)
            )
        return calls

    # -- embeddings -------------------------------------------------------------

    def _embedding(self, request: Any) -> JSONDict | str:
        content = request.get("content") if isinstance(request, dict) else None
        text = _parts_text(content.get("parts")) if isinstance(content, dict) else ""
        if not text:
            return "* EmbedContentRequest.content: content is not specified"
        dims = (
            _get(request, "outputDimensionality", "output_dimensionality")
            or DEFAULT_EMBEDDING_DIMENSIONS
        )
        if not isinstance(dims, int) or dims < 1:
            return "* EmbedContentRequest.output_dimensionality: must be positive"
        return {"values": embedding_vector(text, dims)}

    def embed(self, req: MockRequest, model: str, body: JSONDict) -> Reply:
        result = self._embedding(body)
        return (
            self.error(400, result)
            if isinstance(result, str)
            else JsonReply(200, {"embedding": result})
        )

    def batch_embed(self, req: MockRequest, model: str, body: JSONDict) -> Reply:
        requests = body.get("requests")
        if not isinstance(requests, list) or not requests:
            return self.error(
                400, "* BatchEmbedContentsRequest.requests: requests is not specified"
            )
        embeddings = []
        for request in requests:
            result = self._embedding(request)
            if isinstance(result, str):
                return self.error(400, result)
            embeddings.append(result)
        return JsonReply(200, {"embeddings": embeddings})


@dataclass(frozen=True)
class _Generation:
    model: str
    response_id: str
    prompt_tokens: int
    finish: str
    candidates: int = 1  # generationConfig.candidateCount: each candidate says the same

    def chunk(self, parts: list[JSONDict], output_tokens: int, *, last: bool) -> JSONDict:
        """A response (or stream chunk); usage is the running total so far, as Gemini sends it."""
        candidates: list[JSONDict] = []
        for index in range(self.candidates):
            candidate: JSONDict = {"content": {"parts": parts, "role": "model"}, "index": index}
            if last:
                candidate["finishReason"] = self.finish
            candidates.append(candidate)
        output_tokens *= self.candidates
        usage = {
            "promptTokenCount": self.prompt_tokens,
            "candidatesTokenCount": output_tokens,
            "totalTokenCount": self.prompt_tokens + output_tokens,
        }
        return {
            "candidates": candidates,
            "usageMetadata": usage,
            "modelVersion": self.model,
            "responseId": self.response_id,
        }

    def piece_chunks(self, pieces: list[str]) -> list[JSONDict]:
        """Chunks of ready-made deltas (a continuation), WORDS_PER_CHUNK at a time."""
        step = WORDS_PER_CHUNK
        groups = [pieces[i : i + step] for i in range(0, len(pieces), step)] or [[]]
        return [
            self.chunk(
                [{"text": "".join(g)}], min(len(pieces), (n + 1) * step), last=n == len(groups) - 1
            )
            for n, g in enumerate(groups)
        ]

    def text_chunks(self, words: list[str]) -> list[JSONDict]:
        groups = [words[i : i + WORDS_PER_CHUNK] for i in range(0, len(words), WORDS_PER_CHUNK)]
        chunks, sent = [], 0
        for n, group in enumerate(groups):
            sent += len(group)
            text = (" " if n else "") + " ".join(group)
            chunks.append(self.chunk([{"text": text}], sent, last=n == len(groups) - 1))
        return chunks


def _json_reply(config: Any, words: list[str], prompt: str) -> str | None:
    """The reply as JSON text when ``responseMimeType`` asks for JSON (meeting its schema)."""
    if _get(config, "responseMimeType", "response_mime_type") != "application/json":
        return None
    schema = _get(config, "responseJsonSchema", "response_json_schema")
    if schema is None:
        schema = _get(config, "responseSchema", "response_schema")
    word = prompt.split()[0] if prompt.split() else "mock"
    value = {"answer": " ".join(words)} if schema is None else instance_of(schema, word=word)
    return dumps(value).decode()


def validate_generate_request(body: JSONDict, *, strict_signatures: bool = False) -> str | None:
    """The first problem generativelanguage.googleapis.com would report, or None."""
    for key in body:
        if key not in KNOWN_FIELDS:
            return f'Invalid JSON payload received. Unknown name "{key}": Cannot find field.'
    contents = body.get("contents")
    if not isinstance(contents, list) or not contents:
        return "* GenerateContentRequest.contents: contents is not specified"
    previous: JSONDict | None = None
    for i, content in enumerate(contents):
        if not isinstance(content, dict):
            return f"* GenerateContentRequest.contents[{i}]: must be an object"
        role = content.get("role", "user")
        if role not in ("user", "model"):
            return "Please use a valid role: user, model."
        parts = content.get("parts")
        if not isinstance(parts, list) or not parts:
            return (
                f"* GenerateContentRequest.contents[{i}].parts: contents.parts must not be empty."
            )
        if any(isinstance(p, dict) and p.get("text") == "" for p in parts):
            return (
                "Unable to submit request because it has an empty text parameter. "
                "Add a value to the parameter and try again."
            )
        problem = _check_turn_order(role, parts, previous)
        if problem is not None:
            return problem
        previous = content
    problem = _check_schemas(body)
    if problem is None and strict_signatures:
        problem = _check_signatures(contents)
    return problem


def _check_turn_order(role: str, parts: list[Any], previous: JSONDict | None) -> str | None:
    prev_parts = previous.get("parts") if previous else None
    prev_role = previous.get("role", "user") if previous else None
    if _has(parts, "functionResponse", "function_response"):
        if prev_role != "model" or not _has(prev_parts, "functionCall", "function_call"):
            return (
                "Please ensure that function response turn comes immediately after a function "
                "call turn."
            )
        responses = sum(
            1 for p in parts if _get(p, "functionResponse", "function_response") is not None
        )
        calls = sum(
            1 for p in prev_parts or [] if _get(p, "functionCall", "function_call") is not None
        )
        if responses != calls:
            return (
                "Please ensure that the number of function response parts is equal to the "
                "number of function call parts of the function call turn."
            )
    if role == "model" and _has(parts, "functionCall", "function_call") and prev_role != "user":
        return (
            "Please ensure that function call turn comes immediately after a user turn or after a "
            "function response turn."
        )
    return None


def _check_schemas(body: JSONDict) -> str | None:
    for t, tool in enumerate(body.get("tools") or []):
        declarations = _get(tool, "functionDeclarations", "function_declarations") or []
        for d, declaration in enumerate(declarations):
            bad = _rejected_key(
                declaration.get("parameters") if isinstance(declaration, dict) else None
            )
            if bad is not None:
                return (
                    f'Invalid JSON payload received. Unknown name "{bad}" at '
                    f"'tools[{t}].function_declarations[{d}].parameters': Cannot find field."
                )
    return None


def _rejected_key(schema: Any) -> str | None:
    if isinstance(schema, list):
        return next((k for k in map(_rejected_key, schema) if k is not None), None)
    if not isinstance(schema, dict):
        return None
    for key, value in schema.items():
        if key in REJECTED_SCHEMA_KEYS:
            return str(key)
        # Property names are user data, not keywords: only their schemas are checked.
        found = _rejected_key(
            list(value.values()) if key == "properties" and isinstance(value, dict) else value
        )
        if found is not None:
            return found
    return None


def _check_signatures(contents: list[JSONDict]) -> str | None:
    """Gemini 3: each model turn since the last user text must sign its first function call."""
    start = max(
        (
            i
            for i, c in enumerate(contents)
            if c.get("role", "user") == "user" and _parts_text(c["parts"])
        ),
        default=0,
    )
    for content in contents[start:]:
        calls = [
            p for p in content["parts"] if _get(p, "functionCall", "function_call") is not None
        ]
        if content.get("role") == "model" and calls:
            first = calls[0]
            signature = _get(first, "thoughtSignature", "thought_signature")
            # Any non-empty string passes, the documented dummy values included.
            if not isinstance(signature, str) or not signature:
                name = _get(first, "functionCall", "function_call").get("name", "")
                return MISSING_SIGNATURE.format(
                    name=name, position=content["parts"].index(first) + 1
                )
    return None
