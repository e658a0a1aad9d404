"""`fedloop simulate`: virtual agents over the real aggregator, on local workers and on Ray."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from fedloop.errors import ConfigError
from fedloop.protocol import codec
from fedloop.sim import (
    AgentFailed,
    LocalBackend,
    Observer,
    RayBackend,
    SimSettings,
    run,
    sample_agents,
)
from fedloop.sim.cli import simulate
from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store, database_url
from fedloop.types import Weights

LOGREG = "fedloop.sim.engines:logreg_engine"


class Boom:
    """Agent 3 raises in train(); the others return the global model."""

    def __init__(self, agent_index: int, num_agents: int) -> None:
        self.index = agent_index

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(3, dtype=np.float32)}

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        if self.index == 3:
            raise ValueError("the data of agent 3 is corrupt")
        return weights, 1, {}


class NaNAgent:
    """Agent 2 returns a model with one NaN in its last tensor; `elements` float32 values each."""

    def __init__(self, agent_index: int, num_agents: int, elements: int = 8) -> None:
        self.index, self.elements = agent_index, elements

    def initial_weights(self) -> Weights:
        half = self.elements // 2
        return {"a": np.ones(half, np.float32), "b": np.ones(self.elements - half, np.float32)}

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        if self.index != 2:
            return weights, 1, {}
        bad = {k: np.array(v) for k, v in weights.items()}
        bad["b"][-1] = np.nan
        return bad, 1, {}


class NoDataFirst:
    """Every agent trains on no data in round 1 (num_samples 0), on some from round 2."""

    def __init__(self, agent_index: int, num_agents: int) -> None:
        self.index = agent_index

    def initial_weights(self) -> Weights:
        return {"w": np.zeros(3, dtype=np.float32)}

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        samples = 0 if config["round"] == 1 else self.index + 1
        return {"w": np.full(3, self.index + 1.0, np.float32)}, samples, {}


def records(data_dir: Path) -> tuple[dict[str, str], list[Any]]:
    store = Store(database_url(data_dir, None))
    try:
        names = {a.id: a.name for a in store.agents()}
        return names, store.global_models()
    finally:
        store.close()


def test_sampled_agents_train_on_worker_processes_and_the_rounds_are_stored(
    tmp_path: Path,
) -> None:
    settings = SimSettings(
        LOGREG, num_agents=20, rounds=3, fraction=0.5, seed=4, data_dir=tmp_path / "run"
    )
    result = run(settings, LocalBackend(workers=2, pool="process"))

    assert [r.round for r in result.rounds] == [1, 2, 3]
    assert result.database == tmp_path / "run" / "fedloop.db" and result.database.is_file()
    names, models = records(tmp_path / "run")
    assert len(names) == 20
    assert [m.round for m in models] == [0, 1, 2, 3]
    for model in models[1:]:
        # Exactly the agents the seeded sampler chose for the round, and nobody else.
        chosen = sample_agents(20, 0.5, model.round, seed=4)
        assert sorted(names[a] for a in model.contributors) == [f"sim-{i:06d}" for i in chosen]
    assert models[-1].metrics["accuracy"] > 0.8  # the aggregator's own evaluation
    assert result.rounds[-1].global_metrics == models[-1].metrics
    assert set(result.rounds[-1].local_metrics_mean) == {
        "loss",
        "accuracy",
        "local_steps",
        "local_momentum",
    }
    assert result.worker_peak_rss_mb > 0 and result.driver_peak_rss_mb > 0


def test_fednova_runs_on_the_logreg_agents_with_their_own_step_counts(tmp_path: Path) -> None:
    # The synthetic agents hold 32..96 samples, so their plain-SGD step counts differ: each
    # global model is the paper's x - tau_eff sum_i p_i (x - y_i) / tau_i of the stored models.
    settings = SimSettings(
        LOGREG, num_agents=4, rounds=2, data_dir=tmp_path / "run", evaluate=False,
        strategy="fednova", keep_local_models=True,
    )  # fmt: skip
    run(settings, LocalBackend(workers=1, pool="thread"))
    store = Store(database_url(tmp_path / "run", None))
    blobs = BlobStore(tmp_path / "run" / "blobs")

    def weights(model_id: str) -> dict[str, np.ndarray]:
        return {k: v.astype(np.float64) for k, v in codec.decode(blobs.get(model_id)).items()}

    try:
        models = store.global_models()
        assert [m.round for m in models] == [0, 1, 2]
        for r in (1, 2):
            rows = store.local_models(r)
            assert len(rows) == 4
            taus = [row.metrics["local_steps"] for row in rows]
            # one epoch of mini-batches of 16, plain SGD
            assert taus == [float(-(-row.num_samples // 16)) for row in rows]
            assert all(row.metrics["local_momentum"] == 0.0 for row in rows)
            assert len(set(taus)) > 1
            p = np.array([row.num_samples for row in rows], dtype=np.float64)
            p /= p.sum()
            x, got = weights(models[r - 1].model_id), weights(models[r].model_id)
            ys = [weights(row.model_id) for row in rows]
            tau_eff = float(p @ np.array(taus))
            for key in x:
                parts = zip(p, ys, taus, strict=True)
                d = sum(pi * (x[key] - y[key]) / tau for pi, y, tau in parts)
                np.testing.assert_allclose(got[key], x[key] - tau_eff * d, rtol=1e-5, atol=1e-6)
    finally:
        store.close()


def test_round_1_is_timed_from_its_training_not_from_the_registrations(tmp_path: Path) -> None:
    settings = SimSettings(
        LOGREG, num_agents=50, rounds=2, fraction=0.1, data_dir=tmp_path, evaluate=False
    )
    run(settings, LocalBackend(1, "thread"))
    store = Store(database_url(tmp_path, None))
    try:
        registered = max(agent.registered_at for agent in store.agents())
        models = store.global_models()
    finally:
        store.close()
    # `fedloop history`'s seconds: from the round's start to its global model.
    started = [m.created_at - m.seconds for m in models[1:]]
    assert started[0] > registered  # after every agent registered: set-up, not round 1
    assert started[1] >= models[1].created_at - 1e-6


def test_threads_and_processes_give_the_same_global_model(tmp_path: Path) -> None:
    common: dict[str, Any] = {"num_agents": 12, "rounds": 2, "fraction": 0.5, "evaluate": False}
    run(SimSettings(LOGREG, data_dir=tmp_path / "p", **common), LocalBackend(2, "process"))
    run(SimSettings(LOGREG, data_dir=tmp_path / "t", **common), LocalBackend(3, "thread"))
    # Blobs are content-addressed: the same id means bit-identical weights.
    assert [m.model_id for m in records(tmp_path / "p")[1]] == [
        m.model_id for m in records(tmp_path / "t")[1]
    ]


@pytest.mark.parametrize("keep", [False, True])
def test_local_models_are_filed_and_their_bytes_stored_only_when_asked(
    tmp_path: Path, keep: bool
) -> None:
    # Every local model differs (NoopEngine vary): nothing is deduplicated by content address.
    settings = SimSettings(
        "fedloop.ml.noop:NoopEngine", num_agents=4, rounds=2, params={"model_mb": 0.01,
        "vary": True}, data_dir=tmp_path / "run", evaluate=False, keep_local_models=keep,
    )  # fmt: skip
    run(settings, LocalBackend(workers=2, pool="process"))
    store = Store(database_url(tmp_path / "run", None))
    try:
        local = store.local_models()
        global_ids = {m.model_id for m in store.global_models()}
    finally:
        store.close()
    assert len(local) == 8 and len({row.model_id for row in local}) == 8  # rows always kept
    blobs = {path.stem for path in (tmp_path / "run" / "blobs").glob("*/*/*.safetensors")}
    local_ids = {row.model_id for row in local}
    assert global_ids <= blobs
    assert (local_ids <= blobs) if keep else not (local_ids & blobs)


def test_a_failing_agent_stops_the_run_with_its_index_and_error(tmp_path: Path) -> None:
    settings = SimSettings(f"{__name__}:Boom", num_agents=6, rounds=2, data_dir=tmp_path / "b")
    with pytest.raises(AgentFailed, match=r"virtual agent 3 failed in train.*corrupt") as info:
        run(settings, LocalBackend(2, "process"))
    assert "Traceback" in info.value.details


# 8 values go back as bytes through the pool; 1 M (4 MiB) in a result file the worker checks.
@pytest.mark.parametrize("elements", [8, 1 << 20])
def test_a_local_model_with_a_nan_is_refused_and_stops_the_run(
    tmp_path: Path, elements: int
) -> None:
    settings = SimSettings(
        f"{__name__}:NaNAgent",
        num_agents=4,
        rounds=2,
        params={"elements": elements},
        data_dir=tmp_path / "n",
        evaluate=False,
    )
    with pytest.raises(AgentFailed, match=r"refused virtual agent 2's .*'b' contains NaN"):
        run(settings, LocalBackend(2, "process"))
    _, models = records(tmp_path / "n")
    assert [m.round for m in models] == [0]  # no global model was made of it


def test_a_round_whose_sampled_agents_have_no_data_keeps_the_global_model(
    tmp_path: Path,
) -> None:
    # docs/decisions/0014: the round closes with the model it started from; the run goes on.
    settings = SimSettings(
        f"{__name__}:NoDataFirst", num_agents=6, rounds=2, fraction=0.5, data_dir=tmp_path
    )
    result = run(settings, LocalBackend(2, "process"))
    assert [r.round for r in result.rounds] == [1, 2]
    _, models = records(tmp_path)
    samples = sum(i + 1 for i in sample_agents(6, 0.5, 2, seed=0))
    assert [m.total_samples for m in models[1:]] == [0, samples]
    assert models[1].model_id == models[0].model_id != models[2].model_id


def test_an_earlier_run_is_kept_unless_overwrite(tmp_path: Path) -> None:
    settings = SimSettings(LOGREG, num_agents=3, rounds=1, data_dir=tmp_path, evaluate=False)
    run(settings, LocalBackend(1, "thread"))
    with pytest.raises(ConfigError, match="--overwrite"):
        run(settings, LocalBackend(1, "thread"))
    settings.overwrite, settings.rounds = True, 2
    assert len(run(settings, LocalBackend(1, "thread")).rounds) == 2
    assert [m.round for m in records(tmp_path)[1]] == [0, 1, 2]


@pytest.mark.parametrize(
    ("factory", "strategy_params", "error"),
    [
        (LOGREG, {"bogus": 1}, "no parameter bogus"),  # refused before any worker starts
        ("no_such_pkg:f", {}, "cannot import module 'no_such_pkg'"),  # by the workers' start
    ],
)
def test_an_early_error_leaves_no_worker_processes_or_scratch_files(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    factory: str,
    strategy_params: dict[str, Any],
    error: str,
) -> None:
    import os

    from fedloop.sim import local

    scratch = tmp_path / "scratch"  # where the workers' result files go (/dev/shm otherwise)
    scratch.mkdir()
    monkeypatch.setattr(local, "_scratch_root", lambda: str(scratch))
    backend = LocalBackend(2, "process")
    settings = SimSettings(
        factory, num_agents=3, rounds=1, data_dir=tmp_path / "d", evaluate=False,
        strategy_params=strategy_params,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=error):
        run(settings, backend)
    assert list(scratch.iterdir()) == []
    assert not [pid for pid in backend.pids if os.path.exists(f"/proc/{pid}")]


def test_a_ray_start_that_fails_half_way_shuts_its_ray_down(tmp_path: Path) -> None:
    ray = pytest.importorskip("ray", reason="the ray engine needs `pip install 'ray[default]'`")
    # A local Ray of 1 CPU starts, then cannot hold one agent of 2 CPUs.
    backend = RayBackend(cpus_per_agent=2, num_cpus=1)
    try:
        with pytest.raises(ConfigError, match="not enough for one agent"):
            run(SimSettings(LOGREG, num_agents=2, rounds=1, data_dir=tmp_path), backend)
        assert not ray.is_initialized()
    finally:
        if ray.is_initialized():
            ray.shutdown()


def test_asynchronous_strategies_are_refused_with_a_reason(tmp_path: Path) -> None:
    settings = SimSettings(LOGREG, num_agents=3, rounds=1, data_dir=tmp_path, strategy="fedbuff")
    with pytest.raises(ConfigError, match="synchronous"):
        run(settings, LocalBackend(1, "thread"))


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(simulate)

    @app.command()
    def other() -> None:  # a second command keeps typer's subcommand form: `app simulate …`
        pass

    return app


def test_the_command_prints_the_table_the_database_and_a_json_summary(tmp_path: Path) -> None:
    out = tmp_path / "cli"
    result = CliRunner().invoke(
        cli(),
        [
            "simulate",
            "fedloop.ml.noop:NoopEngine",
            "--set",
            "model_mb=0.001",
            "-n",
            "30",
            "--rounds",
            "2",
            "-C",
            "0.2",
            "--data-dir",
            str(out),
            "--workers",
            "2",
            "--pool",
            "thread",
            "--no-report",
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    assert f"database: {out / 'fedloop.db'}" in result.output
    assert "fedloop simulate" in result.output  # the table's title
    summary = json.loads(result.output.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["database"] == str(out / "fedloop.db")
    assert all(len(m.contributors) == 6 for m in records(out)[1][1:])


def test_the_command_reports_a_users_mistake_in_one_sentence(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli(), ["simulate", "no_such_pkg:f", "--data-dir", str(tmp_path), "--no-progress"]
    )
    assert result.exit_code == 2
    assert "cannot import module 'no_such_pkg'" in result.output
    assert "Traceback" not in result.output


def test_the_command_refuses_a_negative_seed_in_one_sentence(tmp_path: Path) -> None:
    result = CliRunner().invoke(
        cli(),
        ["simulate", LOGREG, "-n", "10", "-C", "0.5", "--seed", "-1", "--rounds", "1",
         "--data-dir", str(tmp_path), "--no-progress", "--pool", "thread"],
    )  # fmt: skip
    assert result.exit_code == 2
    assert result.output.strip() == "error: --seed must be 0 or more, got -1"


def test_ray_runs_the_same_simulation_as_local(tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray engine needs `pip install 'ray[default]'`")
    common: dict[str, Any] = {"num_agents": 8, "rounds": 2, "fraction": 0.5, "evaluate": False}
    result = run(
        SimSettings(LOGREG, data_dir=tmp_path / "ray", **common),
        RayBackend(cpus_per_agent=0.5, num_cpus=2),
    )
    assert len(result.rounds) == 2
    run(SimSettings(LOGREG, data_dir=tmp_path / "local", **common), LocalBackend(1, "thread"))
    assert [m.model_id for m in records(tmp_path / "ray")[1]] == [
        m.model_id for m in records(tmp_path / "local")[1]
    ]


@pytest.mark.parametrize("reuse", [True, False])
def test_ray_gpu_agents_reuse_their_worker_processes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reuse: bool
) -> None:
    """Ray starts a new process for every GPU task unless told otherwise: seconds of CUDA and
    framework start-up per chunk of agents (docs/simulation.md has the H200 figures)."""
    pytest.importorskip("ray", reason="the ray engine needs `pip install 'ray[default]'`")
    # Ray's workers find the test engines through the environment the local Ray starts with.
    monkeypatch.setenv("PYTHONPATH", str(Path(__file__).parent))

    class Pids(Observer):
        def __init__(self) -> None:
            self.pids: set[float] = set()
            self.trained = 0

        def on_agent_done(self, round_number: int, result: Any, done: int, total: int) -> None:
            self.pids.add(result.metrics["pid"])
            self.trained += 1

    seen = Pids()
    backend = RayBackend(
        cpus_per_agent=0.5, gpus_per_agent=0.5, num_cpus=2, num_gpus=1, reuse_workers=reuse
    )
    run(
        SimSettings("engines:PidEngine", num_agents=4, rounds=3, evaluate=False,
                    data_dir=tmp_path / "d"),
        backend, seen,
    )  # fmt: skip
    assert seen.trained == 12
    # 2 agents fit at once (1 GPU / 0.5): reused, at most that many processes train them all.
    # Ray's own default (2.60) starts a process per GPU task, a task per agent here: 12.
    assert len(seen.pids) <= 2 if reuse else len(seen.pids) > 2


def test_ctrl_c_stops_the_driver_and_its_workers_without_their_tracebacks(tmp_path: Path) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    # Ctrl-C reaches the whole process group: the driver stops the run, the workers end quietly.
    script = (
        "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
        "sys.argv = ['fedloop', 'simulate', 'fedloop.ml.noop:NoopEngine', '--agents', '4', "
        f"'--rounds', '100000', '--set', 'model_mb=2', '--data-dir', {str(tmp_path / 'd')!r}]; "
        "runpy.run_module('fedloop', run_name='__main__')"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not (tmp_path / "d" / "fedloop.db").exists():  # running rounds
        assert process.poll() is None and time.monotonic() < deadline
        time.sleep(0.2)
    time.sleep(2)
    os.killpg(process.pid, signal.SIGINT)
    _, err = process.communicate(timeout=60)
    assert process.returncode != 0
    assert "Traceback" not in err.decode(), err.decode()[-3000:]
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:  # no process of the group is left (workers, tracker)
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            break
        time.sleep(0.1)
    else:
        left = subprocess.run(["ps", "-o", "pid,stat,cmd", "-g", str(process.pid)], text=True,
                              capture_output=True).stdout  # fmt: skip
        pytest.fail(f"processes left in the group:\n{left}")
