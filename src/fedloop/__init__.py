"""fedloop: federated learning with an aggregator, a database of models, and agents."""

from __future__ import annotations

from fedloop.errors import ConfigError, FedloopError, ProtocolError
from fedloop.types import Weights

__version__ = "0.1.0"

__all__ = ["ConfigError", "FedloopError", "ProtocolError", "Weights", "__version__"]
