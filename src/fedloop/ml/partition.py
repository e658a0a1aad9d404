"""Split a dataset's sample indices among agents: IID, Dirichlet label skew, shards, quantity skew.

Every function is deterministic for a given seed and returns one index array per agent
(sorted, int64); the arrays are disjoint and together cover every sample exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from fedloop.errors import ConfigError, path_error

__all__ = ["dirichlet", "iid", "label_summary", "plot_label_summary", "quantity_skew", "shards"]


def _check_agents(n_agents: int, n_samples: int) -> None:
    if n_agents < 1:
        raise ConfigError(f"n_agents must be at least 1, got {n_agents}.")
    if n_samples < n_agents:
        raise ConfigError(
            f"cannot split {n_samples} samples among {n_agents} agents; use fewer agents."
        )


def _labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise ConfigError(f"labels must be a 1-D array, got shape {arr.shape}.")
    return arr


def _finish(parts: Sequence[np.ndarray]) -> list[np.ndarray]:
    return [np.sort(np.asarray(p, dtype=np.int64)) for p in parts]


def iid(labels: np.ndarray, n_agents: int, seed: int = 0) -> list[np.ndarray]:
    """Return a uniform random split of the samples into n_agents parts of near-equal size."""
    n = len(_labels(labels))
    _check_agents(n_agents, n)
    perm = np.random.default_rng(seed).permutation(n)
    return _finish(np.array_split(perm, n_agents))


def dirichlet(
    labels: np.ndarray, n_agents: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Return a label-skewed split: each class is divided among agents by proportions ~ Dir(alpha).

    Small alpha gives each agent few classes; large alpha approaches IID. Draws are repeated
    (deterministically) until every agent holds at least ``min_size`` samples.
    """
    y = _labels(labels)
    _check_agents(n_agents, len(y))
    if alpha <= 0:
        raise ConfigError(f"alpha must be positive, got {alpha}.")
    if min_size * n_agents > len(y):
        raise ConfigError(f"cannot give {n_agents} agents {min_size} samples each from {len(y)}.")
    rng = np.random.default_rng(seed)
    classes = np.unique(y)
    for _ in range(1000):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_agents)]
        for c in classes:
            idx = rng.permutation(np.flatnonzero(y == c))
            props = rng.dirichlet(np.full(n_agents, alpha))
            cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
            for agent, chunk in enumerate(np.split(idx, cuts)):
                parts[agent].append(chunk)
        merged = [np.concatenate(p) for p in parts]
        if min(len(p) for p in merged) >= min_size:
            return _finish(merged)
    raise ConfigError(
        f"no Dirichlet split with alpha={alpha} gave every one of {n_agents} agents "
        f"{min_size} samples; raise alpha or lower min_size."
    )


def shards(
    labels: np.ndarray, n_agents: int, shards_per_agent: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Return McMahan et al.'s pathological non-IID split.

    Samples are sorted by label, cut into ``n_agents * shards_per_agent`` contiguous shards,
    and each agent receives ``shards_per_agent`` shards chosen at random; with two shards per
    agent most agents see only two labels.
    """
    y = _labels(labels)
    if shards_per_agent < 1:
        raise ConfigError(f"shards_per_agent must be at least 1, got {shards_per_agent}.")
    n_shards = n_agents * shards_per_agent
    _check_agents(n_agents, len(y))
    if n_shards > len(y):
        raise ConfigError(f"cannot cut {len(y)} samples into {n_shards} shards.")
    order = np.argsort(y, kind="stable")
    pieces = np.array_split(order, n_shards)
    assignment = np.random.default_rng(seed).permutation(n_shards)
    return _finish(
        [np.concatenate([pieces[s] for s in assignment[a::n_agents]]) for a in range(n_agents)]
    )


def quantity_skew(
    n_samples: int, n_agents: int, alpha: float, seed: int = 0, min_size: int = 1
) -> list[np.ndarray]:
    """Return a split whose part sizes follow Dir(alpha) proportions (labels ignored).

    Every agent gets at least ``min_size`` samples; the rest are shared by the drawn
    proportions, so small alpha gives very unequal sizes.
    """
    _check_agents(n_agents, n_samples)
    if alpha <= 0:
        raise ConfigError(f"alpha must be positive, got {alpha}.")
    if min_size * n_agents > n_samples:
        raise ConfigError(
            f"cannot give {n_agents} agents {min_size} samples each from {n_samples}."
        )
    rng = np.random.default_rng(seed)
    perm = rng.permutation(n_samples)
    spare = n_samples - min_size * n_agents
    props = rng.dirichlet(np.full(n_agents, alpha))
    extra = np.floor(props * spare).astype(np.int64)
    # Hand the rounding remainder to the agents with the largest fractional parts.
    remainder = spare - int(extra.sum())
    extra[np.argsort(-(props * spare - extra), kind="stable")[:remainder]] += 1
    sizes = extra + min_size
    return _finish(np.split(perm, np.cumsum(sizes)[:-1]))


def label_summary(
    labels: np.ndarray, parts: Sequence[np.ndarray], num_classes: int | None = None
) -> np.ndarray:
    """Return a table of counts, one row per agent and one column per label (0..num_classes-1)."""
    y = _labels(labels).astype(np.int64)
    k = int(y.max()) + 1 if num_classes is None else num_classes
    table = np.zeros((len(parts), k), dtype=np.int64)
    for row, idx in enumerate(parts):
        table[row] = np.bincount(y[np.asarray(idx, dtype=np.int64)], minlength=k)[:k]
    return table


def plot_label_summary(
    table: np.ndarray, path: str | Path, title: str = "labels per agent"
) -> Path:
    """Write ``label_summary``'s table as a PNG heat map (agents x labels, counts in cells)."""
    try:
        import matplotlib
    except ImportError as exc:
        raise ConfigError(
            "plotting the label summary needs matplotlib; `pip install matplotlib`."
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    counts = np.asarray(table)
    n_agents, n_labels = counts.shape
    figure, ax = plt.subplots(
        figsize=(max(4.0, 0.6 * n_labels + 2), max(3.0, 0.3 * n_agents + 1.5))
    )
    image = ax.imshow(counts, aspect="auto", cmap="Blues")
    figure.colorbar(image, ax=ax, label="samples")
    ax.set_xlabel("label")
    ax.set_ylabel("agent")
    ax.set_xticks(range(n_labels))
    ax.set_yticks(range(0, n_agents, max(1, n_agents // 20)))
    if n_agents <= 30 and n_labels <= 20:
        limit = counts.max() / 2 if counts.size else 0
        for (row, col), value in np.ndenumerate(counts):
            color = "white" if value > limit else "black"
            ax.text(col, row, str(value), ha="center", va="center", fontsize=7, color=color)
    ax.set_title(title)
    target = Path(path)
    try:
        figure.savefig(target, dpi=110, bbox_inches="tight")
    except OSError as exc:
        raise path_error(
            exc, target, "write the plot to", "pass --plot a file you can write"
        ) from exc
    finally:
        plt.close(figure)
    return target
