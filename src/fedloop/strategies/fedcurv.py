"""FedCurv (Shoham et al. 2019): FedAvg plus the sums agents need for the EWC-style penalty.

Agent s's penalty is lambda * sum_{j != s} (w - w_j)^T diag(I_j) (w - w_j), which expands to
lambda * [w^T diag(sum_j I_j) w - 2 w^T sum_j (I_j * w_j) + const]. So each agent uploads, per
floating-point tensor, its Fisher diagonal I_j as ``fedcurv.fisher/<tensor>`` and the product
I_j * w_j as ``fedcurv.fw/<tensor>`` in ``extras``; the server sums both over this round's
updates (unweighted, replacing last round's sums) and keeps them in state() under the same
names, which the aggregator ships to agents with the global model (`shipped_state`). The
weights themselves are FedAvg. round_config returns ``{"fedcurv_lambda": penalty}``.

The agent (`FedCurvAgent`) keeps its own last contribution and, when that is part of the
shipped sums (its upload was in the round that made the global model it trains on),
subtracts it: its engine gets the sums over the other agents, under the same names.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloop.strategies.base import (
    AgentSide,
    Array,
    RoundConfig,
    Strategy,
    Update,
    as_f64,
    assemble,
    check_updates,
    float_keys,
    param_float,
    split_state,
    stack_extras,
)
from fedloop.strategies.fedavg import weighted_mean
from fedloop.types import Weights

FISHER_PREFIX = "fedcurv.fisher/"
PRODUCT_PREFIX = "fedcurv.fw/"


class FedCurvAgent(AgentSide):
    """FedCurv's agent side: the engine gets sum_{j != s} I_j (``fedcurv.fisher/``) and
    sum_{j != s} I_j * w_j (``fedcurv.fw/``) over the agents of the last round; the agent keeps
    its own last upload's I_s and I_s * w_s. Nothing before the first aggregation."""

    def engine_state(
        self, shipped: Weights, kept: Weights, kept_round: int, global_round: int
    ) -> Weights:
        # The shipped sums hold this agent's share only if its upload made global_round.
        own = kept if kept_round == global_round else {}
        out: Weights = {}
        for name, total in shipped.items():
            value = as_f64(total)
            mine = own.get(name)
            if mine is not None:
                value = value - as_f64(mine)
            if name.startswith(FISHER_PREFIX):
                value = np.maximum(value, 0.0)  # a Fisher diagonal is >= 0; no rounding below
            out[name] = value
        return out

    def keep(self, kept: Weights, extras: Weights) -> Weights:
        return {name: np.array(value, dtype=np.float64) for name, value in extras.items()}


class FedCurv(Strategy):
    """FedCurv: FedAvg weights; sums of Fisher diagonals and Fisher-weight products in state()."""

    name = "fedcurv"
    extra_prefixes = (FISHER_PREFIX, PRODUCT_PREFIX)
    agent_side = FedCurvAgent()

    def __init__(self, penalty: float = 1.0) -> None:
        self.penalty = param_float(self.name, "penalty", penalty, low=0.0)
        self._fisher: dict[str, Array] = {}
        self._product: dict[str, Array] = {}

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        fisher: dict[str, Array] = {}
        product: dict[str, Array] = {}
        for key in keys:
            shape = global_weights[key].shape
            fisher[key] = stack_extras(ordered, FISHER_PREFIX + key, shape).sum(axis=0)
            product[key] = stack_extras(ordered, PRODUCT_PREFIX + key, shape).sum(axis=0)
        result = assemble(global_weights, weighted_mean(ordered, keys), ordered, "mean")
        self._fisher, self._product = fisher, product
        return result

    def round_config(self, server_round: int) -> RoundConfig:
        return {"fedcurv_lambda": self.penalty}

    def state(self) -> Weights:
        out: Weights = {FISHER_PREFIX + key: v.copy() for key, v in self._fisher.items()}
        out.update({PRODUCT_PREFIX + key: v.copy() for key, v in self._product.items()})
        return out

    def shipped_state(self, global_weights: Weights) -> Weights:
        """Return the sums of the last round (none before the first aggregate)."""
        out: Weights = {FISHER_PREFIX + key: v for key, v in self._fisher.items()}
        out.update({PRODUCT_PREFIX + key: v for key, v in self._product.items()})
        return out

    def load_state(self, state: Weights) -> None:
        self._fisher, self._product = split_state(state, [FISHER_PREFIX, PRODUCT_PREFIX], self.name)
