"""An aggregator and three agent processes run rounds; the globals are numpy's weighted means."""

from __future__ import annotations

import subprocess

import pytest
from checks import assert_globals_are_weighted_means
from harness import Server, start_agent


@pytest.mark.parametrize("mode", ["push", "poll"])
def test_three_agents_three_rounds(
    make_server: object, agents: list[subprocess.Popen[bytes]], mode: str
) -> None:
    server: Server = make_server(rounds=3, min_agents=3)  # type: ignore[operator]
    for i, (offset, samples) in enumerate([(1.0, 10), (2.0, 20), (4.0, 70)]):
        agents.append(
            start_agent(
                server,
                f"a{i}",
                "engines:ShiftEngine",
                "--mode",
                mode,
                "--set",
                f"offset={offset}",
                "--set",
                f"samples={samples}",
            )
        )
    server.wait_for(lambda s: s["finished"], timeout=90)
    for process in agents:
        assert process.wait(timeout=30) == 0
    assert_globals_are_weighted_means(server.data_dir, 3)
    # Each round adds the weighted mean offset 0.1·1 + 0.2·2 + 0.7·4 = 3.3 to zeros.
    weights = server.get("/v1/models/global/3")
    from fedloop.protocol import codec

    model = codec.decode(weights.content)
    assert abs(float(model["w"].mean()) - 9.9) < 1e-4
    history = server.get("/v1/history").json()["rounds"]
    assert [r["agents"] for r in history] == [0, 3, 3, 3]
    assert [r["samples"] for r in history] == [0, 100, 100, 100]


def test_overtaken_training_result_is_discarded(
    make_server: object, agents: list[subprocess.Popen[bytes]]
) -> None:
    # One upload closes a round, so the fast agent moves on while the slow one trains.
    server: Server = make_server(rounds=6, aggregation_threshold=0.5)  # type: ignore[operator]
    agents.append(start_agent(server, "fast", "engines:ShiftEngine", "--set", "delay=0.3"))
    server.wait_for(lambda s: s["round"] >= 2)
    agents.append(start_agent(server, "slow", "engines:ShiftEngine", "--set", "delay=1.0"))
    server.wait_for(lambda s: s["finished"], timeout=60)
    for process in agents:
        assert process.wait(timeout=30) == 0
    log = (server.root / "slow.log").read_text()
    assert "discarded" in log, log
    assert_globals_are_weighted_means(server.data_dir, 6)
