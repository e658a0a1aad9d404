"""Privacy for federated rounds: a Rényi-DP accountant (used by the ``dp_fedavg`` strategy),
Shamir sharing, and secure aggregation.

``fedloop.privacy.secagg`` needs the ``cryptography`` package and ``fedloop.privacy.opacus``
needs ``opacus``; import them by their module path. See docs/privacy.md.
"""

from __future__ import annotations

from fedloop.privacy.accountant import (
    DEFAULT_ORDERS,
    RdpAccountant,
    compute_rdp,
    dp_epsilon,
    epsilon_from_rdp,
    rdp_sampled_gaussian,
)

__all__ = [
    "DEFAULT_ORDERS",
    "RdpAccountant",
    "compute_rdp",
    "dp_epsilon",
    "epsilon_from_rdp",
    "rdp_sampled_gaussian",
]
