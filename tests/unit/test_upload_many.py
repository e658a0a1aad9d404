"""Aggregator.upload_many on a real Aggregator (in-process, real SQLite file): each upload of a
batch is accepted or refused on its own, and only accepted ones are stored and aggregated."""

from __future__ import annotations

import asyncio
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from fedloop.aggregator.service import Aggregator
from fedloop.config import AggregatorConfig
from fedloop.errors import ProtocolError
from fedloop.protocol import codec
from fedloop.protocol.messages import RegisterRequest, UploadRequest, UploadResponse
from fedloop.store.blobs import blob_id


def weights(value: float) -> bytes:
    return codec.encode({"w": np.full(3, value, np.float32)})


def request(agent_id: str, round_number: int = 1, samples: int = 1) -> UploadRequest:
    return UploadRequest(agent_id=agent_id, round=round_number, num_samples=samples, metrics={})


async def register(agg: Aggregator, count: int) -> list[str]:
    """Register agents a0, a1, …; the first brings the initial model (zeros)."""
    ids = []
    for i in range(count):
        body = weights(0.0) if i == 0 else b""
        ids.append((await agg.register(RegisterRequest(agent_name=f"a{i}"), body)).agent_id)
    return ids


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


def test_uploads_waiting_for_the_lock_are_filed_together_and_each_answered(
    tmp_path: Path,
) -> None:
    # Uploads that arrive while others are being filed queue up and are filed by one task:
    # one transaction for their rows, one pass to fold them, an answer for each.
    async def go() -> None:
        config = AggregatorConfig(data_dir=tmp_path, min_agents=6, rounds=1)
        agg = Aggregator(config)
        await agg.start()
        try:
            ids = await register(agg, 6)
            transactions: list[int] = []
            add_rows = agg.store.add_local_models
            agg.store.add_local_models = lambda rows, inline=False: (  # type: ignore[method-assign]
                transactions.append(len(rows)),
                add_rows(rows, inline),
            )[1]
            checked: list[object] = []
            check = agg._check_and_store

            def counted(body: codec.Bytes) -> object:
                result = check(body)
                checked.append(body)
                return result

            agg._check_and_store = counted  # type: ignore[method-assign]
            async with agg.lock:  # a filing in progress: every upload waits
                tasks = [
                    asyncio.create_task(
                        agg.upload(request(agent, samples=i + 1), weights(float(i)))
                    )
                    for i, agent in enumerate(ids)
                ]
                # The filer takes the first upload(s) checked, the others queue behind it.
                for _ in range(500):
                    if len(checked) == 6:
                        break
                    await asyncio.sleep(0.01)
                await asyncio.sleep(0.1)  # the checked uploads' tasks queue them
                tasks[3].cancel()  # its request goes away: it is filed all the same
            answers = await asyncio.gather(*tasks, return_exceptions=True)
            assert len(transactions) == 2 and sum(transactions) == 6  # not 6 of 1
            assert isinstance(answers[3], asyncio.CancelledError)
            ok = [a for a in answers if isinstance(a, UploadResponse)]
            # Numbered in the order they were filed (their checks end in any order).
            assert len(ok) == 5 and len({a.uploads for a in ok}) == 5
            assert {a.uploads for a in ok} <= set(range(1, 7))
            assert all(a.accepted and a.needed == 6 for a in ok)
            model = await agg.wait_for_global(0, 5)
            assert model is not None and model.round == 1
            assert len(agg.store.local_models(1)) == 6
            # Σ (i+1)·i / Σ (i+1) for i = 0..5: 70 / 21
            np.testing.assert_allclose(model.weights["w"], np.full(3, 70 / 21, np.float32))
        finally:
            await agg.stop()

    asyncio.run(go())


def test_a_failed_filing_answers_every_upload_waiting_for_it(tmp_path: Path) -> None:
    async def go() -> None:
        config = AggregatorConfig(data_dir=tmp_path, min_agents=3, rounds=1)
        agg = Aggregator(config)
        await agg.start()
        try:
            ids = await register(agg, 3)

            def broken(rows: object, inline: bool = False) -> None:
                raise OSError("disk full")

            agg.store.add_local_models = broken  # type: ignore[method-assign]
            answers = await asyncio.gather(
                *(agg.upload(request(agent), weights(1.0)) for agent in ids),
                return_exceptions=True,
            )
            assert all(isinstance(a, OSError) for a in answers)
            assert agg._filer is None and agg._to_file == []
            assert not agg.pending
        finally:
            await agg.stop()

    asyncio.run(go())


