"""`fedloop history` rows and table, and the (ε, δ) a DP run keeps with its global models."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
from rich.console import Console

from fedloop.history import history_rows, history_table, privacy_spent
from fedloop.privacy import dp_epsilon
from fedloop.store.db import GlobalModelRow, Store, database_url
from fedloop.strategies import Update, create
from fedloop.strategies.dp import privacy_metrics


def _store(tmp_path: Path, metrics: list[dict[str, float]]) -> Store:
    store = Store(database_url(tmp_path, None))
    store.start_round(0, now=1.0)
    for number, m in enumerate(metrics):
        row = GlobalModelRow(
            round=number,
            model_id=f"{number:064x}",
            contributors=[] if number == 0 else ["a", "b"],
            total_samples=0 if number == 0 else 20,
            metrics=m,
            seconds=0.5,
            state_id=None,
            created_at=1.0 + number,
        )
        store.commit_global(row, number + 1, now=1.0 + number)
    return store


def _text(rows: list[dict[str, object]]) -> str:
    console = Console(width=200, record=True)
    console.print(history_table(rows))  # type: ignore[arg-type]
    return console.export_text()


def test_rows_and_table_without_dp_have_no_epsilon(tmp_path: Path) -> None:
    store = _store(tmp_path, [{}, {"accuracy": 0.5}])
    rows = history_rows(store)
    store.close()
    assert [r["round"] for r in rows] == [0, 1]
    assert all("dp_epsilon" not in r for r in rows)
    assert rows[1]["global_metrics"] == {"accuracy": 0.5}
    assert "ε" not in _text(rows)


def test_rows_and_table_show_epsilon_per_round_and_delta_once(tmp_path: Path) -> None:
    store = _store(
        tmp_path,
        [
            {},
            {"accuracy": 0.5, "dp_epsilon": 0.8125, "dp_delta": 1e-5},
            {"accuracy": 0.6, "dp_epsilon": 1.25, "dp_delta": 1e-5},
        ],
    )
    rows = history_rows(store)
    store.close()
    assert [r["dp_epsilon"] for r in rows] == [None, 0.8125, 1.25]
    assert [r["dp_delta"] for r in rows] == [None, 1e-5, 1e-5]
    # ε and δ are not model metrics: no "dp_epsilon" metric column next to accuracy.
    assert rows[2]["global_metrics"] == {"accuracy": 0.6}
    text = _text(rows)
    assert "ε (δ=1e-05)" in text and text.count("δ") == 1
    lines = {line.split("│")[1].strip(): line for line in text.splitlines() if "│" in line}
    assert "0.8125" in lines["1"] and "1.25" in lines["2"]
    assert "dp_epsilon" not in text


def test_infinite_epsilon_is_stored_as_delta_alone_and_shown_as_inf(tmp_path: Path) -> None:
    s = create("dp_fedavg", clip_norm=1.0, noise_multiplier=0.0, agents_per_round=2)
    zero = {"w": np.zeros(2, np.float32)}
    s.aggregate(zero, [Update(zero, 1, "a", 0), Update(zero, 1, "b", 0)])
    stored = privacy_metrics(s)
    assert stored == {"dp_delta": 1e-5}  # no infinity in JSON
    assert privacy_spent(stored) == (math.inf, 1e-5)
    store = _store(tmp_path, [{}, stored])
    rows = history_rows(store)
    store.close()
    assert rows[1]["dp_epsilon"] == "inf"
    assert "inf" in _text(rows)


def test_privacy_metrics_are_the_epsilon_after_each_round() -> None:
    assert privacy_metrics(create("fedavg")) == {}
    s = create("dp_fedavg", noise_multiplier=1.1, num_agents=100, agents_per_round=2, seed=1)
    zero = {"w": np.zeros(3, np.float32)}
    seen = []
    for r in range(1, 4):
        s.aggregate(zero, [Update(zero, 1, "a", r - 1), Update(zero, 1, "b", r - 1)])
        spent = privacy_metrics(s)
        assert spent["dp_delta"] == 1e-5  # min(1e-5, N^-1.1)
        assert spent["dp_epsilon"] == pytest.approx(dp_epsilon(0.02, 1.1, r, 1e-5), rel=1e-12)
        seen.append(spent["dp_epsilon"])
    assert seen == sorted(seen) and seen[0] < seen[-1]
