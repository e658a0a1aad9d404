"""Large request bodies read straight into the application's buffer (fedloop.aggregator.direct),
against a real uvicorn server on a loopback port, driven by raw sockets so that the pieces a body
arrives in, pipelining, early hang-ups and TLS are under the test's control.
"""

from __future__ import annotations

import json
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import uvicorn
from starlette.requests import ClientDisconnect, Request
from starlette.types import Receive, Scope, Send

from fedloop.aggregator import guard
from fedloop.aggregator.app import read_body
from fedloop.aggregator.direct import DIRECT_MIN, EXTENSION, protocol_class
from fedloop.security.certs import make_dev_pki
from fedloop.store.blobs import BodyPool, PooledBody, blob_id

pytest.importorskip("httptools")

BIG = bytes(range(256)) * (3 * DIRECT_MIN // 256 + 7)  # 3 × DIRECT_MIN and then some


class _App:
    """Reads each POST body with `read_body` and answers what it got, as JSON."""

    def __init__(self) -> None:
        self.pool = BodyPool(PooledBody)
        self.disconnects = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        request = Request(scope, receive)
        direct = EXTENSION in scope.get("extensions", {})
        try:
            body = await read_body(request, 1 << 30, self.pool)
        except ClientDisconnect:
            self.disconnects += 1
            return
        reply = json.dumps(
            {"size": len(body), "digest": body.digest, "id": blob_id(body), "direct": direct}
        ).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-length", str(len(reply)).encode())],
            }
        )
        await send({"type": "http.response.body", "body": reply})


class _Server:
    def __init__(
        self, loop: str, certs: dict[str, Any] | None = None, guarded: bool = False
    ) -> None:
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
                # The aggregator serves with the connection limits on top (guard.py).
                http=guard.protocol_class(guard.ConnectionLimits())
                if guarded
                else protocol_class(),
                log_level="warning",
                lifespan="on",
                ssl_certfile=str(certs["server"].cert) if certs else None,
                ssl_keyfile=str(certs["server"].key) if certs else None,
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


@pytest.fixture(params=["uvloop", "asyncio", "uvloop-guarded"])
def server(request: pytest.FixtureRequest) -> Iterator[_Server]:
    loop, _, guarded = request.param.partition("-")
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    running = _Server(loop, guarded=bool(guarded))
    yield running
    running.stop()


def _post(body: bytes, extra: bytes = b"") -> bytes:
    head = b"POST /up HTTP/1.1\r\nhost: x\r\ncontent-length: %d\r\n%s\r\n" % (len(body), extra)
    return head + body


def _read_reply(conn: socket.socket | ssl.SSLSocket, buffered: bytearray) -> dict[str, Any]:
    """Read one HTTP response from `conn` (bytes past it stay in `buffered`)."""
    while b"\r\n\r\n" not in buffered:
        chunk = conn.recv(65536)
        assert chunk, "connection closed before a response"
        buffered += chunk
    head, _, rest = bytes(buffered).partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":", 1)[1])
        for line in head.split(b"\r\n")
        if line.lower().startswith(b"content-length:")
    )
    while len(rest) < length:
        chunk = conn.recv(65536)
        assert chunk
        rest += chunk
    buffered[:] = rest[length:]
    reply: dict[str, Any] = json.loads(rest[:length])
    return reply


def _expect(reply: dict[str, Any], body: bytes, direct: bool) -> None:
    assert reply["size"] == len(body)
    assert reply["id"] == blob_id(body)  # the bytes are right
    # Hashed as they came in, unless read straight into the buffer: its taker hashes those
    # on a worker thread, not the event loop's.
    assert reply["digest"] == (None if direct else reply["id"])
    assert reply["direct"] is direct


def test_a_large_body_in_small_pieces_then_more_requests_on_the_same_connection(
    server: _Server,
) -> None:
    other = bytes(reversed(BIG))
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buffered = bytearray()
        message = _post(BIG)
        for start in range(0, len(message), 100_003):  # headers and body split anywhere
            conn.sendall(message[start : start + 100_003])
            time.sleep(0.002)
        _expect(_read_reply(conn, buffered), BIG, direct=True)
        # The parser starts afresh: a small body, then a large one, on the same connection.
        conn.sendall(_post(b"x" * 1000))
        _expect(_read_reply(conn, buffered), b"x" * 1000, direct=False)
        conn.sendall(_post(other))
        _expect(_read_reply(conn, buffered), other, direct=True)


def test_pipelined_requests_after_a_large_body_are_all_answered(server: _Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        buffered = bytearray()
        conn.sendall(_post(BIG) + _post(b"small") + _post(BIG[::-1]))
        _expect(_read_reply(conn, buffered), BIG, direct=True)
        _expect(_read_reply(conn, buffered), b"small", direct=False)
        # Queued behind another request: read the usual way, and still right.
        reply = _read_reply(conn, buffered)
        assert reply["id"] == blob_id(BIG[::-1])


def test_expect_100_continue_is_answered_before_the_body(server: _Server) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        head = _post(BIG, b"expect: 100-continue\r\n")[: -len(BIG)]
        conn.sendall(head)
        interim = conn.recv(100)
        assert interim.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        buffered = bytearray(interim[len(b"HTTP/1.1 100 Continue\r\n\r\n") :])
        conn.sendall(BIG)
        _expect(_read_reply(conn, buffered), BIG, direct=True)


def test_a_client_that_hangs_up_mid_body_is_a_disconnect_and_the_server_goes_on(
    server: _Server,
) -> None:
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_post(BIG)[: len(BIG) // 2])
        time.sleep(0.2)
    deadline = time.monotonic() + 5
    while server.app.disconnects == 0:
        assert time.monotonic() < deadline, "the application never saw the disconnect"
        time.sleep(0.01)
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_post(BIG))
        _expect(_read_reply(conn, bytearray()), BIG, direct=True)


def test_over_tls(tmp_path: Path) -> None:
    pytest.importorskip("uvloop")
    certs = make_dev_pki(tmp_path, ["127.0.0.1"], [])
    running = _Server("uvloop", certs)
    try:
        context = ssl.create_default_context(cafile=str(certs["ca"].cert))
        with (
            socket.create_connection(("127.0.0.1", running.port)) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as conn,
        ):
            buffered = bytearray()
            for body in (BIG, BIG[::-1]):
                conn.sendall(_post(body))
                _expect(_read_reply(conn, buffered), body, direct=True)
    finally:
        running.stop()
