"""Measures the SSE writer choice: aiohttp-sse's EventSourceResponse vs direct writes.

The translated stream path (Anthropic, Gemini) emits OpenAI ``data:`` events.
The issue asked for aiohttp-sse unless a measurement says otherwise; this is
that measurement. Both servers answer POST /v1/chat/completions with the same
13 events (12 content chunks and ``[DONE]``): one with ``EventSourceResponse.send``
per event (as aiohttp-sse is meant to be used), one writing the frames the way
the proxy's relay does (``StreamResponse.write`` per upstream read; here one
write per event, the least favourable case for direct writes).

    python -m bench.sse_writer            # prints both rates and the ratio
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence

from aiohttp import web
from aiohttp_sse import EventSourceResponse

from bench.wrk import run_wrk

EVENTS = [
    '{"id":"chatcmpl-b","object":"chat.completion.chunk","created":1,"model":"m",'
    f'"choices":[{{"index":0,"delta":{{"content":"tok{i}"}},"finish_reason":null}}]}}'
    for i in range(12)
] + ["[DONE]"]
READY = "sse-writer ready"


async def with_library(request: web.Request) -> web.StreamResponse:
    resp = EventSourceResponse(sep="\n", allow_all_methods=True)
    await resp.prepare(request)
    for payload in EVENTS:
        await resp.send(payload)
    resp.stop_streaming()
    await resp.write_eof()
    return resp


async def direct(request: web.Request) -> web.StreamResponse:
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
    )
    await resp.prepare(request)
    for payload in EVENTS:
        await resp.write(b"data: " + payload.encode() + b"\n\n")
    await resp.write_eof()
    return resp


def serve(mode: str, port: int) -> None:
    import uvloop

    # wrk hangs up with streams in flight at the end of a run: not worth a traceback each.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    app = web.Application()
    app.router.add_post("/v1/chat/completions", with_library if mode == "lib" else direct)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(f"{READY} http://127.0.0.1:{runner.addresses[0][1]}", flush=True)
        await asyncio.Event().wait()  # serves until the benchmark kills it

    uvloop.run(main())


def _start(mode: str) -> tuple[subprocess.Popen[str], str]:
    proc = subprocess.Popen(
        ["taskset", "-c", "1", sys.executable, "-m", "bench.sse_writer", "--serve", mode],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(READY):
        proc.kill()
        raise RuntimeError(f"sse writer {mode} did not start: {line!r}")
    return proc, line.split()[-1]


def measure(rounds: int, seconds: float) -> dict[str, float]:
    procs = [_start("lib"), _start("direct")]
    try:
        rates: dict[str, list[float]] = {"lib": [], "direct": []}
        for i in range(rounds):
            order = ("lib", "direct") if i % 2 == 0 else ("direct", "lib")
            for mode in order:
                url = procs[0][1] if mode == "lib" else procs[1][1]
                result = run_wrk(
                    url, connections=16, seconds=seconds, model="m", stream=True, cpus=(0,)
                )
                rates[mode].append(result.rps)
        lib, dir_ = statistics.median(rates["lib"]), statistics.median(rates["direct"])
        return {"aiohttp_sse_rps": lib, "direct_rps": dir_, "ratio": lib / dir_}
    finally:
        for proc, _ in procs:
            proc.kill()
            proc.wait()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.sse_writer", description=__doc__)
    parser.add_argument("--serve", choices=("lib", "direct"))
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve, 0)
        return 0
    started = time.monotonic()
    result = measure(args.rounds, args.seconds)
    print(
        f"SSE writer, 13 events per stream, 16 connections, median of {args.rounds}: "
        f"aiohttp-sse {result['aiohttp_sse_rps']:,.0f} req/s, direct writes "
        f"{result['direct_rps']:,.0f} req/s, aiohttp-sse at {100 * result['ratio']:.1f}% "
        f"({time.monotonic() - started:.0f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
