"""bench/serving/lean_http.py, the benchmark's least-cost HTTP client, against a real server on a loopback port
that splits its responses at awkward places."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable

import pytest

from bench.serving.lean_http import HttpError, LeanConnection, sse_events

EVENTS = [b'{"n": 1}', b'{"n": 2, "text": "a\\nb"}', b"[DONE]"]
SSE = b"".join(b"data: " + e + b"\n\n" for e in EVENTS)


async def serve(
    handler: Callable[[int], list[bytes]], connections: list[asyncio.StreamWriter] | None = None
) -> AsyncIterator[tuple[str, list[bytes]]]:
    """A server on a free loopback port; yields its URL and the raw requests it read. Its connections' writers
    are added to ``connections``, for a test to close."""
    requests: list[bytes] = []

    async def on_connection(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if connections is not None:
            connections.append(writer)
        while True:
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError:
                break
            length = next(
                (int(h.split(b":")[1]) for h in head.split(b"\r\n") if h.lower().startswith(b"content-length")), 0
            )
            requests.append(head + await reader.readexactly(length))
            for piece in handler(len(requests)):
                writer.write(piece)
                await writer.drain()
                await asyncio.sleep(0.001)  # separate TCP segments: the client must join them
        writer.close()

    server = await asyncio.start_server(on_connection, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    async with server:
        yield f"http://127.0.0.1:{port}", requests


def chunked(body: bytes, sizes: list[int]) -> list[bytes]:
    """``body`` in chunks of ``sizes`` (the rest in one), each chunk's framing split across writes too."""
    pieces, at = [], 0
    for size in [*sizes, len(body)]:
        chunk = body[at : at + size]
        at += len(chunk)
        if chunk:
            framed = f"{len(chunk):x};ext=1\r\n".encode() + chunk + b"\r\n"
            pieces += [framed[:2], framed[2:]]
    return [*pieces, b"0\r\n", b"\r\n"]


@pytest.fixture
async def stream_server() -> AsyncIterator[tuple[str, list[bytes]]]:
    def respond(n: int) -> list[bytes]:
        if n == 3:
            body = b'{"error": "nope"}'
            return [b"HTTP/1.1 429 Too Many Requests\r\ncontent-length: %d\r\n\r\n" % len(body), body]
        head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"
        return [head, *chunked(SSE, [3, 11, 1, 20])]  # events and even "data: " split across chunks

    async for found in serve(respond):
        yield found


async def test_events_across_chunks_and_a_reused_connection(stream_server: tuple[str, list[bytes]]) -> None:
    url, requests = stream_server
    conn = LeanConnection(url, {"Authorization": "Bearer k"})
    for _ in range(2):  # the second request on the same connection: the first was read to its end
        events = [e async for e in sse_events(conn.post_stream("/v1/completions", b'{"x": 1}'))]
        assert events == EVENTS
    assert len(requests) == 2
    assert requests[0].startswith(b"POST /v1/completions HTTP/1.1\r\n")
    assert b"Authorization: Bearer k\r\n" in requests[0] and requests[0].endswith(b'\r\n\r\n{"x": 1}')
    with pytest.raises(HttpError, match="HTTP 429.*nope"):  # the third answer: an error, its body in the message
        [e async for e in conn.post_stream("/v1/completions", b"{}")]
    await conn.close()


async def test_a_response_with_a_length_and_connection_close() -> None:
    def respond(n: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhe", b"llo"]

    async for url, requests in serve(respond):
        conn = LeanConnection(url, {})
        assert await conn.get("/health") == b"hello"
        assert await conn.get("/health") == b"hello"  # the server closed the first: a new connection
        assert len(requests) == 2 and requests[0].startswith(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1:")


async def test_an_abandoned_stream_does_not_garble_the_next_request(stream_server: tuple[str, list[bytes]]) -> None:
    url, _ = stream_server
    conn = LeanConnection(url, {})
    pieces = conn.post_stream("/", b"{}")
    assert await anext(pieces)  # the first piece, then the caller walks away
    await pieces.aclose()
    events = [e async for e in sse_events(conn.post_stream("/", b"{}"))]  # a fresh connection, a whole answer
    assert events == EVENTS
    await conn.close()


async def test_a_connection_the_server_closed_while_idle_is_replaced() -> None:
    """Servers close idle keep-alive connections (uvicorn after 5 s): the next request opens a new one."""

    def respond(n: int) -> list[bytes]:
        return [b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"]

    closers: list[asyncio.StreamWriter] = []
    async for url, requests in serve(respond, closers):
        conn = LeanConnection(url, {})
        assert await conn.get("/") == b"ok"
        for writer in closers:  # the server's keep-alive timeout passes
            writer.close()
        await asyncio.sleep(0.05)
        assert await conn.get("/") == b"ok"
        assert len(requests) == 2
        await conn.close()
