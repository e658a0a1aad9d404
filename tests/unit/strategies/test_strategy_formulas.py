"""Each strategy against a case computed by hand from its paper's formula."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedloop.strategies import Update, create, fedavg
from fedloop.strategies.async_ import staleness_weight
from fedloop.strategies.fednova import normalizer
from fedloop.strategies.robust import bulyan, geometric_median, krum_scores, trimmed_mean


def upd(
    w: Sequence[float],
    n: int = 1,
    agent: str = "a",
    base_round: int = 0,
    metrics: dict[str, float] | None = None,
    extras: dict[str, Sequence[float]] | None = None,
) -> Update:
    return Update(
        weights={"w": np.array(w, dtype=np.float64)},
        num_samples=n,
        agent_id=agent,
        base_round=base_round,
        metrics=metrics or {},
        extras={k: np.array(v, dtype=np.float64) for k, v in (extras or {}).items()},
    )


def glob(w: list[float]) -> dict[str, np.ndarray]:
    return {"w": np.array(w, dtype=np.float64)}


# --- fedavg family -------------------------------------------------------------------------


def test_fedavg_weights_by_num_samples() -> None:
    updates = [upd([1, 2], n=1, agent="a"), upd([3, 6], n=3, agent="b")]
    # (1*[1, 2] + 3*[3, 6]) / 4
    out = create("fedavg").aggregate(glob([0, 0]), updates)
    assert_allclose(out["w"], [2.5, 5.0])
    assert_allclose(fedavg(updates)["w"], [2.5, 5.0])


def test_fedavg_rounds_integer_counters_and_keeps_dtypes_and_order() -> None:
    g: dict[str, np.ndarray] = {
        "z": np.zeros(2, np.float32),
        "count": np.array(0, np.int64),
        "a": np.zeros(1, np.float16),
    }
    u1 = Update(
        {"a": np.ones(1, np.float16), "count": np.array(1), "z": np.ones(2, np.float32)},
        1,
        "a",
        0,
    )
    u2 = Update(
        {"a": np.full(1, 3, np.float16), "count": np.array(2), "z": np.full(2, 5, np.float32)},
        3,
        "b",
        0,
    )
    out = create("fedavg").aggregate(g, [u1, u2])
    assert list(out) == ["z", "count", "a"]
    assert out["z"].dtype == np.float32 and out["a"].dtype == np.float16
    assert out["count"].dtype == np.int64
    assert int(out["count"]) == 2  # (1 + 2*3) / 4 = 1.75, rounded
    assert_allclose(out["z"], [4.0, 4.0])  # (1 + 15) / 4
    assert_allclose(out["a"], [2.5])


def test_fedprox_is_fedavg_and_sends_mu() -> None:
    strategy = create("fedprox", mu=0.1)
    updates = [upd([1, 2], n=1, agent="a"), upd([3, 6], n=3, agent="b")]
    assert_allclose(strategy.aggregate(glob([0, 0]), updates)["w"], [2.5, 5.0])
    assert strategy.round_config(3) == {"proximal_mu": 0.1}
    assert strategy.streaming


# --- server optimisers -----------------------------------------------------------------------


def test_fedavgm_two_rounds() -> None:
    s = create("fedavgm", server_lr=2.0, momentum=0.5)
    # round 1: Delta = [1, 2] - 0 ; v = [1, 2] ; x = 0 + 2 v = [2, 4]
    x1 = s.aggregate(glob([0, 0]), [upd([1, 2])])
    assert_allclose(x1["w"], [2, 4])
    # round 2: Delta = [3, 3] - [2, 4] = [1, -1] ; v = 0.5 [1, 2] + [1, -1] = [1.5, 0]
    x2 = s.aggregate(x1, [upd([3, 3])])
    assert_allclose(x2["w"], [5, 4])
    assert_allclose(s.state()["fedavgm.v/w"], [1.5, 0])


def test_fedadam_first_step() -> None:
    s = create("fedadam", eta=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    out = s.aggregate(glob([0]), [upd([1])])
    # Delta = 1; m = 0.1; v = 0.99 * tau^2 + 0.01 * 1 = 0.0199
    assert_allclose(out["w"], [0.1 * 0.1 / (math.sqrt(0.0199) + 0.1)])
    assert_allclose(s.state()["fedopt.m/w"], [0.1])
    assert_allclose(s.state()["fedopt.v/w"], [0.0199])


def test_fedadagrad_first_step() -> None:
    s = create("fedadagrad", eta=0.5, beta1=0.9, tau=0.1)
    out = s.aggregate(glob([0]), [upd([1])])
    # m = 0.1; v = 0.01 + 1 = 1.01
    assert_allclose(out["w"], [0.5 * 0.1 / (math.sqrt(1.01) + 0.1)])


def test_fedyogi_sign_rule_both_ways() -> None:
    s = create("fedyogi", eta=0.1, beta1=0.9, beta2=0.99, tau=0.1)
    out = s.aggregate(glob([0, 0]), [upd([1, 0.05])])
    # v0 = 0.01. Delta^2 = 1 > v0: v = 0.01 + 0.01 * 1 = 0.02
    # Delta^2 = 0.0025 < v0: v = 0.01 - 0.01 * 0.0025 = 0.009975
    assert_allclose(s.state()["fedopt.v/w"], [0.02, 0.009975])
    assert_allclose(s.state()["fedopt.m/w"], [0.1, 0.005])
    expected = [0.1 * 0.1 / (math.sqrt(0.02) + 0.1), 0.1 * 0.005 / (math.sqrt(0.009975) + 0.1)]
    assert_allclose(out["w"], expected)


# --- scaffold, fednova, fedcurv ----------------------------------------------------------------


def test_scaffold_server_step() -> None:
    s = create("scaffold", server_lr=0.5, num_agents=4)
    updates = [
        upd([2, 3], n=10, agent="a", extras={"scaffold.dc/w": [1, 0]}),
        upd([4, 1], n=1, agent="b", extras={"scaffold.dc/w": [0, 2]}),
    ]
    out = s.aggregate(glob([1, 1]), updates)
    # unweighted: mean(y - x) = ([1, 2] + [3, 0]) / 2 = [2, 1]; x = [1, 1] + 0.5 [2, 1]
    assert_allclose(out["w"], [2, 1.5])
    # c = 0 + (2/4) * mean(dc) = 0.5 * [0.5, 1]
    assert_allclose(s.state()["scaffold.c/w"], [0.25, 0.5])
    assert s.round_config(1) == {"scaffold": True}


def test_scaffold_needs_control_deltas() -> None:
    with pytest.raises(ValueError, match=r"scaffold\.dc/w"):
        create("scaffold").aggregate(glob([0]), [upd([1])])


def test_fednova_normalised_averaging() -> None:
    updates = [
        upd([2], n=1, agent="a", metrics={"local_steps": 2, "local_momentum": 0}),
        upd([3], n=3, agent="b", metrics={"local_steps": 6, "local_momentum": 0}),
    ]
    out = create("fednova").aggregate(glob([0]), updates)
    # p = [1/4, 3/4]; d = [-2/2, -3/6] = [-1, -0.5]; tau_eff = 0.5 + 4.5 = 5
    # x = 0 - 5 * (0.25 * -1 + 0.75 * -0.5) = 3.125   (FedAvg would give 2.75)
    assert_allclose(out["w"], [3.125])


def test_fednova_momentum_normalizer() -> None:
    assert normalizer(5) == 5
    # a = [1 - rho^tau, ..., 1 - rho] / (1 - rho): tau=2, rho=0.5 -> [1.5, 1] ; tau=3 -> sum 4.25
    assert normalizer(2, 0.5) == pytest.approx(2.5)
    assert normalizer(3, 0.5) == pytest.approx(4.25)
    updates = [upd([2], metrics={"local_steps": 2, "local_momentum": 0.5})]
    # one agent: x - a * (x - y) / a = y
    assert_allclose(create("fednova").aggregate(glob([0]), updates)["w"], [2])


def test_fednova_needs_local_steps() -> None:
    with pytest.raises(ValueError, match="local_steps"):
        create("fednova").aggregate(glob([0]), [upd([1], metrics={"local_momentum": 0})])


def test_fednova_refuses_an_unknown_momentum_rather_than_assume_plain_sgd() -> None:
    # Taking momentum 0.9 for 0 mis-weights agents silently; the agent must say which it was.
    with pytest.raises(ValueError, match="local_momentum"):
        create("fednova").aggregate(glob([0]), [upd([1], metrics={"local_steps": 5})])
    for bad in (1.0, -0.1, math.nan):
        with pytest.raises(ValueError, match="local_momentum"):
            create("fednova").aggregate(
                glob([0]), [upd([1], metrics={"local_steps": 5, "local_momentum": bad})]
            )


def test_fedcurv_sums_fisher_terms() -> None:
    s = create("fedcurv", penalty=0.5)
    updates = [
        upd([1], n=1, agent="a", extras={"fedcurv.fisher/w": [0.5], "fedcurv.fw/w": [0.5]}),
        upd([3], n=1, agent="b", extras={"fedcurv.fisher/w": [2.0], "fedcurv.fw/w": [6.0]}),
    ]
    out = s.aggregate(glob([0]), updates)
    assert_allclose(out["w"], [2])
    state = s.state()
    assert_allclose(state["fedcurv.fisher/w"], [2.5])
    assert_allclose(state["fedcurv.fw/w"], [6.5])
    assert s.round_config(2) == {"fedcurv_lambda": 0.5}
    with pytest.raises(ValueError, match=r"fedcurv\.fw/w"):
        s.aggregate(glob([0]), [upd([1], extras={"fedcurv.fisher/w": [1.0]})])


# --- robust ----------------------------------------------------------------------------------


def test_median_odd_and_even() -> None:
    odd = [upd([1, 7], agent="a"), upd([5, 3], agent="b"), upd([2, 100], agent="c")]
    assert_allclose(create("median").aggregate(glob([0, 0]), odd)["w"], [2, 7])
    even = [*odd, upd([20, -1], agent="d")]
    # sorted first coordinate 1, 2, 5, 20 -> 3.5 ; second -1, 3, 7, 100 -> 5
    assert_allclose(create("median").aggregate(glob([0, 0]), even)["w"], [3.5, 5])


def test_median_counters_take_median() -> None:
    g: dict[str, np.ndarray] = {"w": np.zeros(1), "n": np.array(0, np.int32)}
    ups = [
        Update({"w": np.zeros(1), "n": np.array(c, np.int32)}, 1, f"a{c}", 0) for c in (3, 4, 99)
    ]
    out = create("median").aggregate(g, ups)
    assert out["n"] == 4 and out["n"].dtype == np.int32


def test_trimmed_mean() -> None:
    values = [[1], [2], [3], [4], [100]]
    ups = [upd(v, agent=str(i)) for i, v in enumerate(values)]
    # beta 0.2, n 5: drop 1 at each end -> mean(2, 3, 4)
    assert_allclose(create("trimmed_mean", beta=0.2).aggregate(glob([0]), ups)["w"], [3])
    # beta 0.1: floor(0.5) = 0, plain mean
    assert_allclose(create("trimmed_mean", beta=0.1).aggregate(glob([0]), ups)["w"], [22])
    # floor(0.29 * 100) is 29 although 0.29 * 100 = 28.999999999999996 in floating point
    stacked = np.arange(100, dtype=np.float64).reshape(100, 1)
    assert_allclose(trimmed_mean(stacked, 0.29), [49.5])


def _krum_updates() -> list[Update]:
    # points 0, 1, 2, 3, 10 with agent ids e, d, c, b, a
    return [upd([p], agent=a) for p, a in zip([0, 1, 2, 3, 10], "edcba", strict=True)]


def test_krum_scores_and_choice() -> None:
    points = np.array([[0.0], [1.0], [2.0], [3.0], [10.0]])
    d = (points - points.T) ** 2
    # n - f - 2 = 2 nearest: 0 -> 1+4, 1 -> 1+1, 2 -> 1+1, 3 -> 1+4, 10 -> 49+64
    assert_array_equal(krum_scores(d, 2), [5, 2, 2, 5, 113])
    # tie between points 1 (agent d) and 2 (agent c): the lower agent_id wins
    assert_array_equal(create("krum", f=1).aggregate(glob([0]), _krum_updates())["w"], [2])


def test_multikrum() -> None:
    # scores in agent order a..e: 113, 5, 2, 2, 5 -> lowest: c(2), d(1), b(3), e(0)
    out = create("multikrum", f=1, m=3).aggregate(glob([0]), _krum_updates())
    assert_allclose(out["w"], [2])  # mean(2, 1, 3)
    out = create("multikrum", f=1).aggregate(glob([0]), _krum_updates())
    assert_allclose(out["w"], [1.5])  # m = n - f = 4: mean(2, 1, 3, 0)


def test_krum_needs_enough_updates() -> None:
    with pytest.raises(ValueError, match=r"2f\+2"):
        create("krum", f=1).aggregate(glob([0]), _krum_updates()[:4])


def test_bulyan_by_hand() -> None:
    # points 0..6, n = 7, f = 1: theta = 5, beta = 3.
    # iterated Krum picks 2, 4, 1, 5, 0 (ties -> lower agent_id); median of {0,1,2,4,5} = 2;
    # the 3 closest to 2 are 2, 1 and (tie 0 / 4 -> smaller) 0 -> mean 1
    points = np.arange(7, dtype=np.float64).reshape(7, 1)
    assert_allclose(bulyan(points, 1), [1.0])
    ups = [upd([float(i)], agent=f"a{i}") for i in range(7)]
    assert_allclose(create("bulyan", f=1).aggregate(glob([0]), ups)["w"], [1.0])
    with pytest.raises(ValueError, match=r"4f\+3"):
        create("bulyan", f=1).aggregate(glob([0]), ups[:6])


def test_bulyan_f0_is_mean() -> None:
    points = np.array([[1.0], [2.0], [6.0]])
    assert_allclose(bulyan(points, 0), [3.0])


def test_geometric_median_cases() -> None:
    # 1-D: the geometric median is the median
    assert_allclose(
        geometric_median(np.array([[0.0], [1.0], [10.0]]), np.ones(3), tol=1e-12, max_iter=1000),
        [1.0],
        atol=1e-5,
    )
    # equilateral triangle: the Fermat point is the centroid
    tri = np.array([[0.0, 0.0], [2.0, 0.0], [1.0, math.sqrt(3)]])
    assert_allclose(geometric_median(tri, np.ones(3)), [1.0, 1 / math.sqrt(3)], atol=1e-9)
    # weights 3 : 1 on two points: the heavier one
    out = create("geometric_median", max_iter=1000, tol=1e-12).aggregate(
        glob([0]), [upd([0], n=3, agent="a"), upd([1], n=1, agent="b")]
    )
    assert_allclose(out["w"], [0.0], atol=1e-5)


# --- asynchronous ----------------------------------------------------------------------------


def test_staleness_functions() -> None:
    assert staleness_weight("constant", 7, 0.5, 4) == 1
    assert staleness_weight("polynomial", 3, 0.5, 4) == pytest.approx(0.5)  # (3+1)^-0.5
    assert staleness_weight("hinge", 4, 0.5, 4) == 1
    assert staleness_weight("hinge", 6, 0.5, 4) == pytest.approx(0.5)  # 1/(0.5*2 + 1)


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"staleness": "constant"}, 5.0),
        ({"staleness": "polynomial", "a": 0.5}, 10 * 0.5 / math.sqrt(3)),  # s = (2+1)^-0.5
        ({"staleness": "hinge", "a": 0.5, "b": 1}, 10 / 3),  # s = 1/(0.5*(2-1)+1) = 2/3
    ],
)
def test_fedasync_mixing(params: dict[str, object], expected: float) -> None:
    s = create("fedasync", alpha=0.5, **params)
    out = s.aggregate(glob([0]), [upd([10], base_round=3)], server_round=5)
    assert_allclose(out["w"], [expected])
    assert s.asynchronous and s.buffer_size == 1


def test_fedasync_applies_updates_in_order() -> None:
    s = create("fedasync", alpha=0.5)
    updates = [upd([20], agent="b", base_round=5), upd([10], agent="a", base_round=5)]
    # a first: 0.5*0 + 0.5*10 = 5 ; then b: 0.5*5 + 0.5*20 = 12.5
    assert_allclose(s.aggregate(glob([0]), updates, server_round=5)["w"], [12.5])
    with pytest.raises(ValueError, match="server_round"):
        s.aggregate(glob([0]), updates)
    with pytest.raises(ValueError, match="round 5"):
        s.aggregate(glob([0]), updates, server_round=4)


def test_fedbuff() -> None:
    s = create("fedbuff", buffer_size=2, server_lr=0.5)
    assert s.asynchronous and s.buffer_size == 2 and s.needs_base_models
    # both trained on the current global model: mean(y - x) = mean(2, 4) = 3 ; x = 1 + 0.5 * 3
    updates = [upd([3], agent="a"), upd([5], agent="b", n=100)]
    assert_allclose(s.aggregate(glob([1]), updates, server_round=0)["w"], [2.5])
    with pytest.raises(ValueError, match="server_round"):
        s.aggregate(glob([1]), updates)


def test_fedbuff_takes_a_stale_delta_against_its_base_model() -> None:
    # The audit's case: global 0 was 0, global 1 is 10; two agents trained on global 0 and
    # each moved +1. Their progress is added to global 1: 10 + mean(1, 1), not mean(y) = 1.
    s = create("fedbuff", buffer_size=2)
    stale = [
        Update({"w": np.array([1.0])}, 1, agent, 0, base_weights={"w": np.array([0.0])})
        for agent in ("a", "b")
    ]
    assert_allclose(s.aggregate(glob([10]), stale, server_round=1)["w"], [11])
    # without its base model a stale update is refused, not measured against global 1
    with pytest.raises(ValueError, match="base_weights"):
        s.aggregate(glob([10]), [upd([1], agent="a", base_round=0)], server_round=1)
    with pytest.raises(ValueError, match="round 2"):
        s.aggregate(glob([10]), [upd([1], base_round=2)], server_round=1)
    wrong = Update({"w": np.array([1.0])}, 1, "a", 0, base_weights={"w": np.zeros(2)})
    with pytest.raises(ValueError, match="shape"):
        s.aggregate(glob([10]), [wrong], server_round=1)


def test_fedbuff_paper_staleness_scaling() -> None:
    s = create("fedbuff", buffer_size=2, staleness="polynomial")  # a = 0.5: 1/sqrt(1 + st)
    updates = [
        Update({"w": np.array([4.0])}, 1, "a", 2, base_weights={"w": np.array([2.0])}),
        upd([12], agent="b", base_round=5),
    ]
    # a: staleness 3, delta 2 -> 2/2 = 1 ; b: fresh, delta 2 -> 2 ; x = 10 + (1 + 2) / 2
    assert_allclose(s.aggregate(glob([10]), updates, server_round=5)["w"], [11.5])
