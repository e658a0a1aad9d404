"""FedNova and FedBuff against independent numpy references written from their papers.

The references below use the papers' definitions directly (FedNova's ||a_i||_1 as the sum of
its coefficients, FedBuff's sum of staleness-scaled deltas over K) and share no code with
fedloop.strategies.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import pytest
from numpy.testing import assert_allclose

from fedloop.strategies import Update, create
from fedloop.strategies.fednova import normalizer

# --- references ---------------------------------------------------------------------------------


def fednova_a(tau: int, rho: float) -> float:
    """Wang et al. 2020, momentum SGD: a_{i,k} = sum_{j=0}^{tau-1-k} rho^j; return ||a_i||_1."""
    return float(sum(sum(rho**j for j in range(tau - k)) for k in range(tau)))


def fednova_reference(
    x: np.ndarray, ys: Sequence[np.ndarray], ns: Sequence[int], a: Sequence[float]
) -> np.ndarray:
    """x - tau_eff sum_i p_i (x - y_i) / a_i with tau_eff = sum_i p_i a_i, p_i = n_i / n."""
    p = np.array(ns, dtype=np.float64) / sum(ns)
    tau_eff = sum(pi * ai for pi, ai in zip(p, a, strict=True))
    d = sum(pi * (x - y) / ai for pi, y, ai in zip(p, ys, a, strict=True))
    return np.asarray(x - tau_eff * d)


def heavy_ball(
    x: np.ndarray, gradient: np.ndarray, steps: int, lr: float, rho: float
) -> np.ndarray:
    """tau steps of SGD with momentum as PyTorch runs it (buffer from zero, no dampening) on a
    loss whose gradient is the constant `gradient`."""
    buffer = np.zeros_like(x)
    for _ in range(steps):
        buffer = rho * buffer + gradient
        x = x - lr * buffer
    return x


def fedbuff_reference(
    x: np.ndarray,
    ys: Sequence[np.ndarray],
    bases: Sequence[np.ndarray],
    staleness: Sequence[int],
    server_lr: float,
    sqrt_scaling: bool,
) -> np.ndarray:
    """Nguyen et al. 2022, Algorithm 1: x + eta_g * (1/K) sum_i s_i (y_i - x_{base_i}), s_i = 1
    or 1/sqrt(1 + staleness_i)."""
    total = np.zeros_like(x)
    for y, base, st in zip(ys, bases, staleness, strict=True):
        s = 1.0 / np.sqrt(1.0 + st) if sqrt_scaling else 1.0
        total = total + s * (y - base)
    return np.asarray(x + server_lr * total / len(ys))


# --- FedNova ------------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [1, 2, 7, 50])
@pytest.mark.parametrize("rho", [0.0, 0.5, 0.9, 0.99])
def test_fednova_normaliser_is_the_papers_sum(tau: int, rho: float) -> None:
    assert normalizer(tau, rho) == pytest.approx(fednova_a(tau, rho), rel=1e-12)


def test_momentum_sgd_moves_by_lr_times_the_normaliser() -> None:
    # What ties a_i to the optimizer: tau heavy-ball steps on a constant gradient g move by
    # lr * ||a||_1 * g: about 6 tau for momentum 0.9 and 20 steps, where plain SGD moves tau.
    g = np.array([1.0, -2.0])
    y = heavy_ball(np.zeros(2), g, 20, 0.01, 0.9)
    assert_allclose(-y, 0.01 * fednova_a(20, 0.9) * g, rtol=1e-12)
    torch = pytest.importorskip("torch")
    p = torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))
    optimizer = torch.optim.SGD([p], lr=0.01, momentum=0.9)  # TorchClassifier's optimizer
    for _ in range(20):
        optimizer.zero_grad()
        (p * torch.tensor(g)).sum().backward()
        optimizer.step()
    assert_allclose(p.detach().numpy(), y, rtol=1e-12)


def test_fednova_with_momentum_weighs_unequal_step_counts_as_the_paper() -> None:
    # The audit's case: A takes 5 steps along e1, B 50 along e2, both momentum 0.9, equal n.
    # The paper normalises each agent's progress by its own ||a_i||_1, so both directions get
    # the same weight; normalising by tau_i (momentum taken for 0) favours B about 3:1.
    x = np.zeros(2)
    ys = [
        heavy_ball(x, np.array([1.0, 0.0]), 5, 0.01, 0.9),
        heavy_ball(x, np.array([0.0, 1.0]), 50, 0.01, 0.9),
    ]
    updates = [
        Update({"w": y}, 100, agent, 0, metrics={"local_steps": steps, "local_momentum": 0.9})
        for y, agent, steps in zip(ys, "AB", [5, 50], strict=True)
    ]
    got = create("fednova").aggregate({"w": x}, updates)["w"]
    expected = fednova_reference(x, ys, [100, 100], [fednova_a(5, 0.9), fednova_a(50, 0.9)])
    assert_allclose(got, expected, rtol=1e-12)
    assert_allclose(got[0], got[1], rtol=1e-12)
    as_plain_sgd = fednova_reference(x, ys, [100, 100], [5, 50])
    assert abs(as_plain_sgd[1] / as_plain_sgd[0]) > 2.5


def test_fednova_matches_the_reference_on_random_agents() -> None:
    rng = np.random.default_rng(7)
    x = {"a": rng.standard_normal((3, 4)), "b": rng.standard_normal(5).astype(np.float32)}
    taus = [1, 3, 12, 40, 7]
    rhos = [0.0, 0.9, 0.5, 0.99, 0.0]
    ns = [5, 60, 13, 200, 1]
    updates = [
        Update(
            {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in x.items()},
            n,
            f"agent-{i}",
            0,
            metrics={"local_steps": float(tau), "local_momentum": rho},
        )
        for i, (tau, rho, n) in enumerate(zip(taus, rhos, ns, strict=True))
    ]
    got = create("fednova").aggregate(x, updates)
    a = [fednova_a(t, r) for t, r in zip(taus, rhos, strict=True)]
    for key in x:
        ys = [u.weights[key].astype(np.float64) for u in updates]
        expected = fednova_reference(x[key].astype(np.float64), ys, ns, a)
        assert got[key].dtype == x[key].dtype
        rtol = 1e-12 if x[key].dtype == np.float64 else 1e-6
        assert_allclose(got[key], expected, rtol=rtol, atol=rtol)


# --- FedBuff ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("params", "sqrt_scaling"),
    [
        ({}, False),
        ({"server_lr": 0.7}, False),
        ({"server_lr": 1.3, "staleness": "polynomial"}, True),  # a = 0.5 by default
    ],
)
def test_fedbuff_matches_the_reference_with_stale_updates(
    params: dict[str, object], sqrt_scaling: bool
) -> None:
    rng = np.random.default_rng(3)
    t = 5  # the current global model; history[r] is global model r
    history = [
        {"a": rng.standard_normal((2, 3)), "b": rng.standard_normal(4).astype(np.float32)}
        for _ in range(t + 1)
    ]
    base_rounds = [5, 0, 3, 3, 4, 1]
    updates = [
        Update(
            {k: (v + rng.standard_normal(v.shape)).astype(v.dtype) for k, v in history[r].items()},
            int(rng.integers(1, 100)),  # FedBuff's mean ignores num_samples
            f"agent-{i}",
            r,
            # the current global model needs no copy; the aggregator passes only older ones
            base_weights=None if r == t else history[r],
        )
        for i, r in enumerate(base_rounds)
    ]
    s = create("fedbuff", buffer_size=len(updates), **params)
    got = s.aggregate(history[t], updates, server_round=t)
    for key in history[t]:
        expected = fedbuff_reference(
            history[t][key].astype(np.float64),
            [u.weights[key].astype(np.float64) for u in updates],
            [history[r][key].astype(np.float64) for r in base_rounds],
            [t - r for r in base_rounds],
            float(params.get("server_lr", 1.0)),  # type: ignore[arg-type]
            sqrt_scaling,
        )
        assert got[key].dtype == history[t][key].dtype
        rtol = 1e-12 if history[t][key].dtype == np.float64 else 1e-6
        assert_allclose(got[key], expected, rtol=rtol, atol=rtol)
