"""Mistakes in a user's ML engine stop its agent with a sentence that says what went wrong."""

from __future__ import annotations

import subprocess
from typing import Any

from harness import Server, start_agent


def _finished(process: subprocess.Popen[bytes], server: Server, name: str) -> str:
    assert process.wait(timeout=60) == 2
    return (server.root / f"{name}.log").read_text()


def test_an_engine_returning_the_wrong_shape_stops_its_agent(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    # The aggregator would refuse the model as wrong_shape, a refusal that otherwise means a
    # local model damaged on disk and is dropped: the agent went on, never contributing.
    server: Server = make_server(min_agents=1, rounds=2)
    agents.append(start_agent(server, "a0", "engines:WrongShapeEngine"))
    log = _finished(agents[-1], server, "a0")
    assert (
        "error: the ML engine's train returned a model that does not match the global model "
        "of round 0: tensor 'w' has shape (5, 3), the registered model has (4, 3)"
    ) in log, log
    assert server.status()["uploads"] == 0


def test_an_engine_that_raises_shows_its_traceback_and_one_sentence(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(min_agents=1, rounds=2)
    agents.append(start_agent(server, "a0", "engines:FailingEngine"))
    log = _finished(agents[-1], server, "a0")
    # The user's traceback (where in their code), then what fedloop makes of it, last.
    assert "RuntimeError: the user's training broke" in log, log
    assert log.rstrip().splitlines()[-1] == (
        "error: the ML engine's train raised RuntimeError in round 1: the user's training broke"
    ), log
