"""A failed aggregation (here: the disk full when the global model is written) leaves the round
open and is tried again by the aggregator itself, on a real Aggregator (in-process, real SQLite
file and blob store): the agents, whose uploads are all in, get the round's global model, the
same one a run without the failure computes, stateful strategies included."""

from __future__ import annotations

import asyncio
import errno
import logging
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.aggregator import service
from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig, StrategyConfig
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest, UploadResponse


def _weights(value: float) -> bytes:
    return codec.encode({"w": np.full(3, value, np.float32)})


async def _run(
    directory: Path, strategy: str, failures: int, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[np.ndarray], Aggregator]:
    """Run 3 rounds of 2 agents; the first `failures` global-model writes fail (ENOSPC)."""
    config = AggregatorConfig(
        data_dir=directory, min_agents=2, rounds=3, strategy=StrategyConfig(name=strategy)
    )
    agg = Aggregator(config)
    real = agg.blobs.put_parts
    left = {"failures": 0}  # the initial model (registration) is written

    def full_disk(parts: Any) -> str:
        if left["failures"]:
            left["failures"] -= 1
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(parts)

    monkeypatch.setattr(agg.blobs, "put_parts", full_disk)
    await agg.start()
    models = []
    try:
        a = (await agg.register(RegisterRequest(agent_name="a"), _weights(0.0))).agent_id
        b = (await agg.register(RegisterRequest(agent_name="b"), b"")).agent_id
        left["failures"] = failures
        for round_number in (1, 2, 3):
            for agent, value, samples in ((a, round_number, 1), (b, -2.0 * round_number, 3)):
                request = UploadRequest(
                    agent_id=agent, round=round_number, num_samples=samples, metrics={}
                )
                outcome = await agg.upload(request, _weights(value))
                assert isinstance(outcome, UploadResponse)
            model = await agg.wait_for_global(round_number - 1, 10)
            assert model is not None and model.round == round_number
            models.append(np.array(model.weights["w"]))
        assert left["failures"] == 0
        assert [g.round for g in agg.store.global_models()] == [0, 1, 2, 3]
    finally:
        await agg.stop()
    return models, agg


@pytest.mark.parametrize("strategy", ["fedavg", "fedadam"])
def test_a_failed_aggregation_is_tried_again_and_gives_the_same_models(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    strategy: str,
) -> None:
    monkeypatch.setattr(service, "AGGREGATION_RETRY", (0.05, 0.2))
    expected, _ = asyncio.run(_run(tmp_path / "clean", strategy, 0, monkeypatch))
    with caplog.at_level(logging.ERROR, logger="fedloop.aggregator"):
        # Round 1 fails twice (the wait doubles), then round 2 once.
        got, agg = asyncio.run(_run(tmp_path / "full", strategy, 3, monkeypatch))
    failed = [r for r in caplog.records if "aggregation of round" in r.getMessage()]
    assert len(failed) == 3 and "tried again in" in failed[0].getMessage()
    # The disk's error in the line, no traceback for it.
    assert "No space left on device" in failed[0].getMessage() and not failed[0].exc_info
    # FedAdam's moments were put back after each failed try: no step is applied twice.
    for want, have in zip(expected, got, strict=True):
        np.testing.assert_array_equal(have, want)
    assert agg._retry_at is None and agg._retry_wait == 0.0


def test_the_retry_waits_longer_after_each_failure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(service, "AGGREGATION_RETRY", (0.3, 0.5))
    waits: list[float] = []
    real = Aggregator._committed_strategy

    def spy(self: Aggregator, latest: Any) -> Any:
        waits.append(self._retry_wait)
        return real(self, latest)

    monkeypatch.setattr(Aggregator, "_committed_strategy", spy)
    asyncio.run(_run(tmp_path, "fedavg", 3, monkeypatch))
    assert waits == [0.3, 0.5, 0.5]
