"""A full federated run on PostgreSQL: a real aggregator process and three real agent processes."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
from checks import assert_globals_are_weighted_means
from harness import Server, start_agent

from fedloop.agent.client import AggregatorClient
from fedloop.protocol import codec
from fedloop.store.db import Store

pytestmark = pytest.mark.postgres


def test_three_agents_three_rounds_on_postgres(
    pg_url: str, make_server: object, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(rounds=3, min_agents=3, database_url=pg_url)  # type: ignore[operator]
    for i, (offset, samples) in enumerate([(1.0, 10), (2.0, 20), (4.0, 70)]):
        agents.append(
            start_agent(
                server,
                f"a{i}",
                "engines:ShiftEngine",
                "--set",
                f"offset={offset}",
                "--set",
                f"samples={samples}",
            )
        )
    server.wait_for(lambda s: s["finished"], timeout=90)
    for process in agents:
        assert process.wait(timeout=30) == 0
    # Nothing went to a SQLite file: the rows are in PostgreSQL, the blobs in data_dir.
    assert not (server.data_dir / "fedloop.db").exists()
    assert_globals_are_weighted_means(server.data_dir, 3, url=pg_url)
    # Each round adds the weighted mean offset 0.1·1 + 0.2·2 + 0.7·4 = 3.3 to zeros.
    model = codec.decode(server.get("/v1/models/global/3").content)
    assert abs(float(model["w"].mean()) - 9.9) < 1e-4
    history = server.get("/v1/history").json()["rounds"]
    assert [r["agents"] for r in history] == [0, 3, 3, 3]
    assert [r["samples"] for r in history] == [0, 100, 100, 100]


def test_raised_rounds_and_uploads_not_kept_after_a_kill_on_postgres(
    pg_url: str, make_server: object
) -> None:
    """Start-up recovery on PostgreSQL: a finished run whose `rounds` was raised opens the next
    round's row, and a kill's uploads whose bytes were not kept are dropped, rows included, so
    the agent's re-send is accepted (docs/faults.md)."""
    server: Server = make_server(rounds=1, keep_local_models=False, database_url=pg_url)  # type: ignore[operator]
    zeros = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}

    def model(value: float) -> bytes:
        return codec.encode({k: v + value for k, v in zeros.items()})

    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", zeros).agent_id for i in range(2)]
    client.upload(ids[0], 1, model(1.0), 10)
    client.upload(ids[1], 1, model(2.0), 10)
    server.wait_for(lambda s: s["finished"])
    client.close()
    server.settings["rounds"] = 2
    server.restart()
    client = AggregatorClient(server.url)
    client.upload(ids[0], 2, model(1.0), 10)
    client.close()
    server.kill()
    server.start()
    assert server.status()["uploads"] == 0  # not kept: dropped
    client = AggregatorClient(server.url)
    assert client.upload(ids[0], 2, model(1.0), 10).accepted
    client.upload(ids[1], 2, model(3.0), 30)
    server.wait_for(lambda s: s["finished"])
    np.testing.assert_allclose(client.global_model(2)["w"], (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
    client.close()
    store = Store(pg_url)
    try:
        assert [(m.agent_id, m.round) for m in store.local_models(2)] == [(ids[0], 2), (ids[1], 2)]
        second = store.round(2)
        assert second is not None and second.closed_at is not None
    finally:
        store.close()
