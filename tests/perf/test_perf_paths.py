"""Functional checks of the fast paths (no timings): many asyncio agents, hashed bodies,
the in-place running mean, simulation results passed as files."""

from __future__ import annotations

import asyncio
import hashlib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from fedloop.agent.aio import AsyncAgent, run_agents
from fedloop.demo import free_port, wait_until_up, write_config
from fedloop.ml.noop import NoopEngine
from fedloop.protocol import codec
from fedloop.sim.core import EngineSpec
from fedloop.sim.local import FILE_BYTES, LocalBackend
from fedloop.store.blobs import BlobStore, HashedBody
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
    body.digest = hashlib.sha256(payload).hexdigest()
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


def test_local_backend_returns_large_local_models_as_files(tmp_path: Path) -> None:
    model_mb = 2 * FILE_BYTES / 1024 / 1024

    async def go() -> None:
        backend = LocalBackend(workers=1)
        await backend.start(EngineSpec("fedloop.ml.noop:NoopEngine", 2, {"model_mb": model_mb}))
        try:
            initial = await backend.initial_model()
            assert initial is not None
            results = [r async for r in backend.train(1, initial, {}, [0, 1])]
            for result in results:
                assert result.path is not None and result.data == b""
                path = Path(result.path)
                body = result.body()
                assert bytes(body) == initial
                assert getattr(body, "digest", None) == hashlib.sha256(initial).hexdigest()
                assert not path.exists()
        finally:
            await backend.stop()

    asyncio.run(go())
