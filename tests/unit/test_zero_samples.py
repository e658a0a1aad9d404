"""A round whose local models all report num_samples=0 keeps the global model and the
strategy's state (docs/decisions/0014), on a real Aggregator (in-process, real SQLite file and
blob store); the next round with data is aggregated as if the empty round had not been."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig, StrategyConfig
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest, UploadResponse
from fedloop.strategies import Update, create
from fedloop.types import Weights

INITIAL: Weights = {"w": np.array([0.5, -1.0, 2.0], np.float32), "steps": np.zeros(2, np.int64)}
# (value of w, num_samples) per agent and round; round 1 has no data at all.
ROUNDS = {1: ((7.0, 0), (-9.0, 0)), 2: ((2.0, 1), (-4.0, 3))}
PARAMS: dict[str, dict[str, Any]] = {"dp_fedavg": {"seed": 3, "noise_multiplier": 0.5}}


def _local(value: float, round_number: int) -> Weights:
    return {"w": np.full(3, value, np.float32), "steps": np.full(2, round_number, np.int64)}


async def _run(directory: Path, strategy: str) -> tuple[list[Any], Weights]:
    config = AggregatorConfig(
        data_dir=directory,
        min_agents=2,
        rounds=2,
        strategy=StrategyConfig(name=strategy, **PARAMS.get(strategy, {})),
    )
    agg = Aggregator(config)
    await agg.start()
    try:
        first = await agg.register(RegisterRequest(agent_name="a"), codec.encode(INITIAL))
        second = await agg.register(RegisterRequest(agent_name="b"), b"")
        agents = (first.agent_id, second.agent_id)
        state_before = agg.strategy.state()
        for round_number, uploads in ROUNDS.items():
            for agent, (value, samples) in zip(agents, uploads, strict=True):
                request = UploadRequest(
                    agent_id=agent,
                    round=round_number,
                    num_samples=samples,
                    metrics={"local_steps": 2.0, "local_momentum": 0.0},
                )
                outcome = await agg.upload(request, codec.encode(_local(value, round_number)))
                assert isinstance(outcome, UploadResponse), outcome
            model = await agg.wait_for_global(round_number - 1, 10)
            assert model is not None and model.round == round_number
            if round_number == 1:
                assert agg.strategy.state().keys() == state_before.keys()
        rows = agg.store.global_models()
        last = {k: np.array(v) for k, v in model.weights.items()}
    finally:
        await agg.stop()
    return rows, last


@pytest.mark.parametrize(
    "strategy", ["fedavg", "fedprox", "fedavgm", "fedadam", "fednova", "dp_fedavg", "median"]
)
def test_a_round_without_samples_keeps_the_global_model_and_the_strategy_state(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, strategy: str
) -> None:
    with caplog.at_level(logging.WARNING, logger="fedloop.aggregator"):
        rows, last = asyncio.run(_run(tmp_path, strategy))

    assert [r.round for r in rows] == [0, 1, 2]
    assert rows[1].model_id == rows[0].model_id  # content-addressed: the very same bytes
    assert rows[1].total_samples == 0 and len(rows[1].contributors) == 2
    assert rows[2].total_samples == 4
    warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("round 1: every local model reports num_samples=0" in m for m in warned), warned

    # Round 2 is what the strategy makes of round 2's uploads from the initial model, in a
    # fresh state: round 1 took no step (no momentum, no moments, no privacy spent).
    fresh = create(strategy, **PARAMS.get(strategy, {}))
    updates = [
        Update(_local(value, 2), samples, agent, 1, {"local_steps": 2.0, "local_momentum": 0.0})
        for agent, (value, samples) in zip(("a", "b"), ROUNDS[2], strict=True)
    ]
    want = fresh.aggregate(INITIAL, updates, server_round=2)
    for key, tensor in want.items():
        np.testing.assert_allclose(last[key], tensor, rtol=1e-6)
    assert last["w"].dtype == np.float32 and last["steps"].dtype == np.int64


def test_fedavg_gives_agents_without_samples_no_weight_when_others_have_some(
    tmp_path: Path,
) -> None:
    """The rule is for rounds where nobody had data; otherwise FedAvg's weighted mean holds."""

    async def run() -> Weights:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=2, rounds=1))
        await agg.start()
        try:
            a = await agg.register(RegisterRequest(agent_name="a"), codec.encode(INITIAL))
            b = await agg.register(RegisterRequest(agent_name="b"), b"")
            for agent, value, samples in ((a.agent_id, 7.0, 0), (b.agent_id, 0.1, 5)):
                request = UploadRequest(agent_id=agent, round=1, num_samples=samples, metrics={})
                await agg.upload(request, codec.encode(_local(value, 1)))
            model = await agg.wait_for_global(0, 10)
            assert model is not None and model.round == 1
            return {k: np.array(v) for k, v in model.weights.items()}
        finally:
            await agg.stop()

    weights = asyncio.run(run())
    np.testing.assert_array_equal(weights["w"], np.full(3, 0.1, np.float32))  # bit for bit
