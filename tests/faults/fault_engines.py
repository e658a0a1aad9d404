"""Numpy ML engines that the fault tests' agent processes load as `fault_engines:…`."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

Weights = dict[str, np.ndarray]


def initial(size_mb: float = 0.0) -> Weights:
    """A small model, or one with a tensor of `size_mb` MiB (float32) for slow transfers."""
    n = max(1, int(size_mb * 1024 * 1024) // 4)
    weights = {"w": np.zeros((4, 3), np.float32), "b": np.zeros(3, np.float32)}
    if size_mb:
        weights["big"] = np.zeros(n, np.float32)
    return weights


class FaultEngine:
    """Adds `offset` to every weight (FedAvg of the results is checkable by hand).

    `delay` seconds of "training" in each round of `slow_rounds` (every round when empty);
    `marker`, when set, is a file that gets one line `<round>` as each training starts.
    """

    def __init__(
        self,
        offset: float = 1.0,
        samples: int = 10,
        delay: float = 0.0,
        slow_rounds: str = "",
        size_mb: float = 0.0,
        marker: str = "",
    ) -> None:
        self.offset, self.samples, self.delay = float(offset), int(samples), float(delay)
        self.slow_rounds = {int(r) for r in str(slow_rounds).split(",") if r.strip()}
        self.size_mb = float(size_mb)
        self.marker = marker

    def initial_weights(self) -> Weights:
        return initial(self.size_mb)

    def train(
        self, weights: Weights, config: dict[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        round_number = int(config.get("round", 0))
        if self.marker:
            with Path(self.marker).open("a") as handle:
                handle.write(f"{round_number}\n")
        if self.delay and (not self.slow_rounds or round_number in self.slow_rounds):
            time.sleep(self.delay)
        new = {k: (v + self.offset).astype(v.dtype) for k, v in weights.items()}
        return new, self.samples, {"loss": 1.0 / (1 + round_number)}
