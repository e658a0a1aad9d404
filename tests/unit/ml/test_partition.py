"""Partitioners: disjoint and covering, deterministic, and skewed the way each promises."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from fedloop.errors import ConfigError
from fedloop.ml import partition

LABELS = np.repeat(np.arange(10), 60)  # sorted, 600 samples


def assert_disjoint_covering(parts: list[np.ndarray], n: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == n
    np.testing.assert_array_equal(np.sort(joined), np.arange(n))
    assert all(p.dtype == np.int64 for p in parts)


SPLITTERS: dict[str, Callable[[np.ndarray, int, int], list[np.ndarray]]] = {
    "iid": lambda y, k, s: partition.iid(y, k, s),
    "dirichlet": lambda y, k, s: partition.dirichlet(y, k, 0.3, s),
    "shards": lambda y, k, s: partition.shards(y, k, 2, s),
    "quantity": lambda y, k, s: partition.quantity_skew(len(y), k, 0.5, s),
}


@pytest.mark.parametrize("name", list(SPLITTERS))
@settings(max_examples=25, deadline=None)
@given(n_agents=st.integers(1, 20), seed=st.integers(0, 2**32 - 1))
def test_parts_are_disjoint_covering_and_deterministic(name: str, n_agents: int, seed: int) -> None:
    split = SPLITTERS[name]
    parts = split(LABELS, n_agents, seed)
    assert len(parts) == n_agents and all(len(p) > 0 for p in parts)
    assert_disjoint_covering(parts, len(LABELS))
    again = split(LABELS, n_agents, seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_seeds_differ() -> None:
    a = partition.iid(LABELS, 4, 0)
    b = partition.iid(LABELS, 4, 1)
    assert not np.array_equal(a[0], b[0])


def test_iid_sizes_are_balanced() -> None:
    sizes = [len(p) for p in partition.iid(np.zeros(103), 4, 0)]
    assert sorted(sizes) == [25, 26, 26, 26]


def test_two_shards_give_at_most_two_labels_per_agent() -> None:
    parts = partition.shards(LABELS, 10, 2, seed=3)
    table = partition.label_summary(LABELS, parts)
    assert table.shape == (10, 10)
    assert ((table > 0).sum(axis=1) <= 2).all()
    assert table.sum() == len(LABELS)


def test_small_alpha_skews_labels_more_than_large_alpha() -> None:
    def labels_per_agent(alpha: float) -> float:
        parts = partition.dirichlet(LABELS, 5, alpha, seed=0)
        counts = partition.label_summary(LABELS, parts)
        # share of each agent's samples in its most frequent label
        return float(np.mean(counts.max(axis=1) / counts.sum(axis=1)))

    assert labels_per_agent(0.05) > labels_per_agent(100.0) + 0.3


def test_quantity_skew_sizes_vary_and_respect_min_size() -> None:
    parts = partition.quantity_skew(1000, 10, 0.2, seed=0, min_size=5)
    sizes = np.array([len(p) for p in parts])
    assert sizes.min() >= 5 and sizes.max() > 3 * sizes.min()


def test_label_summary_counts() -> None:
    y = np.array([0, 1, 1, 2])
    table = partition.label_summary(y, [np.array([0, 1]), np.array([2, 3])], num_classes=4)
    assert table.tolist() == [[1, 1, 0, 0], [0, 1, 1, 0]]


def test_bad_arguments_raise() -> None:
    with pytest.raises(ConfigError, match="n_agents"):
        partition.iid(LABELS, 0)
    with pytest.raises(ConfigError, match="cannot split 3 samples among 5"):
        partition.iid(np.zeros(3), 5)
    with pytest.raises(ConfigError, match="alpha"):
        partition.dirichlet(LABELS, 3, 0.0)
    with pytest.raises(ConfigError, match="shards"):
        partition.shards(np.zeros(5), 3, 2)
    with pytest.raises(ConfigError, match="1-D"):
        partition.iid(np.zeros((2, 2)), 1)
