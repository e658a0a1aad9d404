"""A process killed (SIGKILL) inside a long write transaction leaves no trace of it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pgschema import fresh_schema, postgres_url
from sqlalchemy import text

from fedloop.store.db import LocalModelRow, Store, database_url

# Commits an agent, then inserts local models in one transaction that never ends, flushing
# as it goes; with a tiny page cache SQLite spills the uncommitted pages into its WAL file.
WRITER = """
import sys
from sqlalchemy import text
from sqlalchemy.orm import Session
from fedloop.store.db import LocalModelRow, Store

store = Store(sys.argv[1])
store.add_agent("a", "site-a")
with Session(store.engine) as session, session.begin():
    if store.engine.dialect.name == "sqlite":
        session.execute(text("PRAGMA cache_size=-64"))
    i = 0
    while True:
        session.add(LocalModelRow(agent_id="a", round=i, base_round=0, model_id="x" * 64,
                                  num_samples=1, metrics={"pad": "p" * 1000}, nbytes=1,
                                  created_at=0.0))
        i += 1
        if i % 500 == 0:
            session.flush()
        if i == 5000:
            print("writing", flush=True)
"""


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "sqlite":
        yield database_url(tmp_path, None)
    else:
        with fresh_schema(postgres_url()) as scoped:
            yield scoped


def test_killed_writer_leaves_a_consistent_database_without_its_transaction(
    url: str, tmp_path: Path
) -> None:
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        assert writer.stdout is not None
        line = writer.stdout.readline()
        assert line == b"writing\n", writer.stderr.read() if writer.stderr else line
        wal = tmp_path / "fedloop.db-wal"
        if url.startswith("sqlite"):
            # The uncommitted rows are on disk in the WAL, not only in the writer's memory.
            deadline = time.monotonic() + 30
            while wal.stat().st_size < 2_000_000:
                assert time.monotonic() < deadline, wal.stat().st_size
                time.sleep(0.01)
        writer.send_signal(signal.SIGKILL)
        assert writer.wait(timeout=10) == -signal.SIGKILL
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.wait()

    store = Store(url)
    try:
        if store.engine.dialect.name == "sqlite":
            with store.engine.connect() as connection:
                assert connection.execute(text("PRAGMA integrity_check")).scalar() == "ok"
        assert [a.name for a in store.agents()] == ["site-a"]  # committed before the crash
        assert store.count_local_models() == 0  # the killed transaction left nothing
        store.add_local_model(  # and the database takes writes again
            LocalModelRow(
                agent_id="a",
                round=1,
                base_round=0,
                model_id="y" * 64,
                num_samples=3,
                metrics={},
                nbytes=1,
                created_at=1.0,
            )
        )
        assert store.count_local_models() == 1
    finally:
        store.close()
