"""Shamir secret sharing over GF(2^521 − 1)."""

from __future__ import annotations

import itertools
import os

import pytest

from fedloop.privacy import shamir


def test_any_t_shares_recover_and_fewer_refuse() -> None:
    secret = os.urandom(32)
    shares = shamir.split(secret, [1, 2, 3, 4, 5], threshold=3)
    for subset in itertools.combinations(shares.values(), 3):
        assert shamir.combine(list(subset), 3) == secret
    assert shamir.combine(list(shares.values()), 3) == secret
    with pytest.raises(ValueError, match="need 3"):
        shamir.combine([shares[1], shares[2]], 3)


def test_t_minus_one_shares_are_consistent_with_any_secret() -> None:
    # With t = 2, one share (x, y) fits the line through (0, s') and (x, y) for every s':
    # the share's value is uniform whatever the secret, checked here as "changes every time".
    secret = b"\x00" * 32
    values = {shamir.split(secret, [1, 2], 2)[1][1] for _ in range(20)}
    assert len(values) == 20


def test_bytes_round_trip_and_checks() -> None:
    share = shamir.split(b"abc", [7, 9], 2)[7]
    data = shamir.share_to_bytes(share)
    assert len(data) == shamir.SHARE_BYTES
    assert shamir.share_from_bytes(7, data) == share
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(b"abc", [1, 1], 2)
    with pytest.raises(ValueError, match="threshold"):
        shamir.split(b"abc", [1, 2], 3)
    with pytest.raises(ValueError, match="at most 64"):
        shamir.split(bytes(65), [1, 2], 2)
