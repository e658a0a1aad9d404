"""The protocol version every exchange carries, and where it travels."""

from __future__ import annotations

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = frozenset({PROTOCOL_VERSION})

# Requests and responses whose body is a model carry their JSON message in this header.
MESSAGE_HEADER = "x-fedloop-message"
