"""Aggregator.register on a real Aggregator (in-process, real SQLite file)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import numpy as np

from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig
from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, RegisterResponse


def test_two_first_registrations_at_once_fix_one_model_and_refuse_the_other(
    tmp_path: Path,
) -> None:
    # Each model is checked before the state lock is taken; the one that comes second to the
    # lock is checked again against the model the first fixed meanwhile.
    async def go() -> list[RegisterResponse | BaseException]:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path))
        await agg.start()
        try:
            return await asyncio.gather(
                *(
                    agg.register(
                        RegisterRequest(agent_name=name),
                        codec.encode({"w": np.zeros(size, np.float32)}),
                    )
                    for name, size in (("a", 3), ("b", 4))
                ),
                return_exceptions=True,
            )
        finally:
            await agg.stop()

    results = asyncio.run(go())
    accepted = [r for r in results if isinstance(r, RegisterResponse)]
    refused = [r for r in results if isinstance(r, ProtocolError)]
    assert len(accepted) == 1 and len(refused) == 1, results
    assert refused[0].code == "wrong_shape"
