"""The store on a real SQLite file and a real PostgreSQL server: rows, transactions, schema.

Every database test runs on SQLite and on PostgreSQL; PostgreSQL tests skip, saying why, when
FEDLOOP_TEST_POSTGRES_URL is not set (.ci/run sets it). Each gets a fresh file or schema.
"""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from alembic.migration import MigrationContext
from sqlalchemy import create_engine, inspect, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.pool import NullPool

from fedloop.errors import FedloopError
from fedloop.store.blobs import BlobStore, BodyPool, HashedBody, PooledBody, blob_id
from fedloop.store.db import (
    REVOCATIONS_KEY,
    Base,
    DuplicateUpload,
    GlobalModelRow,
    LocalModelRow,
    Store,
    database_url,
    driver_url,
    head_revision,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "postgres"))
from pgschema import fresh_schema, postgres_url


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database: a new SQLite file, or a new schema on the PostgreSQL test server."""
    if request.param == "sqlite":
        yield database_url(tmp_path, None)
    else:
        with fresh_schema(postgres_url()) as scoped:
            yield scoped


def _sql(url: str, *statements: str) -> list[tuple[object, ...]]:
    """Run raw SQL outside the Store; return the last statement's rows."""
    engine = create_engine(driver_url(url), poolclass=NullPool)
    rows: list[tuple[object, ...]] = []
    try:
        with engine.begin() as connection:
            for statement in statements:
                result = connection.execute(text(statement))
                rows = [tuple(r) for r in result] if result.returns_rows else []
    finally:
        engine.dispose()
    return rows


def _global(round_number: int, model_id: str) -> GlobalModelRow:
    return GlobalModelRow(
        round=round_number,
        model_id=model_id,
        contributors=["a"],
        total_samples=5,
        metrics={"accuracy": 0.5},
        seconds=1.0,
        state_id=None,
        created_at=1.0,
    )


def test_rounds_agents_and_models_persist_across_reopen(url: str) -> None:
    store = Store(url)
    store.add_agent("a", "site-a")
    store.start_round(1, now=10.0)
    store.add_local_model(
        LocalModelRow(
            agent_id="a",
            round=1,
            base_round=0,
            model_id="x" * 64,
            num_samples=5,
            metrics={"loss": 0.1},
            nbytes=10,
            created_at=11.0,
        )
    )
    store.commit_global(_global(1, "y" * 64), next_round=2, now=12.0)
    store.close()

    again = Store(url)
    assert again.agent_by_name("site-a").id == "a"  # type: ignore[union-attr]
    opened = again.open_round()
    assert opened is not None and opened.number == 2 and opened.started_at == 12.0
    closed = again.round(1)
    assert closed is not None and closed.closed_at == 12.0
    assert [m.metrics for m in again.local_models(1)] == [{"loss": 0.1}]
    latest = again.latest_global()
    assert latest is not None and latest.round == 1 and latest.contributors == ["a"]
    assert again.referenced_blobs() == {"x" * 64, "y" * 64}
    assert again.referenced_among(["x" * 64, "z" * 64, "y" * 64]) == {"x" * 64, "y" * 64}
    assert again.referenced_among(["z" * 64]) == set() == again.referenced_among([])
    again.close()


def test_duplicate_upload_is_refused_and_changes_nothing(url: str) -> None:
    store = Store(url)
    store.add_agent("a", "site-a")
    row = dict(
        agent_id="a",
        round=1,
        base_round=0,
        model_id="x" * 64,
        num_samples=5,
        metrics={},
        nbytes=1,
        created_at=1.0,
    )
    store.add_local_model(LocalModelRow(**row))
    with pytest.raises(DuplicateUpload):
        store.add_local_model(LocalModelRow(**row))
    assert store.count_local_models() == 1
    # A batch with one duplicate files none of its rows.
    with pytest.raises(DuplicateUpload):
        store.add_local_models([LocalModelRow(**{**row, "round": 2}), LocalModelRow(**row)])
    assert store.count_local_models() == 1
    # The connection that failed went back to the pool clean: the next write commits.
    store.add_local_model(LocalModelRow(**{**row, "round": 2}))
    assert [m.round for m in store.local_models()] == [1, 2]
    store.close()


def _local(agent_id: str, round_number: int) -> LocalModelRow:
    return LocalModelRow(
        agent_id=agent_id,
        round=round_number,
        base_round=round_number - 1,
        model_id="x" * 64,
        num_samples=5,
        metrics={},
        nbytes=1,
        created_at=1.0,
    )


