"""The FL server: registration, rounds, aggregation, distribution."""

from __future__ import annotations

from fedloop.aggregator.service import Aggregator

__all__ = ["Aggregator"]
