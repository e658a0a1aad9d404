"""The CLI agent's client moves models without extra copies: downloads into one buffer sized
from Content-Length, uploads and registrations streamed from views of the tensors."""

from __future__ import annotations

import itertools
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

from fedloop.agent.client import AggregatorClient, Refused, body_size
from fedloop.agent.state import AgentState, Phase, StateDir
from fedloop.errors import ConnectionFailed
from fedloop.protocol import codec
from fedloop.protocol.messages import GlobalModelInfo
from fedloop.protocol.version import MESSAGE_HEADER

WEIGHTS = {"w": np.arange(12, dtype=np.float32).reshape(4, 3), "b": np.ones(3, np.float32)}
INFO = GlobalModelInfo(round=3, config={"mu": 0.5}).model_dump_json()


def _client(handler: Callable[[httpx.Request], httpx.Response]) -> AggregatorClient:
    """A client whose every request, model bodies included, goes to `handler` through httpx
    (the path taken where a proxy applies; tests/unit/test_agent_bulk.py covers the other)."""
    client = AggregatorClient("http://aggregator.test", token="secret")
    client.http.close()
    client.http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(handler))
    client.bulk = None
    return client


def _model_response(body: bytes, length: int | None = None) -> httpx.Response:
    headers = {MESSAGE_HEADER: INFO, "content-length": str(len(body) if length is None else length)}
    return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))


def test_latest_global_is_read_into_one_buffer() -> None:
    body = codec.encode(WEIGHTS)
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return _model_response(body)

    result = _client(handler).latest_global(2, 0.5)
    assert result is not None
    info, data = result
    assert isinstance(data, bytearray) and data == body
    assert (info.round, info.config) == (3, {"mu": 0.5})
    assert seen[0].url.params["after"] == "2" and seen[0].url.params["wait"] == "0.5"
    assert seen[0].headers["authorization"] == "Bearer secret"


def test_not_yet_is_none() -> None:
    assert _client(lambda request: httpx.Response(204)).latest_global(2) is None


def test_global_model_by_round_is_read_only() -> None:
    body = codec.encode(WEIGHTS)
    weights = _client(lambda request: _model_response(body)).global_model(1)
    np.testing.assert_array_equal(weights["w"], WEIGHTS["w"])
    assert not weights["w"].flags.writeable


@pytest.mark.parametrize("length", [10_000, 10])
def test_a_body_of_the_wrong_length_is_retried(length: int) -> None:
    body = codec.encode(WEIGHTS)
    client = _client(lambda request: _model_response(body, length))
    with pytest.raises(ConnectionFailed):
        client.latest_global(2)


