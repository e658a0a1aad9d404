"""Per-round summary of a run, read from the store: the table `fedloop history` prints."""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from typing import Any

from rich.table import Table

from fedloop.store.db import Store
from fedloop.strategies.dp import DELTA_METRIC, EPSILON_METRIC

PRIVACY_METRICS = frozenset({EPSILON_METRIC, DELTA_METRIC})


def privacy_spent(metrics: Mapping[str, Any]) -> tuple[float, float] | None:
    """Return the (ε, δ) a global model's metrics record, ε = inf when only δ is; None if neither.

    A DP strategy's aggregator stores both with every global model it aggregates
    (``fedloop.strategies.dp.privacy_metrics``); round 0, the initial model, has none.
    """
    if DELTA_METRIC not in metrics:
        return None
    eps = metrics.get(EPSILON_METRIC)
    return (math.inf if eps is None else float(eps)), float(metrics[DELTA_METRIC])


def without_privacy(metrics: Mapping[str, Any]) -> dict[str, Any]:
    """Return ``metrics`` less the privacy keys: what is left measures the model."""
    return {k: v for k, v in metrics.items() if k not in PRIVACY_METRICS}


def history_rows(store: Store) -> list[dict[str, Any]]:
    """Return one dict per global model: round, agents, samples, global and mean local metrics.

    In a run with differential privacy each row also has ``dp_epsilon`` (the ε spent up to and
    including that round, the string "inf" without a guarantee, None for round 0) and
    ``dp_delta``.
    """
    local: dict[int, list[dict[str, float]]] = defaultdict(list)
    nbytes: dict[int, int] = defaultdict(int)
    for row in store.local_models():
        local[row.round].append(row.metrics)
        nbytes[row.round] += row.nbytes
    rows = []
    models = store.global_models()
    private = any(privacy_spent(m.metrics) is not None for m in models)
    for model in models:
        means: dict[str, float] = {}
        metrics_of_round = local.get(model.round, [])
        for key in sorted({k for m in metrics_of_round for k in m}):
            values = [m[key] for m in metrics_of_round if key in m]
            means[key] = sum(values) / len(values)
        summary: dict[str, Any] = {
            "round": model.round,
            "agents": len(model.contributors),
            "samples": model.total_samples,
            "global_metrics": without_privacy(model.metrics),
            "local_metrics_mean": means,
            "bytes_in": nbytes.get(model.round, 0),
            "seconds": round(model.seconds, 4),
            "created_at": model.created_at,
        }
        if private:
            spent = privacy_spent(model.metrics)
            eps = None if spent is None else spent[0]
            # JSON has no infinity: "inf", as the strategy's round config sends it.
            summary["dp_epsilon"] = eps if eps is None or math.isfinite(eps) else "inf"
            summary["dp_delta"] = None if spent is None else spent[1]
        rows.append(summary)
    return rows


def history_table(rows: list[dict[str, Any]], title: str = "fedloop history") -> Table:
    """Return `rows` as the rich table `fedloop history` and `fedloop simulate` print."""
    keys = sorted({k for r in rows for k in r["global_metrics"]})
    local_keys = sorted({k for r in rows for k in r["local_metrics_mean"]})
    table = Table(title=title)
    for column in ["round", "agents", "samples", *keys, *(f"local {k}" for k in local_keys)]:
        table.add_column(column, justify="right")
    deltas = sorted({r["dp_delta"] for r in rows if r.get("dp_delta") is not None})
    if deltas:
        # δ is fixed for a run: said once in the header, ε then reads as (ε, δ)-DP so far.
        table.add_column(f"ε (δ={deltas[0]:.3g})" if len(deltas) == 1 else "ε", justify="right")
        if len(deltas) > 1:
            table.add_column("δ", justify="right")
    table.add_column("seconds", justify="right")
    for r in rows:
        privacy: list[str] = []
        if deltas:
            eps = r.get("dp_epsilon")
            privacy.append("" if eps is None else eps if isinstance(eps, str) else f"{eps:.4g}")
            if len(deltas) > 1:
                delta = r.get("dp_delta")
                privacy.append("" if delta is None else f"{delta:.3g}")
        table.add_row(
            str(r["round"]),
            str(r["agents"]),
            str(r["samples"]),
            *(f"{r['global_metrics'][k]:.4g}" if k in r["global_metrics"] else "" for k in keys),
            *(
                f"{r['local_metrics_mean'][k]:.4g}" if k in r["local_metrics_mean"] else ""
                for k in local_keys
            ),
            *privacy,
            f"{r['seconds']:.3f}",
        )
    return table
