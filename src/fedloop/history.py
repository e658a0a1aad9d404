"""Per-round summary of a run, read from the store: the table `fedloop history` prints."""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from rich.table import Table

from fedloop.store.db import Store


def history_rows(store: Store) -> list[dict[str, Any]]:
    """Return one dict per global model: round, agents, samples, global and mean local metrics."""
    local: dict[int, list[dict[str, float]]] = defaultdict(list)
    nbytes: dict[int, int] = defaultdict(int)
    for row in store.local_models():
        local[row.round].append(row.metrics)
        nbytes[row.round] += row.nbytes
    rows = []
    for model in store.global_models():
        means: dict[str, float] = {}
        metrics_of_round = local.get(model.round, [])
        for key in sorted({k for m in metrics_of_round for k in m}):
            values = [m[key] for m in metrics_of_round if key in m]
            means[key] = sum(values) / len(values)
        rows.append(
            {
                "round": model.round,
                "agents": len(model.contributors),
                "samples": model.total_samples,
                "global_metrics": dict(model.metrics),
                "local_metrics_mean": means,
                "bytes_in": nbytes.get(model.round, 0),
                "seconds": round(model.seconds, 4),
                "created_at": model.created_at,
            }
        )
    return rows


def history_table(rows: list[dict[str, Any]], title: str = "fedloop history") -> Table:
    """Return `rows` as the rich table `fedloop history` and `fedloop simulate` print."""
    keys = sorted({k for r in rows for k in r["global_metrics"]})
    local_keys = sorted({k for r in rows for k in r["local_metrics_mean"]})
    table = Table(title=title)
    for column in ["round", "agents", "samples", *keys, *(f"local {k}" for k in local_keys)]:
        table.add_column(column, justify="right")
    table.add_column("seconds", justify="right")
    for r in rows:
        table.add_row(
            str(r["round"]),
            str(r["agents"]),
            str(r["samples"]),
            *(f"{r['global_metrics'][k]:.4g}" if k in r["global_metrics"] else "" for k in keys),
            *(
                f"{r['local_metrics_mean'][k]:.4g}" if k in r["local_metrics_mean"] else ""
                for k in local_keys
            ),
            f"{r['seconds']:.3f}",
        )
    return table
