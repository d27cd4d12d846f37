"""The least an HTTP/1.1 client can do to stream a response: for measuring what a server adds, not a client.

httpx (what the ``openai`` SDK uses) spends hundreds of microseconds per request on the client side: building the
request, its connection pool, h11's parser, line splitting. A benchmark that sends a gRPC call straight to the
replica (C-core parses it) and an HTTP request through the gateway with httpx charges all of that to the gateway.
``LeanConnection`` writes a prebuilt request on one keep-alive connection and hands back the response body as it
arrives (chunked or Content-Length), so what a measurement through a gateway adds is the gateway's.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from urllib.parse import urlsplit


class HttpError(RuntimeError):
    """A response the caller did not expect (status other than 200, or a malformed message)."""


class LeanConnection:
    """One keep-alive HTTP/1.1 connection to ``url``'s host; one request at a time."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        parts = urlsplit(url)
        if parts.scheme != "http" or parts.hostname is None:
            raise ValueError(f"only plain http:// URLs: {url!r}")
        self.host, self.port = parts.hostname, parts.port or 80
        self._head = "".join(f"{k}: {v}\r\n" for k, v in {"Host": parts.netloc, **headers}.items())
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None

    async def open(self) -> None:
        self._reader, self._writer = await asyncio.open_connection(self.host, self.port)

    async def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            await self._writer.wait_closed()
            self._reader = self._writer = None

    async def get(self, path: str) -> bytes:
        """GET ``path``; the whole body (status 200 expected)."""
        return b"".join([piece async for piece in self._exchange(f"GET {path} HTTP/1.1\r\n{self._head}\r\n".encode())])

    def post_stream(self, path: str, body: bytes) -> AsyncIterator[bytes]:
        """POST a JSON ``body``; yields the response body's bytes as they arrive (status 200 expected)."""
        request = (
            f"POST {path} HTTP/1.1\r\n{self._head}Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        ).encode() + body
        return self._exchange(request)

    async def _exchange(self, request: bytes) -> AsyncIterator[bytes]:
        if self._reader is not None and self._reader.at_eof():  # the server closed it while idle (keep-alive timeout)
            await self.close()
        if self._writer is None:
            await self.open()
        reader, writer = self._reader, self._writer
        assert reader is not None and writer is not None
        whole = False
        try:
            writer.write(request)
            status_line, headers = await _read_head(reader)
            status = int(status_line.split(b" ", 2)[1])
            reusable = headers.get(b"connection", b"").lower() != b"close"
            if headers.get(b"transfer-encoding", b"").lower() == b"chunked":
                pieces = _chunked(reader)
            else:
                pieces = _sized(reader, int(headers.get(b"content-length", b"0")))
            if status != 200:
                body = b"".join([piece async for piece in pieces])
                whole = reusable
                raise HttpError(f"HTTP {status}: {body[:300]!r}")
            async for piece in pieces:
                yield piece
            whole = reusable
        finally:
            if not whole:  # read to the end or never reused: a half-read response would garble the next one
                writer.close()
                self._reader = self._writer = None


async def _read_head(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes]]:
    head = await reader.readuntil(b"\r\n\r\n")
    status_line, *lines = head[:-4].split(b"\r\n")
    headers = {}
    for line in lines:
        name, _, value = line.partition(b":")
        headers[name.strip().lower()] = value.strip()
    return status_line, headers


async def _chunked(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    while True:
        size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
        if size == 0:
            while await reader.readuntil(b"\r\n") != b"\r\n":  # trailer fields, then the empty line
                pass
            return
        data = await reader.readexactly(size + 2)
        if data[-2:] != b"\r\n":
            raise HttpError("malformed chunk: no CRLF after its data")
        yield data[:-2]


async def _sized(reader: asyncio.StreamReader, length: int) -> AsyncIterator[bytes]:
    while length > 0:
        data = await reader.read(min(length, 65536))
        if not data:
            raise HttpError(f"the connection closed with {length} body bytes unread")
        length -= len(data)
        yield data


async def sse_events(pieces: AsyncIterator[bytes]) -> AsyncIterator[bytes]:
    """The ``data:`` payloads of a server-sent event stream, across body pieces split anywhere."""
    pending = b""
    async for piece in pieces:
        pending += piece
        *events, pending = pending.split(b"\n\n")
        for event in events:
            for line in event.split(b"\n"):
                if line.startswith(b"data: "):
                    yield line[6:]
