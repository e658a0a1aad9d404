"""Asynchronous aggregation: FedAsync (Xie et al. 2019) and FedBuff (Nguyen et al. 2022).

The aggregator calls aggregate whenever ``buffer_size`` uploads are in, with ``server_round``
set to the current global model version t; an update's staleness is t - base_round. FedAsync
mixes local models in as they are; FedBuff takes each one's delta against its own base model.
"""

from __future__ import annotations

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
    param_choice,
    param_float,
    param_int,
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
    """FedBuff: x <- x + server_lr * (1/K) sum_i s(t - tau_i) (y_i - x_{tau_i}) over K uploads.

    y_i is agent i's local model and x_{tau_i} the global model it trained on (global model
    ``base_round`` tau_i), so each delta is the agent's own progress and a stale one adds to
    the progress made since its base instead of undoing it (Nguyen et al. 2022, Algorithm 1).
    The aggregator passes x_{tau_i} of a stale update as ``Update.base_weights``; an update
    trained on the current global model needs none. K is the number of updates (buffer_size,
    or fewer when a deadline flushes the buffer); the mean is unweighted by num_samples and
    divides by K, not by the sum of s, as in the paper. s is the staleness weight (as FedAsync's,
    with staleness t - tau_i): ``"constant"`` 1 by default, ``"polynomial"`` (staleness + 1)^-a,
    which with the default a = 0.5 is the paper's 1/sqrt(1 + staleness), or ``"hinge"``.
    """

    name = "fedbuff"
    asynchronous = True
    needs_base_models = True

    def __init__(
        self,
        buffer_size: int = 10,
        server_lr: float = 1.0,
        staleness: str = "constant",
        a: float = 0.5,
        b: float = 4,
    ) -> None:
        self.buffer_size = param_int(self.name, "buffer_size", buffer_size, low=1)
        self.server_lr = param_float(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.staleness = param_choice(self.name, "staleness", staleness, STALENESS_FUNCTIONS)
        self.a = param_float(self.name, "a", a, low=0.0)
        self.b = param_float(self.name, "b", b, low=0.0)

    def scale(self, server_round: int, base_round: int) -> float:
        """Return s(t - tau) for an update started from base_round, applied at server_round."""
        if base_round > server_round:
            raise ValueError(
                f"an update started from round {base_round}, after the current round {server_round}"
            )
        return staleness_weight(self.staleness, server_round - base_round, self.a, self.b)

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        t = _require_round(self.name, server_round)
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        scales = [self.scale(t, u.base_round) for u in ordered]
        bases = [_base_model(global_weights, u, t, keys) for u in ordered]
        result: dict[str, Array] = {}
        for key in keys:
            x = as_f64(global_weights[key])
            total = np.zeros(x.shape, dtype=np.float64)
            for update, base, weight in zip(ordered, bases, scales, strict=True):
                total += weight * (as_f64(update.weights[key]) - as_f64(base[key]))
            result[key] = x + self.server_lr * (total / len(ordered))
        return assemble(global_weights, result, ordered, "mean")


def _base_model(global_weights: Weights, update: Update, t: int, keys: Sequence[str]) -> Weights:
    """Return the global model the update was trained on: its base_weights, or the current
    global model for an update trained on it (base_round == t)."""
    base = update.base_weights
    if base is None:
        if update.base_round == t:
            return global_weights
        raise ValueError(
            f"fedbuff takes the delta of agent {update.agent_id!r} against global model "
            f"{update.base_round}, which it trained on, but the update carries no base_weights "
            f"and the model given is global model {t}; pass global model {update.base_round} "
            "as Update.base_weights (the aggregator does)"
        )
    for key in keys:
        shape = np.shape(base[key]) if key in base else None
        if shape != global_weights[key].shape:
            raise ValueError(
                f"the base model of agent {update.agent_id!r} has {key!r} with shape {shape}, "
                f"the global model's has {global_weights[key].shape}"
            )
    return base
