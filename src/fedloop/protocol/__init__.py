"""The wire protocol: versioned pydantic messages and the safetensors tensor codec."""

from __future__ import annotations

from fedloop.protocol.version import MESSAGE_HEADER, PROTOCOL_VERSION

__all__ = ["MESSAGE_HEADER", "PROTOCOL_VERSION"]
