"""A fresh PostgreSQL schema per test on the server that FEDLOOP_TEST_POSTGRES_URL names."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from sqlalchemy import create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.pool import NullPool

from fedloop.store.db import driver_url

ENV = "FEDLOOP_TEST_POSTGRES_URL"
SKIP_REASON = (
    f"{ENV} is not set, so there is no PostgreSQL server to test against; "
    ".ci/run installs and starts one, or set it to postgresql://user:pass@host:port/db"
)


def postgres_url() -> str:
    """Return the test server's URL, or skip the calling test with the reason."""
    url = os.environ.get(ENV, "")
    if not url:
        pytest.skip(SKIP_REASON)
    return url


@contextmanager
def fresh_schema(url: str) -> Iterator[str]:
    """Yield `url` with its search_path set to a new, empty schema; drop the schema after."""
    name = f"fedloop_test_{uuid.uuid4().hex[:12]}"
    admin = create_engine(driver_url(url), poolclass=NullPool)
    with admin.begin() as connection:
        connection.exec_driver_sql(f'CREATE SCHEMA "{name}"')
    try:
        scoped = make_url(url).update_query_dict({"options": f"-csearch_path={name}"})
        yield scoped.render_as_string(hide_password=False)
    finally:
        with admin.begin() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA "{name}" CASCADE')
        admin.dispose()
