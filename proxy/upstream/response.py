"""``Response``: an upstream reply's status and headers now, its body on demand.

Bodies are framed by Content-Length, chunked coding, or the connection's end,
and read whole (``read``) or piece by piece (``read_chunk``).

Invariants:
- A connection returns to the pool only after its response body was read to
  the end with keep-alive intact and nothing after it; anything else
  (cancellation, an error, a body left unread, ``Connection: close``, bytes
  after the body or on an idle connection) closes it.
- A body framed by the connection's end is complete only on a clean close; a
  reset leaves it incomplete (RFC 9112 section 8).
"""

from __future__ import annotations

from functools import lru_cache
from typing import Protocol

from multidict import CIMultiDict, CIMultiDictProxy

from proxy.upstream.connection import Connection
from proxy.upstream.errors import PayloadError

__all__ = ["ConnectionSink", "Response"]


class ConnectionSink(Protocol):
    """Where a connection goes once its body was read to the end (the pool)."""

    def put(self, conn: Connection) -> None: ...


@lru_cache(maxsize=64)
def _latin1(names: tuple[str, ...]) -> tuple[bytes, ...]:
    return tuple(name.encode("latin-1") for name in names)


class Response:
    """An upstream response: status and headers now, the body on demand.

    The head is kept as one bytes object (its header lines as they came) and turned
    into a header mapping only when asked: a held stream keeps its Response for its
    whole life, and a multidict of an API's 20-odd headers costs kilobytes per stream.
    """

    __slots__ = ("_conn", "_done", "_head", "_pool", "content_length", "status")

    def __init__(self, pool: ConnectionSink, conn: Connection) -> None:
        self._pool = pool
        self._conn = conn
        self.status = conn.status
        # llhttp refuses CR, LF and NUL in header lines and ':' in names: "\r\n" and ": "
        # split the lines back into (name, value) exactly.
        self._head = b"\r\n".join([name + b": " + value for name, value in conn.raw_headers])
        conn.raw_headers = []
        # The declared body length (llhttp checked it is one plain number), or None.
        self.content_length = None if conn.head_only else conn.content_length
        self._done = False
        if conn.complete and not conn.body:
            self._finish()

    def _header_items(self) -> list[tuple[str, str]]:
        if not self._head:
            return []
        items = []
        for line in self._head.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            items.append((name.decode("latin-1"), value.decode("latin-1")))
        return items

    @property
    def headers(self) -> CIMultiDictProxy[str]:
        """The response headers (built on each access: read it once and keep it)."""
        return CIMultiDictProxy(CIMultiDict(self._header_items()))

    def headers_with_prefix(self, prefixes: tuple[str, ...]) -> dict[str, str]:
        """The headers whose lower-cased name starts with one of ``prefixes`` (lower case),
        without building the whole mapping (the relayed rate-limit headers)."""
        if not self._head:
            return {}
        wanted = _latin1(prefixes)
        found: dict[str, str] = {}
        for line in self._head.split(b"\r\n"):
            name, _, value = line.partition(b": ")
            if name.lower().startswith(wanted):
                found[name.decode("latin-1")] = value.decode("latin-1")
        return found

    @property
    def buffered(self) -> int:
        """Body bytes received and not yet read."""
        return self._conn.buffered

    @property
    def connection_closed(self) -> bool:
        return self._conn.transport is None

    async def read(self, limit: int | None = None) -> bytes:
        """The rest of the body (at most ``limit`` bytes; the connection is then dropped)."""
        parts: list[bytes] = []
        size = 0
        while True:
            piece = await self.read_chunk()
            if not piece:
                return b"".join(parts)
            parts.append(piece)
            size += len(piece)
            if limit is not None and size >= limit:
                self.close()
                return b"".join(parts)[:limit]

    async def read_chunk(self) -> bytes:
        """The next piece of the body as it arrives; b"" at its end."""
        conn = self._conn
        while not self._done:
            if conn.body:
                piece = conn.take_body()
                if conn.complete:
                    self._finish()  # the last piece: the connection goes back at once
                return piece
            if conn.complete:
                self._finish()
                break
            if conn.failure is not None:
                self.close()
                raise conn.failure
            if conn.eof:
                # Framed by the connection's end: a clean close ends the body, a reset
                # leaves it incomplete (RFC 9112 section 8).
                if conn.until_close and conn.error is None:
                    self._finish()
                    break
                self.close()
                raise PayloadError("the upstream closed the connection in the middle of the body")
            try:
                await conn.wait_data()
            except BaseException:  # cancelled (a deadline, a client gone): the rest is lost
                self.close()
                raise
        return b""

    def _finish(self) -> None:
        self._done = True
        conn = self._conn
        if conn.keep_alive and conn.complete and conn.alive:
            self._pool.put(conn)
        else:
            conn.close()

    def close(self) -> None:
        """Abandon the response; the connection is closed unless the body was complete."""
        if not self._done:
            self._done = True
            self._conn.close()

    async def __aenter__(self) -> Response:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()
