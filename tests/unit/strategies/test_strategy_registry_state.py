"""Registry, configuration errors, server-state resume, and input checks."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from fedloop.errors import ConfigError
from fedloop.strategies import RunningMean, Strategy, Update, available, create, load
from fedloop.types import Weights


class ScaledMean(Strategy):
    """A user's own strategy: the plain mean times a factor."""

    name = "scaled_mean"

    def __init__(self, scale: float = 1.0) -> None:
        self.scale = scale

    def aggregate(
        self, global_weights: Weights, updates: Sequence[Update], server_round: int | None = None
    ) -> Weights:
        return {
            k: (self.scale * np.mean([u.weights[k] for u in updates], axis=0)).astype(v.dtype)
            for k, v in global_weights.items()
        }


class NotAStrategy:
    pass


def model(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {
        "conv.weight": rng.normal(size=(2, 3)).astype(np.float32),
        "bn.num_batches_tracked": np.array(seed, dtype=np.int64),
        "fc.bias": rng.normal(size=4).astype(np.float32),
    }


def updates_for(seed: int, n: int = 7) -> list[Update]:
    out = []
    for i in range(n):
        weights = model(seed * 100 + i)
        extras: dict[str, np.ndarray] = {}
        for key in ("conv.weight", "fc.bias"):
            extras[f"scaffold.dc/{key}"] = weights[key] * 0.5
            extras[f"fedcurv.fisher/{key}"] = np.abs(weights[key])
            extras[f"fedcurv.fw/{key}"] = np.abs(weights[key]) * weights[key]
        out.append(
            Update(
                weights,
                num_samples=10 + i,
                agent_id=f"a{i}",
                base_round=1,
                metrics={"local_steps": 2.0 + i, "local_momentum": 0.5},
                extras=extras,
            )
        )
    return out


# --- registry and configuration ---------------------------------------------------------------


def test_available_lists_every_method() -> None:
    assert set(available()) == {
        "fedavg",
        "fedprox",
        "fedavgm",
        "fedadagrad",
        "fedadam",
        "fedyogi",
        "scaffold",
        "fednova",
        "fedcurv",
        "median",
        "trimmed_mean",
        "krum",
        "multikrum",
        "bulyan",
        "geometric_median",
        "fedasync",
        "fedbuff",
        "dp_fedavg",
    }
    for name in available():
        assert create(name).name == name


def test_unknown_name_lists_valid_names() -> None:
    with pytest.raises(ConfigError, match="fedavg"):
        create("nope")
    with pytest.raises(ConfigError, match="fedavg"):
        load("nope")


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("krum", {"f": -1}, "f must be an integer >= 0"),
        ("krum", {"f": 1.5}, "f must be an integer"),
        ("krum", {"g": 1}, "its parameters are: f"),
        ("fedavg", {"mu": 1}, "its parameters are: none"),
        ("fedprox", {"mu": -0.1}, "mu must be a number >= 0"),
        ("trimmed_mean", {"beta": 0.5}, "beta"),
        ("fedasync", {"staleness": "linear"}, "constant, polynomial, hinge"),
        ("fedasync", {"alpha": 0}, "alpha"),
        ("fedadagrad", {"beta2": 0.9}, "beta2"),
        ("fedadam", {"eta": "fast"}, "eta"),
        ("fedavgm", {"momentum": True}, "momentum"),
        ("fedbuff", {"buffer_size": 0}, "buffer_size"),
        ("geometric_median", {"eps": 0}, "eps"),
        ("multikrum", {"m": 0}, "m must be an integer >= 1"),
    ],
)
def test_bad_parameters_raise_config_error(
    name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        create(name, **params)


def test_numeric_strings_and_integral_floats_are_accepted() -> None:
    strategy = create("krum", f="2")
    assert strategy.f == 2  # type: ignore[attr-defined]
    assert create("fedprox", mu="0.5").round_config(0) == {"proximal_mu": 0.5}
    assert create("fedbuff", buffer_size=4.0).buffer_size == 4


def test_load_user_class() -> None:
    strategy = load(f"{__name__}:ScaledMean", scale=2.0)
    assert isinstance(strategy, ScaledMean)
    g = {"w": np.zeros(2, np.float32)}
    ups = [Update({"w": np.array([1, 3], np.float32)}, 1, "a", 0)]
    assert_array_equal(strategy.aggregate(g, ups)["w"], [2, 6])
    assert isinstance(load("fedprox", mu=0.2), Strategy)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("no_such_module_xyz:Thing", "cannot import"),
        (f"{__name__}:Missing", "Strategy subclass"),
        (f"{__name__}:NotAStrategy", "Strategy subclass"),
        (f"{__name__}:", "package.module:ClassName"),
    ],
)
def test_load_errors(spec: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load(spec)


def test_load_user_class_bad_param() -> None:
    with pytest.raises(ConfigError, match="scale"):
        load(f"{__name__}:ScaledMean", factor=2)


# --- state resume -------------------------------------------------------------------------------

STATEFUL = {
    "fedavgm": {"server_lr": 0.7, "momentum": 0.9},
    "fedadagrad": {},
    "fedadam": {"eta": 0.05},
    "fedyogi": {},
    "scaffold": {"server_lr": 0.5, "num_agents": 20},
    "fedcurv": {},
}


@pytest.mark.parametrize("name", sorted(STATEFUL))
def test_state_round_trip_resumes_exactly(name: str) -> None:
    original = create(name, **STATEFUL[name])
    assert original.state() == {}
    g1 = original.aggregate(model(1), updates_for(1), server_round=1)
    g2 = original.aggregate(g1, updates_for(2), server_round=2)
    saved = original.state()
    assert saved and all(v.dtype == np.float64 for v in saved.values())
    # persisted as safetensors, as the aggregator does, then loaded into a fresh instance
    restored = create(name, **STATEFUL[name])
    restored.load_state(st_load(st_save(saved)))
    expected = original.aggregate(g2, updates_for(3), server_round=3)
    got = restored.aggregate(g2, updates_for(3), server_round=3)
    for key in expected:
        assert_array_equal(got[key], expected[key])
    for key, value in original.state().items():
        assert_array_equal(restored.state()[key], value)


def test_state_is_a_copy() -> None:
    strategy = create("fedavgm")
    strategy.aggregate(model(1), updates_for(1))
    state = strategy.state()
    state["fedavgm.v/fc.bias"][:] = 1e9
    assert np.all(strategy.state()["fedavgm.v/fc.bias"] < 1e9)


def test_load_state_rejects_foreign_or_mismatched_state() -> None:
    with pytest.raises(ValueError, match="fedopt"):
        create("fedadam").load_state({"fedavgm.v/fc.bias": np.zeros(4)})
    with pytest.raises(ValueError, match="no state"):
        create("fedavg").load_state({"x": np.zeros(1)})
    strategy = create("fedavgm")
    strategy.load_state({"fedavgm.v/fc.bias": np.zeros(5)})
    with pytest.raises(ValueError, match="another model"):
        strategy.aggregate(model(1), updates_for(1))


# --- input checks and dtypes --------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(available()))
def test_every_strategy_checks_input_and_keeps_dtypes(name: str) -> None:
    strategy = create(name)
    g = model(0)
    with pytest.raises(ValueError, match="at least one update"):
        strategy.aggregate(g, [], server_round=1)
    out = strategy.aggregate(g, updates_for(1), server_round=1)
    assert list(out) == list(g)
    for key in g:
        assert out[key].dtype == g[key].dtype
        assert out[key].shape == g[key].shape
    bad = updates_for(1)
    bad[0] = Update({**bad[0].weights, "fc.bias": np.zeros(5, np.float32)}, 1, "a0", 1)
    with pytest.raises(ValueError, match="shape"):
        strategy.aggregate(g, bad, server_round=1)
    with pytest.raises(ValueError, match="missing"):
        strategy.aggregate(g, [Update({"conv.weight": g["conv.weight"]}, 1, "x", 0)], 1)


@pytest.mark.parametrize(
    ("name", "params", "least"),
    [
        ("krum", {"f": 1}, 5),
        ("krum", {"f": 0}, 3),
        ("multikrum", {"f": 1}, 5),
        ("multikrum", {"f": 1, "m": 7}, 7),
        ("bulyan", {"f": 1}, 7),
        ("trimmed_mean", {"beta": 0.4}, 1),
        ("median", {}, 1),
        ("geometric_median", {}, 1),
        ("fedavg", {}, 1),
    ],
)
def test_min_updates_is_the_fewest_local_models_aggregate_takes(
    name: str, params: dict[str, float], least: int
) -> None:
    """The aggregator waits for `min_updates` (docs/protocol.md, `needed`): one fewer fails."""
    strategy = create(name, **params)
    assert strategy.min_updates == least
    g = model(0)
    strategy.aggregate(g, updates_for(1, least), server_round=1)
    if least > 1:
        with pytest.raises(ValueError, match="updates"):
            strategy.aggregate(g, updates_for(1, least - 1), server_round=1)


def test_counters_mean_for_averaging_median_for_robust() -> None:
    g = model(0)
    ups = updates_for(1)  # counters 100..106, num_samples 10..16
    counts = np.array([100 + i for i in range(7)], dtype=np.float64)
    samples = np.arange(10, 17, dtype=np.float64)
    mean = int(np.rint(counts @ samples / samples.sum()))
    assert int(create("fedadam").aggregate(g, ups)["bn.num_batches_tracked"]) == mean
    assert int(create("krum").aggregate(g, ups)["bn.num_batches_tracked"]) == 103


def test_negative_num_samples_rejected() -> None:
    with pytest.raises(ValueError, match="num_samples"):
        Update({"w": np.zeros(1)}, -1, "a", 0)


def test_all_zero_num_samples_rejected() -> None:
    ups = [Update({"w": np.ones(1)}, 0, "a", 0)]
    with pytest.raises(ValueError, match="num_samples=0"):
        create("fedavg").aggregate({"w": np.zeros(1)}, ups)


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"])
def test_running_mean_matches_batch_for_streaming_strategies(name: str) -> None:
    batch = create(name)
    folded = create(name)
    assert folded.streaming
    ups = updates_for(4)
    running = RunningMean()
    for update in ups:
        running.add(update)
    assert running.count == 7 and running.num_samples == sum(u.num_samples for u in ups)
    expected = batch.aggregate(model(0), ups)
    got = folded.aggregate(model(0), [running.as_update()])
    for key in expected:
        assert_allclose(got[key], expected[key], rtol=1e-6, atol=1e-6)
