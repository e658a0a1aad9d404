"""Kill -9 the aggregator mid-round, or an agent mid-training: the run resumes and finishes."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np
from checks import assert_globals_are_weighted_means
from harness import Server, start_agent

from fedloop.agent.client import AggregatorClient
from fedloop.protocol import codec

GOOD = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _model(value: float) -> bytes:
    return codec.encode({k: v + value for k, v in GOOD.items()})


def test_aggregator_killed_mid_round_resumes_the_same_round(make_server: Any) -> None:
    server: Server = make_server(min_agents=3, rounds=2)
    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", GOOD).agent_id for i in range(3)]
    client.upload(ids[0], 1, _model(1.0), 10)
    client.upload(ids[1], 1, _model(2.0), 30)
    before = server.status()
    assert (before["round"], before["uploads"], before["registered_agents"]) == (1, 2, 3)

    server.kill()
    client.close()
    server.start()
    client = AggregatorClient(server.url)

    after = server.status()
    assert (after["round"], after["uploads"], after["registered_agents"]) == (1, 2, 3)
    assert [client.register(f"site-{i}").agent_id for i in range(3)] == ids
    client.upload(ids[2], 1, _model(4.0), 60)
    server.wait_for(lambda s: s["round"] == 2)
    expected = (1.0 * 10 + 2.0 * 30 + 4.0 * 60) / 100
    np.testing.assert_allclose(client.global_model(1)["w"], expected, rtol=1e-6)
    np.testing.assert_array_equal(client.global_model(0)["w"], GOOD["w"])


def test_run_with_agent_processes_survives_an_aggregator_kill(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(min_agents=3, rounds=4)
    for i, delay in enumerate([0.1, 0.1, 4.0]):  # the slow one leaves a window mid-round
        agents.append(
            start_agent(
                server,
                f"a{i}",
                "engines:ShiftEngine",
                "--set",
                f"offset={i + 1}",
                "--set",
                f"delay={delay}",
                "--set",
                f"samples={10 * (i + 1)}",
            )
        )
    server.wait_for(lambda s: s["round"] == 2 and s["uploads"] == 2, timeout=60)
    server.kill()
    time.sleep(0.5)
    server.start()
    assert server.status()["round"] == 2 and server.status()["uploads"] == 2
    server.wait_for(lambda s: s["finished"], timeout=90)
    for process in agents:
        assert process.wait(timeout=30) == 0
    assert_globals_are_weighted_means(server.data_dir, 4)


def _has_a_line(path: Path) -> bool:
    return path.exists() and path.read_text().endswith("\n")


def test_agent_killed_mid_training_resumes(
    make_server: Any, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    server: Server = make_server(min_agents=3, rounds=2)
    marker = tmp_path / "slow-agent-training.txt"
    for i in range(2):
        agents.append(
            start_agent(server, f"a{i}", "engines:ShiftEngine", "--set", f"offset={i + 1}")
        )
    slow = start_agent(
        server,
        "slow",
        "engines:ShiftEngine",
        "--set",
        "delay=30",
        extra_env={"FEDLOOP_TEST_TRAINING_MARKER": str(marker)},
    )
    # The engine opens the marker (creating it) before it writes its line: wait for the line,
    # not for the file, or the kill can land between the two and leave the file empty.
    deadline = time.monotonic() + 60
    while not _has_a_line(marker) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _has_a_line(marker), "the slow agent never started training"
    slow.kill()
    slow.wait(timeout=10)
    state = json.loads((server.root / "slow" / "state.json").read_text())
    assert state["phase"] == "training" and state["global_round"] == 0
    server.wait_for(lambda s: s["uploads"] == 2)

    agents.append(start_agent(server, "slow", "engines:ShiftEngine", "--set", "offset=3"))
    server.wait_for(lambda s: s["finished"], timeout=60)
    for process in agents:
        assert process.wait(timeout=30) == 0
    assert server.status()["registered_agents"] == 3  # the restarted agent kept its id
    assert_globals_are_weighted_means(server.data_dir, 2)
    assert marker.read_text().split() == ["1"]  # killed once, in round 1


def _rounds(server: Server, client: AggregatorClient, ids: list[str], rounds: range) -> None:
    """Both agents upload each round; wait for its global model."""
    for r in rounds:
        for i, agent_id in enumerate(ids):
            client.upload(agent_id, r, _model(float(r + i)), 10)
        server.wait_for(lambda s, r=r: s["global_round"] == r)


def test_rounds_raised_after_the_run_finished_opens_the_next_round(make_server: Any) -> None:
    """The operator raises `rounds` of a finished run and restarts: the next round opens then,
    with its row in the store, so its deadline starts then and an upload acknowledged in it
    survives a kill (docs/faults.md, guarantee 5)."""
    server: Server = make_server(rounds=2, round_timeout=600)
    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", GOOD).agent_id for i in range(2)]
    _rounds(server, client, ids, range(1, 3))
    assert server.status()["finished"]
    client.close()

    server.settings["rounds"] = 3
    server.stop()
    restarted = time.time()
    server.start()
    status = server.status()
    assert (status["round"], status["uploads"], status["finished"]) == (3, 0, False)
    # Before the fix the round "started" at 0.0 (1970): its deadline was already past.
    assert 0 < status["deadline_in"] <= 600
    client = AggregatorClient(server.url)
    client.upload(ids[0], 3, _model(1.0), 10)
    server.kill()
    client.close()
    server.start()
    client = AggregatorClient(server.url)
    # Before the fix round 3 had no row: the upload was not reloaded, and its row refused
    # the agent's re-send as a duplicate, so the round never closed.
    assert server.status()["uploads"] == 1
    client.upload(ids[1], 3, _model(3.0), 30)
    server.wait_for(lambda s: s["finished"])
    np.testing.assert_allclose(client.global_model(3)["w"], (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
    client.close()
    assert_globals_are_weighted_means(server.data_dir, 3)
    (third,) = [h for h in server.history() if h["round"] == 3]
    assert third["agents"] == 2
    assert 0 <= third["seconds"] <= time.time() - restarted  # not seconds since 1970


def test_finished_agents_carry_on_when_rounds_is_raised(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    """Agents that saw the final global model exit; restarted after the operator raised
    `rounds`, they learn from their registration that the run goes on, train on the model they
    hold and finish the longer run (before the fix they exited at once, and the round waited)."""
    server: Server = make_server(rounds=2, min_agents=2)

    def start_both() -> list[subprocess.Popen[bytes]]:
        return [
            start_agent(server, "a0", "engines:ShiftEngine", "--set", "offset=1"),
            start_agent(server, "a1", "engines:ShiftEngine", "--mode", "poll", "--set", "offset=2"),
        ]

    first = start_both()
    agents.extend(first)
    server.wait_for(lambda s: s["finished"], timeout=60)
    for process in first:
        assert process.wait(timeout=30) == 0
    server.settings["rounds"] = 3
    server.restart()
    again = start_both()
    agents.extend(again)
    server.wait_for(lambda s: s["finished"], timeout=60)
    for process in again:
        assert process.wait(timeout=30) == 0
    assert_globals_are_weighted_means(server.data_dir, 3)
    for name in ("a0", "a1"):
        state = json.loads((server.root / name / "state.json").read_text())
        assert (state["global_round"], state["finished"]) == (3, True)
        assert state["rounds_trained"] == 3


def test_uploads_not_kept_are_dropped_at_a_restart_and_can_be_sent_again(
    make_server: Any,
) -> None:
    """keep_local_models = false: a restart cannot count the open round's uploads. They are
    dropped, rows included, so the agent's re-send is accepted and the round closes (before
    the fix the row refused it as a duplicate and the round waited for ever)."""
    server: Server = make_server(keep_local_models=False)
    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", GOOD).agent_id for i in range(2)]
    client.upload(ids[0], 1, _model(1.0), 10)
    server.kill()
    client.close()
    server.start()
    client = AggregatorClient(server.url)
    assert server.status()["uploads"] == 0
    assert f"the local model of {ids[0]} was not kept" in server.log()
    assert client.upload(ids[0], 1, _model(1.0), 10).accepted
    client.upload(ids[1], 1, _model(3.0), 30)
    server.wait_for(lambda s: s["global_round"] == 1)
    np.testing.assert_allclose(client.global_model(1)["w"], (1.0 * 10 + 3.0 * 30) / 40, rtol=1e-6)
    client.close()
    (first,) = [h for h in server.history() if h["round"] == 1]
    assert first["agents"] == 2
