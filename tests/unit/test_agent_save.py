"""The agent saves its local model while it uploads it, and `sending` only once the model is
on disk: a restart then resumes the upload from the file."""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.agent.client import ModelBody, body_parts
from fedloop.agent.runner import Agent
from fedloop.agent.state import Phase, StateDir
from fedloop.protocol import codec
from fedloop.protocol.messages import UploadResponse
from fedloop.types import Weights

WEIGHTS = {"w": np.arange(1000, dtype=np.float32), "b": np.ones(3, dtype=np.float32)}


class Doubling:
    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        return {k: np.asarray(v) * 2 for k, v in weights.items()}, 7, {"loss": 0.5}


class HeldUpload:
    """An aggregator client whose upload waits until the test lets it answer."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()
        self.body = b""

    def upload(
        self,
        agent_id: str,
        round_number: int,
        data: ModelBody,
        num_samples: int,
        metrics: Mapping[str, float] | None = None,
    ) -> UploadResponse:
        self.body = b"".join(bytes(p) for p in body_parts(data))
        self.started.set()
        assert self.release.wait(10)
        return UploadResponse(accepted=True, round=round_number, uploads=1, needed=2)

    def close(self) -> None:
        pass


class HeldSave(StateDir):
    """A state directory whose local model is written only when the test says so."""

    def __init__(self, path: Path, error: Exception | None = None) -> None:
        super().__init__(path)
        self.release, self.error = threading.Event(), error

    def save_local(self, data: ModelBody, meta: dict[str, Any]) -> None:
        assert self.release.wait(10)
        if self.error is not None:
            raise self.error
        super().save_local(data, meta)


def _agent(tmp_path: Path, directory: StateDir) -> tuple[Agent, HeldUpload]:
    agent = Agent(Doubling(), "http://127.0.0.1:9", "a", tmp_path / "a")
    agent.dir = directory
    client = HeldUpload()
    agent.client = client  # type: ignore[assignment]
    agent.state.agent_id, agent.state.global_round = "id-a", 4
    agent.state.phase = Phase.GM_READY
    agent._global_bytes = (4, codec.encode(WEIGHTS))
    return agent, client


def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_upload_starts_before_the_local_model_is_saved_and_sending_waits_for_it(
    tmp_path: Path,
) -> None:
    directory = HeldSave(tmp_path / "a")
    agent, client = _agent(tmp_path, directory)
    agent._train()
    sender = threading.Thread(target=agent._send)
    sender.start()
    assert client.started.wait(10)  # uploading while the save is held
    on_disk = StateDir(tmp_path / "a")
    assert on_disk.load("a").phase == Phase.TRAINING and on_disk.load_local() is None
    directory.release.set()
    # The model and then `sending` reach the disk while the upload is still in flight.
    _wait_for(lambda: on_disk.load("a").phase == Phase.SENDING)
    pending = on_disk.load_local()
    assert pending is not None
    assert pending[0] == client.body
    assert pending[1] == {"round": 5, "num_samples": 7, "metrics": {"loss": 0.5}}
    np.testing.assert_array_equal(codec.decode(pending[0])["w"], WEIGHTS["w"] * 2)
    client.release.set()
    sender.join(10)
    state = on_disk.load("a")
    assert state.phase == Phase.WAITING_GM and state.rounds_trained == 1
    assert on_disk.load_local() is None


def test_a_local_model_that_cannot_be_saved_stops_the_agent_after_its_upload(
    tmp_path: Path,
) -> None:
    directory = HeldSave(tmp_path / "a", error=OSError(28, "No space left on device"))
    agent, client = _agent(tmp_path, directory)
    agent._train()
    client.release.set()
    directory.release.set()
    with pytest.raises(OSError, match="No space left"):
        agent._send()
    assert StateDir(tmp_path / "a").load("a").phase == Phase.TRAINING  # trains again
