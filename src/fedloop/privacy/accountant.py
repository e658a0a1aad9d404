"""Rényi-DP accounting for the sampled Gaussian mechanism, and its conversion to (ε, δ).

The RDP of one step is Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled
Gaussian Mechanism" (arXiv:1908.10530), Section 3.3: log A_α as a finite binomial sum for
integer orders and as the two erfc series for fractional orders — the computation of
TensorFlow Privacy's ``rdp_accountant`` and Opacus's ``accountants.analysis.rdp``, written here
with the standard library only. Steps compose by adding their RDP vectors, so rounds with
different sampling rates can be summed.

Conversion to (ε, δ): ``"improved"`` (the default) is Balle et al. 2020, "Hypothesis testing
interpretations and Rényi differential privacy", Theorem 21 — also what Opacus and current TF
Privacy use:  ε = rdp + log((α−1)/α) − (log δ + log α)/(α − 1).  ``"classic"`` is Mironov 2017,
Proposition 3:  ε = rdp − log δ / (α − 1), which is never smaller. Both take the best order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import numpy as np
from numpy.typing import NDArray

DEFAULT_ORDERS: tuple[float, ...] = (
    *(1.0 + x / 10.0 for x in range(1, 100)),
    *(float(a) for a in range(12, 64)),
    128.0,
    256.0,
    512.0,
    1024.0,
)
"""RDP orders α tried by default: TF Privacy's grid (1.1 … 10.9, 12 … 63) plus larger powers of
two, which matter for small ε at small δ."""

Conversion = Literal["improved", "classic"]


def _log_add(a: float, b: float) -> float:
    """Return log(exp(a) + exp(b))."""
    hi, lo = max(a, b), min(a, b)
    if lo == -math.inf:
        return hi
    return hi + math.log1p(math.exp(lo - hi))


def _log_sub(a: float, b: float) -> float:
    """Return log(exp(a) − exp(b)) for a ≥ b."""
    if b == -math.inf:
        return a
    if a == b:
        return -math.inf
    if a < b:
        raise ValueError("log_sub needs a >= b")
    return a + math.log1p(-math.exp(b - a))


def _log_erfc(x: float) -> float:
    """Return log(erfc(x)), accurate where erfc(x) underflows (large x)."""
    value = math.erfc(x)
    if value > 1e-300:
        return math.log(value)
    # Asymptotic (Laurent) series of log erfc at +infinity, as TF Privacy's fallback.
    return (
        -math.log(math.pi) / 2
        - math.log(x)
        - x * x
        - 0.5 * x**-2
        + 0.625 * x**-4
        - 37.0 / 24.0 * x**-6
        + 353.0 / 64.0 * x**-8
    )


def _log_a_int(q: float, sigma: float, alpha: int) -> float:
    log_a = -math.inf
    log_q, log_1q = math.log(q), math.log1p(-q)
    for i in range(alpha + 1):
        log_coef = math.lgamma(alpha + 1) - math.lgamma(i + 1) - math.lgamma(alpha - i + 1)
        term = log_coef + i * log_q + (alpha - i) * log_1q + (i * i - i) / (2 * sigma**2)
        log_a = _log_add(log_a, term)
    return log_a


def _log_a_frac(q: float, sigma: float, alpha: float) -> float:
    log_a0, log_a1 = -math.inf, -math.inf
    z0 = sigma**2 * math.log(1 / q - 1) + 0.5
    log_q, log_1q = math.log(q), math.log1p(-q)
    coef = 1.0  # the generalised binomial coefficient C(alpha, i), updated in place
    i = 0
    while True:
        log_coef = math.log(abs(coef))
        j = alpha - i
        log_t0 = log_coef + i * log_q + j * log_1q
        log_t1 = log_coef + j * log_q + i * log_1q
        log_e0 = math.log(0.5) + _log_erfc((i - z0) / (math.sqrt(2) * sigma))
        log_e1 = math.log(0.5) + _log_erfc((z0 - j) / (math.sqrt(2) * sigma))
        log_s0 = log_t0 + (i * i - i) / (2 * sigma**2) + log_e0
        log_s1 = log_t1 + (j * j - j) / (2 * sigma**2) + log_e1
        if coef > 0:
            log_a0 = _log_add(log_a0, log_s0)
            log_a1 = _log_add(log_a1, log_s1)
        else:
            log_a0 = _log_sub(log_a0, log_s0)
            log_a1 = _log_sub(log_a1, log_s1)
        coef *= (alpha - i) / (i + 1)
        i += 1
        if max(log_s0, log_s1) < -30:
            break
    return _log_add(log_a0, log_a1)


def rdp_sampled_gaussian(q: float, noise_multiplier: float, order: float) -> float:
    """Return the RDP at one order of one step of the sampled Gaussian mechanism.

    ``q`` is the Poisson sampling rate, ``noise_multiplier`` the noise std over the L2
    sensitivity. q = 1 is the plain Gaussian mechanism, α / (2σ²).
    """
    if not 0.0 <= q <= 1.0:
        raise ValueError(f"sampling rate q must be in [0, 1], got {q}")
    if order <= 1.0:
        raise ValueError(f"RDP orders must be > 1, got {order}")
    if q == 0.0:
        return 0.0
    if noise_multiplier <= 0.0:
        return math.inf
    if q == 1.0:
        return order / (2 * noise_multiplier**2)
    if math.isinf(order):
        return math.inf
    if float(order).is_integer():
        log_a = _log_a_int(q, noise_multiplier, int(order))
    else:
        log_a = _log_a_frac(q, noise_multiplier, order)
    return log_a / (order - 1)


def compute_rdp(
    q: float, noise_multiplier: float, steps: int, orders: Sequence[float] = DEFAULT_ORDERS
) -> NDArray[np.float64]:
    """Return the RDP vector (one value per order) of ``steps`` sampled Gaussian steps."""
    per_step = np.array(
        [rdp_sampled_gaussian(q, noise_multiplier, a) for a in orders], dtype=np.float64
    )
    return per_step * steps


def epsilon_from_rdp(
    rdp: Sequence[float] | NDArray[np.float64],
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: Conversion = "improved",
) -> tuple[float, float]:
    """Return (ε, best order): the smallest ε over the orders for which (ε, δ)-DP holds."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    a = np.asarray(orders, dtype=np.float64)
    r = np.asarray(rdp, dtype=np.float64)
    if a.shape != r.shape:
        raise ValueError(f"{a.size} orders but {r.size} RDP values")
    with np.errstate(invalid="ignore", divide="ignore"):
        if conversion == "improved":
            eps = r + np.log1p(-1.0 / a) - (math.log(delta) + np.log(a)) / (a - 1.0)
        elif conversion == "classic":
            eps = r - math.log(delta) / (a - 1.0)
        else:
            raise ValueError(f"conversion must be 'improved' or 'classic', got {conversion!r}")
    eps = np.where(np.isnan(eps), np.inf, eps)
    best = int(np.argmin(eps))
    return max(0.0, float(eps[best])), float(a[best])


