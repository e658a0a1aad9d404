"""Properties every strategy should have, checked on generated updates."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numpy.testing import assert_allclose, assert_array_equal

from fedloop.strategies import Strategy, Update, create

SHAPES = {"layer.weight": (2, 2), "layer.bias": (3,)}
DIM = 7
SETTINGS = settings(max_examples=30, deadline=None)

# Parameters under which identical updates aggregate to themselves.
IDENTITY: dict[str, dict[str, Any]] = {
    "fedavg": {},
    "fedprox": {"mu": 0.1},
    "fedavgm": {"server_lr": 1.0, "momentum": 0.9},
    "scaffold": {"server_lr": 1.0},
    "fedcurv": {},
    "fedbuff": {"server_lr": 1.0},
    "fedasync": {"alpha": 1.0},
    "median": {},
    "trimmed_mean": {"beta": 0.2},
    "krum": {"f": 0},
    "multikrum": {"f": 0},
    "bulyan": {"f": 0},
    "geometric_median": {},
}

# Every registered method, with parameters that fit up to 8 updates.
ALL: dict[str, dict[str, Any]] = {
    **IDENTITY,
    "fedadagrad": {},
    "fedadam": {},
    "fedyogi": {},
    "fednova": {},
    "fedasync": {"alpha": 0.6, "staleness": "polynomial"},
    "krum": {"f": 1},
    "multikrum": {"f": 1},
    "bulyan": {"f": 1},
}

finite = st.floats(-100, 100, allow_nan=False, allow_infinity=False)


def vectors(count: int, elements: st.SearchStrategy[float] = finite) -> st.SearchStrategy[Any]:
    return st.lists(
        st.lists(elements, min_size=DIM, max_size=DIM), min_size=count, max_size=count
    ).map(lambda rows: np.array(rows, dtype=np.float64))


def to_weights(vector: np.ndarray) -> dict[str, np.ndarray]:
    return {
        "layer.weight": vector[:4].reshape(2, 2).copy(),
        "layer.bias": vector[4:].copy(),
    }


def make_update(vector: np.ndarray, index: int, num_samples: int, steps: int = 3) -> Update:
    weights = to_weights(vector)
    extras: dict[str, np.ndarray] = {}
    for key, tensor in weights.items():
        extras[f"scaffold.dc/{key}"] = tensor * 0.1
        extras[f"fedcurv.fisher/{key}"] = np.abs(tensor)
        extras[f"fedcurv.fw/{key}"] = np.abs(tensor) * tensor
    return Update(
        weights=weights,
        num_samples=num_samples,
        agent_id=f"agent-{index:02d}",
        base_round=index % 3,
        metrics={"local_steps": float(steps), "local_momentum": 0.9},
        extras=extras,
    )


def weights_vector(weights: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([weights["layer.weight"].ravel(), weights["layer.bias"]])


def run(name: str, params: dict[str, Any], g: np.ndarray, updates: list[Update]) -> np.ndarray:
    strategy: Strategy = create(name, **params)
    if strategy.needs_base_models:  # FedBuff: no global model moved since the updates' bases
        updates = [replace(u, base_weights=to_weights(g)) for u in updates]
    return weights_vector(strategy.aggregate(to_weights(g), updates, server_round=5))


@SETTINGS
@given(
    name=st.sampled_from(sorted(IDENTITY)),
    x=vectors(1),
    g=vectors(1),
    n=st.integers(3, 8),
    samples=st.lists(st.integers(1, 50), min_size=8, max_size=8),
)
def test_identical_updates_aggregate_to_themselves(
    name: str, x: np.ndarray, g: np.ndarray, n: int, samples: list[int]
) -> None:
    params = IDENTITY[name]
    updates = [make_update(x[0], i, samples[i]) for i in range(n)]
    out = run(name, params, g[0], updates)
    assert_allclose(out, x[0], rtol=1e-9, atol=1e-9)


@SETTINGS
@given(
    name=st.sampled_from(sorted(ALL)),
    data=st.data(),
    g=vectors(1),
    samples=st.lists(st.integers(1, 50), min_size=8, max_size=8),
    steps=st.lists(st.integers(1, 20), min_size=8, max_size=8),
)
def test_permuting_updates_changes_nothing(
    name: str, data: st.DataObject, g: np.ndarray, samples: list[int], steps: list[int]
) -> None:
    xs = data.draw(vectors(8))
    updates = [make_update(xs[i], i, samples[i], steps[i]) for i in range(8)]
    shuffled = data.draw(st.permutations(updates))
    expected = run(name, ALL[name], g[0], updates)
    assert_array_equal(run(name, ALL[name], g[0], list(shuffled)), expected)


ROBUST: dict[str, dict[str, Any]] = {
    "median": {},
    "trimmed_mean": {"beta": 0.34},
    "krum": {"f": 1},
    "multikrum": {"f": 1},
    "bulyan": {"f": 1},
}
MIN_N = {"median": 3, "trimmed_mean": 3, "krum": 5, "multikrum": 5, "bulyan": 7}


@SETTINGS
@given(
    name=st.sampled_from(sorted(ROBUST)),
    data=st.data(),
    attacker=vectors(1, st.floats(1, 100)),
    sign=st.sampled_from([1.0, -1.0]),
    position=st.integers(0, 7),
)
def test_robust_methods_stay_within_honest_range(
    name: str, data: st.DataObject, attacker: np.ndarray, sign: float, position: int
) -> None:
    n = data.draw(st.integers(MIN_N[name], 8))
    honest = data.draw(vectors(n - 1))
    rows = list(honest)
    rows.insert(position % n, sign * 1e6 * attacker[0])
    updates = [make_update(row, i, 1) for i, row in enumerate(rows)]
    out = run(name, ROBUST[name], np.zeros(DIM), updates)
    slack = 1e-9 * (1 + np.abs(honest).max())
    assert np.all(out >= honest.min(axis=0) - slack)
    assert np.all(out <= honest.max(axis=0) + slack)


@SETTINGS
@given(
    data=st.data(),
    attacker=vectors(1, st.floats(1, 100)),
    position=st.integers(0, 7),
)
def test_geometric_median_resists_one_outlier(
    data: st.DataObject, attacker: np.ndarray, position: int
) -> None:
    n = data.draw(st.integers(3, 8))
    honest = data.draw(vectors(n - 1))
    rows = list(honest)
    rows.insert(position % n, 1e6 * attacker[0])
    updates = [make_update(row, i, 1) for i, row in enumerate(rows)]
    out = run("geometric_median", {}, np.zeros(DIM), updates)
    # More than half the points lie within r of the honest centre z, so the geometric median
    # lies within C r of z with C = (1 - a) / sqrt(1 - 2a) <= 1.16 for a just above 1/n, n >= 3
    # (Minsker 2015, Lemma 2.1); 1.5 r + 1e-3 leaves room for smoothing and stopping early.
    centre = honest.mean(axis=0)
    radius = float(np.linalg.norm(honest - centre, axis=1).max())
    assert float(np.linalg.norm(out - centre)) <= 1.5 * radius + 1e-3
