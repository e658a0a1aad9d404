"""The agent's persisted state machine."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from fedloop.agent import state as state_module
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


def test_phase_changes_and_local_models_are_written_over_the_same_files(tmp_path: Path) -> None:
    # No new file, rename or unlink per round: the same inodes are written in place.
    directory = StateDir(tmp_path)
    state = AgentState(name="a", agent_id="id1", config={"lr": 0.1, "note": "x" * 40})
    directory.save(state)
    inode = directory.state_file.stat().st_ino
    directory.save_local(codec.encode({"w": np.ones(8, np.float32)}), {"round": 1})
    local = (directory.local_file.stat().st_ino, directory.local_meta.stat().st_ino)
    for round_number, size in [(2, 3), (3, 16), (4, 1)]:
        state.phase, state.config = Phase.TRAINING, {}  # shorter: padded with spaces
        directory.save(state, durable=round_number == 3)
        assert directory.load("a") == state
        model = codec.encode({"w": np.full(size, round_number, np.float32)})
        directory.save_local(codec.encode_parts(codec.decode(model)), {"round": round_number})
        assert directory.load_local() == (model, {"round": round_number})  # shorter: truncated
        state.phase = Phase.WAITING_GM
        directory.save(state)
        directory.clear_local()
        assert directory.load_local() is None
    assert directory.state_file.stat().st_ino == inode
    assert (directory.local_file.stat().st_ino, directory.local_meta.stat().st_ino) == local


def test_a_state_larger_than_a_page_is_still_saved_whole(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    state = AgentState(name="a", agent_id="id1")
    directory.save(state)
    state.config = {"text": "y" * 10_000}  # past one page: replaced by a rename instead
    directory.save(state)
    assert directory.load("a") == state
    state.config = {}
    directory.save(state)
    assert directory.load("a") == state


def test_a_local_model_being_written_over_has_no_metadata(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Killed while a later round's model is written over the file: the metadata of the round
    # before was cleared first, so nothing is uploaded from a half-written file.
    directory = StateDir(tmp_path)
    directory.save_local(b"round one", {"round": 1})

    def killed(fd: int, data: object) -> int:
        os.pwrite(fd, b"round tw", 0)
        raise SystemExit("killed")

    monkeypatch.setattr(state_module, "_write_parts", killed)
    with pytest.raises(SystemExit):
        directory.save_local(b"round two", {"round": 2})
    assert directory.local_file.read_bytes() == b"round twe"  # half new, half old
    assert directory.load_local() is None
    monkeypatch.undo()
    directory.save_local(b"round two", {"round": 2})
    assert directory.load_local() == (b"round two", {"round": 2})
    directory.local_meta.write_text("{")  # damaged by a power cut
    assert directory.load_local() is None
