"""DP-FedAvg (McMahan et al. 2018): clipped deltas, fixed denominator, Gaussian noise, RDP ε.

One round, with x the global model and y_i the agents' uploads, all floating tensors flattened
into one vector:

    Δ_i = y_i − x,  Δ̃_i = Δ_i · min(1, C / ‖Δ_i‖₂)                     (clip to L2 norm C)
    x' = x + (Σ_i Δ̃_i + N(0, (σC)² I)) / m                            (fixed denominator)

m is the *expected* number of agents per round (``agents_per_round``), not the number that
arrived: this is the paper's unweighted fixed-denominator estimator f̃_f with w_i = 1, whose
sensitivity to adding or removing one agent is C / m, so the noise std on the mean, σC / m, is
σ times the sensitivity. Every agent counts the same: num_samples is not private and is ignored.
Non-floating tensors (counters) keep the global model's value, since averaging them would leak.

The guarantee is user-level (ε, δ)-DP for an agent's whole contribution, under the sampled
Gaussian mechanism with Poisson rate q = m / N (``num_agents`` = N), composed over rounds in
Rényi DP (:mod:`fedloop.privacy.accountant`). With ``num_agents`` 0 the population is taken to
be the agents of the round (q = 1: no amplification by sampling, the conservative choice).
See docs/privacy.md for what this does and does not protect.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

from fedloop.privacy.accountant import DEFAULT_ORDERS, Conversion, compute_rdp, epsilon_from_rdp
from fedloop.strategies.base import (
    Array,
    RoundConfig,
    Strategy,
    Update,
    as_f64,
    cast_like,
    check_updates,
    flatten,
    float_keys,
    param_choice,
    param_float,
    param_int,
    unflatten,
)
from fedloop.types import Weights


def clip_l2(vector: Array, clip_norm: float) -> tuple[Array, float]:
    """Return (vector scaled to L2 norm at most clip_norm, its original norm)."""
    norm = float(np.linalg.norm(vector))
    if norm > clip_norm:
        return vector * (clip_norm / norm), norm
    return vector, norm


def dp_mean_delta(
    deltas: Sequence[Array],
    clip_norm: float,
    noise_multiplier: float,
    denominator: float,
    rng: np.random.Generator,
) -> Array:
    """Return (Σ clip(Δ_i) + N(0, (σC)²)) / denominator, the noisy fixed-denominator mean."""
    if not deltas:
        raise ValueError("dp_mean_delta needs at least one delta")
    total = np.zeros_like(deltas[0])
    for delta in deltas:
        total += clip_l2(delta, clip_norm)[0]
    if noise_multiplier > 0:
        total += rng.normal(0.0, noise_multiplier * clip_norm, size=total.shape)
    return total / denominator


def default_delta(num_agents: int) -> float:
    """Return δ = min(1e-5, 1/N^1.1): below 1/N, as user-level DP over N agents needs."""
    if num_agents <= 0:
        return 1e-5
    return float(min(1e-5, num_agents**-1.1))


EPSILON_METRIC = "dp_epsilon"
DELTA_METRIC = "dp_delta"


def privacy_metrics(strategy: object) -> dict[str, float]:
    """Return {"dp_epsilon": ε, "dp_delta": δ} spent so far, or {} for a strategy without DP.

    Any strategy with a ``privacy_spent() -> (ε, δ)`` method counts. The aggregator keeps these
    with every global model's metrics, so `fedloop history` and `fedloop report` show them. An
    infinite ε (σ = 0: no guarantee) is left out, as JSON and PostgreSQL have no infinity:
    δ without ε means ε = ∞.
    """
    spent = getattr(strategy, "privacy_spent", None)
    if not callable(spent):
        return {}
    eps, delta = spent()
    out = {DELTA_METRIC: float(delta)}
    if math.isfinite(eps):
        out[EPSILON_METRIC] = float(eps)
    return out


class DPFedAvg(Strategy):
    """DP-FedAvg: x ← x + (Σ clip_C(y_i − x) + N(0, σ²C²)) / m, with an RDP accountant.

    Parameters: ``clip_norm`` C (> 0), ``noise_multiplier`` σ (≥ 0; 0 means no privacy),
    ``num_agents`` N the population the round's agents are drawn from (0: the round's agents,
    q = 1), ``agents_per_round`` m the expected agents per round and fixed denominator
    (0: the number of updates of each round), ``delta`` (0: min(1e-5, N^-1.1)), ``seed`` for the
    noise (None: fresh OS entropy; a fixed seed makes the noise predictable to whoever knows it),
    ``conversion`` RDP → (ε, δ), "improved" (Balle et al. 2020) or "classic" (Mironov 2017).
    """

    name = "dp_fedavg"
    streaming = False
    _ROUNDS = "dp.rounds"
    _RDP = "dp.rdp"

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float = 1.0,
        num_agents: int = 0,
        agents_per_round: int = 0,
        delta: float = 0.0,
        seed: int | None = None,
        conversion: str = "improved",
    ) -> None:
        self.clip_norm = param_float(self.name, "clip_norm", clip_norm, low=0.0, low_open=True)
        self.noise_multiplier = param_float(
            self.name, "noise_multiplier", noise_multiplier, low=0.0
        )
        self.num_agents = param_int(self.name, "num_agents", num_agents, low=0)
        self.agents_per_round = param_int(self.name, "agents_per_round", agents_per_round, low=0)
        if self.num_agents and self.agents_per_round > self.num_agents:
            raise ValueError(
                f"agents_per_round={self.agents_per_round} exceeds num_agents={self.num_agents}"
            )
        delta_value = param_float(self.name, "delta", delta, low=0.0, high=1.0, high_open=True)
        self.delta = delta_value if delta_value > 0 else default_delta(self.num_agents)
        self.seed = None if seed is None else param_int(self.name, "seed", seed, low=0)
        self.conversion: Conversion = (
            "classic"
            if param_choice(self.name, "conversion", conversion, ("improved", "classic"))
            == "classic"
            else "improved"
        )
        self.orders = DEFAULT_ORDERS
        self._rounds = 0
        self._rdp = np.zeros(len(self.orders), dtype=np.float64)
        self._rdp_cache: dict[float, Array] = {}

    # --- accounting ---------------------------------------------------------------------------

    def sampling_rate(self, agents_in_round: int) -> float:
        """Return q = m / N for a round that aggregated the given number of updates."""
        m = self.agents_per_round or agents_in_round
        population = self.num_agents or m
        if m > population:
            raise ValueError(
                f"dp_fedavg: {m} agents in a round but num_agents={population}; set num_agents "
                "to the size of the population the agents are drawn from"
            )
        return m / population

    def _step_rdp(self, q: float) -> Array:
        if q not in self._rdp_cache:
            self._rdp_cache[q] = compute_rdp(q, self.noise_multiplier, 1, self.orders)
        return self._rdp_cache[q]

    def privacy_spent(self) -> tuple[float, float]:
        """Return (ε, δ) spent by the rounds aggregated so far (ε = 0 before the first)."""
        if self._rounds == 0:
            return 0.0, self.delta
        eps, _ = epsilon_from_rdp(self._rdp, self.delta, self.orders, self.conversion)
        return eps, self.delta

    @property
    def rounds(self) -> int:
        """How many rounds were aggregated (and accounted) so far."""
        return self._rounds

    # --- the round loop -----------------------------------------------------------------------

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        q = self.sampling_rate(len(ordered))
        denominator = float(self.agents_per_round or len(ordered))
        x = flatten(global_weights, keys)
        deltas = [flatten(u.weights, keys) - x for u in ordered]
        for update, delta in zip(ordered, deltas, strict=True):
            if not np.all(np.isfinite(delta)):
                raise ValueError(f"update from agent {update.agent_id!r} has non-finite values")
        seed_words = [self._rounds] if self.seed is None else [self.seed, self._rounds]
        rng = (
            np.random.default_rng()
            if self.seed is None
            else np.random.default_rng(np.random.SeedSequence(seed_words))
        )
        new = x + dp_mean_delta(deltas, self.clip_norm, self.noise_multiplier, denominator, rng)
        computed = unflatten(new, global_weights, keys)
        out: Weights = {}
        for key, tensor in global_weights.items():
            out[key] = cast_like(computed[key], tensor) if key in computed else tensor.copy()
        self._rdp = self._rdp + self._step_rdp(q)
        self._rounds += 1
        return out

    def round_config(self, server_round: int) -> RoundConfig:
        eps, delta = self.privacy_spent()
        # JSON has no infinity: with noise_multiplier 0 there is no guarantee, sent as "inf".
        return {"dp_epsilon": eps if math.isfinite(eps) else "inf", "dp_delta": delta}

    def state(self) -> Weights:
        return {
            self._ROUNDS: np.array(float(self._rounds), dtype=np.float64),
            self._RDP: self._rdp.copy(),
        }

    def load_state(self, state: Weights) -> None:
        if not state:
            self._rounds = 0
            self._rdp = np.zeros(len(self.orders), dtype=np.float64)
            return
        unknown = sorted(set(state) - {self._ROUNDS, self._RDP})
        if unknown or self._ROUNDS not in state or self._RDP not in state:
            raise ValueError(
                f"state for {self.name!r} must hold {self._ROUNDS} and {self._RDP}, "
                f"got {sorted(state)[:5]}"
            )
        rdp = as_f64(state[self._RDP]).copy()
        if rdp.shape != (len(self.orders),):
            raise ValueError(
                f"{self._RDP} has shape {rdp.shape}, expected ({len(self.orders)},): the saved "
                "state was written with other RDP orders"
            )
        self._rounds = int(as_f64(state[self._ROUNDS]))
        self._rdp = rdp