def test_errors_while_downloading() -> None:
    refused = _client(
        lambda request: httpx.Response(404, json={"error": "no_model", "detail": "none yet"})
    )
    with pytest.raises(Refused) as info:
        refused.global_model(7)
    assert (info.value.status, info.value.code) == (404, "no_model")
    with pytest.raises(ConnectionFailed):
        _client(lambda request: httpx.Response(503, text="restarting")).latest_global(2)

    def drop(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadError("connection reset")

    with pytest.raises(ConnectionFailed):
        _client(drop).latest_global(2)


def _capture(
    answer: dict[str, object],
) -> tuple[list[tuple[httpx.Headers, bytes]], AggregatorClient]:
    received: list[tuple[httpx.Headers, bytes]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        received.append((request.headers, request.read()))
        return httpx.Response(200, json=answer)

    return received, _client(handler)


def test_upload_streams_the_parts_with_a_content_length() -> None:
    received, client = _capture({"accepted": True, "round": 1, "uploads": 1, "needed": 2})
    parts = codec.encode_parts(WEIGHTS)
    assert body_size(parts) == len(codec.encode(WEIGHTS))
    client.upload("id1", 1, parts, 10, {"loss": 0.5})
    client.upload("id1", 1, codec.encode(WEIGHTS), 10)
    for headers, body in received:
        assert body == codec.encode(WEIGHTS)
        assert headers["content-length"] == str(len(body))
        assert "transfer-encoding" not in headers
    assert json.loads(received[0][0][MESSAGE_HEADER])["metrics"] == {"loss": 0.5}


def test_register_streams_the_initial_model() -> None:
    answer = {"agent_id": "id1", "round": 0, "global_round": 0}
    received, client = _capture(answer)
    assert client.register("a", WEIGHTS).agent_id == "id1"
    assert client.register("a").agent_id == "id1"
    (first, body), (second, empty) = received
    assert body == codec.encode(WEIGHTS) and first["content-length"] == str(len(body))
    assert empty == b"" and second["content-length"] == "0"


def test_local_model_is_saved_from_its_parts(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    directory.save_local(codec.encode_parts(WEIGHTS), {"round": 2})
    assert directory.load_local() == (codec.encode(WEIGHTS), {"round": 2})
    directory.save_global(bytearray(codec.encode(WEIGHTS)))
    np.testing.assert_array_equal(directory.load_global()["b"], WEIGHTS["b"])


def test_unreadable_state_starts_over(tmp_path: Path) -> None:
    directory = StateDir(tmp_path)
    directory.save(AgentState(name="a", agent_id="id1", phase=Phase.SENDING), durable=False)
    assert directory.load("a").phase == Phase.SENDING
    directory.state_file.write_bytes(b"")  # e.g. a phase change lost to a power cut
    assert directory.load("a") == AgentState(name="a")


class _Aggregator:
    """Just enough of an aggregator for one agent: a global model per round, uploads kept."""

    def __init__(self, rounds: int) -> None:
        self.rounds = rounds
        self.uploads: list[tuple[int, bytes]] = []
        self.models = {0: codec.encode(WEIGHTS)}

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        if path == "/v1/register":
            request.read()
            return httpx.Response(200, json={"agent_id": "id1", "round": 1, "global_round": 0})
        if path == "/v1/models/global/latest":
            newest = max(self.models)
            if newest <= int(request.url.params["after"]):
                return httpx.Response(204)
            info = GlobalModelInfo(round=newest, finished=newest == self.rounds)
            body = self.models[newest]
            headers = {MESSAGE_HEADER: info.model_dump_json(), "content-length": str(len(body))}
            return httpx.Response(200, headers=headers, stream=httpx.ByteStream(body))
        if path == "/v1/updates":
            round_number = json.loads(request.headers[MESSAGE_HEADER])["round"]
            body = request.read()
            self.uploads.append((round_number, body))
            shifted = {k: v + 1 for k, v in codec.decode(body).items()}
            self.models[round_number] = codec.encode(shifted)
            answer = {"accepted": True, "round": round_number, "uploads": 1, "needed": 1}
            return httpx.Response(200, json=answer)
        return httpx.Response(404, json={"error": "not_found", "detail": path})


def _run_on_mock(agent: Any, handler: Callable[[httpx.Request], httpx.Response]) -> AgentState:
    """Run an `Agent` (its initial weights WEIGHTS) against `handler` as its aggregator."""
    agent.client.http = httpx.Client(
        base_url=agent.client.url, transport=httpx.MockTransport(handler)
    )
    agent.client.bulk = None
    agent.initial_weights = WEIGHTS
    state: AgentState = agent.run()
    return state


class _KeepEngine:
    """Returns the weights it gets (views of the agent's download buffer), like NoopEngine."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def train(
        self, weights: dict[str, np.ndarray], config: dict[str, object]
    ) -> tuple[dict[str, np.ndarray], int, dict[str, float]]:
        self.seen.append(all(not w.flags.writeable for w in weights.values()))
        return weights, 5, {}


def test_agent_rounds_through_buffers_and_fsyncs_only_its_registration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from fedloop.agent.runner import Agent

    fsyncs: list[int] = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: fsyncs.append(fd) or real_fsync(fd))
    aggregator, engine = _Aggregator(rounds=3), _KeepEngine()
    agent = Agent(engine, "http://aggregator.test", "a", tmp_path, mode="poll", poll_wait=0.0)
    state = _run_on_mock(agent, aggregator)

    assert (state.global_round, state.rounds_trained, state.finished) == (3, 3, True)
    assert [r for r, _ in aggregator.uploads] == [1, 2, 3]
    for (r, body), shift in zip(aggregator.uploads, range(3), strict=True):
        assert body == codec.encode({k: v + shift for k, v in WEIGHTS.items()}), r
    assert engine.seen == [True, True, True]  # read-only views, as over bytes
    assert len(fsyncs) == 1  # the registration; phase changes are not fsynced
    assert agent._global_bytes is not None and agent._global_bytes[0] == 3
    assert StateDir(tmp_path).load("a").phase == Phase.WAITING_GM
    assert StateDir(tmp_path).load_local() is None
    np.testing.assert_array_equal(StateDir(tmp_path).load_global()["b"], WEIGHTS["b"] + 3)


def test_a_push_agent_waits_for_each_global_model_with_a_long_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The request is in flight before the model exists: the aggregator answers it at once,
    instead of announcing over the WebSocket and then being asked."""
    from fedloop.agent import runner

    class _Connected:  # a push connection that is up and never announces anything
        connected, announced, finished = True, -1, False

        def __init__(self, *args: object, **kwargs: object) -> None: ...

        def start(self) -> _Connected:
            return self

        def stop(self) -> None: ...

    monkeypatch.setattr(runner, "PushListener", _Connected)
    waits: list[str] = []
    aggregator = _Aggregator(rounds=2)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/global/latest":
            waits.append(request.url.params["wait"])
        return aggregator(request)

    agent = runner.Agent(_KeepEngine(), "http://aggregator.test", "a", tmp_path, poll_wait=7.0)
    assert agent.mode == "push"
    state = _run_on_mock(agent, handler)
    assert (state.global_round, state.finished) == (2, True)
    assert waits and set(waits) == {"7.0"}, waits


def test_a_push_async_agent_waits_with_a_long_poll_that_names_it() -> None:
    import asyncio

    from fedloop.agent.aio import AsyncAgent, AsyncAgentResult

    aggregator = _Aggregator(rounds=2)
    polls: list[dict[str, str]] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/global/latest":
            polls.append(dict(request.url.params))
        return aggregator(request)

    async def rounds() -> AsyncAgentResult:
        agent = AsyncAgent(_KeepEngine(), "http://aggregator.test", "a", poll_wait=7.0)
        assert agent.mode == "push"
        result = AsyncAgentResult(agent_id="id1")
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=agent.url, transport=transport) as http:
            await agent._rounds(http, result)
        return result

    result = asyncio.run(rounds())
    assert (result.global_round, result.finished, result.rounds_trained) == (2, True, 2)
    assert polls and all(p["wait"] == "7.0" and p["agent_id"] == "id1" for p in polls), polls


def test_async_agent_sends_the_whole_model_again_when_it_retries() -> None:
    import asyncio

    from fedloop.agent.aio import AsyncAgent

    bodies: list[bytes] = []

    def handler(request: httpx.Request) -> httpx.Response:
        bodies.append(request.content)
        if len(bodies) == 1:
            raise httpx.ReadError("connection reset")
        return httpx.Response(200, json={"ok": True})

    async def send() -> None:
        agent = AsyncAgent(_KeepEngine(), "http://aggregator.test", "a")
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=agent.url, transport=transport) as http:
            parts = codec.encode_parts(WEIGHTS)
            headers = {"content-length": str(body_size(parts))}
            await agent._send(http, "POST", "/v1/updates", model=parts, headers=headers)

    asyncio.run(send())
    assert bodies == [codec.encode(WEIGHTS)] * 2


def _answers_not_yet_first(
    aggregator: _Aggregator, times: int, asked: list[float]
) -> Callable[[httpx.Request], httpx.Response]:
    """`aggregator`, except that its first `times` requests for the next global model get
    "not yet" (204) at once, as a `poll_wait` of 0 or a proxy that answers early would;
    `asked` gets the time each of those requests came."""

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/models/global/latest" and len(asked) < times:
            asked.append(time.monotonic())
            return httpx.Response(204)
        return aggregator(request)

    return handler


def _gaps(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


def test_an_agent_that_gets_not_yet_asks_again_after_the_poll_gap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With poll_wait 0 each request comes back at once: without the gap the agent asked as
    fast as the aggregator answered."""
    from fedloop.agent import runner

    monkeypatch.setattr(runner, "POLL_GAP", 0.1)
    asked: list[float] = []
    handler = _answers_not_yet_first(_Aggregator(rounds=1), 4, asked)
    agent = runner.Agent(
        _KeepEngine(), "http://aggregator.test", "a", tmp_path, mode="poll", poll_wait=0.0
    )
    state = _run_on_mock(agent, handler)
    assert (state.global_round, state.finished) == (1, True)
    assert len(asked) == 4 and min(_gaps(asked)) >= 0.07, _gaps(asked)


def test_an_async_agent_that_gets_not_yet_asks_again_after_the_poll_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import asyncio

    from fedloop.agent import aio

    monkeypatch.setattr(aio, "POLL_GAP", 0.1)
    asked: list[float] = []
    handler = _answers_not_yet_first(_Aggregator(rounds=1), 4, asked)

    async def rounds() -> aio.AsyncAgentResult:
        agent = aio.AsyncAgent(_KeepEngine(), "http://aggregator.test", "a", poll_wait=0.0)
        result = aio.AsyncAgentResult(agent_id="id1")
        transport = httpx.MockTransport(handler)
        async with httpx.AsyncClient(base_url=agent.url, transport=transport) as http:
            await agent._rounds(http, result)
        return result

    result = asyncio.run(rounds())
    assert (result.global_round, result.finished) == (1, True)
    assert len(asked) == 4 and min(_gaps(asked)) >= 0.07, _gaps(asked)


def test_the_imperative_client_times_out_on_the_clock_and_asks_at_the_poll_gap(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its timeout is measured, not added up from the waits it asked for: an aggregator that
    answers "not yet" at once is asked every POLL_GAP until the timeout has really passed."""
    from fedloop.agent import imperative

    monkeypatch.setattr(imperative, "POLL_GAP", 0.1)
    asked: list[float] = []
    handler = _answers_not_yet_first(_Aggregator(rounds=1), 1000, asked)
    client = imperative.Client("http://aggregator.test", "a", poll_wait=5.0)
    client.client.http = httpx.Client(
        base_url=client.client.url, transport=httpx.MockTransport(handler)
    )
    client.client.bulk = None
    started = time.monotonic()
    assert client.wait_for_global_model(timeout=0.45) is None
    elapsed = time.monotonic() - started
    assert 0.45 <= elapsed < 2.0, elapsed
    assert 2 <= len(asked) <= 6 and min(_gaps(asked)) >= 0.07, _gaps(asked)
