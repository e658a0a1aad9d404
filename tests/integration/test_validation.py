"""Every bad request gets a clear 4xx naming the problem, and nothing in the store changes."""

from __future__ import annotations

import json
import struct
from typing import Any

import httpx
import numpy as np
import pytest
import safetensors.numpy as st
from harness import Server

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.protocol import codec
from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store, database_url

GOOD = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}


@pytest.fixture
def server(make_server: Any) -> Server:
    server: Server = make_server(min_agents=2, max_model_bytes=4096)
    return server


def _snapshot(server: Server) -> tuple[int, int, set[str]]:
    store = Store(database_url(server.data_dir, None))
    try:
        count = store.count_local_models()
        agents = len(store.agents())
    finally:
        store.close()
    return count, agents, BlobStore(server.data_dir / "blobs").keys()


def _upload(server: Server, message: dict[str, Any], body: bytes) -> httpx.Response:
    return _post(server, "/v1/updates", message, body)


def _post(server: Server, path: str, message: dict[str, Any], body: bytes) -> httpx.Response:
    return httpx.post(
        server.url + path,
        content=body,
        headers={"x-fedloop-message": json.dumps(message)},
        timeout=30,
    )


def _model(**changes: Any) -> bytes:
    return codec.encode({**GOOD, **changes})


def _raw_model(header: dict[str, Any]) -> bytes:
    """GOOD's tensors under a header of our own making: a body no fedloop encoder writes."""
    text = json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + b"\x00" * 60


W = {"dtype": "F32", "shape": [4, 3], "data_offsets": [0, 48]}
B = {"dtype": "F32", "shape": [3], "data_offsets": [48, 60]}


def test_each_bad_upload_is_refused_and_changes_nothing(server: Server) -> None:
    client = AggregatorClient(server.url)
    agent_id = client.register("site-a", GOOD).agent_id
    ok = {"protocol": 1, "agent_id": agent_id, "round": 1, "num_samples": 5}
    before = _snapshot(server)
    nan = np.ones(3, np.float32)
    nan[1] = np.nan
    cases: list[tuple[dict[str, Any], bytes, int, str]] = [
        (ok, codec.encode({"w": GOOD["w"]}), 422, "wrong_names"),
        (ok, _model(extra=np.ones(1, np.float32)), 422, "wrong_names"),
        (ok, _model(w=np.ones((3, 4), np.float32)), 422, "wrong_shape"),
        (ok, _model(w=np.ones((4, 3), np.float64)), 422, "wrong_dtype"),
        (ok, _model(b=nan), 422, "not_finite"),
        (ok, _model(b=np.array([0, np.inf, 0], np.float32)), 422, "not_finite"),
        (ok, _model(w=np.ones((40, 30), np.float32)), 413, "too_large"),
        (ok, b"\x00" * 16, 400, "bad_model"),
        # Headers the safetensors library cannot open: stored as received, they must open.
        (ok, _raw_model({"w": {**W, "shape": ["4", 3]}, "b": B}), 400, "bad_model"),
        (ok, _raw_model({"w": {**W, "data_offsets": [0, 48.0]}, "b": B}), 400, "bad_model"),
        (ok, _raw_model({"__metadata__": 123, "w": W, "b": B}), 400, "bad_model"),
        ({**ok, "agent_id": "nobody"}, _model(), 404, "unknown_agent"),
        ({**ok, "protocol": 2}, _model(), 400, "unsupported_protocol"),
        ({**ok, "round": 7}, _model(), 409, "round_not_open"),
        ({**ok, "num_samples": -3}, _model(), 422, "invalid_message"),
        ({**ok, "metrics": {"loss": "high"}}, _model(), 422, "invalid_message"),
    ]
    for message, body, status, code in cases:
        response = _upload(server, message, body)
        assert response.status_code == status, (code, response.text)
        payload = response.json()
        assert payload["error"] == code, payload
        assert len(payload["detail"]) > 10
        assert _snapshot(server) == before, f"{code} changed the store"
    missing = httpx.post(server.url + "/v1/updates", content=_model(), timeout=30)
    assert missing.status_code == 400 and missing.json()["error"] == "missing_message"
    assert server.status()["uploads"] == 0


