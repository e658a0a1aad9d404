"""The aggregator's memory: model metadata in SQL, weights as content-addressed blobs.

`Store` (SQLAlchemy) is imported on first use, so that agents, which only need the buffers of
`fedloop.store.blobs`, do not load SQLAlchemy.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fedloop.store.blobs import BlobStore

if TYPE_CHECKING:
    from fedloop.store.db import Store

__all__ = ["BlobStore", "Store"]


def __getattr__(name: str) -> Any:
    if name == "Store":
        from fedloop.store.db import Store

        return Store
    raise AttributeError(f"module 'fedloop.store' has no attribute {name!r}")
