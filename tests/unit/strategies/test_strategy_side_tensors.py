"""What strategies with side tensors declare (extras, shipped state) and their agent sides'
math against the papers: SCAFFOLD option II (Karimireddy et al. 2020, Algorithm 1) and
FedCurv's sums over the other agents (Shoham et al. 2019)."""

from __future__ import annotations

import numpy as np
import pytest

from fedloop.strategies import AgentSide, Update, agent_side, available, create
from fedloop.strategies.fedcurv import FedCurv
from fedloop.strategies.scaffold import Scaffold, control_delta

GLOBAL = {
    "w": np.arange(6, dtype=np.float32).reshape(2, 3),
    "b": np.ones(3, dtype=np.float16),
    "steps": np.array(4, dtype=np.int64),
}
rng = np.random.default_rng(7)


def _like(value: float = 0.0) -> dict[str, np.ndarray]:
    return {k: (v + value).astype(v.dtype) for k, v in GLOBAL.items()}


def test_extras_are_one_tensor_per_floating_tensor_under_each_prefix() -> None:
    assert Scaffold().upload_extras(GLOBAL) == {
        "scaffold.dc/w": ((2, 3), np.dtype(np.float32)),
        "scaffold.dc/b": ((3,), np.dtype(np.float16)),
    }
    assert FedCurv().upload_extras(GLOBAL) == {
        "fedcurv.fisher/w": ((2, 3), np.dtype(np.float32)),
        "fedcurv.fisher/b": ((3,), np.dtype(np.float16)),
        "fedcurv.fw/w": ((2, 3), np.dtype(np.float32)),
        "fedcurv.fw/b": ((3,), np.dtype(np.float16)),
    }


def test_only_scaffold_and_fedcurv_ask_for_extras_or_ship_state() -> None:
    params = {"fedbuff": {"buffer_size": 2}, "dp_fedavg": {"noise_multiplier": 1.0}}
    for name in available():
        strategy = create(name, **params.get(name, {}))
        if name in ("scaffold", "fedcurv"):
            continue
        assert strategy.upload_extras(GLOBAL) == {}, name
        assert strategy.shipped_state(GLOBAL) == {}, name
        assert type(agent_side(name)) is AgentSide, name
    # DP-FedAvg keeps state (its accountant) but ships none of it
    assert type(agent_side("mypkg.mod:Mine")) is AgentSide


def test_scaffold_ships_zeros_then_the_server_control_variate() -> None:
    strategy = Scaffold()
    shipped = strategy.shipped_state(GLOBAL)
    assert sorted(shipped) == ["scaffold.c/b", "scaffold.c/w"]
    assert all(v.dtype == np.float64 and not v.any() for v in shipped.values())
    updates = [
        Update(_like(i), 1, f"a{i}", 0, extras={"scaffold.dc/w": _like(i)["w"] * 0 + i,
                                              "scaffold.dc/b": _like()["b"] * 0 + 2 * i})
        for i in (1, 2)
    ]  # fmt: skip
    strategy.aggregate(GLOBAL, updates)
    shipped = strategy.shipped_state(GLOBAL)
    np.testing.assert_array_equal(shipped["scaffold.c/w"], np.full((2, 3), 1.5))
    np.testing.assert_array_equal(shipped["scaffold.c/b"], np.full(3, 3.0))


def test_scaffold_takes_n_from_the_registered_agents_unless_given() -> None:
    extras = {"scaffold.dc/w": np.full((2, 3), 4.0, np.float32), "scaffold.dc/b": np.zeros(3)}
    updates = [Update(_like(1), 1, "a", 0, extras=extras)]
    strategy = Scaffold()
    strategy.population = 4  # 1 of 4 agents sampled: c <- c + (1/4) * 4
    strategy.aggregate(GLOBAL, updates)
    np.testing.assert_array_equal(strategy.state()["scaffold.c/w"], 1.0)
    fixed = Scaffold(num_agents=2)
    fixed.population = 4
    fixed.aggregate(GLOBAL, updates)
    np.testing.assert_array_equal(fixed.state()["scaffold.c/w"], 2.0)


