"""What one connection may cost a real aggregator process (docs/security.md, "Connections").

Raw sockets play the stranger: a request head that never ends or never completes, a body that
stops halfway, hundreds of connections that never send a head. Each is answered (431, 408) or
closed, and legitimate requests, slow uploads, long polls and WebSockets go on as before.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from harness import Server
from websockets.sync.client import connect

from fedloop.agent.client import AggregatorClient
from fedloop.protocol import codec

pytest.importorskip("httptools")  # the limits live in the httptools protocol (h11: head size only)

GOOD = {"w": np.zeros(100_000, np.float32), "b": np.zeros(3, np.float32)}  # 400 KB: a direct body
SMALL = {"w": np.zeros(1_000, np.float32), "b": np.zeros(3, np.float32)}  # 4 KB: through uvicorn
WAIT = 30.0  # seconds a socket waits for the aggregator before the test fails


def _answer(conn: socket.socket) -> bytes:
    """Everything the aggregator sends until it closes the connection."""
    conn.settimeout(WAIT)
    received = b""
    try:
        while chunk := conn.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    return received


def _error(answer: bytes) -> tuple[str, str]:
    """The status line and the error code of an answer."""
    head, _, body = answer.partition(b"\r\n\r\n")
    return head.split(b"\r\n")[0].decode(), json.loads(body)["error"]


def _upload_head(agent_id: str, size: int, **metrics: float) -> bytes:
    message = {"protocol": 1, "agent_id": agent_id, "round": 1, "num_samples": 1}
    message["metrics"] = metrics
    return (
        f"POST /v1/updates HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n"
        f"x-fedloop-message: {json.dumps(message)}\r\n\r\n"
    ).encode()


@pytest.fixture
def fast(make_server: Any) -> Server:
    """An aggregator with one-second limits (the defaults are 20 s and 60 s)."""
    server: Server = make_server(min_agents=1, header_timeout=1.0, body_idle_timeout=1.5)
    return server


# --- the size of a request head ------------------------------------------------------------
def test_a_head_over_the_limit_is_answered_431_before_any_token_is_looked_at(
    make_server: Any,
) -> None:
    server: Server = make_server(auth=True)
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        junk = b"a" * (100 * 1024)
        conn.sendall(b"POST /v1/updates HTTP/1.1\r\nhost: x\r\nx-junk: " + junk + b"\r\n\r\n")
        status, code = _error(_answer(conn))
    # Without the limit: the whole head read, then 401 for the missing token.
    assert status == "HTTP/1.1 431 Request Header Fields Too Large"
    assert code == "headers_too_large"
    assert server.get("/v1/health").status_code == 200


def test_a_head_that_never_ends_is_cut_off_at_the_limit_not_buffered(make_server: Any) -> None:
    server: Server = make_server(auth=True)
    sent = 0
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.settimeout(WAIT)
        conn.sendall(b"POST /v1/updates HTTP/1.1\r\nhost: x\r\nx-junk: ")
        chunk = b"a" * (1 << 20)
        with pytest.raises(OSError):  # the aggregator closed the connection
            for _ in range(64):  # without the limit it takes all 64 MB into memory
                conn.sendall(chunk)
                sent += 1
    assert sent < 64
    assert "exceed 65536 bytes" in server.log()
    assert server.get("/v1/health").status_code == 200


def test_an_upload_with_the_largest_message_header_allowed_is_taken(make_server: Any) -> None:
    server: Server = make_server(min_agents=1)
    agent_id = AggregatorClient(server.url).register("a", SMALL).agent_id
    # 256 metrics of 128-character names: the most an UploadRequest may carry (≈ 40 KB).
    metrics = {f"{i:03d}".ljust(128, "m"): 1.0 / 3 for i in range(256)}
    body = codec.encode(SMALL)
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_upload_head(agent_id, len(body), **metrics) + body)
        conn.settimeout(WAIT)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")


# --- time ----------------------------------------------------------------------------------
def test_a_head_not_complete_in_header_timeout_is_answered_408_and_closed(fast: Server) -> None:
    with (
        socket.create_connection(("127.0.0.1", fast.port)) as silent,
        socket.create_connection(("127.0.0.1", fast.port)) as slow,
    ):
        slow.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-a: ")
        for conn in (silent, slow):
            # Without the timeout neither is ever answered: the recv times out.
            status, code = _error(_answer(conn))
            assert (status, code) == ("HTTP/1.1 408 Request Timeout", "request_timeout")
    assert fast.get("/v1/health").status_code == 200


@pytest.mark.parametrize("model", [GOOD, SMALL], ids=["direct", "uvicorn"])
def test_a_body_that_stops_is_answered_408_and_changes_nothing(
    fast: Server, model: dict[str, np.ndarray]
) -> None:
    agent_id = AggregatorClient(fast.url).register("a", model).agent_id
    body = codec.encode(model)
    with socket.create_connection(("127.0.0.1", fast.port)) as conn:
        conn.sendall(_upload_head(agent_id, len(body)) + body[: len(body) // 2])
        status, code = _error(_answer(conn))
    assert (status, code) == ("HTTP/1.1 408 Request Timeout", "request_timeout")
    assert fast.status()["uploads"] == 0
    # The agent sends it again, whole: taken.
    assert AggregatorClient(fast.url).upload(agent_id, 1, body, 1, {}).accepted


@pytest.mark.parametrize("model", [GOOD, SMALL], ids=["direct", "uvicorn"])
def test_a_slow_upload_that_keeps_sending_is_never_cut(
    fast: Server, model: dict[str, np.ndarray]
) -> None:
    agent_id = AggregatorClient(fast.url).register("a", model).agent_id
    body = codec.encode(model)
    pieces = 12
    step = -(-len(body) // pieces)
    with socket.create_connection(("127.0.0.1", fast.port)) as conn:
        conn.sendall(_upload_head(agent_id, len(body)))
        for start in range(0, len(body), step):  # ≈ 2.4 s in all, longer than either timeout
            time.sleep(0.2)
            conn.sendall(body[start : start + step])
        conn.settimeout(WAIT)
        assert conn.recv(65536).startswith(b"HTTP/1.1 200 ")
    assert fast.status()["global_round"] == 1


def test_long_polls_and_websockets_outlive_the_timeouts(fast: Server) -> None:
    client = AggregatorClient(fast.url)
    agent_id = client.register("a", SMALL).agent_id
    with connect(fast.url.replace("http", "ws") + f"/v1/ws?agent_id={agent_id}") as ws:
        assert json.loads(ws.recv(WAIT))["round"] == 0  # sent on connect
        # A long poll three times the timeouts: answered "not yet", not 408.
        poll = httpx.get(
            fast.url + "/v1/models/global/latest", params={"after": 0, "wait": 3}, timeout=WAIT
        )
        assert poll.status_code == 204
        assert client.upload(agent_id, 1, codec.encode(SMALL), 1, {}).accepted
        assert json.loads(ws.recv(WAIT))["round"] == 1  # the socket is still open


# --- the number of connections -----------------------------------------------------------
@pytest.fixture
def few_files(tmp_path: Path) -> Iterator[Server]:
    """An aggregator allowed 128 open files, with the default max_connections (128 - 64)."""
    server = Server(tmp_path, {}, open_files=128)
    server.start()
    yield server
    server.stop()


def test_connections_that_never_send_a_head_cannot_starve_the_others(few_files: Server) -> None:
    strangers: list[socket.socket] = []
    try:
        for _ in range(200):  # more than the aggregator has files
            conn = socket.create_connection(("127.0.0.1", few_files.port))
            conn.sendall(b"GET /v1/health HTTP/1.1\r\nhost: x\r\nx-a: ")
            strangers.append(conn)
        # Without the cap the aggregator runs out of files and cannot accept these.
        for _ in range(5):
            assert few_files.get("/v1/health").status_code == 200
    finally:
        for conn in strangers:
            conn.close()
    assert "to make room for a new one (max_connections 64)" in few_files.log()
