"""One method of each strategy family end to end: real aggregator and agent processes, and the
stored global models recomputed from the stored local models with the paper's formula."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from checks import opened
from harness import Server, env, start_agent

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.demo import write_config
from fedloop.protocol import codec
from fedloop.store.blobs import BlobStore
from fedloop.store.db import LocalModelRow, Store
from fedloop.strategies import FedAdam, Update
from fedloop.types import Weights

ZEROS = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


def _globals(store: Store, blobs: BlobStore) -> dict[int, Weights]:
    return {g.round: codec.decode(blobs.get(g.model_id)) for g in store.global_models()}


def _weights(blobs: BlobStore, row: LocalModelRow) -> Weights:
    return codec.decode(blobs.get(row.model_id))


def _start(
    server: Server,
    agents: list[subprocess.Popen[bytes]],
    name: str,
    engine: str = "engines:ShiftEngine",
    **sets: Any,
) -> None:
    args = [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]
    agents.append(start_agent(server, name, engine, *args))


def _finish(server: Server, agents: list[subprocess.Popen[bytes]], timeout: float = 30) -> None:
    server.wait_for(lambda s: s["finished"], timeout=timeout)
    for process in agents:
        assert process.wait(timeout=30) == 0


def test_fedadam_globals_follow_the_formula_from_the_stored_local_models(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    params = {"eta": 0.1, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3}
    server: Server = make_server(rounds=3, min_agents=3, strategy={"name": "fedadam", **params})
    for i, (offset, samples) in enumerate([(1.0, 10), (-2.0, 30), (0.5, 60)]):
        _start(server, agents, f"a{i}", offset=offset, samples=samples)
    _finish(server, agents)

    reference = FedAdam(**params)  # the same code, fed what the store says the agents sent
    with opened(server.data_dir) as (store, blobs):
        globals_ = _globals(store, blobs)
        assert sorted(globals_) == [0, 1, 2, 3]
        for r in (1, 2, 3):
            rows = store.local_models(r)
            assert len(rows) == 3 and all(row.base_round == r - 1 for row in rows)
            updates = [
                Update(_weights(blobs, row), row.num_samples, row.agent_id, row.base_round)
                for row in rows
            ]
            expected = reference.aggregate(globals_[r - 1], updates, server_round=r)
            for key in expected:
                np.testing.assert_allclose(globals_[r][key], expected[key], rtol=1e-6, atol=1e-7)
        # and by hand for round 1, where m_0 = 0 and v_0 = tau^2: Delta = 0.1 - 0.6 + 0.3
        delta = (1.0 * 10 - 2.0 * 30 + 0.5 * 60) / 100
        m = 0.1 * delta
        v = 0.99 * 1e-6 + 0.01 * delta**2
        np.testing.assert_allclose(globals_[1]["w"], 0.1 * m / (np.sqrt(v) + 1e-3), rtol=1e-5)
        # the server's moments were persisted with the last global model
        last = store.global_model(3)
        assert last is not None and last.state_id
        state = codec.decode(blobs.get(last.state_id))
        for key, value in reference.state().items():
            np.testing.assert_allclose(state[key], value, rtol=1e-12)


def test_krum_never_picks_the_byzantine_agent(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(rounds=3, min_agents=5, strategy={"name": "krum", "f": 1})
    for i, offset in enumerate([1.0, 1.2, 0.8, 1.1]):
        _start(server, agents, f"honest{i}", offset=offset)
    _start(server, agents, "byzantine", offset=1000.0)
    _finish(server, agents)

    with opened(server.data_dir) as (store, blobs):
        byzantine = next(a.id for a in store.agents() if a.name == "byzantine")
        globals_ = _globals(store, blobs)
        assert sorted(globals_) == [0, 1, 2, 3]
        for r in (1, 2, 3):
            locals_ = {row.agent_id: _weights(blobs, row) for row in store.local_models(r)}
            assert len(locals_) == 5
            chosen = [
                agent
                for agent, weights in locals_.items()
                if all(np.array_equal(weights[k], globals_[r][k]) for k in weights)
            ]
            assert len(chosen) == 1 and chosen[0] != byzantine, chosen
            # honest steps are 0.8..1.2 per round; one Byzantine step would be 1000
            assert float(np.abs(globals_[r]["w"]).max()) <= 1.2 * r + 1e-5


def test_fedasync_mixes_every_upload_in_with_its_staleness(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    alpha, a = 0.5, 0.5
    strategy = {"name": "fedasync", "alpha": alpha, "staleness": "polynomial", "a": a}
    server: Server = make_server(rounds=20, strategy=strategy)
    # All three start training on global model 0 together; the faster ones race ahead.
    gate = server.root / "gate"
    for name, offset, delay in [("slow", 3.0, 0.6), ("medium", 2.0, 0.3), ("fast", 1.0, 0.15)]:
        _start(
            server, agents, name, "engines:GatedShiftEngine", offset=offset, delay=delay, gate=gate
        )
    server.wait_for(lambda s: s["registered_agents"] == 3)
    gate.touch()
    _finish(server, agents, timeout=40)
    assert server.status()["asynchronous"] is True

    with opened(server.data_dir) as (store, blobs):
        names = {agent.id: agent.name for agent in store.agents()}
        globals_ = _globals(store, blobs)
        assert sorted(globals_) == list(range(21))
        stale: list[int] = []
        for r in range(1, 21):
            rows = store.local_models(r)
            assert len(rows) == 1, "FedAsync makes one global model per upload"
            (row,) = rows
            staleness = (r - 1) - row.base_round
            assert staleness >= 0
            if staleness:
                stale.append(staleness)
            mix = alpha * (staleness + 1) ** -a
            y = _weights(blobs, row)
            for key in y:
                expected = (1 - mix) * globals_[r - 1][key].astype(np.float64) + mix * y[key]
                np.testing.assert_allclose(globals_[r][key], expected, rtol=1e-6, atol=1e-6)
            assert not np.array_equal(globals_[r]["w"], globals_[r - 1]["w"])
            model = store.global_model(r)
            assert model is not None and model.contributors == [row.agent_id]
        assert stale, "no upload was stale; the slow agent should have been"
        slow_rounds = [
            (r, row.base_round)
            for r in range(1, 21)
            for row in store.local_models(r)
            if names[row.agent_id] == "slow"
        ]
        assert any(r - 1 > base for r, base in slow_rounds), slow_rounds


def test_fedbuff_buffer_survives_a_kill_and_refuses_duplicates(make_server: Any) -> None:
    server: Server = make_server(rounds=3, strategy={"name": "fedbuff", "buffer_size": 3})
    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", ZEROS).agent_id for i in range(4)]
    assert client.status().needed == 3

    def model(value: float) -> bytes:
        return codec.encode({k: v + value for k, v in ZEROS.items()})

    reply = client.upload(ids[0], 1, model(1.0), 10)
    assert (reply.round, reply.uploads, reply.needed) == (1, 1, 3)
    for code, agent, round_number in [
        ("duplicate_upload", ids[0], 1),  # same agent, same base model
        ("round_not_open", ids[1], 2),  # global model 1 does not exist yet
    ]:
        with pytest.raises(Refused) as refused:
            client.upload(agent, round_number, model(9.0), 10)
        assert refused.value.code == code
    client.upload(ids[1], 1, model(2.0), 10)

    server.kill()  # two uploads are in the buffer, committed but not aggregated
    client.close()
    server.start()
    client = AggregatorClient(server.url)
    status = client.status()
    assert (status.round, status.uploads, status.global_round) == (1, 2, 0)
    with pytest.raises(Refused) as refused:
        client.upload(ids[1], 1, model(9.0), 10)
    assert refused.value.code == "duplicate_upload"

    client.upload(ids[2], 1, model(6.0), 10)  # fills the buffer: global model 1
    np.testing.assert_allclose(client.global_model(1)["w"], 3.0)
    # a stale upload (trained on global model 0) goes into global model 2's buffer
    reply = client.upload(ids[3], 1, model(4.0), 10)
    assert (reply.round, reply.uploads) == (2, 1)
    with pytest.raises(Refused) as refused:  # an agent already in the buffer waits for it
        client.upload(ids[3], 2, model(4.0), 10)
    assert refused.value.code == "duplicate_upload"
    client.upload(ids[0], 2, model(5.0), 10)
    client.upload(ids[1], 2, model(6.0), 10)
    # each delta against the agent's own base model: 3 + mean(4 - 0, 5 - 3, 6 - 3)
    np.testing.assert_allclose(client.global_model(2)["w"], 6.0)
    with opened(server.data_dir) as (store, _):
        rows = store.local_models(2)
        assert sorted((r.agent_id, r.base_round) for r in rows) == sorted(
            [(ids[3], 0), (ids[0], 1), (ids[1], 1)]
        )
    client.close()


def test_fedbuff_agents_wait_for_the_global_model_their_upload_goes_into(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(
        rounds=4, min_agents=2, strategy={"name": "fedbuff", "buffer_size": 2}
    )
    for i, delay in enumerate([0.0, 0.2, 0.5]):
        _start(server, agents, f"a{i}", offset=i + 1, delay=delay)
    _finish(server, agents)
    with opened(server.data_dir) as (store, blobs):
        globals_ = _globals(store, blobs)
        assert sorted(globals_) == [0, 1, 2, 3, 4]
        for r in range(1, 5):
            rows = store.local_models(r)
            model = store.global_model(r)
            assert model is not None
            contributors = [row for row in rows if row.agent_id in model.contributors]
            assert len(contributors) == len(rows) == len(model.contributors) == 2
            # x_r = x_{r-1} + mean(y_i - x_{base_i}): each agent's progress on its own base
            expected = _fedbuff_reference(globals_, r, blobs, contributors)
            for key, value in expected.items():
                np.testing.assert_allclose(globals_[r][key], value, rtol=1e-6, atol=1e-6)
    for i in range(3):
        log = (server.root / f"a{i}.log").read_text()
        assert "Traceback" not in log, log


def _fedbuff_reference(
    globals_: dict[int, Weights],
    r: int,
    blobs: BlobStore,
    rows: list[LocalModelRow],
    server_lr: float = 1.0,
    sqrt_staleness: bool = False,
) -> dict[str, np.ndarray]:
    """Nguyen et al. 2022: x_r = x_{r-1} + lr/K sum_i s_i (y_i - x_{base_i}), in float64, from
    the stored global and local models; s_i = 1/sqrt(1 + staleness) or 1."""
    x = globals_[r - 1]
    out = {}
    for key in x:
        total = np.zeros(x[key].shape)
        for row in rows:
            staleness = (r - 1) - row.base_round
            s = 1 / np.sqrt(1 + staleness) if sqrt_staleness else 1.0
            y = _weights(blobs, row)[key].astype(np.float64)
            total += s * (y - globals_[row.base_round][key].astype(np.float64))
        out[key] = x[key].astype(np.float64) + server_lr * total / len(rows)
    return out


@pytest.mark.parametrize("staleness", ["constant", "polynomial"])
def test_fedbuff_takes_a_stale_delta_against_its_base_model_across_a_restart(
    make_server: Any, staleness: str
) -> None:
    strategy: dict[str, Any] = {"name": "fedbuff", "buffer_size": 2, "server_lr": 0.8}
    if staleness != "constant":  # the default
        strategy["staleness"] = staleness  # a = 0.5: the paper's 1/sqrt(1 + staleness)
    server: Server = make_server(rounds=3, strategy=strategy)
    client = AggregatorClient(server.url)
    start = {k: v + 0.5 for k, v in ZEROS.items()}  # global model 0
    ids = [client.register("a0", start).agent_id]
    ids += [client.register(f"a{i}", ZEROS).agent_id for i in (1, 2)]

    def moved(base: Weights, step: float) -> bytes:
        return codec.encode({k: (v + step).astype(v.dtype) for k, v in base.items()})

    g0 = client.global_model(0)
    client.upload(ids[0], 1, moved(g0, 1.0), 10)
    client.upload(ids[1], 1, moved(g0, 3.0), 10)  # global model 1: 0.5 + 0.8 * 2
    g1 = client.global_model(1)
    np.testing.assert_allclose(g1["w"], 2.1, rtol=1e-6)
    # a2 trained on global model 0 too, slower: its upload goes into global model 2's buffer
    reply = client.upload(ids[2], 1, moved(g0, 1.0), 10)
    assert (reply.round, reply.uploads) == (2, 1)

    server.kill()  # the stale upload is committed in the buffer, not aggregated
    client.close()
    server.start()
    client = AggregatorClient(server.url)
    status = client.status()
    assert (status.round, status.uploads, status.global_round) == (2, 1, 1)

    client.upload(ids[0], 2, moved(g1, 2.0), 10)  # fills the buffer: global model 2
    # a2 moved +1 from global 0, a0 +2 from global 1: 2.1 + 0.8 * (s * 1 + 2) / 2, where the
    # plain mean of the buffer (deltas against global 1) would give 2.1 + 0.8 * (-0.1 + 2) / 2
    s = 1 / np.sqrt(2) if staleness == "polynomial" else 1.0
    np.testing.assert_allclose(client.global_model(2)["w"], 2.1 + 0.4 * (s + 2), rtol=1e-6)
    client.close()

    with opened(server.data_dir) as (store, blobs):
        globals_ = _globals(store, blobs)
        rows = store.local_models(2)
        assert sorted((row.agent_id, row.base_round) for row in rows) == sorted(
            [(ids[2], 0), (ids[0], 1)]
        )
        expected = _fedbuff_reference(
            globals_, 2, blobs, rows, server_lr=0.8, sqrt_staleness=staleness == "polynomial"
        )
        for key, value in expected.items():
            np.testing.assert_allclose(globals_[2][key], value, rtol=1e-6, atol=1e-6)


def test_a_round_waits_for_as_many_local_models_as_the_strategy_needs(
    make_server: Any, tmp_path: Path
) -> None:
    """Krum with f = 1 needs 5 local models. With 3 agents, status says so and the round
    waits, with one sentence in the log at start; before, it showed 3 needed and the
    aggregation failed with a traceback every retry, for ever."""
    server: Server = make_server(strategy={"name": "krum", "f": 1})
    assert "aggregates no fewer than 5 local models" in server.log()
    client = AggregatorClient(server.url)
    ids = [client.register(f"site-{i}", ZEROS).agent_id for i in range(3)]
    replies = [client.upload(a, 1, codec.encode(ZEROS), 10) for a in ids]
    assert [(r.uploads, r.needed) for r in replies] == [(1, 5), (2, 5), (3, 5)]
    status = server.status()
    assert (status["round"], status["uploads"], status["needed"]) == (1, 3, 5)
    ids += [client.register(f"site-{i}", ZEROS).agent_id for i in (3, 4)]
    for agent_id in ids[3:]:
        client.upload(agent_id, 1, codec.encode(ZEROS), 10)
    server.wait_for(lambda s: s["global_round"] == 1)
    client.close()
    assert "Traceback" not in server.log()
    assert "aggregation of round 1 failed" not in server.log()

    # With fewer agents allowed than the strategy needs, the aggregator does not start.
    config = tmp_path / "few.toml"
    write_config(config, 0, tmp_path / "few", max_agents=4, strategy={"name": "bulyan", "f": 1})
    refused = subprocess.run(
        [sys.executable, "-m", "fedloop", "aggregator", "--config", str(config)],
        capture_output=True, text=True, timeout=60, env=env(),
    )  # fmt: skip
    assert refused.returncode == 2, refused.stderr
    assert "no fewer than 7 local models, but max_agents = 4" in refused.stderr
    assert "Traceback" not in refused.stderr