def test_dropped_local_models_can_be_filed_again(url: str) -> None:
    """What a restart does with uploads whose bytes were not kept (keep_local_models off)."""
    store = Store(url)
    store.add_agent("a", "site-a")
    store.add_agent("b", "site-b")
    store.add_local_models([_local("a", 1), _local("b", 1), _local("a", 2)])
    dropped = [m.id for m in store.local_models(1) if m.agent_id == "a"]
    store.drop_local_models(dropped)
    store.drop_local_models([])
    assert [(m.agent_id, m.round) for m in store.local_models()] == [("b", 1), ("a", 2)]
    store.add_local_model(_local("a", 1))  # no duplicate any more
    assert store.count_local_models() == 3
    store.close()


def test_an_agent_whose_credentials_are_all_revoked_is_revoked(url: str) -> None:
    """What a running aggregator reads to take revoked agents out of the run."""
    store = Store(url)
    store.add_agent("a", "site-a")
    for name in ("site-a", "site-b"):
        store.add_token("enrollment", name, f"enroll-{name}")
    ids = {t.name: t.id for t in store.tokens()}
    store.enroll(ids["site-a"], "a", "site-a", "cred-a1", now=1.0, new_agent=False)
    store.enroll(ids["site-b"], "b", "site-b", "cred-b1", now=1.0, new_agent=True)
    assert store.revoked_agents() == set()
    assert store.get_meta(REVOCATIONS_KEY) is None
    store.revoke_tokens("site-b")
    marker = store.get_meta(REVOCATIONS_KEY)
    assert store.revoked_agents() == {"b"} and marker is not None
    store.revoke_tokens("site-b")  # each revocation changes the marker
    assert store.get_meta(REVOCATIONS_KEY) not in (None, marker)
    # Enrolled again (a new token, a new credential): back in.
    store.add_token("enrollment", "site-b", "enroll-b2")
    again = max(t.id for t in store.tokens() if t.secret_hash == "enroll-b2")
    store.enroll(again, "b", "site-b", "cred-b2", now=2.0, new_agent=False)
    assert store.revoked_agents() == set()
    store.close()


def test_only_sqlite_writes_inline(url: str) -> None:
    store = Store(url)
    store.add_agent("a", "site-a")
    if not url.startswith("sqlite"):
        assert store.writes_inline is False  # a commit there waits for the server's fsync
        with pytest.raises(ValueError, match="only SQLite"):
            store.add_local_models([_local("a", 1)], inline=True)
        store.close()
        return
    assert store.writes_inline is True
    store.add_local_models([_local("a", 1)], inline=True)
    with pytest.raises(DuplicateUpload):
        store.add_local_models([_local("a", 2), _local("a", 1)], inline=True)
    store.add_local_models([_local("a", 2)], inline=True)  # rolled back clean: this commits
    assert [m.round for m in store.local_models()] == [1, 2]  # seen by the pool's connections
    store.close()
    again = Store(url)
    assert [m.round for m in again.local_models()] == [1, 2]
    again.close()


def test_inline_writes_leave_the_wals_checkpoints_to_other_connections(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path, None))
    store.add_agent("a", "site-a")
    database = tmp_path / "fedloop.db"
    wal = tmp_path / "fedloop.db-wal"
    size = database.stat().st_size
    for round_number in range(1, 1201):  # several pages a commit: past SQLite's 1,000
        store.add_local_models([_local("a", round_number)], inline=True)
    assert wal.stat().st_size > 1000 * 4096
    assert database.stat().st_size == size  # nothing checkpointed into the database yet
    store.add_local_models([_local("a", 1201)])  # a pooled connection's commit checkpoints
    assert database.stat().st_size > size
    assert store.count_local_models() == 1201
    store.close()


def test_commit_global_is_one_transaction(url: str) -> None:
    store = Store(url)
    store.start_round(1)
    store.commit_global(_global(1, "y" * 64), next_round=2, now=2.0)
    with pytest.raises(IntegrityError):  # same round twice: the whole commit rolls back
        store.commit_global(_global(1, "z" * 64), next_round=3, now=3.0)
    assert store.round(3) is None
    assert store.latest_global().model_id == "y" * 64  # type: ignore[union-attr]
    store.close()


def test_meta_round_trip(url: str) -> None:
    store = Store(url)
    assert store.get_meta("k") is None
    store.set_meta("k", [{"name": "w"}])
    store.set_meta("k", [{"name": "v"}])
    assert store.get_meta("k") == [{"name": "v"}]
    store.close()


