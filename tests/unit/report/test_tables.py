"""The report's tables and files, from a small run written with the Store's own methods."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest

from fedloop.errors import FedloopError
from fedloop.report import open_records, write_report
from fedloop.report.tables import local_model_rows, round_rows
from fedloop.store.blobs import BlobStore
from fedloop.store.db import GlobalModelRow, LocalModelRow, Store, database_url

T0 = 1_700_000_000.0


def _global(store: Store, blobs: BlobStore, number: int, size: int, **fields: object) -> None:
    model_id = blobs.put(bytes([number]) * size)
    row = GlobalModelRow(
        round=number,
        model_id=model_id,
        contributors=fields.get("contributors", []),
        total_samples=fields.get("total_samples", 0),
        metrics=fields.get("metrics", {}),
        seconds=fields.get("seconds", 0.0),
        state_id=None,
        created_at=T0 + number,
    )
    store.commit_global(row, number + 1, now=T0 + number)


def _local(
    store: Store, agent: str, number: int, samples: int, nbytes: int, **metrics: float
) -> None:
    store.add_local_model(
        LocalModelRow(
            agent_id=agent,
            round=number,
            base_round=number - 1,
            model_id="0" * 64,
            num_samples=samples,
            metrics=metrics,
            nbytes=nbytes,
            created_at=T0 + number - 0.5,
        )
    )


@pytest.fixture
def run_dir(tmp_path: Path) -> Path:
    """Two agents, two rounds; agent b skips round 2; a evaluates global models 0-2."""
    data_dir = tmp_path / "aggregator"
    data_dir.mkdir()
    store = Store(database_url(data_dir, None))
    blobs = BlobStore(data_dir / "blobs")
    store.add_agent("id-a", "site-a", now=T0)
    store.add_agent("id-b", "site-b", now=T0)
    store.start_round(0, now=T0)
    _global(store, blobs, 0, 1000, metrics={"accuracy": 0.1})
    _local(store, "id-a", 1, 30, 1100, accuracy=0.5, loss=1.5)
    _local(store, "id-b", 1, 10, 1100, accuracy=0.7, loss=1.0)
    _global(
        store,
        blobs,
        1,
        1000,
        contributors=["id-a", "id-b"],
        total_samples=40,
        metrics={"accuracy": 0.6, "loss": 1.2},
        seconds=2.5,
    )
    _local(store, "id-a", 2, 30, 1100, accuracy=0.8, loss=0.5)
    _global(
        store,
        blobs,
        2,
        1000,
        contributors=["id-a"],
        total_samples=30,
        metrics={"accuracy": 0.8, "loss": 0.6},
        seconds=1.0,
    )
    for number, acc in [(0, 0.1), (1, 0.65), (2, 0.85)]:
        store.add_evaluation("id-a", number, {"accuracy": acc})
    store.add_evaluation("id-b", 0, {"accuracy": 0.12})
    store.close()
    return data_dir


def test_round_rows(run_dir: Path) -> None:
    rows = round_rows(open_records(run_dir))
    assert [r["round"] for r in rows] == [0, 1, 2]
    r0, r1, r2 = rows
    assert (r1["agents"], r1["samples"], r1["seconds"]) == (2, 40, 2.5)
    assert (r0["bytes_up"], r1["bytes_up"], r2["bytes_up"]) == (0, 2200, 1100)
    assert r1["global_model_bytes"] == 1000
    # Global 0: a and b trained from it. Global 1: only a trained from (and evaluated) it.
    assert (r0["downloads_est"], r1["downloads_est"], r2["downloads_est"]) == (2, 1, 1)
    assert r0["bytes_down_est"] == 2000
    assert r1["global_accuracy"] == 0.6 and r0["global_loss"] is None
    assert r1["local_mean_accuracy"] == pytest.approx(0.6)
    assert r1["local_mean_loss"] == pytest.approx(1.25)
    assert r0["local_mean_accuracy"] is None
    assert r0["agents_global_mean_accuracy"] == pytest.approx(0.11)
    assert r2["agents_global_mean_accuracy"] == pytest.approx(0.85)


def test_local_model_rows_put_local_next_to_global(run_dir: Path) -> None:
    rows = local_model_rows(open_records(run_dir))
    assert [(r["round"], r["agent"]) for r in rows] == [(1, "site-a"), (1, "site-b"), (2, "site-a")]
    first = rows[0]
    assert first["base_round"] == 0 and first["num_samples"] == 30 and first["nbytes"] == 1100
    assert first["local_accuracy"] == 0.5 and first["global_accuracy"] == 0.65
    assert rows[1]["global_accuracy"] is None  # b never evaluated global 1


def test_write_report_without_plots_writes_csv_and_html(run_dir: Path, tmp_path: Path) -> None:
    files = write_report(open_records(run_dir), tmp_path / "out", plots=False)
    assert files.png == []
    with files.csv[0].open() as handle:
        table = list(csv.DictReader(handle))
    assert [row["round"] for row in table] == ["0", "1", "2"]
    assert table[0]["local_mean_accuracy"] == ""
    page = files.html.read_text()
    assert "site-b" in page and "<table>" in page
    assert not re.search(r"(src|href)=\"https?://", page)


def test_write_report_with_plots_embeds_them(run_dir: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    files = write_report(open_records(run_dir), tmp_path / "out")
    names = sorted(p.name for p in files.png)
    assert names == ["metric_accuracy.png", "metric_loss.png", "rounds.png"]
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in files.png)
    assert files.html.read_text().count("data:image/png;base64,") == 3


def test_an_out_that_is_a_file_is_one_clear_error(run_dir: Path, tmp_path: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("hi\n")
    reason = f"cannot write the report to {afile}: a file is where a directory should be; "
    with pytest.raises(FedloopError, match="^" + re.escape(reason)):
        write_report(open_records(run_dir), afile, plots=False)
    assert afile.read_text() == "hi\n"


def test_no_database_is_one_clear_error(tmp_path: Path) -> None:
    with pytest.raises(FedloopError, match="no fedloop database"):
        open_records(tmp_path)
    assert not (tmp_path / "fedloop.db").exists()


def test_database_without_rounds_is_one_clear_error(tmp_path: Path) -> None:
    Store(database_url(tmp_path, None)).close()
    with pytest.raises(FedloopError, match="no rounds yet"):
        open_records(tmp_path)
