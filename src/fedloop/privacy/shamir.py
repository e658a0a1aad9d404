"""Shamir t-of-n secret sharing over the prime field GF(2^521 − 1), for secrets of ≤ 64 bytes."""

from __future__ import annotations

import secrets
from collections.abc import Sequence

PRIME = 2**521 - 1
"""The field's modulus: a Mersenne prime, so any 64-byte secret is one field element."""

SHARE_BYTES = 66
"""Bytes of one share's value (⌈521 / 8⌉)."""

Share = tuple[int, int]
"""(x, y): the point x ≥ 1 of the dealer's polynomial and its value y = f(x) mod PRIME."""


def split(secret: bytes, xs: Sequence[int], threshold: int) -> dict[int, Share]:
    """Return one share per x in xs of the secret; any ``threshold`` of them recover it.

    The polynomial is f(X) = secret + a_1 X + … + a_{t−1} X^{t−1} with a_i uniform in the field
    (from ``secrets``), so t − 1 shares reveal nothing about the secret.
    """
    if len(secret) > 64:
        raise ValueError(f"secret has {len(secret)} bytes; at most 64 fit in the field")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"threshold must be in [1, {len(xs)}], got {threshold}")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError("share points must be distinct integers >= 1")
    coefficients = [int.from_bytes(secret, "big")] + [
        secrets.randbelow(PRIME) for _ in range(threshold - 1)
    ]
    shares: dict[int, Share] = {}
    for x in xs:
        y = 0
        for coefficient in reversed(coefficients):  # Horner
            y = (y * x + coefficient) % PRIME
        shares[x] = (x, y)
    return shares


def combine(shares: Sequence[Share], threshold: int, length: int = 32) -> bytes:
    """Return the ``length``-byte secret from at least ``threshold`` shares (Lagrange at 0).

    With fewer than ``threshold`` shares this raises ValueError rather than return garbage;
    with enough but wrong shares the result is garbage (shares are not authenticated here).
    """
    points = {x: y for x, y in shares}
    if len(points) < threshold:
        raise ValueError(
            f"need {threshold} distinct shares to recover the secret, got {len(points)}"
        )
    chosen = sorted(points.items())[:threshold]
    secret = 0
    for i, (xi, yi) in enumerate(chosen):
        numerator, denominator = 1, 1
        for j, (xj, _) in enumerate(chosen):
            if i != j:
                numerator = numerator * (-xj) % PRIME
                denominator = denominator * (xi - xj) % PRIME
        secret = (secret + yi * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not recover a secret of the expected length")
    return secret.to_bytes(length, "big")


def share_to_bytes(share: Share) -> bytes:
    """Return the share's value as SHARE_BYTES big-endian bytes (x travels separately)."""
    return share[1].to_bytes(SHARE_BYTES, "big")


def share_from_bytes(x: int, data: bytes) -> Share:
    """Return the share (x, y) from share_to_bytes's bytes."""
    if len(data) != SHARE_BYTES:
        raise ValueError(f"a share value has {SHARE_BYTES} bytes, got {len(data)}")
    y = int.from_bytes(data, "big")
    if y >= PRIME:
        raise ValueError("share value out of the field")
    return (x, y)
