"""LocalKeeper: the local model of an upload still unanswered after `after` seconds is written by
a watcher thread, when due; an upload answered sooner is never written, and costs the watcher
nothing."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

import pytest

from fedloop.agent.client import ModelBody
from fedloop.agent.keeper import LocalKeeper
from fedloop.agent.state import AgentState, Phase, StateDir


class Saves:
    """Records each write (with the time it began); can hold a write or make it fail."""

    def __init__(self, error: Exception | None = None) -> None:
        self.writes: list[tuple[float, bytes, dict[str, Any], AgentState]] = []
        self.threads: set[str] = set()
        self.release = threading.Event()
        self.release.set()
        self.error = error

    def __call__(self, data: ModelBody, meta: dict[str, Any], state: AgentState) -> None:
        started = time.monotonic()
        self.threads.add(threading.current_thread().name)
        assert self.release.wait(10)
        if self.error is not None:
            raise self.error
        self.writes.append((started, bytes(data), meta, state))  # type: ignore[arg-type]


def _state(round_number: int) -> AgentState:
    return AgentState(name="a", phase=Phase.SENDING, global_round=round_number)


def _watchers() -> int:
    return sum(t.name == "fedloop-agent-save" for t in threading.enumerate())


def test_uploads_answered_in_time_are_never_written_and_share_one_watcher() -> None:
    saves = Saves()
    keeper = LocalKeeper(0.5, saves)
    before = _watchers()
    for round_number in range(50):
        keeper.start(b"model", {"round": round_number}, _state(round_number))
        keeper.answered()
        keeper.finish()
    assert _watchers() == before + 1  # started once, not per upload
    time.sleep(0.6)  # past `after`: nothing is waiting any more
    keeper.close()
    assert saves.writes == []
    assert _watchers() == before


def test_a_slow_upload_is_written_by_the_watcher_after_its_delay() -> None:
    saves = Saves()
    keeper = LocalKeeper(0.2, saves)
    started = time.monotonic()
    keeper.start(b"model", {"round": 3}, _state(2))
    deadline = time.monotonic() + 5
    while not saves.writes:
        assert time.monotonic() < deadline, "never written"
        time.sleep(0.01)
    begun, data, meta, state = saves.writes[0]
    assert 0.2 <= begun - started < 0.2 + 0.5  # when due, not a polling period later
    assert (data, meta, state.global_round) == (b"model", {"round": 3}, 2)
    assert saves.threads == {"fedloop-agent-save"}
    keeper.answered()
    keeper.finish()  # written already: nothing more to do, nothing raised
    keeper.close()
    assert len(saves.writes) == 1


def test_with_no_delay_the_model_is_written_at_once_while_the_upload_goes_on() -> None:
    saves = Saves()
    keeper = LocalKeeper(0.0, saves)
    assert keeper.every is None  # woken for each upload, never polling
    for round_number in range(3):
        keeper.start(b"m", {"round": round_number}, _state(round_number))
        deadline = time.monotonic() + 5
        while len(saves.writes) <= round_number:  # the "upload" is still unanswered
            assert time.monotonic() < deadline, "not written at once"
            time.sleep(0.005)
        keeper.answered()
        keeper.finish()
    keeper.close()
    assert [w[2]["round"] for w in saves.writes] == [0, 1, 2]


def test_with_no_delay_an_upload_answered_before_the_watcher_looks_is_still_written() -> None:
    # `--keep-local-after 0` means always: whichever of the watcher and finish() gets there
    # first writes it, exactly once, before finish() returns.
    saves = Saves()
    keeper = LocalKeeper(0.0, saves)
    for round_number in range(50):
        keeper.start(b"m", {"round": round_number}, _state(round_number))
        keeper.answered()  # at once: usually before the watcher has woken
        keeper.finish()
        assert [w[2]["round"] for w in saves.writes] == list(range(round_number + 1))
    keeper.close()


def test_finish_waits_for_a_write_in_progress_and_raises_its_error_once() -> None:
    saves = Saves(error=OSError(28, "No space left on device"))
    saves.release.clear()
    keeper = LocalKeeper(0.0, saves)
    keeper.start(b"m", {"round": 1}, _state(0))
    deadline = time.monotonic() + 5
    while not saves.threads:  # the watcher took it and is held
        assert time.monotonic() < deadline
        time.sleep(0.005)
    keeper.answered()  # too late: the write has begun
    raised: list[BaseException | None] = []

    def finish() -> None:
        try:
            keeper.finish()
            raised.append(None)
        except BaseException as exc:
            raised.append(exc)

    finisher = threading.Thread(target=finish)
    finisher.start()
    finisher.join(0.2)
    assert finisher.is_alive()  # waits for the write
    saves.release.set()
    finisher.join(5)
    assert len(raised) == 1 and isinstance(raised[0], OSError)
    keeper.finish()  # the error was raised once
    keeper.close()


def test_close_writes_an_unanswered_upload_now(tmp_path: Path) -> None:
    # What an agent stopped by an error does on its way out: a restart resumes the upload.
    directory = StateDir(tmp_path / "a")

    def save(data: ModelBody, meta: dict[str, Any], state: AgentState) -> None:
        directory.save_local(data, meta)
        directory.save(state, durable=False)

    keeper = LocalKeeper(30.0, save)
    keeper.start(b"model bytes", {"round": 4, "num_samples": 2, "metrics": {}}, _state(3))
    started = time.monotonic()
    keeper.close()
    assert time.monotonic() - started < 5  # not after the 30 s
    pending = directory.load_local()
    assert pending is not None and bytes(pending[0]) == b"model bytes"
    assert directory.load("a").phase == Phase.SENDING
    with pytest.raises(RuntimeError, match="closed"):
        keeper.start(b"m", {}, _state(4))
