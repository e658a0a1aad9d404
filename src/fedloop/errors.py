"""Exceptions a user can cause; their message says what to do, and the CLI prints only that."""

from __future__ import annotations


class FedloopError(Exception):
    """Base of every error fedloop raises on purpose."""


class ConfigError(FedloopError):
    """A configuration file or flag is wrong."""


class ProtocolError(FedloopError):
    """A message or model does not follow the wire protocol or the registered model."""

    def __init__(self, message: str, status: int = 400, code: str = "bad_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


class ConnectionFailed(FedloopError):
    """The aggregator cannot be reached."""
