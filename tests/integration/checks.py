"""Reads an aggregator's database (SQLite file or PostgreSQL) and blobs the way an auditor would."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from fedloop.protocol import codec
from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store, database_url


@contextmanager
def opened(data_dir: Path) -> Iterator[tuple[Store, BlobStore]]:
    """Yield a run's store and blob store (SQLite in `data_dir`), closed afterwards."""
    store = Store(database_url(data_dir, None))
    try:
        yield store, BlobStore(data_dir / "blobs")
    finally:
        store.close()


def assert_globals_are_weighted_means(data_dir: Path, rounds: int, url: str | None = None) -> None:
    """Every global model r ≥ 1 equals numpy's sample-weighted mean of round r's local models.

    `url` is the aggregator's `database_url`; without it, the SQLite file in `data_dir`.
    """
    store = Store(database_url(data_dir, url))
    blobs = BlobStore(data_dir / "blobs")
    try:
        globals_ = {g.round: g for g in store.global_models()}
        assert sorted(globals_) == list(range(rounds + 1)), sorted(globals_)
        for r in range(1, rounds + 1):
            model = globals_[r]
            locals_ = [m for m in store.local_models(r) if m.agent_id in model.contributors]
            assert len(locals_) == len(model.contributors)
            weights = np.array([m.num_samples for m in locals_], dtype=np.float64)
            got = codec.decode(blobs.get(model.model_id))
            for name in got:
                stacked = np.stack([codec.decode(blobs.get(m.model_id))[name] for m in locals_])
                expected = np.average(stacked.astype(np.float64), axis=0, weights=weights)
                np.testing.assert_allclose(got[name], expected, rtol=1e-6, atol=1e-6)
        assert store.referenced_blobs() <= blobs.keys(), "a row names a missing blob"
    finally:
        store.close()
