"""The baseline: a bare aiohttp pass-through in front of the same fake upstream.

``POST /v1/chat/completions`` is forwarded byte for byte to
``UPSTREAM/v1/chat/completions`` with one shared ``ClientSession``. A plain
reply is read whole and returned; an event-stream reply is relayed chunk by
chunk as it arrives. No parsing, routing, metrics or logging: this is the
floor any aiohttp-based proxy pays, so the proxy's ratio against it measures
what the proxy adds. The client session mirrors the proxy's connector limits
so neither side is throttled by pooling; ``--connector-limit 0`` lifts them
(for the memory-per-stream row, which holds thousands of streams open at once,
each on its own upstream connection, as the proxy's client does).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import AsyncIterator, Callable, Sequence

import aiohttp
from aiohttp import web

CHAT_PATH = "/v1/chat/completions"
CONNECTOR_LIMIT = 1024
CONNECTOR_LIMIT_PER_HOST = 256
KEEPALIVE_SECONDS = 30
READY_PREFIX = "passthrough ready"
UPSTREAM_KEY = web.AppKey("upstream", str)
SESSION_KEY = web.AppKey("session", aiohttp.ClientSession)
FORWARD_HEADERS = {"Content-Type": "application/json"}


async def relay_chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    session = request.app[SESSION_KEY]
    url = request.app[UPSTREAM_KEY] + CHAT_PATH
    async with session.post(url, data=body, headers=FORWARD_HEADERS) as upstream:
        content_type = upstream.headers.get("Content-Type", "application/json")
        if content_type.startswith("text/event-stream"):
            out = web.StreamResponse(
                status=upstream.status,
                headers={"Content-Type": content_type, "Cache-Control": "no-cache"},
            )
            await out.prepare(request)
            async for chunk in upstream.content.iter_any():
                await out.write(chunk)
            await out.write_eof()
            return out
        data = await upstream.read()
        return web.Response(body=data, status=upstream.status, content_type="application/json")


def _session_context(limit: bool) -> Callable[[web.Application], AsyncIterator[None]]:
    async def context(app: web.Application) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(
            limit=CONNECTOR_LIMIT if limit else 0,  # 0: no limit
            limit_per_host=CONNECTOR_LIMIT_PER_HOST if limit else 0,
            keepalive_timeout=KEEPALIVE_SECONDS,
        )
        app[SESSION_KEY] = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=None)
        )
        yield
        await app[SESSION_KEY].close()

    return context


def create_passthrough_app(upstream: str, *, connector_limit: bool = True) -> web.Application:
    """``upstream`` is the fake's base URL without a path, e.g. ``http://127.0.0.1:8001``."""
    app = web.Application()
    app[UPSTREAM_KEY] = upstream.rstrip("/")
    app.cleanup_ctx.append(_session_context(connector_limit))
    app.router.add_post(CHAT_PATH, relay_chat)
    return app


async def _serve_forever(host: str, port: int, upstream: str, connector_limit: bool) -> None:
    app = create_passthrough_app(upstream, connector_limit=connector_limit)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    bound_host, bound_port = runner.addresses[0][:2]
    print(f"{READY_PREFIX} http://{bound_host}:{bound_port}", flush=True)
    try:
        await asyncio.Event().wait()  # until the process is signalled
    finally:
        await runner.cleanup()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.passthrough", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT, port 0 = any")
    parser.add_argument("--upstream", required=True, help="fake upstream base URL")
    parser.add_argument(
        "--connector-limit",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: the proxy's connection limits (default); 0: none",
    )
    args = parser.parse_args(argv)
    host, _, port = args.listen.rpartition(":")
    coro = _serve_forever(host or "127.0.0.1", int(port), args.upstream, args.connector_limit == 1)
    try:
        import uvloop

        uvloop.run(coro)
    except ImportError:  # pragma: no cover - platforms without uvloop
        asyncio.run(coro)
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
