"""An ML engine that does no training: for benchmarks and smoke tests of the plumbing."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloop.types import Weights


class NoopEngine:
    """Returns the global model unchanged; its initial model has `model_mb` MB of float32."""

    def __init__(self, model_mb: float = 4.0, tensors: int = 4, seed: int = 0) -> None:
        self.model_mb, self.tensors, self.seed = float(model_mb), max(1, int(tensors)), seed

    def initial_weights(self) -> Weights:
        total = max(self.tensors, int(self.model_mb * 1024 * 1024 / 4))
        sizes = [total // self.tensors] * self.tensors
        sizes[-1] += total - sum(sizes)
        rng = np.random.default_rng(self.seed)
        return {f"layer{i}": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        return weights, 1, {}
