"""The store on real databases: PostgreSQL (when FEDLOOP_TEST_POSTGRES_URL is set) and SQLite.

The integration tests' process helpers are loaded from tests/integration under their own module
names, so that their fixtures serve these tests too.
"""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pgschema import fresh_schema, postgres_url

INTEGRATION = Path(__file__).resolve().parents[1] / "integration"


def _load(name: str, path: Path) -> ModuleType:
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


integration = _load("integration_conftest", INTEGRATION / "conftest.py")
checks = _load("integration_checks", INTEGRATION / "checks.py")
make_server = integration.make_server
agents = integration.agents


@pytest.fixture
def pg_url() -> Iterator[str]:
    """A URL whose connections see only a fresh schema of the test server."""
    with fresh_schema(postgres_url()) as url:
        yield url
