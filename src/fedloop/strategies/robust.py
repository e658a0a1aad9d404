"""Byzantine-robust aggregation: median, trimmed mean, Krum, Multi-Krum, Bulyan, geometric median.

All are unweighted except the geometric median (weights proportional to num_samples, as in RFA).
Non-floating tensors take the coordinate-wise median of the updates (see base). Krum, Multi-Krum,
Bulyan and the geometric median measure distances on the whole floating-point model flattened
into one float64 vector.
"""

from __future__ import annotations

import math
from abc import abstractmethod
from collections.abc import Sequence

import numpy as np

from fedloop.strategies.base import (
    Array,
    Strategy,
    Update,
    assemble,
    check_updates,
    flatten_updates,
    float_keys,
    param_float,
    param_int,
    sample_fractions,
    stack,
    unflatten,
)
from fedloop.types import Weights

# --- pure functions on stacked arrays (axis 0 = updates) -------------------------------------


def coordinate_median(stacked: Array) -> Array:
    """Return the coordinate-wise median over axis 0 (mean of the two middle values if n even)."""
    return np.asarray(np.median(stacked, axis=0), dtype=np.float64)


def trim_count(n: int, beta: float) -> int:
    """Return floor(beta * n), the values trimmed from each end (robust to 0.29 * 100 = 28.99..)."""
    return math.floor(beta * n + 1e-9)


def trimmed_mean(stacked: Array, beta: float) -> Array:
    """Return the coordinate-wise mean after dropping the floor(beta n) largest and smallest."""
    n = stacked.shape[0]
    k = trim_count(n, beta)
    if not 0 <= 2 * k < n:
        raise ValueError(f"trimmed mean with beta={beta} drops every one of the {n} values")
    ordered = np.sort(stacked, axis=0)
    return np.asarray(ordered[k : n - k].mean(axis=0), dtype=np.float64)


def pairwise_sq_distances(points: Array) -> Array:
    """Return the (n, n) matrix of squared distances between the rows, exactly symmetric."""
    n = points.shape[0]
    distances = np.zeros((n, n), dtype=np.float64)
    for i in range(n - 1):
        diff = points[i + 1 :] - points[i]
        row = np.einsum("ij,ij->i", diff, diff)
        distances[i, i + 1 :] = row
        distances[i + 1 :, i] = row
    return distances


def krum_scores(distances: Array, neighbours: int) -> Array:
    """Return score_i = sum of the squared distances from i to its `neighbours` nearest others."""
    n = distances.shape[0]
    if not 0 <= neighbours <= n - 1:
        raise ValueError(f"cannot sum {neighbours} nearest neighbours among {n} points")
    others = distances.copy()
    np.fill_diagonal(others, np.inf)
    nearest = np.sort(others, axis=1)[:, :neighbours]
    return np.asarray(nearest.sum(axis=1), dtype=np.float64)


def check_krum(n: int, f: int) -> None:
    """Raise ValueError unless Krum's condition n > 2f + 2 holds."""
    if n <= 2 * f + 2:
        raise ValueError(
            f"Krum with f={f} needs more than 2f+2={2 * f + 2} updates, got {n}; "
            "lower f or wait for more agents"
        )


def krum_select(points: Array, f: int, m: int) -> list[int]:
    """Return the indices of the m rows with the lowest Krum scores (n - f - 2 neighbours).

    Ties go to the lower index, so callers put the rows in agent_id order first.
    """
    n = points.shape[0]
    check_krum(n, f)
    if not 1 <= m <= n:
        raise ValueError(f"Multi-Krum cannot keep m={m} of {n} updates; use 1 <= m <= {n}")
    scores = krum_scores(pairwise_sq_distances(points), n - f - 2)
    return [int(i) for i in np.argsort(scores, kind="stable")[:m]]


def check_bulyan(n: int, f: int) -> None:
    """Raise ValueError unless Bulyan's condition n >= 4f + 3 holds."""
    if n < 4 * f + 3:
        raise ValueError(
            f"Bulyan with f={f} needs at least 4f+3={4 * f + 3} updates, got {n}; "
            "lower f or wait for more agents"
        )


def bulyan(points: Array, f: int) -> Array:
    """Return Bulyan's aggregate of the rows of points (El Mhamdi et al. 2018).

    Iterated Krum picks theta = n - 2f rows: each pass scores the remaining r rows with
    max(1, r - f - 2) nearest neighbours (the clamp, as in Flower, keeps the last passes
    defined when r - f - 2 < 1), takes the lowest score (ties: lowest index) and removes it.
    Then per coordinate the beta = theta - 2f selected values closest to their median are
    averaged (ties in distance go to the smaller value).
    """
    n = points.shape[0]
    check_bulyan(n, f)
    theta = n - 2 * f
    beta = theta - 2 * f
    distances = pairwise_sq_distances(points)
    remaining = list(range(n))
    selected: list[int] = []
    while len(selected) < theta:
        r = len(remaining)
        if r == 1:
            best = 0
        else:
            sub = distances[np.ix_(remaining, remaining)]
            best = int(np.argmin(krum_scores(sub, max(1, r - f - 2))))
        selected.append(remaining.pop(best))
    chosen = np.sort(points[selected], axis=0)
    median = np.median(chosen, axis=0)
    closest = np.argsort(np.abs(chosen - median), axis=0, kind="stable")[:beta]
    return np.asarray(np.take_along_axis(chosen, closest, axis=0).mean(axis=0), dtype=np.float64)


