"""FedAvg (McMahan et al. 2017) and FedProx (Li et al. 2020): the num_samples-weighted mean."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloop.strategies.base import (
    Array,
    RoundConfig,
    Strategy,
    Update,
    assemble,
    canonical,
    check_updates,
    float_keys,
    param_float,
    sample_fractions,
)
from fedloop.types import Weights


def weighted_mean(updates: Sequence[Update], keys: Sequence[str]) -> dict[str, Array]:
    """Return sum_i (n_i / sum n) * y_i for each named tensor, in float64.

    Folded one update at a time into one float64 total per tensor through one reused scratch
    buffer: memory is one float64 copy of the model, not n of them, and no temporaries. For a
    single update the mean is that update exactly (n_1 / n_1 = 1), so its own tensors are
    returned as they are, in their dtype, without a copy (callers only read them).
    """
    fractions = sample_fractions(updates)
    if len(updates) == 1:
        return {key: np.asarray(updates[0].weights[key]) for key in keys}
    out: dict[str, Array] = {}
    scratch: Array | None = None
    for key in keys:
        first = np.asarray(updates[0].weights[key])
        total = np.empty(first.shape, dtype=np.float64)
        np.multiply(first, fractions[0], out=total, dtype=np.float64)
        if scratch is None or scratch.size < total.size:
            scratch = np.empty(total.size, dtype=np.float64)
        term = scratch[: total.size].reshape(total.shape)
        for fraction, update in zip(fractions[1:], updates[1:], strict=True):
            np.multiply(update.weights[key], fraction, out=term, dtype=np.float64)
            np.add(total, term, out=total)
        out[key] = total
    return out


def fedavg(updates: Sequence[Update]) -> Weights:
    """Return the num_samples-weighted mean of the updates, each tensor in the first's dtype."""
    if not updates:
        raise ValueError("fedavg needs at least one update, got none")
    ordered = canonical(updates)
    like = ordered[0].weights
    return assemble(like, weighted_mean(ordered, float_keys(like)), ordered, "mean")


class FedAvg(Strategy):
    """FedAvg: x <- sum_i (n_i / n) y_i."""

    name = "fedavg"
    streaming = True

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        mean = weighted_mean(ordered, float_keys(global_weights))
        return assemble(global_weights, mean, ordered, "mean")


def returns_mean(strategy: Strategy) -> bool:
    """Return True if the strategy's aggregate is FedAvg's own: the weighted mean, nothing else.

    Then a `RunningMean` may hand it the mean already in the model's dtypes
    (``as_update(like=...)``) with a bit-identical result.
    """
    return isinstance(strategy, FedAvg) and type(strategy).aggregate is FedAvg.aggregate


class FedProx(FedAvg):
    """FedProx: FedAvg on the server; agents add (mu/2)||w - x||^2 to their local loss.

    ``mu`` (default 0.01, one of the values Li et al. tune over) reaches agents through
    round_config as ``{"proximal_mu": mu}``.
    """

    name = "fedprox"

    def __init__(self, mu: float = 0.01) -> None:
        self.mu = param_float(self.name, "mu", mu, low=0.0)

    def round_config(self, server_round: int) -> RoundConfig:
        return {"proximal_mu": self.mu}
