"""Secrets micro-benchmark: what redaction costs per body, with no key in it.

Two columns: the full scan (``redact_bytes``: every 8-character run of a key and
the masked forms; headers, error bodies, in-band errors, log lines get it) and
the success-body check (``redact_success``: a whole key in any case, one
``find`` per key; the full scan runs only when it hits).

Three realistic keys (an OpenAI project key, an Anthropic key, a Gemini key:
164, 108 and 39 characters, 65 aligned grams in all) against the bodies a
proxy relays: one SSE chunk, plain chat completions of 1 and 4 KiB, a
64 KiB reply, one float embedding (1,536 dimensions) and a batch of 32. The
figure that decides whether success bodies are scanned is the cost per
request next to the hot-path budget (tens of microseconds of the proxy's own
CPU, docs/architecture.md): see "Secrets" in docs/architecture.md.

    python -m bench.secrets
"""

from __future__ import annotations

import random
import statistics
import string
import time
from collections.abc import Callable
from dataclasses import dataclass

import orjson

from proxy.core.secrets import Redactor

SEED = 7
BATCH = 50
ROUNDS = 21
KEY_ALPHABET = string.ascii_letters + string.digits + "_-"


def _key(rng: random.Random, prefix: str, length: int) -> str:
    return prefix + "".join(rng.choice(KEY_ALPHABET) for _ in range(length - len(prefix)))


def keys(seed: int = SEED) -> list[str]:
    rng = random.Random(seed)
    return [_key(rng, "sk-proj-", 164), _key(rng, "sk-ant-api03-", 108), _key(rng, "AIza", 39)]


def _chat(chars: int, rng: random.Random) -> bytes:
    words = ["the", "proxy", "relays", "a", "reply", "of", "tokens", "with", "usage", "..."]
    text = ""
    while len(text) < chars:
        text += rng.choice(words) + " "
    return orjson.dumps(
        {
            "id": "chatcmpl-" + "".join(rng.choice(string.ascii_letters) for _ in range(29)),
            "object": "chat.completion",
            "created": 1_760_000_000,
            "model": "gpt-4o-mini-2024-07-18",
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text[:chars], "refusal": None},
                    "logprobs": None,
                    "finish_reason": "stop",
                }
            ],
            "usage": {"prompt_tokens": 12, "completion_tokens": chars // 4, "total_tokens": 99},
            "system_fingerprint": "fp_0123456789",
        }
    )


def _embeddings(count: int, rng: random.Random) -> bytes:
    data = [
        {
            "object": "embedding",
            "index": i,
            "embedding": [rng.uniform(-0.1, 0.1) for _ in range(1536)],
        }
        for i in range(count)
    ]
    return orjson.dumps({"object": "list", "data": data, "model": "text-embedding-3-small"})


def bodies(seed: int = SEED) -> dict[str, bytes]:
    rng = random.Random(seed)
    chunk = (
        b'data: {"id":"chatcmpl-x","object":"chat.completion.chunk","created":1760000000,'
        b'"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":" tokens"},'
        b'"finish_reason":null}]}\n\n'
    )
    return {
        "header value": b"2020-10-01",
        "log line": b"request req_0123456789abcdef attempt 1 on gpt-4o@openai failed (failure): "
        b"upstream openai answered HTTP 500",
        "sse chunk": chunk,
        "chat 1 KiB": _chat(800, rng),
        "chat 4 KiB": _chat(3800, rng),
        "reply 64 KiB": _chat(64_000, rng),
        "embedding x1": _embeddings(1, rng),
        "embeddings x32": _embeddings(32, rng),
    }


@dataclass(frozen=True, slots=True)
class SecretsResult:
    body: str
    size: int
    full_us: float
    success_us: float


def _median_us(call: Callable[[bytes], bytes], body: bytes) -> float:
    per_call: list[float] = []
    clock = time.perf_counter_ns
    batch = max(1, BATCH * 4096 // max(len(body), 4096))
    for _ in range(ROUNDS):
        started = clock()
        for _ in range(batch):
            call(body)
        per_call.append((clock() - started) / batch / 1000)
    return statistics.median(per_call)


def time_redact(redactor: Redactor, name: str, body: bytes) -> SecretsResult:
    if redactor.redact_bytes(body) is not body:  # fails loudly: the bodies hold no key
        raise AssertionError(f"{name}: a key was found in a body without one")
    full = _median_us(redactor.redact_bytes, body)
    return SecretsResult(name, len(body), full, _median_us(redactor.redact_success, body))


def run() -> list[SecretsResult]:
    redactor = Redactor(keys())
    return [time_redact(redactor, name, body) for name, body in bodies().items()]


def main() -> None:
    print(f"{'body':<16} {'bytes':>10} {'full scan us':>13} {'success check us':>17}")
    for r in run():
        print(f"{r.body:<16} {r.size:>10} {r.full_us:>13.1f} {r.success_us:>17.1f}")


if __name__ == "__main__":
    main()
