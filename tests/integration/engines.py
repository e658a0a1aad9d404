"""Numpy ML engines that agent processes in the integration tests load as `engines:…`."""

from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


def initial() -> Weights:
    return {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}


class ShiftEngine:
    """Adds a per-agent offset to every weight: FedAvg of the results is checkable by hand."""

    def __init__(self, offset: float = 1.0, samples: int = 10, delay: float = 0.0) -> None:
        self.offset, self.samples, self.delay = float(offset), int(samples), float(delay)

    def initial_weights(self) -> Weights:
        return initial()

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        marker = os.environ.get("FEDLOOP_TEST_TRAINING_MARKER")
        if marker:
            with open(marker, "a") as handle:
                handle.write(f"{config.get('round')}\n")
        if self.delay:
            time.sleep(self.delay)
        new = {k: (v + self.offset).astype(v.dtype) for k, v in weights.items()}
        return new, self.samples, {"loss": 1.0 / (1 + config.get("round", 0)), "accuracy": 0.5}

    def evaluate(self, weights: Weights, config: dict[str, Any]) -> dict[str, float]:
        return {"mean": float(np.mean(weights["w"]))}


class GatedShiftEngine(ShiftEngine):
    """A ShiftEngine whose training waits until the file `gate` exists: every agent of a test
    registers first, then all start together, however slowly their processes came up."""

    def __init__(self, gate: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        deadline = time.monotonic() + 60
        while not os.path.exists(self.gate) and time.monotonic() < deadline:
            time.sleep(0.02)
        return super().train(weights, config)


class PidEngine:
    """Returns the global model unchanged; its metric ``pid`` is the process that trained it."""

    def __init__(self, agent_index: int, num_agents: int) -> None:
        self.index = agent_index

    def initial_weights(self) -> Weights:
        return initial()

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        return weights, 1, {"pid": float(os.getpid())}


class WrongShapeEngine(ShiftEngine):
    """Returns `w` with one row too many: a bug in the user's training code."""

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        new, samples, metrics = super().train(weights, config)
        new["w"] = np.zeros((5, 3), np.float32)
        return new, samples, metrics


class FailingEngine(ShiftEngine):
    """Raises in training, as a user's code with a bug does."""

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        raise RuntimeError("the user's training broke")
