"""Functional checks of the fast paths (no timings): many asyncio agents, hashed bodies,
the in-place running mean, simulation results passed as files."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from uploads import float32_updates

from fedloop.agent.aio import AsyncAgent, run_agents
from fedloop.demo import free_port, wait_until_up, write_config
from fedloop.ml.noop import NoopEngine
from fedloop.protocol import codec
from fedloop.sim.core import EngineSpec, ModelBytes, ResultFiles
from fedloop.sim.local import FILE_BYTES, LocalBackend
from fedloop.store import blobs
from fedloop.store.blobs import BlobStore, HashedBody, blob_id
from fedloop.store.db import Store, database_url
from fedloop.strategies import RunningMean, Update
from fedloop.strategies.fedavg import FedAvg, returns_mean


@pytest.fixture
def aggregator(tmp_path: Path) -> Iterator[tuple[str, Path]]:
    port = free_port()
    data = tmp_path / "data"
    config = write_config(
        tmp_path / "aggregator.toml", port, data, rounds=2, min_agents=50, log_level="warning"
    )
    with open(tmp_path / "aggregator.log", "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, process)
        yield url, data
    finally:
        process.terminate()
        process.wait(timeout=10)


@pytest.mark.timeout(60)
def test_fifty_asyncio_agents_in_one_process_complete_two_rounds(
    aggregator: tuple[str, Path],
) -> None:
    url, data = aggregator
    engine = NoopEngine(model_mb=0.05)
    agents = [
        AsyncAgent(engine, url, f"a{i:02d}", mode="push" if i % 2 else "poll", poll_wait=5.0)
        for i in range(50)
    ]
    results = asyncio.run(run_agents(agents))
    assert [r.rounds_trained for r in results] == [2] * 50
    assert all(r.finished and r.global_round == 2 for r in results)
    assert len({r.agent_id for r in results}) == 50
    status = httpx.get(f"{url}/v1/status").json()
    assert status["finished"] and status["registered_agents"] == 50
    store = Store(database_url(data, None))
    try:
        rounds = store.global_models()
    finally:
        store.close()
    assert [g.round for g in rounds] == [0, 1, 2]
    assert all(len(g.contributors) == 50 for g in rounds[1:])
    # The no-op agents return the global model: FedAvg of 50 copies is the same model.
    blobs = BlobStore(data / "blobs")
    first, last = (codec.decode(blobs.get(g.model_id)) for g in (rounds[0], rounds[-1]))
    assert all(np.array_equal(first[k], last[k]) for k in first)


def test_blob_store_uses_the_digest_computed_while_streaming(tmp_path: Path) -> None:
    payload = b"x" * 1000
    body = HashedBody(payload)
    body.digest = blob_id(payload)
    store = BlobStore(tmp_path)
    assert store.put(body) == body.digest
    assert store.get(body.digest) == payload


def _updates(counts: tuple[int, ...]) -> list[Update]:
    rng = np.random.default_rng(len(counts))
    return [
        Update(
            weights={
                "w": rng.standard_normal((64, 33)).astype(np.float32),
                "b": rng.standard_normal(5),  # float64
                "steps": np.array(i + 3, dtype=np.int64),
            },
            num_samples=n,
            agent_id=f"agent{i}",
            base_round=0,
        )
        for i, n in enumerate(counts)
    ]


@pytest.mark.parametrize("counts", [(1,), (5,), (1, 1), (3, 1, 7), (2, 0, 2)])
def test_running_mean_in_the_models_dtypes_equals_the_float64_route(
    counts: tuple[int, ...],
) -> None:
    updates = _updates(counts)
    like = {k: np.zeros_like(v) for k, v in updates[0].weights.items()}
    running = RunningMean()
    for update in updates:
        running.add(update)
    strategy = FedAvg()
    assert returns_mean(strategy)
    plain = strategy.aggregate(like, [running.as_update()])
    fast = strategy.aggregate(like, [running.as_update(like=like)])
    direct = strategy.aggregate(like, updates)
    for key in like:
        assert fast[key].dtype == like[key].dtype
        np.testing.assert_array_equal(fast[key], plain[key])
        np.testing.assert_allclose(fast[key], direct[key], rtol=1e-6)


@pytest.mark.parametrize("counts", [(1, 1), (3, 1, 7), (2, 5, 1, 4)])
def test_running_mean_folds_in_blocks_with_the_bits_of_the_plain_float64_sum(
    counts: tuple[int, ...],
) -> None:
    # Tensors over several blocks (and not a multiple of one): the blocked fold must give the
    # very bits of (n1·y1 + n2·y2) + n3·y3 … computed on whole float64 arrays.
    sizes = {"big": 3 * 65536 + 5, "small": 7}
    updates = float32_updates(sizes, counts, seed=7)
    running = RunningMean()
    for update in updates:
        running.add(update)
    mean = running.as_update()
    for key in sizes:
        total = updates[0].weights[key].astype(np.float64) * updates[0].num_samples
        for update in updates[1:]:
            total += update.weights[key].astype(np.float64) * update.num_samples
        np.testing.assert_array_equal(mean.weights[key], total / sum(counts))


def test_running_mean_refuses_an_update_of_another_size() -> None:
    running = RunningMean()
    running.add(
        Update(weights={"w": np.ones(4, np.float32)}, num_samples=1, agent_id="a", base_round=0)
    )
    with pytest.raises(ValueError, match="another shape"):
        running.add(
            Update(weights={"w": np.ones(5, np.float32)}, num_samples=1, agent_id="b", base_round=0)
        )


def test_local_backend_writes_large_local_models_into_files_it_keeps_and_reuses() -> None:
    model_mb = 2 * FILE_BYTES / 1024 / 1024

    async def go() -> None:
        backend = LocalBackend(workers=1)
        await backend.start(EngineSpec("fedloop.ml.noop:NoopEngine", 2, {"model_mb": model_mb}))
        try:
            initial = await backend.initial_model()
            assert initial is not None
            first = [r async for r in backend.train(1, ModelBytes.of(initial), {}, [0, 1])]
            bodies = []
            for result in first:
                assert result.path is not None and result.data == b""
                body = result.body()
                assert bytes(body) == initial
                assert getattr(body, "digest", None) == blob_id(initial)
                assert getattr(body, "finite", False)  # the worker checked the values
                assert Path(result.path).exists()  # kept for the next round
                bodies.append(body)
            # Agent 0's model is still viewed (an upload kept for the aggregation, say):
            # its file must not be handed out again. Agent 1's is free.
            held = np.frombuffer(bodies[0], dtype=np.uint8)
            kept_path, free_path = first[0].path, first[1].path
            del bodies, body
            weights = codec.decode(initial)
            other = codec.encode({k: np.asarray(v) + 1 for k, v in weights.items()})
            second = [r async for r in backend.train(2, ModelBytes.of(other), {}, [0, 1])]
            paths = {r.path for r in second}
            assert free_path in paths and kept_path not in paths
            for result in second:
                body = result.body()
                assert bytes(body) == other
                assert getattr(body, "digest", None) == blob_id(other)
            assert held.tobytes() == initial  # not overwritten while viewed
        finally:
            await backend.stop()

    asyncio.run(go())


def test_every_worker_process_is_up_before_the_first_round() -> None:
    # A pool spawns processes on demand; one starting during the first rounds takes a core
    # from them. start() returns once each worker ran a task (one each: they wait for all).
    async def go() -> None:
        backend = LocalBackend(workers=3)
        await backend.start(EngineSpec("fedloop.ml.noop:NoopEngine", 2, {"model_mb": 0.01}))
        try:
            assert len(backend.pids) == 3 and os.getpid() not in backend.pids
        finally:
            await backend.stop()

    asyncio.run(go())


def test_result_files_are_handed_out_while_free_and_up_to_the_cap(tmp_path: Path) -> None:
    assert 0 < ResultFiles(tmp_path).keep_bytes <= 2 << 30  # 1/16 of memory, at most 2 GiB
    files = ResultFiles(tmp_path, keep_bytes=3 * FILE_BYTES)
    a, b, c = files.take(3, FILE_BYTES + 10)
    assert a is not None and b is not None and c is None  # a third is past the cap
    assert files.take(1, FILE_BYTES) == [None]  # both are out with their tasks
    for path in (a, b):
        Path(path).write_bytes(bytes(FILE_BYTES + 10))
    body_a = files.open(a, FILE_BYTES + 10, "x", True)
    body_b = files.open(b, FILE_BYTES + 10, None, False)
    assert body_a.digest == "x" and body_a.finite and not body_b.finite
    assert len(body_b) == FILE_BYTES + 10
    view = memoryview(body_a)
    del body_a, body_b
    assert files.take(2, FILE_BYTES) == [b, None]  # a is viewed
    view.release()
    assert files.take(1, FILE_BYTES) == [a]
    files.give_back(b)  # its task wrote nothing into it
    assert files.take(1, FILE_BYTES) == [b]
    Path(a).write_bytes(bytes(FILE_BYTES))  # a smaller model: mapped again at its size
    assert len(files.open(a, FILE_BYTES, None, False)) == FILE_BYTES


def test_running_mean_reuses_its_buffers_across_rounds_with_the_same_results() -> None:
    reused = RunningMean()
    for counts in [(3, 1, 7), (1, 1), (2, 5)]:
        updates = _updates(counts)
        like = {k: np.zeros_like(v) for k, v in updates[0].weights.items()}
        fresh = RunningMean()
        for update in updates:
            reused.add(update)
            fresh.add(update)
        buffers = {k: id(v) for k, v in reused._buffers.items()}
        got, want = reused.as_update(like=like), fresh.as_update(like=like)
        assert got.num_samples == want.num_samples == sum(counts)
        for key in like:
            np.testing.assert_array_equal(got.weights[key], want.weights[key])
        reused.reset()
        assert reused.count == 0 and reused.num_samples == 0
        if counts != (3, 1, 7):  # after the first round, no new float64 buffer
            assert {k: id(v) for k, v in reused._buffers.items()} == buffers


def test_encode_parts_and_put_parts_equal_the_joined_encoding(tmp_path: Path) -> None:
    weights = _updates((1,))[0].weights
    parts = codec.encode_parts(weights)
    assert b"".join(parts) == codec.encode(weights)
    # Views, not copies: a tensor's piece is the tensor's memory.
    assert next(iter(weights)) == "w"
    assert np.shares_memory(np.frombuffer(parts[1], dtype=np.uint8), weights["w"])
    store = BlobStore(tmp_path)
    key = store.put_parts(parts)
    assert key == blob_id(codec.encode(weights))
    assert store.get(key) == codec.encode(weights)


def test_encode_into_lays_out_the_encoding_in_one_buffer(tmp_path: Path) -> None:
    weights = {**_updates((1,))[0].weights, "empty": np.zeros((0, 3), np.float16)}
    spec = codec.ModelSpec.of(weights)
    buffer, views = codec.encode_into(spec, HashedBody)
    assert isinstance(buffer, HashedBody) and list(views) == list(weights)
    for key, value in weights.items():
        assert views[key].flags.writeable and views[key].dtype == value.dtype
        views[key][...] = value
    assert bytes(buffer) == codec.encode(weights)
    assert codec.holds_encoding(buffer, views)
    assert not codec.holds_encoding(buffer, weights)  # equal values, other memory
    assert not codec.holds_encoding(buffer, {**views, "w": views["w"].copy()})
    assert not codec.holds_encoding(bytearray(buffer), views)
    # Stored as one piece: the same content address as the encoding in pieces.
    store = BlobStore(tmp_path)
    assert store.put_parts([memoryview(buffer)]) == blob_id(codec.encode(weights))
    assert store.get(blob_id(codec.encode(weights))) == codec.encode(weights)


def test_a_fedavg_global_model_is_one_buffer_that_comes_back_two_rounds_later(
    tmp_path: Path,
) -> None:
    from fedloop.aggregator.service import Aggregator
    from fedloop.config import AggregatorConfig
    from fedloop.protocol.messages import RegisterRequest, UploadRequest

    rng = np.random.default_rng(4)
    shapes = {"w": (300, 7), "b": (11,)}

    def model() -> dict[str, np.ndarray]:
        return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}

    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=2, rounds=4))
        await agg.start()
        try:
            first = await agg.register(RegisterRequest(agent_name="a"), codec.encode(model()))
            second = await agg.register(RegisterRequest(agent_name="b"), b"")
            buffers = []
            for round_number in range(1, 5):
                uploads = [(model(), 1), (model(), 3)]
                for agent, (weights, samples) in zip(
                    (first.agent_id, second.agent_id), uploads, strict=True
                ):
                    request = UploadRequest(agent_id=agent, round=round_number, num_samples=samples)
                    await agg.upload(request, HashedBody(codec.encode(weights)))
                assert await agg.wait_for_global(round_number - 1, 30.0) is not None
                current = agg.global_model
                assert current is not None and current.round == round_number
                (piece,) = current.parts  # one piece: the whole encoding
                data = bytes(piece)
                assert data == codec.encode(current.weights)
                assert current.model_id == blob_id(data) and agg.blobs.get(blob_id(data)) == data
                for key in shapes:
                    total = sum(w[key].astype(np.float64) * n for w, n in uploads)
                    expected = (total / 4).astype(np.float32)
                    np.testing.assert_array_equal(current.weights[key], expected)
                buffers.append(id(piece.obj))
                del current, piece
            # Round 3's global model went into round 1's buffer, round 4's into round 2's.
            assert buffers[2] == buffers[0] and buffers[3] == buffers[1]
            assert buffers[0] != buffers[1]
        finally:
            await agg.stop()

    asyncio.run(go())


@pytest.mark.parametrize("tensor_mb", [1, 5])
def test_put_parts_gives_the_same_address_on_one_core_and_on_all(
    tmp_path: Path, tensor_mb: int
) -> None:
    # Models of small tensors are hashed on one thread, of large ones on all (the header
    # shifts the tensors off BLAKE3's subtree alignment): the same content address either way.
    rng = np.random.default_rng(0)
    n = tensor_mb * 1024 * 1024 // 4
    weights = {f"t{i}": rng.standard_normal(n, dtype=np.float32) for i in range(3)}
    parts = codec.encode_parts(weights)
    assert blobs._PARALLEL_PART > 1024 * 1024 * 2 and blobs._PARALLEL_PART < 5 * 1024 * 1024
    assert BlobStore(tmp_path).put_parts(parts) == blob_id(codec.encode(weights))


def test_global_model_is_served_in_pieces_with_its_content_length(tmp_path: Path) -> None:
    from starlette.testclient import TestClient

    from fedloop.aggregator.app import SEND_CHUNK, create_app
    from fedloop.config import AggregatorConfig
    from fedloop.protocol.messages import RegisterRequest, UploadRequest

    config = AggregatorConfig(data_dir=tmp_path / "data", min_agents=1, rounds=1)
    # Large enough for several 1 MiB slices, with a tail that is not a whole slice.
    weights = {
        "w": np.arange(3 * SEND_CHUNK // 4 + 123, dtype=np.float32),
        "b": np.ones(7, dtype=np.float32),
    }
    with TestClient(create_app(config)) as client:
        agg = client.app.state.aggregator
        body = HashedBody(codec.encode(weights))
        client.portal.call(agg.register, RegisterRequest(agent_name="a"), body)
        model = agg.global_model
        assert model is not None and model.round == 0
        assert len(model.parts) > 1 and b"".join(model.parts) == codec.encode(weights)
        latest = client.get("/v1/models/global/latest")
        assert latest.status_code == 200
        assert int(latest.headers["content-length"]) == len(latest.content) == model.nbytes
        assert latest.content == codec.encode(weights)
        by_round = client.get("/v1/models/global/0")
        assert by_round.content == latest.content
        assert by_round.headers["etag"].strip('"') == blob_id(latest.content)
        head = client.head("/v1/models/global/latest")
        assert head.status_code == 200 and head.content == b""
        assert head.headers["content-length"] == latest.headers["content-length"]
        # Round 1 from one upload: the global model is that upload (views into its body).
        agent_id = agg.agent_ids["a"]
        twice = {k: v * 2 for k, v in weights.items()}
        upload = UploadRequest(agent_id=agent_id, round=1, num_samples=3)
        uploaded = HashedBody(codec.encode(twice))
        client.portal.call(agg.upload, upload, uploaded)
        assert client.portal.call(agg.wait_for_global, 0, 30.0) is not None
        held = agg.global_model.weights["w"]
        assert np.shares_memory(np.frombuffer(uploaded, dtype=np.uint8), held)
        assert not held.flags.writeable
        assert client.get("/v1/models/global/latest").content == codec.encode(twice)
        assert client.get("/v1/models/global/1").content == codec.encode(twice)
        # Round 0 is no longer in memory: streamed from its blob file.
        old = client.get("/v1/models/global/0")
        assert old.content == latest.content
        assert int(old.headers["content-length"]) == len(latest.content)


def test_server_uses_uvloop_and_httptools_when_installed_else_asyncio_and_h11(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import importlib.util

    from fedloop.aggregator import server

    real = importlib.util.find_spec
    installed = real("uvloop") is not None, real("httptools") is not None
    loop, http = server.event_loop_and_parser()
    assert (loop == "uvloop", http == "httptools") == installed
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name in ("uvloop", "httptools") else real(name, *a),
    )
    assert server.event_loop_and_parser() == ("asyncio", "h11")


def test_the_aggregator_serves_with_the_direct_body_protocol_when_httptools_is_there(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import uvicorn

    from fedloop.aggregator import direct, server
    from fedloop.config import AggregatorConfig

    seen: list[object] = []
    monkeypatch.setattr(uvicorn.Server, "run", lambda self: seen.append(self.config.http))
    server.serve(AggregatorConfig(port=free_port(), data_dir=tmp_path / "data"))
    _, http = server.event_loop_and_parser()
    if http == "httptools":  # with the connection limits on top (guard.py)
        (protocol,) = seen
        assert isinstance(protocol, type) and issubclass(protocol, direct.protocol_class())
    else:
        assert seen == ["h11"]


@pytest.mark.parametrize("hold", [1, 2, 3, 4])
@pytest.mark.parametrize("last", [False, True])
def test_uploads_folded_in_groups_have_the_bits_of_folding_one_at_a_time(
    hold: int, last: bool
) -> None:
    # Kept until `hold` are in, then folded together block by block: each element sees the
    # same float64 additions, in the order the uploads came, as the plain running sum.
    rng = np.random.default_rng(11)
    counts = [3, 1, 7, 1, 2, 5, 1, 4, 9, 1, 6]
    sizes = {"big": 2 * 65536 + 3, "small": 5}
    updates = [
        Update(
            weights={
                k: rng.standard_normal(n, dtype=np.float32) * (i + 1) for k, n in sizes.items()
            },
            num_samples=c,
            agent_id=f"a{i}",
            base_round=0,
        )
        for i, c in enumerate(counts)
    ]
    running = RunningMean(max_held=hold)
    like = {k: np.zeros(n, np.float32) for k, n in sizes.items()}
    for i, update in enumerate(updates):
        running.add(update, last=last and i == len(updates) - 1)
        # After each upload the mean so far is that of the plain sum, and asking does not
        # change what comes next.
        mean = running.as_update(like=like)
        for key in sizes:
            total = updates[0].weights[key].astype(np.float64) * updates[0].num_samples
            for earlier in updates[1 : i + 1]:
                total += earlier.weights[key].astype(np.float64) * earlier.num_samples
            expected = total / sum(counts[: i + 1])
            np.testing.assert_array_equal(mean.weights[key], expected.astype(np.float32))
            np.testing.assert_array_equal(running.as_update().weights[key], expected)
    assert running.count == len(counts) and running.num_samples == sum(counts)


@pytest.mark.parametrize("batches", [(1, 1, 1), (2, 3, 1), (4, 2), (1, 5), (6,)])
@pytest.mark.parametrize("closing", [False, True])
def test_uploads_added_together_have_the_bits_of_adding_them_one_at_a_time(
    batches: tuple[int, ...], closing: bool
) -> None:
    # The aggregator files the uploads that waited for the lock together (add_many): folded
    # in one pass, or all kept for the division when they close the round.
    counts = [2, 1, 7, 3, 1, 4][: sum(batches)]
    sizes = {"big": 2 * 65536 + 3, "small": 5}
    updates = float32_updates(sizes, counts, seed=5)
    together, alone = RunningMean(), RunningMean()
    at = 0
    for j, size in enumerate(batches):
        last = closing and j == len(batches) - 1
        together.add_many(updates[at : at + size], last=last)
        for k, update in enumerate(updates[at : at + size]):
            alone.add(update, last=last and k == size - 1)
        at += size
    assert together.count == alone.count == len(counts)
    assert together.num_samples == sum(counts)
    like = {k: np.zeros(n, np.float32) for k, n in sizes.items()}
    for key in sizes:
        total = updates[0].weights[key].astype(np.float64) * updates[0].num_samples
        for update in updates[1:]:
            total += update.weights[key].astype(np.float64) * update.num_samples
        expected = total / sum(counts)
        np.testing.assert_array_equal(together.as_update().weights[key], expected)
        np.testing.assert_array_equal(
            together.as_update(like=like).weights[key], expected.astype(np.float32)
        )
        np.testing.assert_array_equal(alone.as_update().weights[key], expected)
