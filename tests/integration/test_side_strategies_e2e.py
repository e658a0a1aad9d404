"""SCAFFOLD and FedCurv end to end, over the real protocol: a real aggregator with real agent
processes (the digits TorchClassifier), and `fedloop simulate` (the logistic-regression
engine, with partial participation). After the run, every stored global model and the stored
server state are recomputed in plain numpy from the stored local models and their extra
tensors, with the papers' formulas (Karimireddy et al. 2020, Algorithm 1, option II; Shoham
et al. 2019), and so are the agents' own kept tensors (SCAFFOLD's c_i)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from checks import opened
from harness import Server, start_agent

from fedloop.agent.client import AggregatorClient, Refused
from fedloop.protocol import codec
from fedloop.security import tokens
from fedloop.sim import LocalBackend, SimSettings, run
from fedloop.store.db import Store, database_url
from fedloop.types import Weights

DIGITS = "fedloop.ml.engines:digits_engine"
LOGREG = "fedloop.sim.engines:logreg_engine"
DIGITS_LR = 0.05  # TorchClassifier's default learning rate


def f64(weights: Weights) -> dict[str, np.ndarray]:
    return {k: v.astype(np.float64) for k, v in weights.items()}


class Run:
    """What the store holds of a finished run: global models, server states, local uploads
    (model and extras apart), per round."""

    def __init__(self, data_dir: Path) -> None:
        with opened(data_dir) as (store, blobs):
            self.agents = {a.id: a.name for a in store.agents()}
            rows = store.global_models()
            self.globals = {g.round: codec.decode(blobs.get(g.model_id)) for g in rows}
            self.states = {
                g.round: codec.decode(blobs.get(g.state_id)) if g.state_id else {} for g in rows
            }
            self.uploads: dict[int, list[tuple[str, int, dict[str, float], Weights, Weights]]] = {}
            for r in self.globals:
                if r == 0:
                    continue
                self.uploads[r] = []
                for row in store.local_models(r):
                    body = codec.decode(blobs.get(row.model_id))
                    model = {k: v for k, v in body.items() if "/" not in k}
                    extras = {k: v for k, v in body.items() if "/" in k}
                    self.uploads[r].append(
                        (row.agent_id, row.num_samples, dict(row.metrics), model, extras)
                    )

    @property
    def last(self) -> int:
        return max(self.globals)


def check_scaffold(
    run: Run, num_agents: int, lr: float, sampled: int, steps_of: Callable[[int, Any], float]
) -> dict[str, dict[str, np.ndarray]]:
    """Recompute SCAFFOLD from the store (server_lr 1): x and c per round, each agent's option
    II Delta c_i (K = steps_of(num_samples, metrics) local steps), and return each agent's
    c_i = sum of its Delta c_i."""
    keys = list(run.globals[0])
    c = {k: np.zeros(run.globals[0][k].shape) for k in keys}
    ci: dict[str, dict[str, np.ndarray]] = {}
    for r in range(1, run.last + 1):
        x = f64(run.globals[r - 1])
        uploads = run.uploads[r]
        assert len(uploads) == sampled, (r, len(uploads))
        for agent, samples, metrics, y, extras in uploads:
            assert sorted(extras) == sorted(f"scaffold.dc/{k}" for k in keys)
            steps = steps_of(samples, metrics)
            for k in keys:
                # the agent's engine got this round's c: dc = -c + (x - y) / (K lr)
                option_two = -c[k] + (x[k] - y[k].astype(np.float64)) / (steps * lr)
                dc = extras[f"scaffold.dc/{k}"]
                assert dc.dtype == y[k].dtype
                np.testing.assert_allclose(
                    dc, option_two, rtol=1e-4, atol=1e-5 * (1 + abs(option_two).max())
                )
                mine = ci.setdefault(agent, {k: np.zeros(x[k].shape) for k in keys})
                mine[k] = mine[k] + dc.astype(np.float64)
        for k in keys:
            mean_y = np.mean([y[k].astype(np.float64) for _, _, _, y, _ in uploads], axis=0)
            mean_dc = np.mean(
                [e[f"scaffold.dc/{k}"].astype(np.float64) for *_, e in uploads], axis=0
            )
            expected_x = x[k] + (mean_y - x[k])
            np.testing.assert_allclose(
                run.globals[r][k], expected_x.astype(np.float32), rtol=1e-6, atol=1e-7
            )
            c[k] = c[k] + (len(uploads) / num_agents) * mean_dc
            np.testing.assert_allclose(
                run.states[r][f"scaffold.c/{k}"], c[k], rtol=1e-12, atol=1e-15
            )
    return ci


def check_fedcurv(run: Run) -> None:
    """Recompute FedCurv from the store: FedAvg weights, sums of F_i and F_i * w_i."""
    keys = list(run.globals[0])
    for r in range(1, run.last + 1):
        uploads = run.uploads[r]
        total = sum(n for _, n, _, _, _ in uploads)
        for k in keys:
            mean = sum(n * y[k].astype(np.float64) for _, n, _, y, _ in uploads) / total
            np.testing.assert_allclose(
                run.globals[r][k], mean.astype(np.float32), rtol=1e-6, atol=1e-7
            )
            fisher = [e[f"fedcurv.fisher/{k}"].astype(np.float64) for *_, e in uploads]
            product = [e[f"fedcurv.fw/{k}"].astype(np.float64) for *_, e in uploads]
            assert all((f >= 0).all() for f in fisher) and any(f.any() for f in fisher)
            for f, fw, (*_, y, _) in zip(fisher, product, uploads, strict=True):
                # what the agent uploaded is its Fisher diagonal times its own weights
                np.testing.assert_allclose(fw, f * y[k], rtol=1e-6, atol=1e-12)
            np.testing.assert_allclose(
                run.states[r][f"fedcurv.fisher/{k}"], sum(fisher), rtol=1e-12
            )
            np.testing.assert_allclose(
                run.states[r][f"fedcurv.fw/{k}"], sum(product), rtol=1e-12, atol=1e-300
            )


def _agents(server: Server, agents: list[subprocess.Popen[bytes]], count: int) -> None:
    for i in range(count):
        args = ["--set", f"agent_index={i}", "--set", f"num_agents={count}", "--set", "epochs=1"]
        agents.append(start_agent(server, f"site{i}", DIGITS, *args))


def _finish(server: Server, agents: list[subprocess.Popen[bytes]]) -> None:
    server.wait_for(lambda s: s["finished"], timeout=240)
    for i, process in enumerate(agents):
        assert process.wait(timeout=60) == 0, (server.root / f"site{i}.log").read_text()[-3000:]


def test_deployed_scaffold_follows_the_paper(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(rounds=3, min_agents=2, strategy={"name": "scaffold"})
    _agents(server, agents, 2)
    _finish(server, agents)
    run = Run(server.data_dir)
    assert run.last == 3
    ci = check_scaffold(
        run, num_agents=2, lr=DIGITS_LR, sampled=2, steps_of=lambda n, m: m["local_steps"]
    )
    # Each agent kept c_i = sum of its accepted Delta c_i in its working directory.
    for agent_id, name in run.agents.items():
        kept = codec.decode(
            (server.root / name / f"side-scaffold-{agent_id}.safetensors").read_bytes()
        )
        assert int(kept.pop("fedloop.round")) == 3
        assert sorted(kept) == sorted(f"scaffold.ci/{k}" for k in ci[agent_id])
        for k, value in ci[agent_id].items():
            np.testing.assert_allclose(kept[f"scaffold.ci/{k}"], value, rtol=1e-12, atol=1e-12)
    # with full participation the server's c is the mean of the agents' c_i
    for k in run.globals[0]:
        mean = np.mean([ci[a][k] for a in ci], axis=0)
        np.testing.assert_allclose(run.states[3][f"scaffold.c/{k}"], mean, rtol=1e-9, atol=1e-12)


def test_deployed_fedcurv_follows_the_paper(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(
        rounds=2, min_agents=2, strategy={"name": "fedcurv", "penalty": 0.5}
    )
    _agents(server, agents, 2)
    _finish(server, agents)
    run = Run(server.data_dir)
    assert run.last == 2
    check_fedcurv(run)
    # each agent kept its own last contribution, the extras of its round-2 upload
    for agent_id, name in run.agents.items():
        kept = codec.decode(
            (server.root / name / f"side-fedcurv-{agent_id}.safetensors").read_bytes()
        )
        assert int(kept.pop("fedloop.round")) == 2
        (extras,) = [e for a, *_, e in run.uploads[2] if a == agent_id]
        assert sorted(kept) == sorted(extras)
        for k, value in extras.items():
            np.testing.assert_array_equal(kept[k], value.astype(np.float64))


def test_an_engine_without_scaffold_stops_its_agent_with_a_clear_error(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(rounds=2, strategy={"name": "scaffold"})
    agents.append(start_agent(server, "plain", "engines:ShiftEngine"))
    assert agents[0].wait(timeout=60) != 0
    log = (server.root / "plain.log").read_text()
    assert "does not support strategy 'scaffold'" in log, log[-2000:]
    status = server.status()
    assert (status["round"], status["uploads"], status["global_round"]) == (1, 0, 0)
    # a client that sends no extras is told what is missing, and nothing is stored
    client = AggregatorClient(server.url)
    try:
        agent_id = client.register("plain").agent_id
        model = {"w": np.ones((4, 3), np.float32), "b": np.ones(3, np.float32)}
        with pytest.raises(Refused) as refused:
            client.upload(agent_id, 1, codec.encode(model), 10)
        assert (refused.value.status, refused.value.code) == (422, "missing_extras")
        assert "scaffold.dc/<tensor>" in str(refused.value)
        assert client.strategy_state(0)["scaffold.c/w"].dtype == np.float64
    finally:
        client.close()
    with opened(server.data_dir) as (store, _):
        assert store.count_local_models() == 0


def test_shipped_state_needs_the_same_credentials_as_the_model(make_server: Any) -> None:
    server: Server = make_server(auth=True, strategy={"name": "scaffold"})
    store = Store(database_url(server.data_dir, None))
    try:
        enrollment = tokens.new_secret(tokens.ENROLLMENT_PREFIX)
        store.add_token(tokens.ENROLLMENT, "site", tokens.hash_secret(enrollment))
    finally:
        store.close()
    model = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    reply = httpx.post(
        server.url + "/v1/register",
        content=codec.encode(model),
        headers={
            "x-fedloop-message": json.dumps({"protocol": 1, "agent_name": "site"}),
            "authorization": f"Bearer {enrollment}",
        },
    )
    assert reply.status_code == 200, reply.text
    credential = reply.json()["credential"]
    path = "/v1/models/global/0/state"
    assert server.get(path).status_code == 401
    other = tokens.new_secret(tokens.ENROLLMENT_PREFIX)
    assert server.get(path, headers={"authorization": f"Bearer {other}"}).status_code == 401
    ok = server.get(path, headers={"authorization": f"Bearer {credential}"})
    assert ok.status_code == 200
    assert list(codec.decode(ok.content)) == ["scaffold.c/w", "scaffold.c/b"]
    missing = server.get(
        "/v1/models/global/5/state", headers={"authorization": f"Bearer {credential}"}
    )
    assert (missing.status_code, missing.json()["error"]) == (404, "no_such_round")


@pytest.mark.parametrize("pool", ["process", "thread"])
def test_simulated_scaffold_with_partial_participation_follows_the_paper(
    tmp_path: Path, pool: str
) -> None:
    settings = SimSettings(
        LOGREG,
        num_agents=4,
        rounds=3,
        fraction=0.5,
        data_dir=tmp_path / "sim",
        strategy="scaffold",
        params={"skew": 1.0, "lr": 0.3, "epochs": 2},
        evaluate=False,
        keep_local_models=True,
    )
    run(settings, LocalBackend(workers=2, pool=pool))  # type: ignore[arg-type]
    stored = Run(settings.data_dir)
    assert stored.last == 3
    # N = 4 registered agents, 2 sampled a round: c <- c + (2/4) mean(Delta c_i)
    # K: 2 epochs of LogRegEngine's batches of 16
    ci = check_scaffold(
        stored, num_agents=4, lr=0.3, sampled=2, steps_of=lambda n, m: 2 * -(-n // 16)
    )
    # each virtual agent's c_i is kept under the data dir, also for rounds it sat out
    names = {name: agent_id for agent_id, name in stored.agents.items()}
    for name, agent_id in names.items():
        path = settings.data_dir / "side" / f"side-scaffold-{name}.safetensors"
        if agent_id not in ci:
            assert not path.exists()
            continue
        kept = codec.decode(path.read_bytes())
        kept.pop("fedloop.round")
        for k, value in ci[agent_id].items():
            np.testing.assert_allclose(kept[f"scaffold.ci/{k}"], value, rtol=1e-12, atol=1e-12)
    assert not list((settings.data_dir / "side").glob("shipped-*"))


def test_simulated_fedcurv_follows_the_paper(tmp_path: Path) -> None:
    settings = SimSettings(
        LOGREG,
        num_agents=3,
        rounds=3,
        data_dir=tmp_path / "sim",
        strategy="fedcurv",
        strategy_params={"penalty": 0.1},
        params={"skew": 1.0},
        evaluate=False,
        keep_local_models=True,
    )
    run(settings, LocalBackend(workers=1, pool="thread"))
    stored = Run(settings.data_dir)
    assert stored.last == 3
    check_fedcurv(stored)


def _kept(path: Path) -> tuple[dict[str, np.ndarray], int]:
    kept = codec.decode(path.read_bytes())
    return kept, int(kept.pop("fedloop.round"))


def test_a_restarted_scaffold_agent_trains_on_from_its_kept_control_variate(
    make_server: Any, agents: list[subprocess.Popen[bytes]]
) -> None:
    server: Server = make_server(rounds=3, min_agents=2, strategy={"name": "scaffold"})
    sets = ["--set", "num_agents=2", "--set", "skew=1.0"]
    # site0 stops after round 1 and is started again (same workdir) while round 2 waits for it
    agents.append(
        start_agent(server, "site0", LOGREG, "--set", "agent_index=0", *sets, "--rounds", "1")
    )
    agents.append(start_agent(server, "site1", LOGREG, "--set", "agent_index=1", *sets))
    assert agents[0].wait(timeout=60) == 0
    server.wait_for(lambda s: s["global_round"] == 1 and s["uploads"] == 1)
    agents.append(start_agent(server, "site0", LOGREG, "--set", "agent_index=0", *sets))
    server.wait_for(lambda s: s["finished"], timeout=60)
    for process in agents[1:]:
        assert process.wait(timeout=30) == 0
    run = Run(server.data_dir)
    steps = lambda n, m: -(-n // 16)  # noqa: E731 - one epoch of batches of 16
    ci = check_scaffold(run, num_agents=2, lr=0.5, sampled=2, steps_of=steps)
    # Every local model is what the engine trains from the global model, c and the agent's
    # own c_i so far: after the restart too, site0 went on from the c_i it kept.
    from fedloop.sim.engines import logreg_engine

    ids = {name: agent_id for agent_id, name in run.agents.items()}
    for name, index in (("site0", 0), ("site1", 1)):
        engine = logreg_engine(index, 2, skew=1.0)
        mine = {k: np.zeros(v.shape) for k, v in run.globals[0].items()}
        for r in range(1, 4):
            state = {
                f"scaffold.c/{k}": run.states[r - 1].get(f"scaffold.c/{k}", np.zeros(v.shape))
                for k, v in mine.items()
            }
            state.update({f"scaffold.ci/{k}": v for k, v in mine.items()})
            new, _, _ = engine.train(
                run.globals[r - 1], {"round": r, "strategy": "scaffold", "strategy_state": state}
            )
            (upload,) = [u for u in run.uploads[r] if u[0] == ids[name]]
            for k in mine:
                np.testing.assert_array_equal(upload[3][k], new[k])
                mine[k] = mine[k] + upload[4][f"scaffold.dc/{k}"].astype(np.float64)
        kept, kept_round = _kept(server.root / name / f"side-scaffold-{ids[name]}.safetensors")
        assert kept_round == 3
        for k, value in ci[ids[name]].items():
            np.testing.assert_allclose(kept[f"scaffold.ci/{k}"], value, rtol=1e-12, atol=1e-12)


def test_an_accepted_upload_sent_again_is_kept_once(make_server: Any, tmp_path: Path) -> None:
    from fedloop.agent import Agent
    from fedloop.errors import ConnectionFailed
    from fedloop.sim.engines import logreg_engine

    server: Server = make_server(rounds=2, strategy={"name": "scaffold"})
    agent = Agent(logreg_engine(0, 1), server.url, "site", tmp_path / "site", mode="poll")
    real = agent.client.upload
    sent: list[int] = []

    def answer_lost_once(*args: Any, **kwargs: Any) -> Any:
        sent.append(args[1])
        reply = real(*args, **kwargs)
        if len(sent) == 1:  # the aggregator took it, the agent never heard
            raise ConnectionFailed("the answer was lost")
        return reply

    agent.client.upload = answer_lost_once  # type: ignore[method-assign]
    agent.run()
    assert sent == [1, 1, 2]  # round 1 again: refused as duplicate_upload
    run = Run(server.data_dir)
    ci = check_scaffold(run, num_agents=1, lr=0.5, sampled=1, steps_of=lambda n, m: -(-n // 16))
    ((agent_id, values),) = ci.items()
    kept, kept_round = _kept(tmp_path / "site" / f"side-scaffold-{agent_id}.safetensors")
    assert kept_round == 2
    for k, value in values.items():  # dc of round 1 counted once
        np.testing.assert_allclose(kept[f"scaffold.ci/{k}"], value, rtol=1e-12, atol=1e-12)