class RdpAccountant:
    """Return (ε, δ) for a sequence of sampled Gaussian steps, composed in RDP.

    Steps with different sampling rates or noise multipliers may be mixed; the accumulated RDP
    vector (``rdp``) is what to persist.
    """

    def __init__(
        self,
        orders: Sequence[float] = DEFAULT_ORDERS,
        conversion: Conversion = "improved",
    ) -> None:
        self.orders = tuple(float(a) for a in orders)
        self.conversion: Conversion = conversion
        self.rdp = np.zeros(len(self.orders), dtype=np.float64)
        self.steps = 0

    def step(self, q: float, noise_multiplier: float, steps: int = 1) -> None:
        """Account for ``steps`` more steps at sampling rate q and the given noise multiplier."""
        self.rdp = self.rdp + compute_rdp(q, noise_multiplier, steps, self.orders)
        self.steps += steps

    def epsilon(self, delta: float) -> float:
        """Return the ε spent so far at the given δ (0 before any step)."""
        if self.steps == 0:
            return 0.0
        return epsilon_from_rdp(self.rdp, delta, self.orders, self.conversion)[0]


def dp_epsilon(
    q: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    orders: Sequence[float] = DEFAULT_ORDERS,
    conversion: Conversion = "improved",
) -> float:
    """Return ε after ``steps`` sampled Gaussian steps at rate q, for the given δ."""
    rdp = compute_rdp(q, noise_multiplier, steps, orders)
    return epsilon_from_rdp(rdp, delta, orders, conversion)[0]