def test_scaffold_agent_side_is_option_two() -> None:
    side = agent_side("scaffold")
    shape = (2, 3)
    c = rng.standard_normal(shape)
    x = rng.standard_normal(shape).astype(np.float32)
    y = rng.standard_normal(shape).astype(np.float32)
    steps, lr = 7, 0.05
    # first round: c_i = 0
    state = side.engine_state({"scaffold.c/w": c}, {}, -1, 0)
    assert sorted(state) == ["scaffold.c/w", "scaffold.ci/w"]
    assert state["scaffold.ci/w"].dtype == np.float64 and not state["scaffold.ci/w"].any()
    ci = rng.standard_normal(shape)
    state = side.engine_state({"scaffold.c/w": c}, {"scaffold.ci/w": ci}, 3, 5)
    np.testing.assert_array_equal(state["scaffold.c/w"], c)
    np.testing.assert_array_equal(state["scaffold.ci/w"], ci)
    # the engine uploads Delta c_i; the agent keeps c_i + Delta c_i = c_i+
    delta = control_delta(c, x, y, steps, lr)
    kept = side.keep({"scaffold.ci/w": ci}, {"scaffold.dc/w": delta})
    paper = ci - c + (x.astype(np.float64) - y.astype(np.float64)) / (steps * lr)
    np.testing.assert_allclose(kept["scaffold.ci/w"], paper, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(delta, paper - ci, rtol=1e-12, atol=1e-12)
    # no kept c_i yet: c_i+ = 0 + Delta c_i
    np.testing.assert_array_equal(side.keep({}, {"scaffold.dc/w": delta})["scaffold.ci/w"], delta)
    # no local step: no new estimate
    assert not control_delta(c, x, y, 0, lr).any()
    with pytest.raises(ValueError, match="another model"):
        side.engine_state({"scaffold.c/w": c}, {"scaffold.ci/w": np.zeros(3)}, 1, 1)


def test_fedcurv_ships_nothing_then_the_sums_of_the_last_round() -> None:
    strategy = FedCurv(penalty=0.5)
    assert strategy.shipped_state(GLOBAL) == {}
    assert strategy.round_config(1) == {"fedcurv_lambda": 0.5}
    extras = [
        {f"fedcurv.{kind}/{key}": np.full(GLOBAL[key].shape, v, GLOBAL[key].dtype)
         for kind, v in (("fisher", i), ("fw", 10 * i)) for key in ("w", "b")}
        for i in (1, 2)
    ]  # fmt: skip
    strategy.aggregate(
        GLOBAL, [Update(_like(i), 1, f"a{i}", 0, extras=e) for i, e in enumerate(extras)]
    )
    shipped = strategy.shipped_state(GLOBAL)
    np.testing.assert_array_equal(shipped["fedcurv.fisher/w"], 3.0)
    np.testing.assert_array_equal(shipped["fedcurv.fw/b"], 30.0)


def test_fedcurv_agent_side_subtracts_its_own_share_only_when_it_is_in_the_sums() -> None:
    side = agent_side("fedcurv")
    assert side.engine_state({}, {}, -1, 0) == {}  # round 1: no penalty yet
    fisher = [rng.random(4) for _ in range(3)]
    weights = [rng.standard_normal(4) for _ in range(3)]
    shipped = {
        "fedcurv.fisher/w": sum(fisher),
        "fedcurv.fw/w": sum(f * w for f, w in zip(fisher, weights, strict=True)),
    }
    own = side.keep({}, {"fedcurv.fisher/w": fisher[0].astype(np.float32),
                         "fedcurv.fw/w": (fisher[0] * weights[0]).astype(np.float32)})  # fmt: skip
    assert all(v.dtype == np.float64 for v in own.values())
    # its upload of round 4 made global model 4: the engine gets the others' sums
    state = side.engine_state(shipped, own, 4, 4)
    np.testing.assert_allclose(state["fedcurv.fisher/w"], fisher[1] + fisher[2], atol=1e-7)
    np.testing.assert_allclose(
        state["fedcurv.fw/w"], fisher[1] * weights[1] + fisher[2] * weights[2], atol=1e-6
    )
    # it sat out the round that made global model 5: nothing of it is in those sums
    state = side.engine_state(shipped, own, 4, 5)
    np.testing.assert_array_equal(state["fedcurv.fisher/w"], shipped["fedcurv.fisher/w"])
    # a difference that rounds below zero is no negative curvature
    alone = {
        "fedcurv.fisher/w": own["fedcurv.fisher/w"] * (1 - 1e-16),
        "fedcurv.fw/w": own["fedcurv.fw/w"],
    }
    assert (side.engine_state(alone, own, 4, 4)["fedcurv.fisher/w"] >= 0).all()
