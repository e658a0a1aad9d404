"""DP-FedAvg: clipping, fixed denominator, noise scale, accounting, state and config."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from fedloop.errors import ConfigError
from fedloop.privacy import dp_epsilon
from fedloop.strategies import DPFedAvg, Update, create
from fedloop.strategies.dp import clip_l2, default_delta


def glob(values: list[float]) -> dict[str, np.ndarray]:
    return {"w": np.array(values, dtype=np.float64), "steps": np.array(7, dtype=np.int64)}


def upd(values: list[float], agent: str, num_samples: int = 1) -> Update:
    return Update(
        {"w": np.array(values, dtype=np.float64), "steps": np.array(99, dtype=np.int64)},
        num_samples,
        agent,
        0,
    )


def test_clip_l2_bounds_the_norm_and_keeps_direction() -> None:
    v = np.array([3.0, 4.0])
    clipped, norm = clip_l2(v, 1.0)
    assert norm == 5.0
    assert_allclose(clipped, [0.6, 0.8])
    small, _ = clip_l2(np.array([0.1, 0.0]), 1.0)
    assert_array_equal(small, [0.1, 0.0])
    rng = np.random.default_rng(0)
    for _ in range(50):
        out, _ = clip_l2(rng.normal(size=100) * rng.uniform(0.01, 100), 2.5)
        assert np.linalg.norm(out) <= 2.5 + 1e-12


def test_without_noise_it_is_the_clipped_fixed_denominator_mean() -> None:
    s = create("dp_fedavg", clip_norm=1.0, noise_multiplier=0.0, agents_per_round=4)
    g = glob([1.0, 1.0])
    ups = [upd([4.0, 5.0], "a", 1000), upd([1.5, 1.0], "b", 1)]  # deltas (3,4)→(.6,.8), (.5,0)
    out = s.aggregate(g, ups)
    # Sum of clipped deltas over the *expected* 4 agents, whatever num_samples says.
    assert_allclose(out["w"], [1.0 + (0.6 + 0.5) / 4, 1.0 + 0.8 / 4])
    assert int(out["steps"]) == 7  # counters keep the global value
    assert s.round_config(2)["dp_epsilon"] == "inf"


def test_one_agent_moves_the_model_by_at_most_c_over_m() -> None:
    s = create("dp_fedavg", clip_norm=0.5, noise_multiplier=0.0, agents_per_round=3)
    g = glob([0.0, 0.0])
    base = [upd([0.1, 0.1], "a"), upd([-0.2, 0.0], "b")]
    with_outlier = [*base, upd([1e6, -1e6], "evil")]
    without = s.aggregate(g, base)["w"]
    with_ = s.aggregate(g, with_outlier)["w"]
    assert np.linalg.norm(with_ - without) == pytest.approx(0.5 / 3)


def test_noise_std_is_sigma_c_over_m() -> None:
    sigma, clip, m, dim = 1.5, 2.0, 5, 200_000
    s = create("dp_fedavg", clip_norm=clip, noise_multiplier=sigma, agents_per_round=m, seed=7)
    g = {"w": np.zeros(dim, dtype=np.float64)}
    ups = [Update({"w": np.zeros(dim)}, 1, f"a{i}", 0) for i in range(m)]
    noise = s.aggregate(g, ups)["w"]
    expected = sigma * clip / m
    # The sample std of 200k normals is within 1% of the truth with overwhelming probability.
    assert float(np.std(noise)) == pytest.approx(expected, rel=0.01)
    assert abs(float(np.mean(noise))) < 5 * expected / np.sqrt(dim)


def test_seeded_noise_is_reproducible_per_round_and_differs_between_rounds() -> None:
    g = {"w": np.zeros(1000)}
    ups = [Update({"w": np.zeros(1000)}, 1, "a", 0)]
    a, b = create("dp_fedavg", seed=3), create("dp_fedavg", seed=3)
    first = a.aggregate(g, ups)["w"]
    assert_array_equal(first, b.aggregate(g, ups)["w"])
    assert not np.array_equal(first, a.aggregate(g, ups)["w"])


def test_epsilon_grows_with_rounds_and_matches_the_accountant() -> None:
    s = create("dp_fedavg", noise_multiplier=1.1, num_agents=1000, agents_per_round=10)
    assert isinstance(s, DPFedAvg)
    assert s.privacy_spent() == (0.0, 1e-5)
    g = glob([0.0, 0.0])
    ups = [upd([0.1 * i, 0.0], f"a{i}") for i in range(10)]
    previous = 0.0
    for _ in range(5):
        g = s.aggregate(g, ups)
        eps, _ = s.privacy_spent()
        assert eps > previous
        previous = eps
    assert s.rounds == 5
    assert eps == pytest.approx(dp_epsilon(0.01, 1.1, 5, 1e-5), rel=1e-12)
    assert s.round_config(6) == {"dp_epsilon": eps, "dp_delta": 1e-5}


def test_state_round_trip_resumes_the_accounting() -> None:
    s = create("dp_fedavg", num_agents=100)
    g = glob([0.0, 0.0])
    for _ in range(3):
        g = s.aggregate(g, [upd([1.0, 0.0], "a"), upd([0.0, 1.0], "b")])
    state = s.state()
    assert set(state) == {"dp.rounds", "dp.rdp"}
    assert all(v.dtype == np.float64 for v in state.values())
    restored = create("dp_fedavg", num_agents=100)
    restored.load_state(state)
    assert restored.privacy_spent() == s.privacy_spent()
    assert restored.rounds == 3
    with pytest.raises(ValueError, match="other RDP orders"):
        restored.load_state({"dp.rounds": np.array(1.0), "dp.rdp": np.zeros(3)})
    with pytest.raises(ValueError, match=r"dp\.rounds"):
        restored.load_state({"fedavgm.v/w": np.zeros(2)})


def test_default_delta_and_sampling_rate() -> None:
    assert default_delta(0) == 1e-5
    assert default_delta(1000) == 1e-5
    assert default_delta(10**6) == pytest.approx(1e-6**1.1)
    s = create("dp_fedavg")  # population unknown: the round's agents, q = 1
    assert isinstance(s, DPFedAvg)
    assert s.sampling_rate(7) == 1.0
    s = create("dp_fedavg", num_agents=50)
    assert isinstance(s, DPFedAvg)
    assert s.sampling_rate(5) == 0.1
    with pytest.raises(ValueError, match="num_agents"):
        s.sampling_rate(51)


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"clip_norm": 0}, "clip_norm"),
        ({"noise_multiplier": -1}, "noise_multiplier"),
        ({"num_agents": -3}, "num_agents"),
        ({"delta": 1.0}, "delta"),
        ({"seed": "x"}, "seed"),
        ({"conversion": "tight"}, "improved, classic"),
        ({"num_agents": 5, "agents_per_round": 6}, "agents_per_round"),
        ({"sigma": 1}, "its parameters are"),
    ],
)
def test_bad_parameters(params: dict[str, object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        create("dp_fedavg", **params)


def test_non_finite_update_is_refused() -> None:
    with pytest.raises(ValueError, match="non-finite"):
        create("dp_fedavg").aggregate(glob([0.0, 0.0]), [upd([np.nan, 0.0], "a")])