def test_a_restart_mid_round_drops_uploads_whose_bytes_were_not_kept(tmp_path: Path) -> None:
    # keep_local_models=False (a simulation's default): rows only, so a restarted aggregator
    # cannot count them again; it says so, drops them (rows too) and waits for them again.
    async def go() -> None:
        config = AggregatorConfig(
            data_dir=tmp_path, min_agents=2, rounds=1, keep_local_models=False
        )
        agg = Aggregator(config)
        await agg.start()
        a = (await agg.register(RegisterRequest(agent_name="a"), weights(0.0))).agent_id
        b = (await agg.register(RegisterRequest(agent_name="b"), b"")).agent_id
        await agg.upload(request(a), weights(1.0))
        assert not agg.blobs.exists(agg.store.local_models(1)[0].model_id)
        await agg.stop()
        again = Aggregator(config)
        await again.start()
        try:
            assert again.round == 1 and not again.pending
            assert not again.store.local_models(1)
            # a's row went with its model: its re-send is accepted, and b's closes the round.
            await again.upload(request(a), weights(1.0))
            await again.upload(request(b), weights(3.0))
            assert await again.wait_for_global(0, 30) is not None
            assert sorted(m.agent_id for m in again.store.local_models(1)) == sorted([a, b])
        finally:
            await again.stop()

    asyncio.run(go())


def test_a_model_that_cannot_be_stored_is_refused_with_a_5xx_and_taken_when_sent_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=2, rounds=1))
        await agg.start()
        try:
            a, b = await register(agg, 2)
            real = agg.blobs.put
            errors = [OSError(errno.ENOSPC, "No space left on device"), OSError(errno.EIO, "I/O")]

            def put(data: bytes, key: str | None = None) -> str:
                if errors:
                    raise errors.pop(0)
                return real(data, key)

            monkeypatch.setattr(agg.blobs, "put", put)
            (full,) = await agg.upload_many([(request(a), weights(1.0))])
            (broken,) = await agg.upload_many([(request(a), weights(1.0))])
            assert isinstance(full, ProtocolError) and isinstance(broken, ProtocolError)
            # Retryable (agents send a 5xx again later), and said as such.
            assert (full.status, full.code) == (507, "storage_full")
            assert (broken.status, broken.code) == (503, "storage_error")
            assert agg.store.local_models(1) == []  # nothing was filed
            again = await agg.upload_many([(request(a), weights(1.0))])
            other = await agg.upload_many([(request(b), weights(3.0))])
            assert isinstance(again[0], UploadResponse) and isinstance(other[0], UploadResponse)
            model = await agg.wait_for_global(0, 5)
            assert model is not None and model.round == 1
            np.testing.assert_allclose(model.weights["w"], np.full(3, 2.0, np.float32))
        finally:
            await agg.stop()

    asyncio.run(go())


def test_long_polls_get_the_new_model_before_the_announcements_go_out(tmp_path: Path) -> None:
    """Agents waiting for the model (a long poll) start their downloads before the event loop
    sends the WebSocket announcements, which only training agents need."""

    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=1, rounds=2))
        await agg.start()
        try:
            (a,) = await register(agg, 1)
            queue = agg.subscribe(a)
            queue.get_nowait()  # the announcement of the current model, on connecting
            order: list[str] = []

            async def long_poll() -> None:
                model = await agg.wait_for_global(0, 5)
                assert model is not None and model.round == 1
                order.append("long poll")

            async def push() -> None:
                await queue.get()
                order.append("announcement")

            waiting = [asyncio.create_task(long_poll()), asyncio.create_task(push())]
            await asyncio.sleep(0)  # both wait now
            (answer,) = await agg.upload_many([(request(a), weights(1.0))])
            assert isinstance(answer, UploadResponse)
            await asyncio.wait_for(asyncio.gather(*waiting), 5)
            assert order == ["long poll", "announcement"]
        finally:
            await agg.stop()

    asyncio.run(go())


