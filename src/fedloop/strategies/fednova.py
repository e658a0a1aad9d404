"""FedNova (Wang et al. 2020): normalised averaging of heterogeneous local progress.

Each update's metrics carry ``local_steps`` tau_i and ``local_momentum`` rho (the local SGD's
momentum, 0 for plain SGD; its buffer starts at zero each round, as PyTorch's ``SGD`` does for a
new optimizer). a_i is ||a_i||_1 of the paper: tau_i for plain SGD, and for momentum SGD
[tau_i - rho (1 - rho^tau_i) / (1 - rho)] / (1 - rho). With p_i = n_i / sum n:

    d_i = (x - y_i) / a_i,  tau_eff = sum_i p_i a_i,  x <- x - tau_eff * sum_i p_i d_i

(the server learning rate is 1; agents' proximal terms are not modelled in a_i).

Both metrics are required: an update without ``local_momentum`` is refused rather than taken
as plain SGD, because a momentum of 0.9 taken for 0 gives a_i = tau_i instead of up to 10 tau_i
(2.6 tau_i at 5 steps, 9.3 tau_i at 128) and silently mis-weights agents whose step counts
differ (docs/decisions/0012).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedloop.strategies.base import (
    Array,
    Strategy,
    Update,
    as_f64,
    assemble,
    check_updates,
    float_keys,
    sample_fractions,
    stack,
    weighted_sum,
)
from fedloop.types import Weights


def normalizer(local_steps: float, momentum: float = 0.0) -> float:
    """Return ||a_i||_1 for tau_i local steps of SGD with momentum rho (rho = 0: tau_i)."""
    if momentum == 0.0:
        return local_steps
    rho = momentum
    return float((local_steps - rho * (1.0 - rho**local_steps) / (1.0 - rho)) / (1.0 - rho))


def update_normalizer(update: Update) -> float:
    """Return a_i from the update's metrics, raising ValueError if local_steps or
    local_momentum is missing or out of range."""
    if "local_steps" not in update.metrics:
        raise ValueError(
            f"fednova needs metrics['local_steps'] (the local SGD steps) from every agent; "
            f"agent {update.agent_id!r} sent none"
        )
    steps = float(update.metrics["local_steps"])
    if not (math.isfinite(steps) and steps > 0):
        raise ValueError(
            f"agent {update.agent_id!r} sent local_steps={steps}; it must be a positive number"
        )
    if "local_momentum" not in update.metrics:
        raise ValueError(
            f"fednova needs metrics['local_momentum'] (the local SGD momentum, 0 for plain "
            f"SGD) from every agent, since the normaliser depends on it; agent "
            f"{update.agent_id!r} sent none: report the optimizer's momentum with local_steps"
        )
    rho = float(update.metrics["local_momentum"])
    if not 0.0 <= rho < 1.0:
        raise ValueError(
            f"agent {update.agent_id!r} sent local_momentum={rho}; it must be in [0, 1)"
        )
    return normalizer(steps, rho)


def fednova_step(x: Array, ys: Array, fractions: Array, a: Array) -> Array:
    """Return x - tau_eff * sum_i p_i (x - y_i) / a_i from stacked y_i (axis 0 = agents)."""
    tau_eff = float(fractions @ a)
    return x - tau_eff * weighted_sum(x - ys, fractions / a)


class FedNova(Strategy):
    """FedNova: needs metrics["local_steps"] and metrics["local_momentum"] per update."""

    name = "fednova"

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        a = np.array([update_normalizer(u) for u in ordered], dtype=np.float64)
        fractions = sample_fractions(ordered)
        result = {
            key: fednova_step(as_f64(global_weights[key]), stack(ordered, key), fractions, a)
            for key in float_keys(global_weights)
        }
        return assemble(global_weights, result, ordered, "mean")
