"""Fixtures of the fuzz tests: one real aggregator process per module, with one agent."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from httpfuzz import Api, start_api


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Api]:
    api = start_api(tmp_path_factory.mktemp("fuzz-aggregator"))
    yield api
    alive = api.server.process.poll() is None
    log = api.server.log()
    api.server.stop()
    assert alive, f"the aggregator died during fuzzing:\n{log[-3000:]}"
    assert "Traceback" not in log, f"the aggregator logged a traceback:\n{log[-5000:]}"
