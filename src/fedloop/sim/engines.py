"""A small numpy logistic-regression engine on synthetic data: many virtual agents, no downloads.

``logreg_engine(agent_index, num_agents)`` builds agent ``agent_index``'s engine in
microseconds: its data is drawn from a generator seeded by ``(seed, agent_index)``, so nothing
is stored or shared and any number of agents costs no memory between rounds. Every agent's
labels come from the same true linear model; ``skew`` shifts each agent's inputs differently
(feature skew, a common non-IID setting). ``evaluate`` scores a common test set.
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import lru_cache
from typing import Any

import numpy as np

from fedloop.errors import ConfigError
from fedloop.strategies import fedcurv, scaffold
from fedloop.types import Weights

__all__ = ["LogRegEngine", "logreg_engine"]

_TEST_STREAM = 2**31 - 1  # the test set's generator key, never an agent index


def _sigmoid(z: np.ndarray) -> np.ndarray:
    out: np.ndarray = 0.5 * (1.0 + np.tanh(0.5 * z))  # overflow-free logistic function
    return out


def _true_model(seed: int, features: int) -> tuple[np.ndarray, float]:
    rng = np.random.default_rng([seed, _TEST_STREAM, 1])
    return rng.standard_normal(features), float(rng.standard_normal())


def _draw(
    rng: np.random.Generator,
    n: int,
    features: int,
    seed: int,
    shift: np.ndarray | None,
    noise: float,
) -> tuple[np.ndarray, np.ndarray]:
    w, b = _true_model(seed, features)
    x = rng.standard_normal((n, features))
    if shift is not None:
        x += shift
    logits = x @ w + b + noise * rng.standard_normal(n)
    return x.astype(np.float32), (logits > 0).astype(np.float32)


@lru_cache(maxsize=4)
def _test_set(seed: int, features: int, size: int, noise: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng([seed, _TEST_STREAM, 2])
    return _draw(rng, size, features, seed, None, noise)


class LogRegEngine:
    """Binary logistic regression trained by mini-batch SGD on one agent's synthetic data."""

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        test: tuple[np.ndarray, np.ndarray],
        epochs: int = 1,
        batch_size: int = 16,
        lr: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.x, self.y, self.test = x, y, test
        self.epochs, self.batch_size, self.lr, self.seed = epochs, batch_size, lr, seed

    def initial_weights(self) -> Weights:
        """Return zeros: the same initial model in every agent."""
        return {
            "w": np.zeros(self.x.shape[1], dtype=np.float32),
            "b": np.zeros(1, dtype=np.float32),
        }

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        """Return (trained weights, samples, metrics): ``loss`` and ``accuracy`` on the local
        data after training, and ``local_steps`` (mini-batch steps) and ``local_momentum`` (0:
        plain SGD), which FedNova needs.

        ``config`` may override ``epochs`` and ``lr`` and carry ``proximal_mu`` (FedProx).
        With ``config["strategy"]`` ``scaffold`` every step's gradient is corrected,
        g <- g - c_i + c, and ``scaffold.dc/`` = -c + (x - y) / (K lr) is returned (option II);
        with ``fedcurv`` the gradient of lambda * sum_{j != s} (w - w_j)^T diag(F_j) (w - w_j)
        is added, and the Fisher diagonal F of the local log-likelihood at the trained
        weights is returned as ``fedcurv.fisher/`` with ``fedcurv.fw/`` = F * w.
        """
        epochs = int(config.get("epochs", self.epochs))
        lr = float(config.get("lr", self.lr))
        mu = float(config.get("proximal_mu", 0.0))
        strategy = config.get("strategy")
        if strategy not in (None, "scaffold", "fedcurv"):
            raise ConfigError(
                f"LogRegEngine does not support strategy {strategy!r}, whose agents exchange "
                "side tensors; it supports scaffold and fedcurv"
            )
        state: Mapping[str, Any] = config.get("strategy_state") or {}
        # The constant part of each step's gradient: SCAFFOLD's c - c_i, FedCurv's -2λ·FW;
        # FedCurv's 2λ·F multiplies w.
        shift = {"w": np.zeros(self.x.shape[1]), "b": np.zeros(1)}
        curvature = {"w": np.zeros(self.x.shape[1]), "b": np.zeros(1)}
        if strategy == "scaffold":
            for key in shift:
                shift[key] = _state(state, scaffold.CONTROL_PREFIX + key) - _state(
                    state, scaffold.LOCAL_PREFIX + key
                )
        lam = float(config.get("fedcurv_lambda", 0.0))
        if strategy == "fedcurv" and state:  # no sums before the first round
            for key in shift:
                curvature[key] = 2 * lam * _state(state, fedcurv.FISHER_PREFIX + key)
                shift[key] = -2 * lam * _state(state, fedcurv.PRODUCT_PREFIX + key)
        w = np.array(weights["w"], dtype=np.float64)
        b = float(np.asarray(weights["b"]).reshape(-1)[0])
        w0, b0 = w.copy(), b
        rng = np.random.default_rng([self.seed, int(config.get("round", 0))])
        n = len(self.y)
        steps = 0
        for _ in range(epochs):
            order = rng.permutation(n)
            for start in range(0, n, self.batch_size):
                idx = order[start : start + self.batch_size]
                xb, yb = self.x[idx], self.y[idx]
                err = _sigmoid(xb @ w + b) - yb
                grad_w = xb.T @ err / len(idx) + mu * (w - w0)
                grad_b = float(err.mean()) + mu * (b - b0)
                grad_w += curvature["w"] * w + shift["w"]
                grad_b += float(curvature["b"][0] * b + shift["b"][0])
                w -= lr * grad_w
                b -= lr * grad_b
                steps += 1
        metrics = self._score(w, b, self.x, self.y)
        metrics.update(local_steps=float(steps), local_momentum=0.0)
        new = {"w": w.astype(np.float32), "b": np.array([b], dtype=np.float32)}
        if strategy == "scaffold":
            start_ = {"w": w0, "b": np.array([b0])}
            for key, value in list(new.items()):
                c = _state(state, scaffold.CONTROL_PREFIX + key)
                delta = scaffold.control_delta(c, start_[key], value, steps, lr)
                new[scaffold.DELTA_PREFIX + key] = delta.astype(np.float32)
        elif strategy == "fedcurv":
            fisher = self.fisher(new["w"].astype(np.float64), float(new["b"][0]))
            for key, f in fisher.items():
                new[fedcurv.FISHER_PREFIX + key] = f.astype(np.float32)
                new[fedcurv.PRODUCT_PREFIX + key] = (f * new[key]).astype(np.float32)
        return new, n, metrics

    def fisher(self, w: np.ndarray, b: float) -> dict[str, np.ndarray]:
        """Return the empirical Fisher diagonal of the local data at (w, b): the mean over
        samples of each squared per-sample gradient of the negative log-likelihood."""
        err = _sigmoid(self.x @ w + b) - self.y  # d(-log p)/dz per sample
        return {
            "w": np.mean((err[:, None] * self.x.astype(np.float64)) ** 2, axis=0),
            "b": np.array([np.mean(err**2)]),
        }

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> dict[str, float]:
        """Return {"loss", "accuracy"} of ``weights`` on the common test set."""
        w = np.asarray(weights["w"], dtype=np.float64)
        b = float(np.asarray(weights["b"]).reshape(-1)[0])
        return self._score(w, b, *self.test)

    @staticmethod
    def _score(w: np.ndarray, b: float, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        p = np.clip(_sigmoid(x @ w + b), 1e-7, 1 - 1e-7)
        loss = -np.mean(y * np.log(p) + (1 - y) * np.log(1 - p))
        return {"loss": float(loss), "accuracy": float(np.mean((p > 0.5) == (y > 0.5)))}


def _state(state: Mapping[str, Any], name: str) -> np.ndarray:
    """Return one strategy-state tensor as float64, or raise a ConfigError naming it."""
    if name not in state:
        raise ConfigError(
            f"config['strategy_state'] lacks {name!r}: the agent must pass the tensors its "
            "aggregator ships with the global model (an older aggregator sends none; upgrade it)"
        )
    return np.asarray(state[name], dtype=np.float64).reshape(-1)


def logreg_engine(
    agent_index: int,
    num_agents: int,
    features: int = 20,
    samples: int = 64,
    skew: float = 0.0,
    noise: float = 0.5,
    test_size: int = 2000,
    seed: int = 0,
    **kw: Any,
) -> LogRegEngine:
    """Return agent ``agent_index``'s logistic-regression engine on its own synthetic data.

    Each agent holds between ``samples/2`` and ``3·samples/2`` samples of ``features`` inputs
    (so FedAvg's weighting matters); ``skew`` > 0 shifts each agent's inputs by a random
    vector of that scale. Keyword arguments go to ``LogRegEngine`` (epochs, batch_size, lr).
    """
    if not 0 <= agent_index < num_agents:
        raise ConfigError(
            f"agent_index must be in 0..{num_agents - 1} for {num_agents} agents, "
            f"got {agent_index}."
        )
    if features < 1 or samples < 2:
        raise ConfigError(f"need features >= 1 and samples >= 2, got {features} and {samples}.")
    rng = np.random.default_rng([seed, agent_index])
    n = int(rng.integers(max(1, samples // 2), samples * 3 // 2 + 1))
    shift = skew * rng.standard_normal(features) if skew > 0 else None
    x, y = _draw(rng, n, features, seed, shift, noise)
    test = _test_set(seed, features, test_size, noise)
    return LogRegEngine(x, y, test, seed=seed * 1_000_003 + agent_index, **kw)
