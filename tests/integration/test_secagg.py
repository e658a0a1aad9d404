"""Secure aggregation over HTTP: real aggregator and agent processes, masked uploads only."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from harness import Server, start_agent

from fedloop.agent.client import AggregatorClient
from fedloop.protocol import codec
from fedloop.protocol.messages import UploadRequest
from fedloop.protocol.version import MESSAGE_HEADER
from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store, database_url

pytest.importorskip("cryptography")

# Fixed point with frac_bits = 24: each of n agents adds at most 2^-25 to a sum of n·x, so the
# mean is off by at most n · 2^-25 / Σn; float32 rounding of the result dominates.
TOLERANCE = 1e-5
AGENTS = [(1.0, 10), (2.0, 20), (3.0, 30), (4.0, 40)]  # (offset, num_samples)


def secagg_server(make_server: object, rounds: int, **secagg: object) -> Server:
    server: Server = make_server(  # type: ignore[operator]
        rounds=rounds,
        min_agents=len(AGENTS),
        secagg={"enabled": True, **secagg},
    )
    return server


def start(
    server: Server,
    agents: list[subprocess.Popen[bytes]],
    gate: Path,
    drop: dict[str, str] | None = None,
) -> None:
    for i, (offset, samples) in enumerate(AGENTS):
        name = f"s{i}"
        agents.append(
            start_agent(
                server,
                name,
                "engines:GatedShiftEngine",
                "--set",
                f"gate={gate}",
                "--set",
                f"offset={offset}",
                "--set",
                f"samples={samples}",
                extra_env=(
                    {"FEDLOOP_TEST_SECAGG_EXIT": drop[name]} if drop and name in drop else None
                ),
            )
        )


def globals_and_store(server: Server) -> tuple[dict[int, dict[str, np.ndarray]], list[Any]]:
    store = Store(database_url(server.data_dir, None))
    blobs = BlobStore(server.data_dir / "blobs")
    try:
        rows = store.global_models()
        models = {g.round: codec.decode(blobs.get(g.model_id)) for g in rows}
        assert store.local_models() == [], "a local model was stored"
        # Only global models in the blob store: no individual update was ever written.
        assert blobs.keys() == {g.model_id for g in rows}
        return models, list(rows)
    finally:
        store.close()


def fedavg_of_shifts(previous: dict[str, np.ndarray], members: list[int]) -> dict[str, np.ndarray]:
    """Return plain FedAvg of ShiftEngine's local models trained on `previous`."""
    from fedloop.strategies import Update
    from fedloop.strategies.fedavg import fedavg

    updates = []
    for i in members:
        offset, samples = AGENTS[i]
        local = {k: (v + offset).astype(v.dtype) for k, v in previous.items()}
        updates.append(Update(local, samples, f"s{i}", 0))
    return fedavg(updates)


