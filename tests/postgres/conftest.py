"""The store on real databases: PostgreSQL (when FEDLOOP_TEST_POSTGRES_URL is set) and SQLite.

The integration tests' process helpers and fixtures (tests/integration/harness.py) serve these
tests too.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from harness import agents, make_server
from pgschema import fresh_schema, postgres_url

# The integration tests' fixtures (tests/integration is on the test path, see pyproject.toml).
__all__ = ["agents", "make_server"]


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of the test server."""
    with fresh_schema(postgres_url()) as url:
        yield url
