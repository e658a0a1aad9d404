"""A scikit-learn ML engine: logistic regression (SGDClassifier) on the 8x8 digits, federated.

Run from this directory (so that ``engine`` is importable), in three shells:

    fedloop aggregator --config aggregator.toml
    fedloop agent engine:make_engine --name a0 --set agent_index=0 --set num_agents=2
    fedloop agent engine:make_engine --name a1 --set agent_index=1 --set num_agents=2

then ``fedloop report --data-dir sklearn-data``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
from sklearn.linear_model import SGDClassifier
from sklearn.model_selection import train_test_split

from fedloop.ml import data, partition
from fedloop.ml.sklearn import init_model, load_weights, to_weights
from fedloop.types import Weights

CLASSES = np.arange(10)


class SGDEngine:
    """Local training = ``epochs`` passes of ``partial_fit`` from the global weights."""

    def __init__(self, agent_index: int, num_agents: int, epochs: int = 5, seed: int = 0) -> None:
        images, labels = data.load_digits()
        x = images.reshape(len(images), -1).astype(np.float64)
        x_train, self.x_test, y_train, self.y_test = train_test_split(
            x, labels, test_size=0.2, stratify=labels, random_state=seed
        )
        part = partition.iid(y_train, num_agents, seed)[agent_index]
        self.x, self.y = x_train[part], y_train[part]
        self.epochs = epochs
        self.model = init_model(
            SGDClassifier(loss="log_loss", alpha=1e-4, random_state=seed), x.shape[1], CLASSES
        )

    def initial_weights(self) -> Weights:
        return to_weights(self.model)

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        load_weights(self.model, weights)
        for _ in range(int(config.get("epochs", self.epochs))):
            self.model.partial_fit(self.x, self.y, classes=CLASSES)
        accuracy = float(self.model.score(self.x_test, self.y_test))
        return to_weights(self.model), len(self.y), {"accuracy": accuracy}

    def evaluate(self, weights: Weights, config: Mapping[str, Any]) -> dict[str, float]:
        load_weights(self.model, weights)
        return {"accuracy": float(self.model.score(self.x_test, self.y_test))}


def make_engine(agent_index: int = 0, num_agents: int = 1, **kw: Any) -> SGDEngine:
    """The factory ``fedloop agent engine:make_engine --set …`` calls."""
    return SGDEngine(agent_index, num_agents, **kw)
