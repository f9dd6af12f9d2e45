"""A small HTTP CONNECT proxy on 127.0.0.1, port 0, for the egress tests.

A script on the shared raw server (``tests.fakes.raw``): it reads one CONNECT
request per connection, records its target and headers, answers ``200
Connection established`` (or ``refuse`` with a 403), and then pipes bytes both
ways until either side closes. Nothing else is proxied: a request that is not
CONNECT gets a 405, so a client that forgot the tunnel fails loudly.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass

from tests.fakes.raw import Peer, RawUpstream

HEAD_LIMIT = 16 * 1024


@dataclass(frozen=True)
class Tunnel:
    target: str  # host:port from the request line
    headers: dict[str, str]  # lower-cased names


class ConnectProxy(RawUpstream):
    """``async with ConnectProxy() as p:`` then ``HTTPS_PROXY=p.url``; ``p.tunnels`` records."""

    def __init__(self, *, refuse: bool = False, hosts: dict[str, str] | None = None) -> None:
        super().__init__(self._tunnel, limit=HEAD_LIMIT)
        self.refuse = refuse
        self.hosts = hosts or {}  # names only this proxy can resolve (a direct call cannot)
        self.tunnels: list[Tunnel] = []

    async def _tunnel(self, peer: Peer) -> None:
        try:
            request = await peer.receive()
            if request is None:
                return
            if request.method != "CONNECT":
                peer.writer.write(b"HTTP/1.1 405 Method Not Allowed\r\nContent-Length: 0\r\n\r\n")
                return
            self.tunnels.append(Tunnel(request.path, request.headers))
            if self.refuse:
                peer.writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            host, _, port = request.path.rpartition(":")
            host = self.hosts.get(host, host.strip("[]"))
            up_reader, up_writer = await asyncio.open_connection(host, int(port))
            peer.writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            try:
                await asyncio.gather(_pipe(peer.reader, up_writer), _pipe(up_reader, peer.writer))
            finally:
                up_writer.close()
        except asyncio.LimitOverrunError:
            pass  # a head over HEAD_LIMIT: the connection just closes


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(1 << 16):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(ConnectionError, RuntimeError):
            writer.write_eof()
