"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1), server side.

Each agent uploads its new weights y_i and, in ``extras``, its control-variate change
Delta c_i = c_i+ - c_i for every floating-point tensor, named ``scaffold.dc/<tensor>``. The server
computes, unweighted over the |S| participating agents,

    x <- x + server_lr * (1/|S|) sum_i (y_i - x)
    c <- c + (|S|/N) * (1/|S|) sum_i Delta c_i

with N = ``num_agents`` (all agents; 0 means |S|, i.e. full participation). The server control
variate c lives in state() as float64 tensors ``scaffold.c/<tensor>``; the aggregator ships them
to agents with the global model. Before the first aggregate the state is empty, meaning c = 0.
round_config returns ``{"scaffold": True}`` (arrays cannot travel in round_config).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from fedloop.strategies.base import (
    Array,
    RoundConfig,
    Strategy,
    Update,
    as_f64,
    assemble,
    check_state_tensors,
    check_updates,
    float_keys,
    param_float,
    param_int,
    split_state,
    stack,
    stack_extras,
)
from fedloop.types import Weights

CONTROL_PREFIX = "scaffold.c/"
DELTA_PREFIX = "scaffold.dc/"


def scaffold_step(
    x: Array, ys: Array, c: Array, dcs: Array, server_lr: float, num_agents: int
) -> tuple[Array, Array]:
    """Return (x', c') from stacked y_i and Delta c_i (axis 0 = the |S| agents)."""
    sampled = ys.shape[0]
    total = num_agents or sampled
    x_new = x + server_lr * (ys - x).mean(axis=0)
    c_new = c + (sampled / total) * dcs.mean(axis=0)
    return x_new, c_new


class Scaffold(Strategy):
    """SCAFFOLD: server learning rate ``server_lr`` (1.0) and ``num_agents`` N (0 = |S|)."""

    name = "scaffold"

    def __init__(self, server_lr: float = 1.0, num_agents: int = 0) -> None:
        self.server_lr = param_float(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.num_agents = param_int(self.name, "num_agents", num_agents, low=0)
        self._c: dict[str, Array] = {}

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        if self._c:
            check_state_tensors(self._c, global_weights, keys, "scaffold control variate")
        result: dict[str, Array] = {}
        control: dict[str, Array] = {}
        for key in keys:
            x = as_f64(global_weights[key])
            dcs = stack_extras(ordered, DELTA_PREFIX + key, x.shape)
            c = self._c.get(key, np.zeros_like(x))
            result[key], control[key] = scaffold_step(
                x, stack(ordered, key), c, dcs, self.server_lr, self.num_agents
            )
        self._c = control
        return assemble(global_weights, result, ordered, "mean")

    def round_config(self, server_round: int) -> RoundConfig:
        return {"scaffold": True}

    def state(self) -> Weights:
        return {CONTROL_PREFIX + key: c.copy() for key, c in self._c.items()}

    def load_state(self, state: Weights) -> None:
        (self._c,) = split_state(state, [CONTROL_PREFIX], self.name)
