"""The aggregator's memory: model metadata in SQL, weights as content-addressed blobs."""

from __future__ import annotations

from fedloop.store.blobs import BlobStore
from fedloop.store.db import Store

__all__ = ["BlobStore", "Store"]
