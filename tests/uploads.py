"""Random float32 uploads for tests of the running mean and the folds (unit and perf tests)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from fedloop.strategies import Update


def float32_updates(sizes: Mapping[str, int], counts: Sequence[int], seed: int) -> list[Update]:
    """Random float32 uploads of the given tensor sizes, one per num_samples in `counts`."""
    rng = np.random.default_rng(seed)
    return [
        Update(
            weights={k: rng.standard_normal(n, dtype=np.float32) for k, n in sizes.items()},
            num_samples=c,
            agent_id=f"a{i}",
            base_round=0,
        )
        for i, c in enumerate(counts)
    ]