# The DDL that fedloop 0.1's `Base.metadata.create_all` ran, before there were migrations.
LEGACY_SCHEMA = """
CREATE TABLE agents (id VARCHAR(64) NOT NULL, name VARCHAR(128) NOT NULL,
    registered_at FLOAT NOT NULL, last_seen FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (name));
CREATE TABLE global_models (round {serial} NOT NULL, model_id VARCHAR(64) NOT NULL,
    contributors JSON NOT NULL, total_samples INTEGER NOT NULL, metrics JSON NOT NULL,
    seconds FLOAT NOT NULL, state_id VARCHAR(64), created_at FLOAT NOT NULL,
    PRIMARY KEY (round));
CREATE TABLE meta ("key" VARCHAR(64) NOT NULL, value JSON NOT NULL, PRIMARY KEY ("key"));
CREATE TABLE rounds (number {serial} NOT NULL, started_at FLOAT NOT NULL, closed_at FLOAT,
    PRIMARY KEY (number));
CREATE TABLE evaluations (id {serial} NOT NULL, agent_id VARCHAR(64) NOT NULL,
    round INTEGER NOT NULL, metrics JSON NOT NULL, created_at FLOAT NOT NULL, PRIMARY KEY (id),
    UNIQUE (agent_id, round), FOREIGN KEY(agent_id) REFERENCES agents (id));
CREATE INDEX ix_evaluations_round ON evaluations (round);
CREATE TABLE local_models (id {serial} NOT NULL, agent_id VARCHAR(64) NOT NULL,
    round INTEGER NOT NULL, base_round INTEGER NOT NULL, model_id VARCHAR(64) NOT NULL,
    num_samples INTEGER NOT NULL, metrics JSON NOT NULL, nbytes INTEGER NOT NULL,
    created_at FLOAT NOT NULL, PRIMARY KEY (id), UNIQUE (agent_id, round),
    FOREIGN KEY(agent_id) REFERENCES agents (id));
CREATE INDEX ix_local_models_round ON local_models (round)
"""