def test_four_agents_two_secure_rounds(
    make_server: object, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    server = secagg_server(make_server, rounds=2)
    gate = tmp_path / "gate"
    start(server, agents, gate)
    server.wait_for(lambda s: s["registered_agents"] == len(AGENTS), timeout=60)
    gate.touch()
    server.wait_for(lambda s: s["finished"], timeout=120)
    for process in agents:
        assert process.wait(timeout=30) == 0
    models, rows = globals_and_store(server)
    assert sorted(models) == [0, 1, 2]
    for r in (1, 2):
        expected = fedavg_of_shifts(models[r - 1], [0, 1, 2, 3])
        for name, tensor in expected.items():
            np.testing.assert_allclose(models[r][name], tensor, atol=TOLERANCE)
        assert len(set(rows[r].contributors)) == len(AGENTS)
        assert rows[r].total_samples == 100
    # Each round adds the weighted mean offset (10·1 + 20·2 + 30·3 + 40·4) / 100 = 3.
    assert abs(float(models[2]["w"].mean()) - 6.0) < TOLERANCE
    log = server.log()
    assert "secure sum of 4 masked inputs" in log, log[-3000:]
    history = server.get("/v1/history").json()["rounds"]
    assert [r["agents"] for r in history] == [0, 4, 4]
    assert [r["samples"] for r in history] == [0, 100, 100]


def test_plain_upload_refused(make_server: object, agents: list[subprocess.Popen[bytes]]) -> None:
    server = secagg_server(make_server, rounds=1)
    weights = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    registered = AggregatorClient(server.url).register("plain", weights)
    assert registered.secure_aggregation
    upload = httpx.post(
        server.url + "/v1/updates",
        content=codec.encode(weights),
        headers={
            MESSAGE_HEADER: UploadRequest(
                agent_id=registered.agent_id, round=1, num_samples=1
            ).model_dump_json()
        },
        timeout=30,
    )
    assert upload.status_code == 409, upload.text
    assert upload.json()["error"] == "secagg_required"
    store = Store(database_url(server.data_dir, None))
    try:
        assert store.local_models() == []
    finally:
        store.close()


def test_agents_that_upload_in_the_clear_stop_with_a_clear_error(make_server: object) -> None:
    # AsyncAgent and the imperative Client do not speak secure aggregation: told so at
    # registration, they stop with a sentence instead of being refused every round.
    import asyncio

    from fedloop.agent.aio import AsyncAgent
    from fedloop.agent.imperative import Client
    from fedloop.errors import FedloopError

    server = secagg_server(make_server, rounds=1)
    weights = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    with pytest.raises(FedloopError, match="does not speak"):
        Client(server.url, "imperative").send_initial_model(weights)

    class Same:
        def train(self, w: Any, config: Any) -> Any:
            return w, 1, {}

    agent = AsyncAgent(Same(), server.url, "aio", initial_weights=weights, give_up_after=10)
    with pytest.raises(FedloopError, match="AsyncAgent does not speak"):
        asyncio.run(agent.run())


def test_agent_dies_after_sharing_keys(
    make_server: object, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    server = secagg_server(make_server, rounds=1, phase_timeout=3.0)
    gate = tmp_path / "gate"
    start(server, agents, gate, drop={"s3": "after_shares"})
    server.wait_for(lambda s: s["registered_agents"] == len(AGENTS), timeout=60)
    gate.touch()
    server.wait_for(lambda s: s["finished"], timeout=120)
    assert agents[3].wait(timeout=30) == 17  # the test hook's exit status
    for process in agents[:3]:
        assert process.wait(timeout=30) == 0
    models, rows = globals_and_store(server)
    expected = fedavg_of_shifts(models[0], [0, 1, 2])
    for name, tensor in expected.items():
        np.testing.assert_allclose(models[1][name], tensor, atol=TOLERANCE)
    assert len(rows[1].contributors) == 3
    assert rows[1].total_samples == 60
    assert "secure sum of 3 masked inputs (4 in the cohort)" in server.log()


def test_aggregator_restart_in_the_key_phase(
    make_server: object, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    """Agents waiting in an attempt of a killed aggregator start over with the new process."""
    server = secagg_server(make_server, rounds=1)
    gate = tmp_path / "gate"
    start(server, agents, gate)
    server.wait_for(lambda s: s["registered_agents"] == len(AGENTS), timeout=60)
    waiting = agents.pop()  # three advertise and wait for the fourth (min_agents = 4)
    waiting.kill()
    waiting.wait(timeout=10)
    gate.touch()
    deadline = time.monotonic() + 60
    while not all(
        "joined secure aggregation" in (server.root / f"s{i}.log").read_text() for i in range(3)
    ):
        assert time.monotonic() < deadline, server.log()[-3000:]
        time.sleep(0.1)
    server.kill()
    server.start()
    offset, samples = AGENTS[3]
    agents.append(
        start_agent(
            server,
            "s3",
            "engines:ShiftEngine",
            "--set",
            f"offset={offset}",
            "--set",
            f"samples={samples}",
        )
    )
    server.wait_for(lambda s: s["finished"], timeout=120)
    for process in agents:
        assert process.wait(timeout=30) == 0
    models, rows = globals_and_store(server)
    expected = fedavg_of_shifts(models[0], [0, 1, 2, 3])
    for name, tensor in expected.items():
        np.testing.assert_allclose(models[1][name], tensor, atol=TOLERANCE)
    assert len(rows[1].contributors) == 4


def test_bad_secagg_requests_are_refused_with_4xx(
    make_server: object, agents: list[subprocess.Popen[bytes]]
) -> None:
    server = secagg_server(make_server, rounds=1)
    weights = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    agent_id = AggregatorClient(server.url).register("probe", weights).agent_id
    key = "A" * 43 + "="  # 32 bytes of base64
    base = server.url + "/v1/secagg"

    def message(**fields: Any) -> dict[str, Any]:
        return {"json": {"protocol": 1, "agent_id": agent_id, **fields}}

    header = {MESSAGE_HEADER: f'{{"protocol":1,"agent_id":"{agent_id}","attempt":0}}'}
    cases: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/1/keys", {"content": b"not json"}),
        ("POST", "/1/keys", message(agent_id="nobody", c_pk=key, s_pk=key)),
        ("POST", "/1/keys", message(c_pk="AAAA", s_pk=key)),
        ("POST", "/1/keys", message(c_pk="!!", s_pk=key)),
        ("POST", "/7/keys", message(c_pk=key, s_pk=key)),
        ("POST", "/1/shares", message(attempt=0, ciphertexts={"0": key})),
        ("POST", "/1/shares", message(attempt=0, ciphertexts={})),
        ("POST", "/1/masked", {"content": b"\x00" * 8}),
        ("POST", "/1/masked", {"content": b"\x00" * 8, "headers": header}),
        ("POST", "/1/unmask", message(attempt=0, b_shares={}, sk_shares={})),
        ("GET", "/1/keys", {"params": {"agent_id": agent_id, "attempt": "x"}}),
        ("GET", "/1/keys", {"params": {"agent_id": agent_id, "wait": "nan"}}),
        ("GET", "/1/shares", {"params": {"agent_id": agent_id, "attempt": 5}}),
        ("GET", "/1/masked", {"params": {}}),
        ("GET", "/0/unmask", {"params": {"agent_id": agent_id}}),
        ("GET", "/99999999999999999999/keys", {"params": {"agent_id": agent_id}}),
    ]
    for method, path, kwargs in cases:
        response = httpx.request(method, base + path, timeout=30, **kwargs)
        assert 400 <= response.status_code < 500, (method, path, response.text)
        assert "error" in response.json(), response.text
    assert "Traceback" not in server.log()
