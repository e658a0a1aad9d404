"""Aggregator.upload_many on a real Aggregator (in-process, real SQLite file): each upload of a
batch is accepted or refused on its own, and only accepted ones are stored and aggregated."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig
from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest, UploadResponse


def weights(value: float) -> bytes:
    return codec.encode({"w": np.full(3, value, np.float32)})


def request(agent_id: str, round_number: int = 1, samples: int = 1) -> UploadRequest:
    return UploadRequest(agent_id=agent_id, round=round_number, num_samples=samples, metrics={})


def test_a_batch_refuses_each_bad_upload_and_keeps_the_good_ones(tmp_path: Path) -> None:
    async def go() -> None:
        config = AggregatorConfig(data_dir=tmp_path, min_agents=4, rounds=2)
        agg = Aggregator(config)
        await agg.start()
        try:
            ids = []
            for i, name in enumerate("abcd"):
                body = weights(0.0) if i == 0 else b""
                ids.append((await agg.register(RegisterRequest(agent_name=name), body)).agent_id)
            a, b, c, d = ids
            outcomes = await agg.upload_many(
                [
                    (request(a, samples=1), weights(1.0)),
                    (request("nobody"), weights(9.0)),  # not registered
                    (request(b, samples=3), weights(3.0)),
                    (request(c), codec.encode({"w": np.full(3, np.nan, np.float32)})),
                    (request(d, round_number=2), weights(9.0)),  # not this round
                    (request(a), weights(9.0)),  # a second time in one batch
                ]
            )
            kinds = [o.code if isinstance(o, ProtocolError) else "ok" for o in outcomes]
            # The second upload of `a` in one batch is refused by the store's unique row.
            assert kinds == [
                "ok",
                "unknown_agent",
                "ok",
                "not_finite",
                "round_not_open",
                "duplicate_upload",
            ]
            ok = [o for o in outcomes if isinstance(o, UploadResponse)]
            assert [(o.uploads, o.needed) for o in ok] == [(1, 4), (2, 4)]
            assert [r.agent_id for r in agg.store.local_models(1)] == [a, b]
            # The round closes with the two others, from the good uploads only.
            later = await agg.upload_many(
                [(request(c, samples=2), weights(2.0)), (request(d, samples=2), weights(2.0))]
            )
            assert all(isinstance(o, UploadResponse) for o in later)
            model = await agg.wait_for_global(0, 5)
            assert model is not None and model.round == 1
            # (1·1 + 3·3 + 2·2 + 2·2) / 8 = 2.25
            np.testing.assert_allclose(model.weights["w"], np.full(3, 2.25, np.float32))
        finally:
            await agg.stop()

    asyncio.run(go())
