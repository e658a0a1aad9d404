"""The plots' data (pure) and that every figure is drawn as a real PNG."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fedloop.ml import partition
from fedloop.report.plots import metric_series
from fedloop.report.tables import RunRecords
from fedloop.store.db import AgentRow, EvaluationRow, GlobalModelRow, LocalModelRow

PNG = b"\x89PNG\r\n\x1a\n"


def _records(n_agents: int) -> RunRecords:
    agents = [
        AgentRow(id=f"id{i}", name=f"a{i}", registered_at=0.0, last_seen=0.0)
        for i in range(n_agents)
    ]
    local = [
        LocalModelRow(
            agent_id=f"id{i}",
            round=r,
            base_round=r - 1,
            model_id="0" * 64,
            num_samples=10,
            metrics={"accuracy": 0.1 * r + 0.01 * i, "note": "text"},
            nbytes=100,
            created_at=0.0,
        )
        for r in (1, 2)
        for i in range(n_agents)
    ]
    global_ = [
        GlobalModelRow(
            round=r,
            model_id="0" * 64,
            contributors=[],
            total_samples=0,
            metrics={"accuracy": 0.1 * r},
            seconds=1.0,
            state_id=None,
            created_at=0.0,
        )
        for r in (0, 1, 2)
    ]
    evals = [EvaluationRow(agent_id="id0", round=1, metrics={"accuracy": 0.3}, created_at=0.0)]
    return RunRecords(agents, local, global_, evals)


def test_metric_series_has_global_local_and_agent_global_lines() -> None:
    series = metric_series(_records(2), "accuracy")
    assert series.global_ == [(0, 0.0), (1, 0.1), (2, 0.2)]
    assert series.local["a1"] == [(1, pytest.approx(0.11)), (2, pytest.approx(0.21))]
    assert series.agent_global == {"a0": [(1, 0.3)]}
    assert metric_series(_records(2), "note").empty()  # not a number: nothing to draw


@pytest.mark.parametrize("n_agents", [3, 12])  # one line per agent, then a mean and band
def test_plots_are_pngs(n_agents: int) -> None:
    pytest.importorskip("matplotlib")
    from fedloop.report.plots import plot_metric, plot_rounds, png_bytes
    from fedloop.report.tables import round_rows

    records = _records(n_agents)
    assert png_bytes(plot_metric(metric_series(records, "accuracy"))).startswith(PNG)
    assert png_bytes(plot_rounds(round_rows(records))).startswith(PNG)


def test_label_summary_plot(tmp_path: Path) -> None:
    pytest.importorskip("matplotlib")
    labels = np.repeat(np.arange(4), 10)
    table = partition.label_summary(labels, partition.shards(labels, 4, 2, seed=1))
    path = partition.plot_label_summary(table, tmp_path / "labels.png")
    assert path.read_bytes().startswith(PNG)
