"""Fixtures of the end-to-end tests: aggregator processes that serve the dashboard."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from procs import started_servers

from e2e.processes import Server


@pytest.fixture
def make_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    """Start aggregators (with dashboard routes) in `tmp_path`; all are stopped afterwards."""
    yield from started_servers(Server, tmp_path)
