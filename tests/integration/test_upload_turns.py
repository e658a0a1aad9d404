"""One agent's uploads, against a real aggregator process: refused before their bodies are read
when the round would refuse them anyway, one at a time, and a refused one leaves no blob."""

from __future__ import annotations

import json
import socket
import time
from typing import Any

import numpy as np
import pytest
from harness import Server

from fedloop.agent.client import AggregatorClient
from fedloop.protocol import codec
from fedloop.store.blobs import BlobStore, blob_id

MODEL = {"w": np.zeros(100_000, np.float32)}  # 400 KB
WAIT = 30.0


def _head(agent_id: str, size: int) -> bytes:
    message = {"protocol": 1, "agent_id": agent_id, "round": 1, "num_samples": 1}
    return (
        f"POST /v1/updates HTTP/1.1\r\nhost: x\r\ncontent-length: {size}\r\n"
        f"x-fedloop-message: {json.dumps(message)}\r\n\r\n"
    ).encode()


def _answer(conn: socket.socket) -> tuple[int, dict[str, Any]]:
    conn.settimeout(WAIT)
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = conn.recv(65536)
        assert chunk, "closed without an answer"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += conn.recv(65536)
    return int(head.split(b" ")[1]), json.loads(body[:length])


@pytest.fixture
def server(make_server: Any) -> Server:
    server: Server = make_server(min_agents=2, body_idle_timeout=1.5)
    return server


def test_an_upload_the_round_refuses_is_refused_before_its_body_is_read(server: Server) -> None:
    client = AggregatorClient(server.url)
    agent_id = client.register("a", MODEL).agent_id
    client.register("b")
    assert client.upload(agent_id, 1, codec.encode(MODEL), 1).accepted
    with socket.create_connection(("127.0.0.1", server.port)) as conn:
        conn.sendall(_head(agent_id, 50_000_000))  # and no body: without the check, no answer
        status, reply = _answer(conn)
    assert (status, reply["error"]) == (409, "duplicate_upload")


def test_an_agents_second_upload_waits_for_its_first_and_leaves_no_blob(server: Server) -> None:
    client = AggregatorClient(server.url)
    agent_id = client.register("a", MODEL).agent_id
    client.register("b")
    blobs = BlobStore(server.data_dir / "blobs")
    before = blobs.keys()
    first = codec.encode({"w": np.full(100_000, 1.0, np.float32)})
    second = codec.encode({"w": np.full(100_000, 2.0, np.float32)})
    with (
        socket.create_connection(("127.0.0.1", server.port)) as slow,
        socket.create_connection(("127.0.0.1", server.port)) as quick,
    ):
        slow.sendall(_head(agent_id, len(first)) + first[:1000])
        time.sleep(0.3)  # the first upload holds the agent's turn
        quick.sendall(_head(agent_id, len(second)) + second)  # complete, but after the first
        # The first keeps sending for ≈ 3 s (each pause under the 1.5 s idle timeout); the
        # second waits, its body unread, and is not cut for that.
        step = len(first) // 15 + 1
        for start in range(1000, len(first), step):
            time.sleep(0.2)
            slow.sendall(first[start : start + step])
        assert _answer(slow)[0] == 200  # without turns, the quicker upload would be taken
        status, reply = _answer(quick)
    assert (status, reply["error"]) == (409, "duplicate_upload")
    assert blobs.keys() - before == {blob_id(first)}