def _revision(url: str) -> str | None:
    engine = create_engine(driver_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            return MigrationContext.configure(connection).get_current_revision()
    finally:
        engine.dispose()


def test_migrations_make_exactly_the_models_schema(url: str) -> None:
    Store(url).close()
    assert _revision(url) == head_revision()
    engine = create_engine(driver_url(url), poolclass=NullPool)
    try:
        with engine.connect() as connection:
            from alembic.autogenerate import compare_metadata

            # Models and migrations agree: autogenerate would write an empty revision.
            assert compare_metadata(MigrationContext.configure(connection), Base.metadata) == []
            assert "alembic_version" in inspect(connection).get_table_names()
    finally:
        engine.dispose()


def test_database_made_before_migrations_is_adopted_with_its_rows(url: str) -> None:
    serial = "SERIAL" if url.startswith("postgresql") else "INTEGER"
    statements = [s for s in LEGACY_SCHEMA.format(serial=serial).split(";") if s.strip()]
    _sql(url, *statements, "INSERT INTO agents VALUES ('a', 'site-a', 1.0, 2.0)")
    assert _revision(url) is None

    store = Store(url)
    assert [(a.id, a.name, a.last_seen) for a in store.agents()] == [("a", "site-a", 2.0)]
    store.start_round(1)
    store.close()
    assert _revision(url) == head_revision()


def test_processes_starting_on_one_new_database_at_once_all_come_up(url: str) -> None:
    # Each process waits for the same instant, then opens the store (and migrates).
    start = time.time() + 2.0
    code = (
        "import sys, time; from fedloop.store.db import Store\n"
        "time.sleep(max(0.0, float(sys.argv[2]) - time.time()))\n"
        "store = Store(sys.argv[1]); store.set_meta(sys.argv[3], 1); store.close()\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, str(start), f"p{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(4)
    ]
    outputs = [p.communicate(timeout=60)[0].decode(errors="replace") for p in processes]
    assert [p.returncode for p in processes] == [0] * 4, "\n".join(outputs)
    assert _revision(url) == head_revision()
    store = Store(url)
    assert [store.get_meta(f"p{i}") for i in range(4)] == [1] * 4
    store.close()


def test_writers_in_several_processes_wait_for_each_other(url: str) -> None:
    # `fedloop token create` next to a running aggregator: processes writing one database.
    # A write that reads first (merge: SELECT, then INSERT or UPDATE) is one transaction that
    # holds the write lock from its start: the processes take turns on the same new keys
    # instead of both inserting one (IntegrityError) or failing "database is locked".
    Store(url).close()
    code = (
        "import sys; from fedloop.store.db import Store\n"
        "store = Store(sys.argv[1])\n"
        "for i in range(150): store.set_meta(f'k{i}', sys.argv[2])\n"
        "store.close()\n"
    )
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", code, url, f"w{i}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for i in range(3)
    ]
    outputs = [p.communicate(timeout=120)[0].decode(errors="replace") for p in processes]
    assert [p.returncode for p in processes] == [0] * 3, "\n".join(outputs)
    store = Store(url)
    assert all(store.get_meta(f"k{i}") in ("w0", "w1", "w2") for i in range(150))
    store.close()


def test_schema_from_a_newer_fedloop_is_refused_with_a_clear_error(url: str) -> None:
    Store(url).close()
    _sql(url, "UPDATE alembic_version SET version_num = 'f00d'")
    with pytest.raises(FedloopError, match="newer fedloop"):
        Store(url)


def test_unreachable_postgres_is_a_clear_error() -> None:
    # Port 1 on loopback refuses connections; no server is needed for this test.
    with pytest.raises(FedloopError, match=r"cannot open the database .*\*\*\*@127.0.0.1:1/"):
        Store("postgresql://user:secret@127.0.0.1:1/fedloop")


def test_blob_store_is_content_addressed_and_atomic(tmp_path: Path) -> None:
    blobs = BlobStore(tmp_path / "blobs")
    key = blobs.put(b"hello")
    assert key == blob_id(b"hello") and blobs.get(key) == b"hello"
    assert blobs.put(b"hello") == key and blobs.keys() == {key}
    assert not list((tmp_path / "blobs").glob("*/*/.tmp-*"))
    with pytest.raises(KeyError):
        blobs.path("../etc/passwd")
    blobs.delete(key)
    assert not blobs.exists(key)


@pytest.mark.parametrize("make", [HashedBody, PooledBody])
def test_body_pool_reuses_a_buffer_only_once_nothing_views_it(
    make: Any,
) -> None:
    pool = BodyPool(make, keep_bytes=1024)
    first = pool.acquire(100)
    first[:] = b"x" * 100
    first.digest = "old"
    address = id(first)
    tensor = np.frombuffer(memoryview(first), dtype=np.float32)  # a decoded upload views it
    del first
    busy = pool.acquire(100)
    assert id(busy) != address, "handed out a buffer that a tensor still views"
    del tensor
    again = pool.acquire(100)
    assert id(again) == address and again.digest is None and type(again) is make
    assert bytes(again) == b"x" * 100  # not zeroed: the caller overwrites all of it


@pytest.mark.parametrize("make", [HashedBody, PooledBody])
def test_body_pool_keeps_at_most_keep_bytes_of_buffers(
    make: Any,
) -> None:
    pool = BodyPool(make, keep_bytes=250)
    held = [pool.acquire(100) for _ in range(3)]  # the third is not kept: 300 > 250
    ids = [id(b) for b in held]
    del held
    assert id(pool.acquire(100)) in ids[:2]
    other = pool.acquire(200)  # room is made by forgetting free buffers of another size
    assert len(other) == 200
    del other
    assert len(pool.acquire(200)) == 200


def test_blob_store_writes_again_after_its_directories_were_removed(tmp_path: Path) -> None:
    import shutil

    blobs = BlobStore(tmp_path / "blobs")
    first = blobs.put(b"one")
    shutil.rmtree(tmp_path / "blobs" / first[:2])  # e.g. an operator pruning by hand
    again = blobs.put(b"one")
    assert again == first and blobs.get(first) == b"one"


@pytest.mark.parametrize("fsync", [True, False])
def test_a_blob_on_disk_leaves_the_page_cache_and_reads_back_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fsync: bool
) -> None:
    # Written once, seldom read: once fsynced, its pages are dropped from the cache (a
    # simulation does not fsync, and its workers map the stored global model: kept there).
    import os

    advice: list[tuple[int, int, int, int]] = []
    real = os.posix_fadvise

    def spy(fd: int, offset: int, length: int, what: int) -> None:
        advice.append((fd, offset, length, what))
        real(fd, offset, length, what)

    monkeypatch.setattr(os, "posix_fadvise", spy)
    blobs = BlobStore(tmp_path / "blobs", fsync=fsync)
    data = np.arange(300_000, dtype=np.float32).tobytes()
    key = blobs.put(data)
    parts_key = blobs.put_parts([data[:1000], memoryview(data)[1000:], b"x"])
    expected = [(0, 0, os.POSIX_FADV_DONTNEED)] * 2 if fsync else []
    assert [a[1:] for a in advice] == expected
    assert blobs.get(key) == data and blobs.get(parts_key) == data + b"x"
