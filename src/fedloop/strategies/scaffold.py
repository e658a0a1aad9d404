"""SCAFFOLD (Karimireddy et al. 2020, Algorithm 1 with option II), server and agent sides.

Each agent uploads its new weights y_i and, in ``extras``, its control-variate change
Delta c_i = c_i+ - c_i for every floating-point tensor, named ``scaffold.dc/<tensor>``. The server
computes, unweighted over the |S| participating agents,

    x <- x + server_lr * (1/|S|) sum_i (y_i - x)
    c <- c + (|S|/N) * (1/|S|) sum_i Delta c_i

with N = ``num_agents`` (all agents; 0 means the agents registered with the aggregator, or |S|
outside one). The server control variate c lives in state() as float64 tensors
``scaffold.c/<tensor>``, and the aggregator ships them to agents with each global model
(`shipped_state`; zeros before the first aggregate). round_config returns ``{"scaffold": True}``.

The agent (`ScaffoldAgent`) keeps its own control variate c_i (``scaffold.ci/<tensor>``,
float64, zeros at first) and hands its engine c and c_i. The engine corrects every local
gradient, g <- g - c_i + c, takes K steps of learning rate lr from x to y_i, and returns
Delta c_i = -c + (x - y_i) / (K lr) (`control_delta`: option II, c_i+ = c_i - c + (x - y_i) /
(K lr)). Once the upload is accepted the agent keeps c_i + Delta c_i.
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
LOCAL_PREFIX = "scaffold.ci/"


def scaffold_step(
    x: Array, ys: Array, c: Array, dcs: Array, server_lr: float, num_agents: int
) -> tuple[Array, Array]:
    """Return (x', c') from stacked y_i and Delta c_i (axis 0 = the |S| agents)."""
    sampled = ys.shape[0]
    total = num_agents or sampled
    x_new = x + server_lr * (ys - x).mean(axis=0)
    c_new = c + (sampled / total) * dcs.mean(axis=0)
    return x_new, c_new


def control_delta(
    c: np.ndarray, x: np.ndarray, y: np.ndarray, local_steps: int, lr: float
) -> Array:
    """Return Delta c_i = c_i+ - c_i = -c + (x - y) / (K lr), option II, in float64.

    ``x`` is the global model trained from, ``y`` the model after K = ``local_steps`` steps
    of learning rate ``lr``. No step (K = 0) gives no new estimate: Delta c_i = 0.
    """
    if local_steps <= 0:
        return np.zeros(np.shape(c), dtype=np.float64)
    if lr <= 0:
        raise ValueError(f"SCAFFOLD needs a learning rate > 0, got {lr}")
    return -as_f64(c) + (as_f64(x) - as_f64(y)) / (local_steps * lr)


class ScaffoldAgent(AgentSide):
    """SCAFFOLD's agent side: the engine gets c (``scaffold.c/``) and c_i (``scaffold.ci/``);
    the agent keeps c_i + Delta c_i once its upload is accepted."""

    def engine_state(
        self, shipped: Weights, kept: Weights, kept_round: int, global_round: int
    ) -> Weights:
        out: Weights = {}
        for name, c in shipped.items():
            if not name.startswith(CONTROL_PREFIX):
                raise ValueError(f"SCAFFOLD ships scaffold.c/ tensors only, not {name!r}")
            local = LOCAL_PREFIX + name[len(CONTROL_PREFIX) :]
            ci = kept.get(local)
            if ci is not None and ci.shape != c.shape:
                raise ValueError(
                    f"the kept control variate {local!r} has shape {ci.shape}, the server's "
                    f"{c.shape}: it belongs to another model"
                )
            out[name] = c
            out[local] = ci if ci is not None else np.zeros(c.shape, dtype=np.float64)
        return out

    def keep(self, kept: Weights, extras: Weights) -> Weights:
        out: Weights = {}
        for name, delta in extras.items():
            if not name.startswith(DELTA_PREFIX):
                continue
            local = LOCAL_PREFIX + name[len(DELTA_PREFIX) :]
            ci = kept.get(local)
            out[local] = (as_f64(ci) if ci is not None else 0.0) + as_f64(delta)
        return out


class Scaffold(Strategy):
    """SCAFFOLD: server learning rate ``server_lr`` (1.0) and ``num_agents`` N (0: the agents
    registered with the aggregator)."""

    name = "scaffold"
    extra_prefixes = (DELTA_PREFIX,)
    agent_side = ScaffoldAgent()

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
                x, stack(ordered, key), c, dcs, self.server_lr, self.num_agents or self.population
            )
        self._c = control
        return assemble(global_weights, result, ordered, "mean")

    def round_config(self, server_round: int) -> RoundConfig:
        return {"scaffold": True}

    def state(self) -> Weights:
        return {CONTROL_PREFIX + key: c.copy() for key, c in self._c.items()}

    def shipped_state(self, global_weights: Weights) -> Weights:
        """Return c, float64: zeros before the first aggregate."""
        return {
            CONTROL_PREFIX + key: self._c[key]
            if key in self._c
            else np.zeros(global_weights[key].shape, dtype=np.float64)
            for key in float_keys(global_weights)
        }

    def load_state(self, state: Weights) -> None:
        (self._c,) = split_state(state, [CONTROL_PREFIX], self.name)
