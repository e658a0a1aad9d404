"""FedCurv (Shoham et al. 2019): FedAvg plus the sums agents need for the EWC-style penalty.

Agent s's penalty is lambda * sum_{j != s} (w - w_j)^T diag(I_j) (w - w_j), which expands to
lambda * [w^T diag(sum_j I_j) w - 2 w^T sum_j (I_j * w_j) + const]. So each agent uploads, per
floating-point tensor, its Fisher diagonal I_j as ``fedcurv.fisher/<tensor>`` and the product
I_j * w_j as ``fedcurv.fw/<tensor>`` in ``extras``; the server sums both over this round's
updates (unweighted, replacing last round's sums) and keeps them in state() under the same
names, for the aggregator to ship with the global model. An agent subtracts its own last
contribution to get the sum over the others. The weights themselves are FedAvg.
round_config returns ``{"fedcurv_lambda": penalty}``.
"""

from __future__ import annotations

from collections.abc import Sequence

from fedloop.strategies.base import (
    Array,
    RoundConfig,
    Strategy,
    Update,
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


class FedCurv(Strategy):
    """FedCurv: FedAvg weights; sums of Fisher diagonals and Fisher-weight products in state()."""

    name = "fedcurv"

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

    def load_state(self, state: Weights) -> None:
        self._fisher, self._product = split_state(state, [FISHER_PREFIX, PRODUCT_PREFIX], self.name)
