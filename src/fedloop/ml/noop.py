"""An ML engine that does no training: for benchmarks and smoke tests of the plumbing."""

from __future__ import annotations

import itertools
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedloop.types import Weights

_calls = itertools.count(1)  # per process: engines of several virtual agents share it


class NoopEngine:
    """Returns the global model unchanged; its initial model has `model_mb` MB of float32.

    ``vary``: each local model differs from the global one and from every other: the first
    tensor is copied with two values replaced (this process's id and its count of calls). Unchanged
    models are all alike, so a store that keeps each distinct model once writes none of them.
    """

    def __init__(
        self, model_mb: float = 4.0, tensors: int = 4, seed: int = 0, vary: bool = False
    ) -> None:
        self.model_mb, self.tensors, self.seed = float(model_mb), max(1, int(tensors)), seed
        self.vary = bool(vary)

    def initial_weights(self) -> Weights:
        total = max(self.tensors, int(self.model_mb * 1024 * 1024 / 4))
        sizes = [total // self.tensors] * self.tensors
        sizes[-1] += total - sum(sizes)
        rng = np.random.default_rng(self.seed)
        return {f"layer{i}": rng.standard_normal(n, dtype=np.float32) for i, n in enumerate(sizes)}

    def train(
        self, weights: Weights, config: Mapping[str, Any]
    ) -> tuple[Weights, int, dict[str, float]]:
        if not self.vary:
            return weights, 1, {}
        call = next(_calls)
        out = dict(weights)
        name = next(iter(out))
        changed = np.array(out[name], copy=True)
        flat = changed.reshape(-1)
        # Both below 2**24: exact in float32, so no two calls give the same bytes.
        flat[: min(2, flat.size)] = [os.getpid() % 2**24, call % 2**24][: flat.size]
        out[name] = changed
        return out, 1, {}