def test_round_closed_and_duplicate(server: Server) -> None:
    client = AggregatorClient(server.url)
    a = client.register("site-a", GOOD).agent_id
    b = client.register("site-b").agent_id
    assert client.register("site-a").agent_id == a  # same name, same id
    client.upload(a, 1, _model(), 5)
    with pytest.raises(Refused) as info:
        client.upload(a, 1, _model(), 5)
    assert info.value.code == "duplicate_upload"
    client.upload(b, 1, _model(), 5)
    server.wait_for(lambda s: s["round"] == 2)
    with pytest.raises(Refused) as info:
        client.upload(a, 1, _model(), 5)
    assert info.value.code == "round_closed" and "round 1 is closed" in str(info.value)


def test_registration_checks(server: Server) -> None:
    client = AggregatorClient(server.url)
    with pytest.raises(Refused) as info:
        client.register("site-a")  # the first agent must fix the model
    assert info.value.code == "initial_model_required"
    client.register("site-a", GOOD)
    with pytest.raises(Refused) as info:
        client.register("site-b", {"w": np.ones((2, 2), np.float32)})
    assert info.value.code == "wrong_names"
    assert _snapshot(server)[1] == 1
    with pytest.raises(Refused) as info:
        client.report("nobody", 0, {"accuracy": 1.0})
    assert info.value.code == "unknown_agent"


def test_push_refuses_unknown_agent(server: Server) -> None:
    from websockets.exceptions import InvalidStatus, WebSocketException
    from websockets.sync.client import connect

    ws_url = server.url.replace("http://", "ws://") + "/v1/ws?agent_id=nobody"
    with pytest.raises((InvalidStatus, WebSocketException)), connect(ws_url) as ws:
        ws.recv(timeout=5)


def test_push_connections_are_not_compressed(server: Server) -> None:
    # A client that offers permessage-deflate (websockets does by default) gets none: push
    # messages are a few dozen bytes, and each compressed connection holds zlib state.
    from websockets.sync.client import connect

    agent_id = AggregatorClient(server.url).register("site-a", GOOD).agent_id
    ws_url = server.url.replace("http://", "ws://") + f"/v1/ws?agent_id={agent_id}"
    with connect(ws_url) as ws:
        assert "permessage-deflate" in (ws.request.headers.get("Sec-WebSocket-Extensions") or "")
        assert ws.response.headers.get("Sec-WebSocket-Extensions") is None


def test_a_model_header_longer_than_the_model_needs_is_refused_unread(make_server: Any) -> None:
    # Parsing a header's JSON costs up to 25 times its size in memory, under the GIL: the first
    # model's header may be 1 MiB, later ones twice as long as the registered model's needs
    # plus 64 KiB of __metadata__. Longer ones are refused before they are parsed.
    server: Server = make_server(min_agents=2)
    name = {"protocol": 1, "agent_name": "site-a"}
    metadata = {"x": "y" * codec.MAX_RECEIVED_HEADER}
    first = _post(
        server, "/v1/register", name, _raw_model({"__metadata__": metadata, "w": W, "b": B})
    )
    assert first.status_code == 400, first.text
    assert first.json()["error"] == "bad_model" and "at most 1048576" in first.json()["detail"]
    assert server.status()["registered_agents"] == 0
    agent_id = AggregatorClient(server.url).register("site-a", GOOD).agent_id
    message = {"protocol": 1, "agent_id": agent_id, "round": 1, "num_samples": 1}
    before = _snapshot(server)
    long = _raw_model({"__metadata__": {"x": "y" * 200_000}, "w": W, "b": B})
    refused = _post(server, "/v1/updates", message, long)
    assert refused.status_code == 400 and "at most" in refused.json()["detail"], refused.text
    assert _snapshot(server) == before
    # What the safetensors library writes, with the metadata PyTorch adds, is taken.
    taken = _post(server, "/v1/updates", message, st.save(GOOD, metadata={"format": "pt"}))
    assert taken.status_code == 200, taken.text


@pytest.mark.parametrize("wait", ["nan", "NaN", "inf", "-inf", "-5", "1e400"])
def test_a_long_poll_wait_that_is_not_a_duration_is_refused(server: Server, wait: str) -> None:
    AggregatorClient(server.url).register("site-a", GOOD)
    response = server.get("/v1/models/global/latest", params={"after": 5, "wait": wait})
    assert response.status_code == 400, response.text  # nan was a 500
    assert response.json()["error"] == "bad_request" and "'wait'" in response.json()["detail"]
