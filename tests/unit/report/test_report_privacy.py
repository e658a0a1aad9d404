"""The report of a DP run: ε per round in the rounds table, the summary and a plot."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from fedloop.report import open_records, write_report
from fedloop.report.tables import round_rows
from fedloop.store.blobs import BlobStore
from fedloop.store.db import GlobalModelRow, Store, database_url

EPS = [0.5, 0.75, 0.9375]


@pytest.fixture
def dp_run(tmp_path: Path) -> Path:
    data_dir = tmp_path / "aggregator"
    data_dir.mkdir()
    store = Store(database_url(data_dir, None))
    blobs = BlobStore(data_dir / "blobs")
    store.start_round(0, now=1.0)
    for number in range(4):
        metrics = {} if number == 0 else {"dp_epsilon": EPS[number - 1], "dp_delta": 1e-5}
        row = GlobalModelRow(
            round=number,
            model_id=blobs.put(bytes([number]) * 100),
            contributors=[] if number == 0 else ["a"],
            total_samples=0 if number == 0 else 10,
            metrics=metrics,
            seconds=0.1,
            state_id=None,
            created_at=1.0 + number,
        )
        store.commit_global(row, number + 1, now=1.0 + number)
    store.close()
    return data_dir


def test_round_rows_have_epsilon_and_delta_not_as_metrics(dp_run: Path) -> None:
    rows = round_rows(open_records(dp_run))
    assert [r["dp_epsilon"] for r in rows] == [None, *EPS]
    assert [r["dp_delta"] for r in rows] == [None, 1e-5, 1e-5, 1e-5]
    assert not any(k.startswith("global_dp") for r in rows for k in r)


def test_report_shows_epsilon_in_table_summary_and_plot(dp_run: Path, tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    out = tmp_path / "report"
    files = write_report(open_records(dp_run), out, source="test")
    assert {p.name for p in files.png} == {"rounds.png", "privacy.png"}
    with (out / "rounds.csv").open() as handle:
        assert [r["dp_epsilon"] for r in csv.DictReader(handle)] == ["", "0.5", "0.75", "0.9375"]
    page = files.html.read_text()
    assert "<th>dp_epsilon</th>" in page and "<td>0.9375</td>" in page
    assert "privacy spent (ε, δ)" in page and "ε = 0.9375, δ = 1e-05" in page


def test_report_without_dp_has_no_privacy(tmp_path: Path) -> None:
    data_dir = tmp_path / "aggregator"
    data_dir.mkdir()
    store = Store(database_url(data_dir, None))
    store.start_round(0, now=1.0)
    store.commit_global(
        GlobalModelRow(
            round=0, model_id="0" * 64, contributors=[], total_samples=0, metrics={},
            seconds=0.0, state_id=None, created_at=1.0,
        ),
        1,
        now=1.0,
    )  # fmt: skip
    store.close()
    files = write_report(open_records(data_dir), tmp_path / "out", plots=False)
    assert "dp_epsilon" not in files.html.read_text() and "privacy" not in files.html.read_text()