def test_an_agent_whose_long_poll_gets_the_model_is_not_announced_it(tmp_path: Path) -> None:
    """The model is the long poll's answer; the WebSocket announcement goes to the others."""

    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=2, rounds=3))
        await agg.start()
        try:
            a, b = await register(agg, 2)
            queues = {agent: agg.subscribe(agent) for agent in (a, b)}
            for queue in queues.values():
                queue.get_nowait()  # the announcement of the current model, on connecting
            polls = [
                asyncio.create_task(agg.wait_for_global(0, 5, agent_id=a)),
                asyncio.create_task(agg.wait_for_global(0, 5)),  # an agent not naming itself
            ]
            await asyncio.sleep(0)
            assert agg.waiting == {a: 1}
            await agg.upload_many([(request(a), weights(1.0)), (request(b), weights(3.0))])
            got = await asyncio.wait_for(asyncio.gather(*polls), 5)
            assert [m.round if m else None for m in got] == [1, 1]
            await asyncio.sleep(0)
            assert queues[a].empty() and queues[b].get_nowait().round == 1
            assert not agg.waiting  # the poll is over: a is announced the next model
            await agg.upload_many([(request(a, 2), weights(1.0)), (request(b, 2), weights(3.0))])
            await asyncio.wait_for(agg.wait_for_global(1, 5), 5)
            await asyncio.sleep(0)
            assert queues[a].get_nowait().round == 2 and queues[b].get_nowait().round == 2
        finally:
            await agg.stop()

    asyncio.run(go())


@pytest.mark.parametrize(
    ("agents", "expected"),
    [
        (2, [True, True]),  # the first upload is kept, the second closes the round
        (4, [True, False, False, True]),  # the second and third are folded: a worker thread
    ],
)
def test_uploads_that_fold_nothing_are_filed_on_the_event_loops_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, agents: int, expected: list[bool]
) -> None:
    filed: list[bool] = []
    real = Aggregator._file_and_hold

    def spy(self: Aggregator, rows: Any, updates: Any, inline: bool = False) -> Any:
        on_loop = threading.current_thread() is threading.main_thread()
        assert on_loop is inline
        filed.append(on_loop)
        return real(self, rows, updates, inline)

    monkeypatch.setattr(Aggregator, "_file_and_hold", spy)

    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=agents, rounds=2))
        await agg.start()
        try:
            ids = await register(agg, agents)
            for i, agent_id in enumerate(ids):
                (outcome,) = await agg.upload_many([(request(agent_id), weights(float(i)))])
                assert isinstance(outcome, UploadResponse)
            model = await agg.wait_for_global(0, 5)
            assert model is not None and model.round == 1
            mean = sum(range(agents)) / agents
            np.testing.assert_allclose(model.weights["w"], np.full(3, mean, np.float32))
            assert len(agg.store.local_models(1)) == agents
        finally:
            await agg.stop()

    asyncio.run(go())
    assert filed == expected


def test_an_upload_refused_after_its_blob_was_written_leaves_no_blob(tmp_path: Path) -> None:
    # Uploads are checked and written before their rows are filed; one refused at filing (a
    # second from the same agent, filed after its first) must not leave its blob behind, nor
    # take a blob that a filed row names (the same bytes as another agent's upload).
    async def go() -> None:
        agg = Aggregator(AggregatorConfig(data_dir=tmp_path, min_agents=3))
        await agg.start()
        try:
            a, b, _ = await register(agg, 3)
            before = agg.blobs.keys()
            uploads = [(a, 1.0), (a, 2.0), (b, 3.0), (a, 3.0)]  # a's last: the bytes of b's
            outcomes = await asyncio.gather(
                *(agg.upload(request(agent), weights(value)) for agent, value in uploads),
                return_exceptions=True,
            )
            # Checked on worker threads: which of a's comes first to be filed varies.
            taken = [
                u for u, o in zip(uploads, outcomes, strict=True) if not isinstance(o, Exception)
            ]
            refused = [o for o in outcomes if isinstance(o, ProtocolError)]
            assert len(taken) == 2 and (b, 3.0) in taken, outcomes
            assert [o.code for o in refused] == ["duplicate_upload"] * 2
            assert agg.blobs.keys() - before == {blob_id(weights(value)) for _, value in taken}
            assert not agg._claims
        finally:
            await agg.stop()

    asyncio.run(go())