def geometric_median(
    points: Array,
    alphas: Array,
    *,
    eps: float = 1e-6,
    max_iter: int = 100,
    tol: float = 1e-7,
) -> Array:
    """Return the smoothed Weiszfeld approximation of argmin_v sum_i alpha_i ||v - x_i||.

    RFA (Pillutla et al. 2022): start at the alpha-weighted mean and repeat
    v <- sum_i b_i x_i / sum_i b_i with b_i = alpha_i / max(eps, ||v - x_i||), for at most
    max_iter passes, stopping once a pass moves v by at most tol * (1 + ||v||). (RFA's code
    stops on a relative change of the objective instead; a far outlier dominates the objective,
    so that test would stop while v is still visibly pulled towards it.)
    """
    weights = alphas / alphas.sum()
    median = np.asarray(weights @ points, dtype=np.float64)
    for _ in range(max_iter):
        betas = weights / np.maximum(eps, np.linalg.norm(points - median, axis=1))
        previous, median = median, np.asarray((betas / betas.sum()) @ points, dtype=np.float64)
        if float(np.linalg.norm(median - previous)) <= tol * (1.0 + float(np.linalg.norm(median))):
            break
    return median


# --- strategies --------------------------------------------------------------------------------


def _coordinatewise(
    global_weights: Weights, updates: Sequence[Update], rule: str, beta: float = 0.0
) -> Weights:
    ordered = check_updates(global_weights, updates)
    result: dict[str, Array] = {}
    for key in float_keys(global_weights):
        stacked = stack(ordered, key)
        result[key] = (
            coordinate_median(stacked) if rule == "median" else trimmed_mean(stacked, beta)
        )
    return assemble(global_weights, result, ordered, "median")


class Median(Strategy):
    """Coordinate-wise median (Yin et al. 2018), unweighted."""

    name = "median"

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        return _coordinatewise(global_weights, updates, "median")


class TrimmedMean(Strategy):
    """Coordinate-wise trimmed mean (Yin et al. 2018): drop floor(beta n) at each end, average.

    ``beta`` in [0, 0.5), default 0.1.
    """

    name = "trimmed_mean"

    def __init__(self, beta: float = 0.1) -> None:
        self.beta = param_float(self.name, "beta", beta, low=0.0, high=0.5, high_open=True)

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        return _coordinatewise(global_weights, updates, "trimmed", self.beta)


class _Flattened(Strategy):
    """A method that works on the whole floating-point model as one vector per update."""

    @abstractmethod
    def _combine(self, points: Array, updates: Sequence[Update]) -> Array:
        """Return the aggregate of the (n, d) matrix of flattened updates."""

    def aggregate(
        self,
        global_weights: Weights,
        updates: Sequence[Update],
        server_round: int | None = None,
    ) -> Weights:
        ordered = check_updates(global_weights, updates)
        keys = float_keys(global_weights)
        vector = self._combine(flatten_updates(ordered, keys), ordered)
        return assemble(global_weights, unflatten(vector, global_weights, keys), ordered, "median")


class Krum(_Flattened):
    """Krum (Blanchard et al. 2017): the update with the lowest score, needs n > 2f + 2.

    ``f`` (default 1) is the number of Byzantine agents to tolerate.
    """

    name = "krum"

    def __init__(self, f: int = 1) -> None:
        self.f = param_int(self.name, "f", f, low=0)

    @property
    def min_updates(self) -> int:
        return 2 * self.f + 3  # n > 2f + 2 (check_krum)

    def _combine(self, points: Array, updates: Sequence[Update]) -> Array:
        # a copy, so the result does not keep the whole (n, d) matrix alive
        return np.array(points[krum_select(points, self.f, 1)[0]], dtype=np.float64)


class MultiKrum(_Flattened):
    """Multi-Krum (Blanchard et al. 2017): unweighted mean of the m lowest-scoring updates.

    ``m`` defaults to n - f for each round's n; scores are computed once (not iterated).
    """

    name = "multikrum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        self.f = param_int(self.name, "f", f, low=0)
        self.m = None if m is None else param_int(self.name, "m", m, low=1)

    @property
    def min_updates(self) -> int:
        return max(2 * self.f + 3, self.m or 1)  # n > 2f + 2, and m of them kept

    def _combine(self, points: Array, updates: Sequence[Update]) -> Array:
        n = points.shape[0]
        m = n - self.f if self.m is None else self.m
        selected = krum_select(points, self.f, m)
        return np.asarray(points[sorted(selected)].mean(axis=0), dtype=np.float64)


class Bulyan(_Flattened):
    """Bulyan (El Mhamdi et al. 2018) over iterated Krum; needs n >= 4f + 3."""

    name = "bulyan"

    def __init__(self, f: int = 1) -> None:
        self.f = param_int(self.name, "f", f, low=0)

    @property
    def min_updates(self) -> int:
        return 4 * self.f + 3  # check_bulyan

    def _combine(self, points: Array, updates: Sequence[Update]) -> Array:
        return bulyan(points, self.f)


class GeometricMedian(_Flattened):
    """RFA's geometric median (Pillutla et al. 2022), weights alpha_i proportional to n_i."""

    name = "geometric_median"

    def __init__(self, eps: float = 1e-6, max_iter: int = 100, tol: float = 1e-7) -> None:
        self.eps = param_float(self.name, "eps", eps, low=0.0, low_open=True)
        self.max_iter = param_int(self.name, "max_iter", max_iter, low=1)
        self.tol = param_float(self.name, "tol", tol, low=0.0)

    def _combine(self, points: Array, updates: Sequence[Update]) -> Array:
        return geometric_median(
            points,
            sample_fractions(updates),
            eps=self.eps,
            max_iter=self.max_iter,
            tol=self.tol,
        )
