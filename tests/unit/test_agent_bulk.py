"""Model bodies over http.client (fedloop.agent.bulk), against a real HTTP/1.1 server on
loopback: downloads into one buffer, uploads from views, errors mapped like the httpx path,
and a keep-alive connection the server closed while idle reopened without the caller seeing it.
"""

from __future__ import annotations

import contextlib
import json
import socket
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import numpy as np
import pytest

from fedloop.agent.bulk import usable
from fedloop.agent.client import AggregatorClient, Refused
from fedloop.errors import ConnectionFailed
from fedloop.protocol import codec
from fedloop.protocol.messages import GlobalModelInfo
from fedloop.protocol.version import MESSAGE_HEADER

WEIGHTS = {"w": np.arange(300_000, dtype=np.float32), "b": np.ones(3, np.float32)}
BODY = codec.encode(WEIGHTS)
INFO = GlobalModelInfo(round=3, config={"mu": 0.5}).model_dump_json()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, like uvicorn
    server: _Server

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:
        self.server.seen.append((self.path, {k.lower(): v for k, v in self.headers.items()}))
        self.server.connections.add(self.client_address)
        mode = self.server.mode
        if mode == "model":
            self._answer(200, BODY, {MESSAGE_HEADER: INFO})
        elif mode == "not-yet":
            self._answer(204, b"")
        elif mode == "short":  # announces more than it sends, then hangs up
            self.send_response(200)
            self.send_header("content-length", str(len(BODY)))
            self.end_headers()
            self.wfile.write(BODY[:1000])
            self.close_connection = True
        elif mode == "refused":
            self._answer(409, json.dumps({"error": "round_closed", "detail": "too late"}).encode())
        else:
            self._answer(503, b"restarting")
        if self.server.close_after:
            self.close_connection = True  # as a server does with an idle keep-alive connection

    def do_POST(self) -> None:
        size = int(self.headers["content-length"])
        body = self.rfile.read(size)
        self.server.uploads.append(({k.lower(): v for k, v in self.headers.items()}, body))
        answer = {"accepted": True, "round": 1, "uploads": 1, "needed": 2}
        self._answer(200, json.dumps(answer).encode())


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.mode = "model"
        self.close_after = False
        self.seen: list[tuple[str, dict[str, str]]] = []
        self.uploads: list[tuple[dict[str, str], bytes]] = []
        self.connections: set[tuple[str, int]] = set()


@pytest.fixture
def server() -> Iterator[_Server]:
    httpd = _Server()
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def _client(server: _Server) -> AggregatorClient:
    client = AggregatorClient(f"http://127.0.0.1:{server.server_address[1]}", token="secret")
    assert client.bulk is not None, "loopback without a proxy goes over http.client"
    return client


def test_downloads_go_into_one_buffer_over_one_connection(server: _Server) -> None:
    client = _client(server)
    for _ in range(3):
        result = client.latest_global(2, 0.5)
        assert result is not None
        info, data = result
        assert isinstance(data, bytearray) and data == BODY
        assert (info.round, info.config) == (3, {"mu": 0.5})
    path, headers = server.seen[0]
    assert path == "/v1/models/global/latest?after=2&wait=0.5"
    assert headers["authorization"] == "Bearer secret"
    assert len(server.connections) == 1  # kept alive
    np.testing.assert_array_equal(client.global_model(1)["w"], WEIGHTS["w"])
    client.close()


def test_uploads_stream_the_parts_with_a_content_length(server: _Server) -> None:
    client = _client(server)
    reply = client.upload("id1", 1, codec.encode_parts(WEIGHTS), 10, {"loss": 0.5})
    assert (reply.accepted, reply.uploads, reply.needed) == (True, 1, 2)
    ((headers, body),) = server.uploads
    assert body == BODY and headers["content-length"] == str(len(BODY))
    assert "transfer-encoding" not in headers
    assert json.loads(headers[MESSAGE_HEADER])["metrics"] == {"loss": 0.5}
    assert headers["authorization"] == "Bearer secret"
    client.close()


def test_answers_map_like_the_httpx_path(server: _Server) -> None:
    client = _client(server)
    server.mode = "not-yet"
    assert client.latest_global(2) is None
    server.mode = "refused"
    with pytest.raises(Refused) as refused:
        client.latest_global(2)
    assert (refused.value.status, refused.value.code) == (409, "round_closed")
    server.mode = "unavailable"
    with pytest.raises(ConnectionFailed, match="503"):
        client.latest_global(2)
    server.mode = "short"
    with pytest.raises(ConnectionFailed, match="shorter than its Content-Length"):
        client.latest_global(2)
    server.mode = "model"  # and the connection is good again after all of that
    assert client.latest_global(2) is not None
    client.close()


