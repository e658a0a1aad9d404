"""A full federated run on PostgreSQL: a real aggregator process and three real agent processes."""

from __future__ import annotations

import subprocess

import pytest
from checks import assert_globals_are_weighted_means
from harness import Server, start_agent

from fedloop.protocol import codec

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
