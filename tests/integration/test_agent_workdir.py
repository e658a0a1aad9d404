"""An agent's working directory from another run, and answers lost on the way back."""

from __future__ import annotations

import json
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from engines import ShiftEngine, initial
from harness import Server, start_agent

from fedloop.agent import Agent
from fedloop.agent.client import AggregatorClient, Refused
from fedloop.agent.imperative import Client
from fedloop.protocol import codec


def _finished_run(make_server: Any, agents: list[subprocess.Popen[bytes]], **settings: Any) -> Path:
    """Run `a0` to the end of a 2-round run; return its working directory."""
    server: Server = make_server(min_agents=1, rounds=2, **settings)
    agents.append(start_agent(server, "a0"))
    assert agents[-1].wait(timeout=60) == 0
    state = json.loads((server.root / "a0" / "state.json").read_text())
    assert (state["finished"], state["global_round"]) == (True, 2)
    return server.root / "a0"


def _new_run(tmp_path: Path, old_workdir: Path, **settings: Any) -> Server:
    """A second aggregator on a database of its own, with a copy of a0's old directory."""
    server = Server(tmp_path / "run2", settings)
    server.start()
    shutil.copytree(old_workdir, server.root / "a0")
    return server


def test_a_directory_from_another_run_starts_over_as_the_first_agent(
    make_server: Any, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    old = _finished_run(make_server, agents)
    server = _new_run(tmp_path, old, min_agents=1, rounds=2)
    try:
        # The aggregator has no model: the agent, which had registered before, sends its own.
        agent = start_agent(server, "a0")
        assert agent.wait(timeout=60) == 0, (server.root / "a0.log").read_text()
        assert server.status()["finished"]
        log = (server.root / "a0.log").read_text()
        assert "a new run; sending the initial model" in log, log
        assert "agent a0 done: 2 rounds trained" in log, log
    finally:
        server.stop()


def test_a_finished_directory_from_another_run_trains_in_the_new_one(
    make_server: Any, agents: list[subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    old = _finished_run(make_server, agents)
    server = _new_run(tmp_path, old, min_agents=2, rounds=2)
    try:
        # b0 registers first and gives the run its model; a0's old state says "finished".
        agents.append(start_agent(server, "b0"))
        server.wait_for(lambda s: s["registered_agents"] == 1, timeout=30)
        agents.append(start_agent(server, "a0"))
        server.wait_for(lambda s: s["finished"], timeout=60)
        for process in agents[-2:]:
            assert process.wait(timeout=30) == 0
        log = (server.root / "a0.log").read_text()
        assert "is from another run of the aggregator" in log, log
        assert "agent a0 done: 2 rounds trained" in log, log
    finally:
        server.stop()


def test_an_upload_whose_answer_was_lost_counts_as_sent(make_server: Any, tmp_path: Path) -> None:
    # min_agents=2 keeps round 1 open; the upload made here stands for an agent's first
    # attempt, stored by the aggregator, whose answer never reached the agent.
    server: Server = make_server(min_agents=2, rounds=3)
    raw = AggregatorClient(server.url)
    agent_id = raw.register("a0", initial()).agent_id
    raw.upload(agent_id, 1, codec.encode(initial()), 10)

    agent = Agent(ShiftEngine(), server.url, "a0", tmp_path / "a0", max_rounds=1)
    thread = threading.Thread(target=agent.run, daemon=True)
    thread.start()
    thread.join(timeout=30)
    if thread.is_alive():  # before the fix: dropped as overtaken, then waiting for round 1
        agent.stop()
        thread.join(timeout=30)
        pytest.fail("the agent did not count its round-1 model as sent")
    assert agent.state.rounds_trained == 1

    book = Client(server.url, "a0")
    book.send_initial_model(initial())
    assert book.wait_for_global_model(timeout=10) is not None  # global model 0
    weights = {k: np.ones_like(v) for k, v in initial().items()}
    assert book.send_trained_model(weights, 10) is True
    # A second call for a round this client saw accepted is the caller's mistake.
    with pytest.raises(Refused) as refused:
        book.send_trained_model(weights, 10)
    assert refused.value.code == "duplicate_upload"
    book.close()
    raw.close()
