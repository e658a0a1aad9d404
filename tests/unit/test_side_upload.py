"""Side tensors on a real Aggregator (in-process, real SQLite file): uploads carry SCAFFOLD's and
FedCurv's extra tensors in their safetensors body, checked like the model before anything is
stored; the strategy's shipped tensors are served per round, also after a restart."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig, StrategyConfig
from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest, UploadResponse

MODEL = {"w": np.zeros((2, 3), np.float32), "n": np.zeros(2, np.int64)}


def body(value: float, **extras: np.ndarray) -> bytes:
    model = {"w": np.full((2, 3), value, np.float32), "n": np.full(2, 1, np.int64)}
    return codec.encode({**model, **extras})


def dc(value: float, dtype: Any = np.float32, shape: tuple[int, ...] = (2, 3)) -> np.ndarray:
    return np.full(shape, value, dtype)


def request(agent_id: str, round_number: int = 1) -> UploadRequest:
    return UploadRequest(agent_id=agent_id, round=round_number, num_samples=1, metrics={})


def run(
    tmp_path: Path, strategy: str, test: Callable[[Aggregator, list[str]], Awaitable[None]]
) -> None:
    async def go() -> None:
        config = AggregatorConfig(
            data_dir=tmp_path, min_agents=2, rounds=3, strategy=StrategyConfig(name=strategy)
        )
        agg = Aggregator(config)
        await agg.start()
        try:
            ids = []
            for i in range(2):
                init = codec.encode(MODEL) if i == 0 else b""
                reply = await agg.register(RegisterRequest(agent_name=f"a{i}"), init)
                ids.append(reply.agent_id)
            await test(agg, ids)
        finally:
            await agg.stop()

    asyncio.run(go())


async def refused(agg: Aggregator, agent: str, data: bytes) -> ProtocolError:
    (outcome,) = await agg.upload_many([(request(agent), data)])
    assert isinstance(outcome, ProtocolError), outcome
    return outcome


def test_scaffold_uploads_are_refused_unless_their_extras_match(tmp_path: Path) -> None:
    async def test(agg: Aggregator, ids: list[str]) -> None:
        a, _ = ids
        side = agg.global_info().side
        assert side is not None and side.model_dump() == {
            "strategy": "scaffold",
            "extras": ["scaffold.dc/"],
            "state": True,
        }
        # c = 0 before the first aggregate, float64, for the floating tensor only
        shipped = codec.decode(b"".join(await agg.shipped(0)))
        assert list(shipped) == ["scaffold.c/w"] and shipped["scaffold.c/w"].dtype == np.float64
        assert not shipped["scaffold.c/w"].any()
        cases = [
            (body(1.0), "missing_extras", "needs, with each local model, the extra tensors"),
            (body(1.0, **{"scaffold.dc/w": dc(1, shape=(3, 2))}), "wrong_extras", "(2, 3)"),
            (body(1.0, **{"scaffold.dc/w": dc(1, np.float64)}), "wrong_extras", "F32"),
            (body(1.0, **{"scaffold.dc/w": dc(np.nan)}), "not_finite", "scaffold.dc/w"),
            (
                body(1.0, **{"scaffold.dc/w": dc(1), "scaffold.dc/n": dc(1, np.int64, (2,))}),
                "wrong_extras",
                "unexpected extra tensors ['scaffold.dc/n']",
            ),
            (body(1.0, **{"scaffold.dc/w": dc(1), "other": dc(1)}), "wrong_names", "other"),
        ]
        for data, code, words in cases:
            error = await refused(agg, a, data)
            assert (error.status, error.code) == (422, code), error
            assert words in str(error), error
        assert agg.store.local_models(1) == [] and not agg.pending

    run(tmp_path, "scaffold", test)


def test_scaffold_round_ships_c_and_survives_a_restart_mid_round(tmp_path: Path) -> None:
    async def first(agg: Aggregator, ids: list[str]) -> None:
        a, b = ids
        for agent, value in ((a, 1.0), (b, 3.0)):
            (ok,) = await agg.upload_many(
                [(request(agent), body(value, **{"scaffold.dc/w": dc(value)}))]
            )
            assert isinstance(ok, UploadResponse)
        model = await agg.wait_for_global(0, 5)
        assert model is not None and model.round == 1
        np.testing.assert_array_equal(model.weights["w"], 2.0)
        # c = 0 + (2/2) * mean(1, 3)
        shipped = codec.decode(b"".join(await agg.shipped(1)))
        np.testing.assert_array_equal(shipped["scaffold.c/w"], 2.0)
        # one upload of round 2 is in when the aggregator stops
        (ok,) = await agg.upload_many([(request(a, 2), body(5.0, **{"scaffold.dc/w": dc(4.0)}))])
        assert isinstance(ok, UploadResponse)

    run(tmp_path, "scaffold", first)

    async def second(agg: Aggregator, ids: list[str]) -> None:
        a, b = ids
        assert agg.round == 2 and list(agg.pending) == [a]
        assert agg.pending[a].extras["scaffold.dc/w"].dtype == np.float32
        info = agg.global_info()
        assert info.round == 1 and info.side is not None and info.side.state
        # both the current and an older round's shipped tensors, after the restart
        np.testing.assert_array_equal(
            codec.decode(b"".join(await agg.shipped(1)))["scaffold.c/w"], 2.0
        )
        assert not codec.decode(b"".join(await agg.shipped(0)))["scaffold.c/w"].any()
        with pytest.raises(ProtocolError) as missing:
            await agg.shipped(7)
        assert (missing.value.status, missing.value.code) == (404, "no_such_round")
        # a's round-1 upload sent again (its answer lost): the aggregator has it, and says so
        again = body(1.0, **{"scaffold.dc/w": dc(1.0)})
        assert (await refused(agg, a, again)).code == "duplicate_upload"
        (dup,) = await agg.upload_many([(request(a, 2), body(5.0, **{"scaffold.dc/w": dc(4.0)}))])
        assert isinstance(dup, ProtocolError) and dup.code == "duplicate_upload"
        (ok,) = await agg.upload_many([(request(b, 2), body(7.0, **{"scaffold.dc/w": dc(2.0)}))])
        assert isinstance(ok, UploadResponse)
        model = await agg.wait_for_global(1, 5)
        assert model is not None and model.round == 2
        np.testing.assert_array_equal(model.weights["w"], 6.0)
        # c = 2 + mean(4, 2): the extras of the upload filed before the restart count
        np.testing.assert_array_equal(
            codec.decode(b"".join(await agg.shipped(2)))["scaffold.c/w"], 5.0
        )

    run(tmp_path, "scaffold", second)


def test_fedcurv_ships_nothing_before_its_first_round(tmp_path: Path) -> None:
    async def test(agg: Aggregator, ids: list[str]) -> None:
        side = agg.global_info().side
        assert side is not None and side.extras == ["fedcurv.fisher/", "fedcurv.fw/"]
        assert not side.state
        with pytest.raises(ProtocolError) as none:
            await agg.shipped(0)
        assert (none.value.status, none.value.code) == (404, "no_state")
        for agent, value in zip(ids, (1.0, 2.0), strict=True):
            extras = {"fedcurv.fisher/w": dc(value), "fedcurv.fw/w": dc(value * value)}
            (ok,) = await agg.upload_many([(request(agent), body(value, **extras))])
            assert isinstance(ok, UploadResponse)
        assert await agg.wait_for_global(0, 5) is not None
        late = await agg.register(RegisterRequest(agent_name="late"), b"")
        extras = {"fedcurv.fisher/w": dc(1), "fedcurv.fw/w": dc(1)}
        # round 1 is closed: for an agent not in it that is round_closed, not a duplicate
        assert (await refused(agg, late.agent_id, body(1.0, **extras))).code == "round_closed"
        assert (await refused(agg, ids[0], body(1.0, **extras))).code == "duplicate_upload"
        side = agg.global_info().side
        assert side is not None and side.state
        shipped = codec.decode(b"".join(await agg.shipped(1)))
        np.testing.assert_array_equal(shipped["fedcurv.fisher/w"], 3.0)
        np.testing.assert_array_equal(shipped["fedcurv.fw/w"], 5.0)

    run(tmp_path, "fedcurv", test)


def test_fedavg_has_no_side_and_refuses_extra_tensors(tmp_path: Path) -> None:
    async def test(agg: Aggregator, ids: list[str]) -> None:
        assert agg.side is None and agg.global_info().side is None
        error = await refused(agg, ids[0], body(1.0, **{"scaffold.dc/w": dc(1)}))
        assert error.code == "wrong_names"
        with pytest.raises(ProtocolError) as none:
            await agg.shipped(0)
        assert none.value.code == "no_state"

    run(tmp_path, "fedavg", test)
