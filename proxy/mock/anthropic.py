"""The mock upstream's Anthropic Messages format (``POST /v1/messages``, ``GET /v1/models``).

Requests are validated the way api.anthropic.com does it, so a translating
proxy's mistakes come back as Anthropic 400s in tests: ``anthropic-version``
header, ``max_tokens``, only user/assistant roles starting with user and
alternating, no empty text, tool ids matching ``^[a-zA-Z0-9_-]+$``, each
``tool_use`` answered by a ``tool_result`` first in the next message, no
unknown top-level fields, temperature within 0..1.

A stream is ``message_start``, per block ``content_block_start`` /
``content_block_delta``... / ``content_block_stop`` (a ``ping`` after the first
start), ``message_delta`` (stop reason, running ``output_tokens``), then
``message_stop``, the terminal marker. Tool replies start with a short text
block, so tool_use blocks sit at index 1 and 2 as they often do for Claude.
Text in blocks carrying ``cache_control`` is reported as cache reads.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, ClassVar

from proxy.mock.common import (
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
    fragments,
    reply_words,
    stable_id,
    stream_pieces,
    truncate,
)
from proxy.mock.schema import UnsupportedSchema, instance_of

DEFAULT_MODELS = ("claude-3-5-haiku-latest", "claude-sonnet-4-5")
TOOL_PREAMBLE = "mock tool call"
ID_RE = "^[a-zA-Z0-9_-]+$"
TOOL_ID_PATTERN = re.compile(ID_RE)
TOOL_NAME_PATTERN = re.compile(r"^[a-zA-Z0-9_-]{1,128}$")
KNOWN_FIELDS = frozenset(
    {
        "model", "messages", "max_tokens", "system", "metadata", "stop_sequences", "stream",
        "temperature", "top_p", "top_k", "tools", "tool_choice", "thinking", "service_tier",
        "container", "mcp_servers", "context_management",
    }
)  # fmt: skip
TOOL_CHOICE_TYPES = frozenset({"auto", "any", "tool", "none"})
MODEL_CREATED_AT = "2025-01-01T00:00:00Z"
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    402: "billing_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def error_body(
    status: int, message: str | None = None, *, request_id: str = "req_mock"
) -> JSONDict:
    kind = ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")
    text = message or ("Overloaded" if kind == "overloaded_error" else f"mock {kind} ({status})")
    return {"type": "error", "error": {"type": kind, "message": text}, "request_id": request_id}


def _sse(event: str, data: JSONDict) -> bytes:
    return b"event: " + event.encode() + b"\ndata: " + dumps(data) + b"\n\n"


def _block_text(block: Any) -> str:
    if isinstance(block, str):
        return block
    if not isinstance(block, dict):
        return ""
    if block.get("type") == "text":
        return str(block.get("text", ""))
    if block.get("type") == "tool_result":
        return _content_text(block.get("content"))
    return ""


def _content_text(content: Any) -> str:
    if isinstance(content, list):
        return " ".join(_block_text(b) for b in content)
    return _block_text(content)


def _blocks(content: Any) -> list[Any]:
    return content if isinstance(content, list) else [content]


def _cached_words(body: JSONDict) -> int:
    """Words in blocks marked ``cache_control``: reported as cache reads."""
    blocks = [b for m in body["messages"] if isinstance(m, dict) for b in _blocks(m.get("content"))]
    blocks += _blocks(body.get("system"))
    return sum(
        count_words(_block_text(b))
        for b in blocks
        if isinstance(b, dict) and b.get("cache_control")
    )


class AnthropicFormat(MockFormat):
    name: ClassVar[str] = "anthropic"

    def routes(self) -> Sequence[Route]:
        return (
            Route("POST", "/v1/messages", self.messages),
            Route("GET", "/v1/models", self.list_models),
        )

    def _request_id(self) -> str:
        return f"req_mock{self.options.name}{self._serial}"

    def error(self, status: int, message: str | None = None) -> JsonReply:
        rid = self._request_id()
        return JsonReply(status, error_body(status, message, request_id=rid), {"request-id": rid})

    def rate_limited(self, retry_after: str | None) -> JsonReply:
        reply = self.error(429, "Number of requests has exceeded your per-minute rate limit.")
        headers = {**reply.headers, "anthropic-ratelimit-requests-remaining": "0"}
        return JsonReply(reply.status, reply.body, headers)

    def quota_exhausted(self) -> JsonReply:
        # Anthropic reports an empty prepaid balance as a 400, not a 402 or 429.
        message = (
            "Your credit balance is too low to access the Anthropic API. "
            "Please go to Plans & Billing to upgrade or purchase credits."
        )
        return self.error(400, message)

    def bare_end(self) -> bytes:
        return _sse("message_stop", {"type": "message_stop"})

    def in_band_error(self) -> bytes:
        return _sse(
            "error",
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}},
        )

    def authorize(self, req: MockRequest) -> JsonReply | None:
        key = self.options.require_key
        if key is not None:
            given = req.headers.get("x-api-key")
            if not given:
                return self.error(401, "x-api-key header is required")
            if given != key:
                return self.error(401, "invalid x-api-key")
        if not req.headers.get("anthropic-version"):
            return self.error(400, "anthropic-version: header is required")
        return None

    def not_found(self, req: MockRequest) -> JsonReply:
        return self.error(404, "Not Found")

    def unknown_model(self, model: str) -> JsonReply | None:
        missing = super().unknown_model(model)
        return None if missing is None else self.error(404, f"model: {model}")

    def list_models(self, req: MockRequest) -> Reply:
        models = list(self.listed_models(DEFAULT_MODELS))
        data = [
            {"type": "model", "id": m, "display_name": m, "created_at": MODEL_CREATED_AT}
            for m in models
        ]
        body = {
            "data": data,
            "has_more": False,
            "first_id": models[0] if models else None,
            "last_id": models[-1] if models else None,
        }
        return JsonReply(200, body, {"request-id": self._request_id()})

    def messages(self, req: MockRequest) -> Reply:
        body = req.body
        if body is INVALID_JSON or not isinstance(body, dict):
            return self.error(400, "There was an error parsing the body of your request.")
        problem = validate_messages_request(body)
        if problem is not None:
            return self.error(400, problem)
        model: str = body["model"]
        missing = self.unknown_model(model)
        if missing is not None:
            return missing
        messages: list[JSONDict] = body["messages"]
        last = messages[-1]
        prompt = next(
            (_content_text(m["content"]) for m in reversed(messages) if m["role"] == "user"), ""
        )
        total_words = sum(count_words(_content_text(m["content"])) for m in messages)
        total_words += count_words(_content_text(body.get("system")))
        cached = _cached_words(body)
        try:
            calls = self._tool_calls(body, last, prompt)
        except UnsupportedSchema as exc:
            return self.error(400, f"tools: the mock cannot honour this input_schema: {exc}")
        words, cut = truncate(reply_words(prompt, self.options.words), body["max_tokens"])
        pieces = stream_pieces(words)
        if calls:
            words, stop = TOOL_PREAMBLE.split(), "tool_use"
            pieces = stream_pieces(words)
        else:
            stop = "max_tokens" if cut else "end_turn"
            if last["role"] == "assistant":
                # A prefill: the answer goes on from after the assistant's text.
                pieces = continued_pieces(words, _content_text(last["content"]))
        output_tokens = len(pieces) + sum(count_words(c.arguments_json) for c in calls)
        usage = {
            "input_tokens": total_words - cached,
            "output_tokens": output_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": cached,
        }
        serial = self.next_serial()
        message: JSONDict = {
            "id": stable_id("msg_", self.options.name, serial, prompt),
            "type": "message",
            "role": "assistant",
            "model": model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        headers = {"request-id": self._request_id()}
        text_block = {"type": "text", "text": "".join(pieces)}
        tool_blocks = [
            {"type": "tool_use", "id": c.call_id, "name": c.name, "input": c.arguments}
            for c in calls
        ]
        if not self.wants_stream(req):
            message.update(content=[text_block, *tool_blocks], stop_reason=stop)
            return JsonReply(200, message, headers)
        return StreamReply(_stream_events(message, pieces, calls, stop), headers=headers)

    def _tool_calls(self, body: JSONDict, last: JSONDict, prompt: str) -> list[ToolCall]:
        """``tool_choice``: auto calls on a user turn, ``any``/``tool`` always, ``none`` never."""
        tools = [t for t in body.get("tools") or [] if isinstance(t, dict) and "input_schema" in t]
        raw_choice = body.get("tool_choice")
        choice: JSONDict = raw_choice if isinstance(raw_choice, dict) else {}
        answering = any(
            isinstance(b, dict) and b.get("type") == "tool_result" for b in _blocks(last["content"])
        )
        forced = choice.get("type") in ("any", "tool")
        if not tools or choice.get("type") == "none":
            return []
        if not forced and (last["role"] != "user" or answering):
            return []
        if choice.get("type") == "tool":
            tools = [t for t in tools if t.get("name") == choice.get("name")]
        limit = 1 if choice.get("disable_parallel_tool_use") else MAX_TOOL_CALLS
        word = prompt.split()[0] if prompt.split() else "mock"
        calls = []
        for i, t in enumerate(tools[:limit]):
            args = instance_of(t["input_schema"], word=word, top_level_optional=MAX_TOOL_ARGUMENTS)
            if not isinstance(args, dict):
                raise UnsupportedSchema(f"the input_schema of {t['name']!r} is not an object")
            calls.append(ToolCall(stable_id("toolu_", prompt, i, t["name"]), t["name"], args))
        return calls


def _stream_events(
    message: JSONDict, pieces: list[str], calls: list[ToolCall], stop: str
) -> list[bytes]:
    """The Messages stream for a reply: text block 0, then one tool_use block per call."""
    start = {**message, "usage": {**message["usage"], "output_tokens": 1}}
    events = [_sse("message_start", {"type": "message_start", "message": start})]
    events.append(_block_start(0, {"type": "text", "text": ""}))
    events.append(_sse("ping", {"type": "ping"}))
    events.extend(_block_delta(0, {"type": "text_delta", "text": p}) for p in pieces)
    events.append(_block_stop(0))
    for index, call in enumerate(calls, start=1):
        opening = {"type": "tool_use", "id": call.call_id, "name": call.name, "input": {}}
        events.append(_block_start(index, opening))
        # The input arrives only in the deltas; the first one is empty, as Anthropic sends it.
        for fragment in ["", *fragments(call.arguments_json)]:
            events.append(
                _block_delta(index, {"type": "input_json_delta", "partial_json": fragment})
            )
        events.append(_block_stop(index))
    delta = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": message["usage"]["output_tokens"]},
    }
    events.append(_sse("message_delta", delta))
    events.append(_sse("message_stop", {"type": "message_stop"}))
    return events


def _block_stop(index: int) -> bytes:
    return _sse("content_block_stop", {"type": "content_block_stop", "index": index})


def _block_start(index: int, block: JSONDict) -> bytes:
    return _sse(
        "content_block_start",
        {"type": "content_block_start", "index": index, "content_block": block},
    )


def _block_delta(index: int, delta: JSONDict) -> bytes:
    return _sse(
        "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}
    )


def validate_messages_request(body: JSONDict) -> str | None:
    """The first problem api.anthropic.com would report for this body, or None."""
    for key in body:
        if key not in KNOWN_FIELDS:
            return f"{key}: Extra inputs are not permitted"
    if not isinstance(body.get("model"), str) or not body["model"]:
        return "model: Field required"
    max_tokens = body.get("max_tokens")
    if "max_tokens" not in body:
        return "max_tokens: Field required"
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        return "max_tokens: Input should be a valid integer greater than or equal to 1"
    temperature = body.get("temperature")
    if temperature is not None and (
        not isinstance(temperature, (int, float)) or not 0 <= temperature <= 1
    ):
        return "temperature: Input should be less than or equal to 1"
    problem = _check_tools(body)
    if problem is not None:
        return problem
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        return (
            "messages: Field required"
            if messages is None
            else "messages: at least one message is required"
        )
    return _check_messages(messages)


def _check_tools(body: JSONDict) -> str | None:
    tools = body.get("tools", [])
    if not isinstance(tools, list):
        return "tools: Input should be a valid list"
    for i, tool in enumerate(tools):
        if not isinstance(tool, dict):
            return f"tools.{i}: Input should be a valid dictionary"
        if "type" in tool and tool["type"] != "custom":
            continue  # a server tool (web search ...): not modelled
        if not isinstance(tool.get("name"), str) or not TOOL_NAME_PATTERN.match(tool["name"]):
            return f"tools.{i}.custom.name: String should match pattern '^[a-zA-Z0-9_-]{{1,128}}$'"
        if not isinstance(tool.get("input_schema"), dict):
            return f"tools.{i}.custom.input_schema: Field required"
    choice = body.get("tool_choice")
    if choice is not None and (
        not isinstance(choice, dict) or choice.get("type") not in TOOL_CHOICE_TYPES
    ):
        return (
            "tool_choice: Input tag does not match any of the expected tags: auto, any, tool, none"
        )
    names = {t.get("name") for t in tools if isinstance(t, dict)}
    if (
        isinstance(choice, dict)
        and choice.get("type") == "tool"
        and choice.get("name") not in names
    ):
        return f"tool_choice: tool {choice.get('name')!r} is not in 'tools'"
    return None


def _check_messages(messages: list[Any]) -> str | None:
    open_tool_ids: list[str] = []
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"messages.{i}: Input should be a valid dictionary"
        role = message.get("role")
        if role == "system":
            return (
                'messages: Unexpected role "system". The Messages API accepts a top-level '
                '`system` parameter, not "system" as an input message role.'
            )
        if role not in ("user", "assistant"):
            return f"messages.{i}.role: Input should be 'user' or 'assistant'"
        if i == 0 and role != "user":
            return 'messages: first message must use the "user" role'
        if i > 0 and messages[i - 1].get("role") == role:
            return (
                'messages: roles must alternate between "user" and "assistant", '
                f'but found multiple "{role}" roles in a row'
            )
        content = message.get("content")
        final_assistant = role == "assistant" and i == len(messages) - 1
        if content in ("", []) or content is None:
            if final_assistant and content is not None:
                continue
            return (
                f"messages.{i}: all messages must have non-empty content except for the "
                "optional final assistant message"
            )
        problem = _check_blocks(i, _blocks(content), open_tool_ids, final_assistant)
        if problem is not None:
            return problem
        open_tool_ids = [
            str(b.get("id"))
            for b in _blocks(content)
            if isinstance(b, dict) and b.get("type") == "tool_use"
        ]
    return None


def _check_blocks(
    i: int, blocks: list[Any], open_ids: list[str], final_assistant: bool
) -> str | None:
    answered: list[str] = []
    seen_other = False
    for j, block in enumerate(blocks):
        where = f"messages.{i}.content.{j}"
        if isinstance(block, str):
            if not block.strip() and not final_assistant:
                return f"{where}: text content blocks must contain non-whitespace text"
            continue
        if not isinstance(block, dict):
            return f"{where}: Input should be a valid dictionary"
        kind = block.get("type")
        if kind == "text" and not str(block.get("text", "")).strip():
            return f"{where}.text: text content blocks must contain non-whitespace text"
        if kind == "tool_use" and not TOOL_ID_PATTERN.match(str(block.get("id", ""))):
            return f"{where}.tool_use.id: String should match pattern '{ID_RE}'"
        if kind == "tool_result":
            tool_use_id = str(block.get("tool_use_id", ""))
            if not TOOL_ID_PATTERN.match(tool_use_id):
                return f"{where}.tool_result.tool_use_id: String should match pattern '{ID_RE}'"
            if tool_use_id not in open_ids:
                return (
                    f"{where}: unexpected `tool_use_id` found in `tool_result` blocks: "
                    f"{tool_use_id}. Each `tool_result` block must have a corresponding "
                    "`tool_use` block in the previous message."
                )
            if seen_other:
                return f"messages.{i}: `tool_result` blocks must come first in the content"
            answered.append(tool_use_id)
        else:
            seen_other = True
    unanswered = [t for t in open_ids if t not in answered]
    if unanswered:
        return (
            f"messages.{i}: `tool_use` ids were found without `tool_result` blocks "
            f"immediately after: {', '.join(unanswered)}. Each `tool_use` block must have "
            "a corresponding `tool_result` block in the next message."
        )
    return None
