"""Server optimisers on the FedAvg pseudo-gradient: FedAvgM, FedAdagrad, FedAdam, FedYogi.

Delta = fedavg(updates) - x is treated as a (negative) gradient. FedAvgM is Hsu et al. 2019;
the adaptive three are Reddi et al. 2021, Algorithm 2, without bias correction, with
m_{-1} = 0 and v_{-1} = tau^2. Defaults: eta 0.1 (FedAdagrad) or 0.01 (FedAdam, FedYogi),
beta1 0.9, beta2 0.99, tau 1e-3 (the paper's usual tau; also Flower's FedYogi default).
Server state is float64; state() names it ``fedavgm.v/<tensor>`` or ``fedopt.m/<tensor>`` and
``fedopt.v/<tensor>``, and is empty before the first aggregate.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from fedloop.strategies.base import (
    Array,
    Strategy,
    Update,
    as_f64,
    assemble,
    check_state_tensors,
    check_updates,
    float_keys,
    param_float,
    split_state,
)
from fedloop.strategies.fedavg import weighted_mean
from fedloop.types import Weights


def pseudo_gradient(
    global_weights: Weights, updates: Sequence[Update], keys: Sequence[str]
) -> dict[str, Array]:
    """Return Delta = fedavg(updates) - x for each named tensor, in float64."""
    mean = weighted_mean(updates, keys)
    return {key: mean[key] - as_f64(global_weights[key]) for key in keys}


def fedavgm_step(
    x: Array, delta: Array, v: Array, server_lr: float, momentum: float
) -> tuple[Array, Array]:
    """Return (x', v'): v' = momentum * v + Delta, x' = x + server_lr * v'."""
    v_new = momentum * v + delta
    return x + server_lr * v_new, v_new


def second_moment(kind: str, v: Array, delta: Array, beta2: float) -> Array:
    """Return v_t for FedAdagrad, FedAdam or FedYogi (Reddi et al. 2021, Algorithm 2)."""
    d2 = delta * delta
    if kind == "adagrad":
        return v + d2
    if kind == "adam":
        return beta2 * v + (1.0 - beta2) * d2
    if kind == "yogi":
        return v - (1.0 - beta2) * d2 * np.sign(v - d2)
    raise ValueError(f"unknown adaptive optimiser {kind!r}; use adagrad, adam or yogi")


def fedopt_step(
    kind: str,
    x: Array,
    delta: Array,
    m: Array,
    v: Array,
    *,
    eta: float,
    beta1: float,
    beta2: float,
    tau: float,
) -> tuple[Array, Array, Array]:
    """Return (x', m', v'): m' = b1 m + (1-b1) Delta, v' per kind, x' = x + eta m'/(√v' + tau)."""
    m_new = beta1 * m + (1.0 - beta1) * delta
    v_new = second_moment(kind, v, delta, beta2)
    return x + eta * m_new / (np.sqrt(v_new) + tau), m_new, v_new


class FedAvgM(Strategy):
    """FedAvgM: v <- momentum v + Delta; x <- x + server_lr v, with v starting at 0."""

    name = "fedavgm"
    streaming = True
    _PREFIX = "fedavgm.v/"

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9) -> None:
        self.server_lr = param_float(self.name, "server_lr", server_lr, low=0.0, low_open=True)
        self.momentum = param_float(self.name, "momentum", momentum, low=0.0, high=1.0)
        self._v: dict[str, Array] = {}

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        if self._v:
            check_state_tensors(self._v, global_weights, keys, "fedavgm momentum")
        delta = pseudo_gradient(global_weights, ordered, keys)
        result: dict[str, Array] = {}
        velocity: dict[str, Array] = {}
        for key in keys:
            v = self._v.get(key, np.zeros_like(delta[key]))
            result[key], velocity[key] = fedavgm_step(
                as_f64(global_weights[key]), delta[key], v, self.server_lr, self.momentum
            )
        self._v = velocity
        return assemble(global_weights, result, ordered, "mean")

    def state(self) -> Weights:
        return {self._PREFIX + key: v.copy() for key, v in self._v.items()}

    def load_state(self, state: Weights) -> None:
        (self._v,) = split_state(state, [self._PREFIX], self.name)


class _FedOpt(Strategy):
    """Reddi et al. 2021, Algorithm 2; subclasses pick the second-moment rule."""

    streaming = True
    kind: ClassVar[str]
    _M = "fedopt.m/"
    _V = "fedopt.v/"

    def _setup(self, eta: float, beta1: float, beta2: float, tau: float) -> None:
        self.eta = param_float(self.name, "eta", eta, low=0.0, low_open=True)
        self.beta1 = param_float(self.name, "beta1", beta1, low=0.0, high=1.0, high_open=True)
        self.beta2 = param_float(self.name, "beta2", beta2, low=0.0, high=1.0, high_open=True)
        self.tau = param_float(self.name, "tau", tau, low=0.0, low_open=True)
        self._m: dict[str, Array] = {}
        self._v: dict[str, Array] = {}

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        if self._m or self._v:
            check_state_tensors(self._m, global_weights, keys, f"{self.name} first moment")
            check_state_tensors(self._v, global_weights, keys, f"{self.name} second moment")
        delta = pseudo_gradient(global_weights, ordered, keys)
        result: dict[str, Array] = {}
        first: dict[str, Array] = {}
        second: dict[str, Array] = {}
        for key in keys:
            m = self._m.get(key, np.zeros_like(delta[key]))
            v = self._v.get(key, np.full_like(delta[key], self.tau * self.tau))
            result[key], first[key], second[key] = fedopt_step(
                self.kind,
                as_f64(global_weights[key]),
                delta[key],
                m,
                v,
                eta=self.eta,
                beta1=self.beta1,
                beta2=self.beta2,
                tau=self.tau,
            )
        self._m, self._v = first, second
        return assemble(global_weights, result, ordered, "mean")

    def state(self) -> Weights:
        out: Weights = {self._M + key: m.copy() for key, m in self._m.items()}
        out.update({self._V + key: v.copy() for key, v in self._v.items()})
        return out

    def load_state(self, state: Weights) -> None:
        self._m, self._v = split_state(state, [self._M, self._V], self.name)
        if set(self._m) != set(self._v):
            raise ValueError(f"{self.name} state has first and second moments for other tensors")


class FedAdagrad(_FedOpt):
    """FedAdagrad: v <- v + Delta^2 (no beta2)."""

    name = "fedadagrad"
    kind = "adagrad"

    def __init__(self, eta: float = 0.1, beta1: float = 0.9, tau: float = 1e-3) -> None:
        self._setup(eta, beta1, 0.0, tau)


class FedAdam(_FedOpt):
    """FedAdam: v <- beta2 v + (1 - beta2) Delta^2."""

    name = "fedadam"
    kind = "adam"

    def __init__(
        self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self._setup(eta, beta1, beta2, tau)


class FedYogi(_FedOpt):
    """FedYogi: v <- v - (1 - beta2) Delta^2 sign(v - Delta^2)."""

    name = "fedyogi"
    kind = "yogi"

    def __init__(
        self, eta: float = 1e-2, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3
    ) -> None:
        self._setup(eta, beta1, beta2, tau)