def test_a_connection_the_server_closed_is_reopened_unseen(server: _Server) -> None:
    client = _client(server)
    server.close_after = True  # every answer ends its connection
    for _ in range(3):
        assert client.latest_global(2) is not None
    assert len(server.connections) == 3
    client.close()


def test_nothing_listening_is_a_connection_failure() -> None:
    client = AggregatorClient("http://127.0.0.1:9", token="secret")  # discard port: closed
    with pytest.raises(ConnectionFailed, match="cannot reach the aggregator"):
        client.latest_global(2)


def test_a_proxy_keeps_bodies_on_httpx(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HTTP_PROXY", "http://proxy.example:3128")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    assert not usable("http://10.1.2.3:8765")
    assert AggregatorClient("http://10.1.2.3:8765").bulk is None
    monkeypatch.setenv("NO_PROXY", "10.1.2.3")
    assert usable("http://10.1.2.3:8765")


def test_one_client_serves_several_threads_at_once(server: _Server) -> None:
    from concurrent.futures import ThreadPoolExecutor

    client = _client(server)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: client.latest_global(2), range(16)))
    assert all(r is not None and r[1] == BODY for r in results)
    assert 1 <= len(server.connections) <= 16
    client.close()


# --- framing the client must read, from a scripted server -----------------------------------
ANSWER = json.dumps({"accepted": True, "round": 1, "uploads": 2, "needed": 2}).encode()


class _Scripted:
    """A loopback server that answers the n-th request with the n-th scripted answer, sent in
    the given pieces (each its own send, with a pause: the client sees split reads), and closes
    the connection after an answer marked so. Records how many connections it accepted."""

    def __init__(self, answers: list[tuple[list[bytes], bool]]) -> None:
        self.answers = answers
        self.connections = 0
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        with contextlib.suppress(OSError):
            while self.answers:
                conn, _ = self.listener.accept()
                self.connections += 1
                with conn:
                    while self.answers and self._request(conn):
                        pieces, close = self.answers.pop(0)
                        for piece in pieces:
                            conn.sendall(piece)
                            time.sleep(0.002)
                        if close:
                            break

    @staticmethod
    def _request(conn: socket.socket) -> bool:
        data = b""
        while b"\r\n\r\n" not in data:
            more = conn.recv(65536)
            if not more:
                return False
            data += more
        head, _, body = data.partition(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        while len(body) < length:
            body += conn.recv(65536)
        return True

    def client(self) -> AggregatorClient:
        client = AggregatorClient(f"http://127.0.0.1:{self.port}")
        assert client.bulk is not None
        return client


def _upload(client: AggregatorClient) -> Any:
    return client.upload("id1", 1, codec.encode_parts(WEIGHTS), 10, {})


def test_chunked_and_interim_answers_then_keep_alive() -> None:
    chunked = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\ncontent-type: application/json\r\n\r\n"
    )
    body = f"{len(ANSWER[:10]):x};ext=1\r\n".encode() + ANSWER[:10] + b"\r\n"
    body += f"{len(ANSWER[10:]):X}\r\n".encode() + ANSWER[10:] + b"\r\n0\r\ntrailer: x\r\n\r\n"
    plain = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
    server = _Scripted([([chunked, body[:7], body[7:]], False), ([plain[:5], plain[5:]], False)])
    client = server.client()
    for _ in range(2):
        reply = _upload(client)
        assert (reply.accepted, reply.uploads) == (True, 2)
    assert server.connections == 1  # both answers over one kept connection
    client.close()


def test_an_answer_ended_by_the_close_then_a_new_connection() -> None:
    closing = b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\n" + ANSWER
    old = b"HTTP/1.0 200 OK\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
    plain = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n" % len(ANSWER) + ANSWER
    server = _Scripted([([closing], True), ([old], True), ([plain], False)])
    client = server.client()
    for _ in range(3):
        assert _upload(client).accepted
    assert server.connections == 3  # neither answer left a connection to reuse
    client.close()


@pytest.mark.parametrize(
    "answer",
    [
        b"HTTP/1.1 200 OK\r\nx-big: " + b"a" * 70_000 + b"\r\n\r\n",  # a head past 64 KiB
        b"HTTP/1.1 2OO OK\r\ncontent-length: 0\r\n\r\n",  # not a status
        b"HTTP/1.1 200 OK\r\ncontent-length: many\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\nzz\r\n",
        b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n\r\n",
        b"HTTP/1.1 200 OK\r\ncontent-le",  # cut in its head
    ],
)
def test_a_malformed_or_cut_answer_is_a_connection_failure(answer: bytes) -> None:
    server = _Scripted([([answer], True)])
    client = server.client()
    with pytest.raises(ConnectionFailed):
        _upload(client)
    client.close()
