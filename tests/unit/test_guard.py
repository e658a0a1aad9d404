"""The connection limits (fedloop.aggregator.guard) on a real uvicorn server on a loopback port,
driven by raw sockets: what the limits must leave alone. (What they refuse is tested against a
real aggregator process, tests/integration/test_connections.py.)
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import uvicorn
from starlette.requests import Request
from starlette.types import Receive, Scope, Send

from fedloop.aggregator.app import read_body
from fedloop.aggregator.guard import ConnectionLimits, protocol_class
from fedloop.store.blobs import BodyPool, PooledBody

pytest.importorskip("httptools")

LIMITS = ConnectionLimits(
    max_head_bytes=64 * 1024, head_timeout=1.0, body_idle_timeout=1.0, max_connections=100
)


class _App:
    """Answers each request with the size of its body, read after `delay` seconds."""

    def __init__(self) -> None:
        self.pool = BodyPool(PooledBody)
        self.delay = 0.0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        await asyncio.sleep(self.delay)
        body = await read_body(Request(scope, receive), 1 << 30, self.pool)
        reply = json.dumps({"size": len(body)}).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(reply)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": reply})


class _Server:
    def __init__(self, loop: str) -> None:
        self.app = _App()
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            self.port = probe.getsockname()[1]
        self.server = uvicorn.Server(
            uvicorn.Config(
                self.app,
                host="127.0.0.1",
                port=self.port,
                loop=loop,
                http=protocol_class(LIMITS),
                log_level="warning",
                lifespan="on",
            )
        )
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(10)


@pytest.fixture(params=["uvloop", "asyncio"])
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    if request.param == "uvloop":
        pytest.importorskip("uvloop")
    running = _Server(request.param)
    yield running
    running.stop()


def _post(size: int) -> bytes:
    return b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n\r\n" % size + b"\x01" * size


def _replies(conn: socket.socket, count: int) -> list[dict[str, Any]]:
    """Read `count` HTTP responses (200 each) from `conn`."""
    conn.settimeout(30)
    buffered, replies = b"", []
    while len(replies) < count:
        while b"\r\n\r\n" not in buffered:
            chunk = conn.recv(65536)
            assert chunk, f"connection closed after {len(replies)} replies: {buffered[:200]!r}"
            buffered += chunk
        head, _, rest = buffered.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200"), head
        length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
        while len(rest) < length:
            chunk = conn.recv(65536)
            assert chunk
            rest += chunk
        replies.append(json.loads(rest[:length]))
        buffered = rest[length:]
    return replies


@pytest.mark.parametrize("size", [100_000, 3_000_000])
def test_a_body_in_the_same_read_as_its_head_is_not_counted_as_head(
    server: _Server, size: int
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_post(size))
        assert _replies(conn, 1) == [{"size": size}]


def test_pipelined_requests_with_bodies_are_all_answered(server: _Server) -> None:
    sizes = [200_000, 10, 300_000, 0, 70_000]
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(b"".join(_post(size) for size in sizes))
        assert _replies(conn, len(sizes)) == [{"size": size} for size in sizes]


def test_time_the_server_does_not_read_is_not_the_clients_idle_time(server: _Server) -> None:
    # The body waits, unread (reading paused, the socket's buffers full), twice as long as
    # body_idle_timeout before the application reads it.
    server.app.delay = 2.0
    size = 4_000_000
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_post(size))
        assert _replies(conn, 1) == [{"size": size}]


def test_a_kept_alive_connection_may_wait_longer_than_head_timeout_between_requests(
    server: _Server,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_post(10))
        assert _replies(conn, 1) == [{"size": 10}]
        time.sleep(2.0)  # between requests uvicorn's keep-alive timeout (5 s here) applies
        conn.sendall(_post(300_000))
        assert _replies(conn, 1) == [{"size": 300_000}]
