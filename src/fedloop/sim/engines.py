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
        """
        epochs = int(config.get("epochs", self.epochs))
        lr = float(config.get("lr", self.lr))
        mu = float(config.get("proximal_mu", 0.0))
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
                w -= lr * grad_w
                b -= lr * grad_b
                steps += 1
        metrics = self._score(w, b, self.x, self.y)
        metrics.update(local_steps=float(steps), local_momentum=0.0)
        new = {"w": w.astype(np.float32), "b": np.array([b], dtype=np.float32)}
        return new, n, metrics

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
