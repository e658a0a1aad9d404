"""The agent saves its local model while it uploads it (once the upload has taken
`keep_local_after`), and `sending` only once the model is on disk: a restart then resumes the
upload from the file. An upload answered sooner leaves nothing to write."""

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


def _agent(
    tmp_path: Path, directory: StateDir, keep_local_after: float = 0.0
) -> tuple[Agent, HeldUpload]:
    agent = Agent(
        Doubling(), "http://127.0.0.1:9", "a", tmp_path / "a", keep_local_after=keep_local_after
    )
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


def test_an_upload_answered_quickly_leaves_no_local_model_to_write(tmp_path: Path) -> None:
    directory = StateDir(tmp_path / "a")
    agent, client = _agent(tmp_path, directory, keep_local_after=5.0)
    client.release.set()
    agent._train()
    started = time.monotonic()
    agent._send()
    assert time.monotonic() - started < 2.0  # did not wait for keep_local_after
    state = directory.load("a")
    assert state.phase == Phase.WAITING_GM and state.rounds_trained == 1
    assert not directory.local_file.exists() and directory.load_local() is None
    assert client.body == codec.encode({k: v * 2 for k, v in WEIGHTS.items()})


def test_a_slow_upload_gets_its_local_model_on_disk_while_in_flight(tmp_path: Path) -> None:
    directory = StateDir(tmp_path / "a")
    agent, client = _agent(tmp_path, directory, keep_local_after=0.2)
    agent._train()
    sender = threading.Thread(target=agent._send)
    sender.start()
    assert client.started.wait(10)
    _wait_for(lambda: directory.load("a").phase == Phase.SENDING)
    pending = directory.load_local()
    assert pending is not None and pending[0] == client.body
    client.release.set()
    sender.join(10)
    assert directory.load("a").phase == Phase.WAITING_GM and directory.load_local() is None


class Unreachable(HeldUpload):
    def upload(self, *args: Any, **kwargs: Any) -> UploadResponse:
        raise ConnectionError("aggregator unreachable")


def test_an_upload_that_fails_keeps_the_local_model_for_a_restart(tmp_path: Path) -> None:
    directory = StateDir(tmp_path / "a")
    agent, _ = _agent(tmp_path, directory, keep_local_after=0.1)
    agent.client = Unreachable()  # type: ignore[assignment]
    agent._train()
    with pytest.raises(ConnectionError):
        agent._send()
    agent._saved()  # what run() does on its way out: the save thread finishes
    assert directory.load("a").phase == Phase.SENDING
    pending = directory.load_local()
    assert pending is not None and pending[1]["round"] == 5
