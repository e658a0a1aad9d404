"""Fixtures of the end-to-end tests: aggregator processes that serve the dashboard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from e2e.processes import Server


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start aggregators (with dashboard routes) in `tmp_path`; all are stopped afterwards."""
    servers: list[Server] = []

    def make(**settings: Any) -> Server:
        server = Server(tmp_path, settings)
        servers.append(server)
        return server.start()

    yield make
    for server in servers:
        server.stop()
