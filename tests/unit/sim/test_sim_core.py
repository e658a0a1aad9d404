"""Sampling, engine building and the aggregator settings of `fedloop simulate`."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.aggregator.service import needed_uploads
from fedloop.errors import ConfigError
from fedloop.sim.core import (
    AgentFailed,
    EngineSpec,
    SimSettings,
    agents_per_round,
    aggregator_config,
    build_engine,
    sample_agents,
    train_agent,
)
from fedloop.sim.engines import logreg_engine
from fedloop.sim.local import chunk_size


@pytest.mark.parametrize(
    ("n", "c", "k"), [(30, 0.1, 3), (7, 1.0, 7), (1000, 0.0001, 1), (10, 0.25, 3), (3, 0.7, 3)]
)
def test_agents_per_round_is_ceil_of_c_times_n(n: int, c: float, k: int) -> None:
    assert agents_per_round(n, c) == k


@pytest.mark.parametrize(("n", "c"), [(0, 1.0), (10, 0.0), (10, 1.5), (10, -0.1)])
def test_bad_agents_or_fraction_is_a_config_error(n: int, c: float) -> None:
    with pytest.raises(ConfigError):
        agents_per_round(n, c)


def test_sampling_is_seeded_sorted_distinct_and_changes_per_round() -> None:
    first = sample_agents(100, 0.1, 1, seed=7)
    assert first == sample_agents(100, 0.1, 1, seed=7)
    assert first == sorted(set(first)) and len(first) == 10
    assert all(0 <= i < 100 for i in first)
    assert first != sample_agents(100, 0.1, 2, seed=7)
    assert first != sample_agents(100, 0.1, 1, seed=8)
    assert sample_agents(5, 1.0, 3, seed=0) == [0, 1, 2, 3, 4]


def test_every_agent_is_sampled_about_equally_often() -> None:
    counts = np.zeros(50)
    for r in range(1, 401):
        counts[sample_agents(50, 0.2, r, seed=1)] += 1
    assert counts.sum() == 400 * 10
    assert counts.min() > 50 and counts.max() < 110  # expected 80 each


def test_a_negative_seed_is_a_config_error_before_anything_runs() -> None:
    with pytest.raises(ConfigError, match=r"^--seed must be 0 or more, got -1$"):
        sample_agents(10, 0.5, 1, seed=-1)
    # Checked with the run's other settings, whether sampling uses the seed (C < 1) or not.
    for fraction in (0.5, 1.0):
        settings = SimSettings("fedloop.ml.noop:NoopEngine", 10, fraction=fraction, seed=-1)
        with pytest.raises(ConfigError, match="--seed must be 0 or more"):
            aggregator_config(settings)


@pytest.mark.parametrize(("n", "c"), [(10, 1.0), (10, 0.3), (1000, 0.1), (7, 0.7), (3, 0.01)])
def test_a_round_closes_exactly_when_the_sampled_agents_are_in(n: int, c: float) -> None:
    settings = SimSettings("fedloop.ml.noop:NoopEngine", n, fraction=c, evaluate=False)
    config = aggregator_config(settings)
    k = agents_per_round(n, c)
    assert needed_uploads(config.aggregation_threshold, n, config.min_agents) == k
    assert config.rounds == settings.rounds and config.max_agents >= n


def test_a_strategy_that_needs_more_local_models_than_a_round_samples_is_refused() -> None:
    """Krum with f = 1 aggregates no fewer than 5: rounds of 3 sampled agents would wait for
    ever (before, each round's aggregation failed and was tried again)."""
    few = SimSettings("fedloop.ml.noop:NoopEngine", 10, fraction=0.3, evaluate=False)
    few.strategy, few.strategy_params = "krum", {"f": 1}
    with pytest.raises(ConfigError, match=r"no fewer than 5 local models.*samples 3 agents"):
        aggregator_config(few)
    few.fraction = 0.5
    assert aggregator_config(few).min_agents == 5


def test_the_aggregator_evaluates_with_agent_zeros_engine_when_it_can() -> None:
    with_eval = aggregator_config(SimSettings("fedloop.sim.engines:logreg_engine", 4))
    assert with_eval.evaluate is not None
    assert with_eval.evaluate.params["agent_index"] == 0
    assert with_eval.evaluate.params["num_agents"] == 4
    assert aggregator_config(SimSettings("fedloop.ml.noop:NoopEngine", 4)).evaluate is None


def test_factory_gets_agent_index_and_num_agents_only_if_it_takes_them() -> None:
    assert EngineSpec("fedloop.ml.noop:NoopEngine", 5, {"model_mb": 0.01}).kwargs(2) == {
        "model_mb": 0.01
    }
    kwargs = EngineSpec("fedloop.sim.engines:logreg_engine", 5, {"features": 3}).kwargs(2)
    assert kwargs == {"features": 3, "agent_index": 2, "num_agents": 5}


def test_building_something_that_is_not_an_engine_says_so(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no train"):
        build_engine(EngineSpec("fedloop.sim.core:peak_rss_mb", 2), 0)
    with pytest.raises(ConfigError, match="--set"):
        build_engine(EngineSpec("fedloop.ml.noop:NoopEngine", 2, {"nope": 1}), 0)
    with pytest.raises(AgentFailed, match=r"agent 1 failed in .*logreg_engine.*nope"):
        build_engine(EngineSpec("fedloop.sim.engines:logreg_engine", 2, {"nope": 1}), 1)
    with pytest.raises(ConfigError, match="cannot import"):
        build_engine(EngineSpec("no_such_module_xyz:f", 2), 0)


def test_train_agent_returns_encoded_weights_and_keeps_nothing() -> None:
    spec = EngineSpec("fedloop.sim.engines:logreg_engine", 10, {"features": 4})
    engine = build_engine(spec, 3)
    result = train_agent(spec, 3, engine.initial_weights(), {"round": 1})
    assert result.index == 3 and result.num_samples > 0
    assert set(result.metrics) == {"loss", "accuracy", "local_steps", "local_momentum"}
    assert result.data[:8] != b"" and result.worker_rss_mb > 0


def test_logreg_agents_are_deterministic_distinct_and_learn() -> None:
    a = logreg_engine(0, 10, seed=1)
    assert np.array_equal(a.x, logreg_engine(0, 10, seed=1).x)
    assert not np.array_equal(a.x[:5], logreg_engine(1, 10, seed=1).x[:5])
    weights = a.initial_weights()
    before = a.evaluate(weights, {})
    new, n, metrics = a.train(weights, {"round": 1, "epochs": 5})
    after = a.evaluate(new, {})
    assert n == len(a.y) and after["loss"] < before["loss"]
    assert after["accuracy"] > 0.7 and metrics["accuracy"] > 0.7
    with pytest.raises(ConfigError):
        logreg_engine(10, 10)


def test_chunks_balance_the_workers_and_bound_memory() -> None:
    assert chunk_size(1000, 2, 100) == 125  # four tasks per worker
    assert chunk_size(3, 8, 100) == 1
    assert chunk_size(1000, 2, 40 * 1024 * 1024) == 1  # two 40 MB models exceed 64 MB


def test_round_uploads_hand_over_batches_of_bounded_size() -> None:
    import asyncio

    from fedloop.protocol.messages import UploadResponse
    from fedloop.sim.core import CHUNK_BYTES, AgentResult, Observer, _RoundUploads

    class Aggregator:
        def __init__(self) -> None:
            self.batches: list[list[int]] = []

        async def upload_many(self, uploads: list[tuple[Any, Any]]) -> list[UploadResponse]:
            self.batches.append([len(body) for _, body in uploads])
            await asyncio.sleep(0.01)  # results pile up meanwhile
            return [UploadResponse(accepted=True, round=1, uploads=1, needed=1) for _ in uploads]

    def result(index: int, nbytes: int) -> AgentResult:
        return AgentResult(index, b"x", 1, {"loss": 1.0}, 0.0, 0.0, nbytes=nbytes)  # size only

    async def go(nbytes: int, count: int) -> list[list[int]]:
        agg = Aggregator()
        uploads = _RoundUploads(agg, [f"id{i}" for i in range(count)], 1, count, Observer(), 2)
        async with asyncio.TaskGroup() as group:
            for i in range(count):
                uploads.add(group, result(i, nbytes))
        assert uploads.done == count and uploads.local_means() == {"loss": 1.0}
        return agg.batches

    big = asyncio.run(go(CHUNK_BYTES // 2 + 1, 6))
    assert all(len(b) == 1 for b in big)  # two would pass CHUNK_BYTES: one model at a time
    small = asyncio.run(go(1000, 600))
    assert sum(len(b) for b in small) == 600
    assert max(len(b) for b in small) == _RoundUploads.MAX_BATCH
    assert len(small) < 600 // 2  # batched, not one by one


@pytest.mark.parametrize(
    ("tensor", "where"),
    [(None, 0), ("big", 0), ("big", 1 << 20), ("big", -1), ("small", 0), ("small", -1)],
)
@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("kept", [False, True])
def test_a_result_file_is_written_hashed_and_checked_slice_by_slice(
    tmp_path: Path, tensor: str | None, where: int, bad: float, kept: bool
) -> None:
    from fedloop.protocol import codec
    from fedloop.sim.core import _SLICE, _SLICE_FROM, _fill_kept, _write_parts
    from fedloop.store.blobs import blob_id

    rng = np.random.default_rng(1)
    weights = {
        # Sliced (with a shorter last slice), then whole: both are written, hashed and checked.
        "big": rng.standard_normal(_SLICE_FROM // 4 + 5, dtype=np.float32),
        "steps": np.arange(5, dtype=np.int64),  # not floating: written, not checked
        "small": rng.standard_normal(1000).astype(np.float16),
    }
    assert weights["big"].nbytes > _SLICE_FROM and weights["big"].nbytes % _SLICE
    if tensor is not None:
        weights[tensor][where] = bad
    target = tmp_path / "result"
    target.write_bytes(b"x" * (16 << 20))  # a longer earlier result
    parts = codec.encode_parts(weights)
    if kept:  # a driver's kept file, through the worker's map of it
        digest, finite = _fill_kept(str(target), parts, sum(len(p) for p in parts))
    else:
        digest, finite = _write_parts(str(target), parts)
    assert finite is (tensor is None)
    assert target.read_bytes() == codec.encode(weights)
    assert digest == blob_id(codec.encode(weights))


def test_a_kept_result_file_is_overwritten_through_the_same_map_until_its_size_changes(
    tmp_path: Path,
) -> None:
    from fedloop.protocol import codec
    from fedloop.sim import core
    from fedloop.store.blobs import map_file

    target = str(tmp_path / "result-0.safetensors")
    reader = None
    maps = []
    for round_number, n in enumerate([1 << 18, 1 << 18, 3 << 17]):
        weights = {"w": np.full(n, float(round_number), dtype=np.float32)}
        parts = codec.encode_parts(weights)
        nbytes = sum(len(p) for p in parts)
        core._fill_kept(target, parts, nbytes)
        mapped = core._kept_maps[target]
        assert len(mapped) == nbytes
        maps.append(mapped)
        if reader is None or len(reader) != nbytes:  # the driver maps it again on a new size
            reader = map_file(target)
        assert bytes(reader) == codec.encode(weights)  # the driver sees what the worker wrote
    # The same size: the same map, no new pages; another size: mapped again.
    assert maps[1] is maps[0] and maps[2] is not maps[1]
    core._kept_maps.pop(target).close()
