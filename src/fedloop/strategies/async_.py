"""Asynchronous aggregation: FedAsync (Xie et al. 2019) and FedBuff (Nguyen et al. 2022).

The aggregator calls aggregate whenever ``buffer_size`` uploads are in, with ``server_round``
set to the current global model version t; an update's staleness is t - base_round.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedloop.strategies.base import (
    Array,
    Strategy,
    Update,
    as_f64,
    assemble,
    check_updates,
    float_keys,
    param_choice,
    param_float,
    param_int,
    stack,
)
from fedloop.types import Weights

STALENESS_FUNCTIONS = ("constant", "polynomial", "hinge")


def staleness_weight(kind: str, staleness: int, a: float, b: float) -> float:
    """Return s(t - tau): constant 1, polynomial (t-tau+1)^-a, hinge 1 or 1/(a(t-tau-b)+1)."""
    if staleness < 0:
        raise ValueError(f"staleness must be 0 or more, got {staleness}")
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((staleness + 1) ** (-a))
    if kind == "hinge":
        return 1.0 if staleness <= b else 1.0 / (a * (staleness - b) + 1.0)
    raise ValueError(f"unknown staleness function {kind!r}; use one of {STALENESS_FUNCTIONS}")


def _require_round(name: str, server_round: int | None) -> int:
    if server_round is None:
        raise ValueError(f"{name} needs server_round, the current global model version")
    return server_round


class FedAsync(Strategy):
    """FedAsync: x <- (1 - a_t) x + a_t x_new with a_t = alpha * s(t - tau).

    Several updates in one call are mixed in one after another, in (base_round, agent_id)
    order, all with t = server_round (the call produces one new global version).
    num_samples plays no part.
    """

    name = "fedasync"
    asynchronous = True

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: str = "constant",
        a: float = 0.5,
        b: float = 4,
    ) -> None:
        self.alpha = param_float(self.name, "alpha", alpha, low=0.0, high=1.0, low_open=True)
        self.staleness = param_choice(self.name, "staleness", staleness, STALENESS_FUNCTIONS)
        self.a = param_float(self.name, "a", a, low=0.0)
        self.b = param_float(self.name, "b", b, low=0.0)
        self.buffer_size = 1

    def mixing_weight(self, server_round: int, base_round: int) -> float:
        """Return alpha_t for an update started from base_round, applied at server_round."""
        if base_round > server_round:
            raise ValueError(
                f"an update started from round {base_round}, after the current round {server_round}"
            )
        return self.alpha * staleness_weight(
            self.staleness, server_round - base_round, self.a, self.b
        )

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        t = _require_round(self.name, server_round)
        checked = check_updates(global_weights, updates)
        ordered = sorted(checked, key=lambda u: (u.base_round, u.agent_id))
        keys = float_keys(global_weights)
        model = {key: as_f64(global_weights[key]).copy() for key in keys}
        for update in ordered:
            mix = self.mixing_weight(t, update.base_round)
            for key in keys:
                model[key] = (1.0 - mix) * model[key] + mix * as_f64(update.weights[key])
        return assemble(global_weights, model, checked, "mean")


class FedBuff(Strategy):
    """FedBuff: x <- x + server_lr * mean_i (y_i - x) over a buffer of K = buffer_size uploads.

    Updates carry full weights, not deltas, so delta_i is taken against the current global
    model rather than the (older) one agent i started from: with server_lr = 1 the result is
    the plain mean of the buffer. The mean is unweighted, as in the paper; no staleness scaling.
    """

    name = "fedbuff"
    asynchronous = True

    def __init__(self, buffer_size: int = 10, server_lr: float = 1.0) -> None:
        self.buffer_size = param_int(self.name, "buffer_size", buffer_size, low=1)
        self.server_lr = param_float(self.name, "server_lr", server_lr, low=0.0, low_open=True)

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        result: dict[str, Array] = {}
        for key in float_keys(global_weights):
            x = as_f64(global_weights[key])
            result[key] = x + self.server_lr * (stack(ordered, key) - x).mean(axis=0)
        return assemble(global_weights, result, ordered, "mean")
