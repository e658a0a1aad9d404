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

    Folded one update at a time: memory is one float64 copy of the model, not n of them.
    """
    fractions = sample_fractions(updates)
    out: dict[str, Array] = {}
    for key in keys:
        total = np.zeros(np.shape(updates[0].weights[key]), dtype=np.float64)
        for fraction, update in zip(fractions, updates, strict=True):
            total += np.float64(fraction) * np.asarray(update.weights[key])
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
