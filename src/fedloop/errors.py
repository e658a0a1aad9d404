"""Exceptions a user can cause; their message says what to do, and the CLI prints only that."""

from __future__ import annotations


class FedloopError(Exception):
    """Base of every error fedloop raises on purpose."""


class ConfigError(FedloopError):
    """A configuration file or flag is wrong."""


class ProtocolError(FedloopError):
    """A message or model does not follow the wire protocol or the registered model."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        code: str = "bad_request",
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        # Seconds before the request is worth sending again (`Retry-After`), for a 5xx that
        # will not go away at once.
        self.retry_after = retry_after


class ConnectionFailed(FedloopError):
    """The aggregator cannot be reached (or answered a 5xx: worth trying again later).

    `retry_after`: the seconds the aggregator asked to wait (its `Retry-After`), if it did.
    """

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class EngineError(FedloopError):
    """The user's ML engine raised: the exception it raised is the cause (`__cause__`)."""


def path_error(exc: OSError, path: object, doing: str, fix: str) -> FedloopError:
    """Return the FedloopError for a file-system call on a user-given path that failed: which
    path, the system's reason, and what to do (``doing``: "write the plot to", …)."""
    where = exc.filename if exc.filename is not None else path
    if isinstance(exc, FileExistsError | NotADirectoryError):
        reason = "a file is where a directory should be"
    else:
        reason = exc.strerror or str(exc)
    return FedloopError(f"cannot {doing} {where}: {reason}; {fix}")
