"""The store on a real SQLite file: rows, transactions, blobs."""

from __future__ import annotations

from pathlib import Path

import pytest
from sqlalchemy.exc import IntegrityError

from fedloop.store.blobs import BlobStore, blob_id
from fedloop.store.db import DuplicateUpload, GlobalModelRow, LocalModelRow, Store, database_url


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


def test_rounds_agents_and_models_persist_across_reopen(tmp_path: Path) -> None:
    url = database_url(tmp_path, None)
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
    again.close()


def test_duplicate_upload_is_refused_and_changes_nothing(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path, None))
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


def test_commit_global_is_one_transaction(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path, None))
    store.start_round(1)
    store.commit_global(_global(1, "y" * 64), next_round=2, now=2.0)
    with pytest.raises(IntegrityError):  # same round twice: the whole commit rolls back
        store.commit_global(_global(1, "z" * 64), next_round=3, now=3.0)
    assert store.round(3) is None
    assert store.latest_global().model_id == "y" * 64  # type: ignore[union-attr]


def test_meta_round_trip(tmp_path: Path) -> None:
    store = Store(database_url(tmp_path, None))
    assert store.get_meta("k") is None
    store.set_meta("k", [{"name": "w"}])
    store.set_meta("k", [{"name": "v"}])
    assert store.get_meta("k") == [{"name": "v"}]


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
