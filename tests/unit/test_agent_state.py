"""The agent's persisted state machine."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from fedloop.agent.state import AgentState, Phase, StateDir
from fedloop.protocol import codec


def test_state_survives_a_restart(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    assert directory.load("a") == AgentState(name="a")
    state = AgentState(
        name="a", agent_id="id1", phase=Phase.TRAINING, global_round=3, config={"mu": 0.1}
    )
    directory.save(state)
    directory.save_global(codec.encode({"w": np.ones(2, np.float32)}))
    assert StateDir(tmp_path).load("a") == state
    np.testing.assert_array_equal(StateDir(tmp_path).load_global()["w"], np.ones(2))


def test_pending_local_model_needs_its_metadata(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    assert directory.load_local() is None
    directory.local_file.write_bytes(b"partial")  # killed before the metadata was written
    assert directory.load_local() is None
    directory.save_local(b"model", {"round": 2})
    assert directory.load_local() == (b"model", {"round": 2})
    directory.clear_local()
    assert directory.load_local() is None


def test_another_agents_directory_is_not_reused(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    directory.save(AgentState(name="a", agent_id="id1"))
    assert directory.load("b").agent_id is None
