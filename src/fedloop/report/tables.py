"""The tables of a report, built from a run's records: one row per round, one per local model.

Everything here is pure: it reads a ``RunRecords`` (what ``load_records`` took from the store
and the blob directory) and returns lists of flat dicts, ready for CSV, HTML or plotting.
"""

from __future__ import annotations

import csv
import math
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedloop.history import PRIVACY_METRICS, privacy_spent
from fedloop.store.db import AgentRow, EvaluationRow, GlobalModelRow, LocalModelRow, Store

__all__ = [
    "RunRecords",
    "agent_names",
    "load_records",
    "local_model_rows",
    "metric_keys",
    "round_rows",
    "write_csv",
]

Row = dict[str, Any]


@dataclass(frozen=True)
class RunRecords:
    """Everything a report reads about one run: the store's rows and the global blobs' sizes."""

    agents: Sequence[AgentRow]
    local_models: Sequence[LocalModelRow]
    global_models: Sequence[GlobalModelRow]
    evaluations: Sequence[EvaluationRow]
    # model_id -> bytes of the stored safetensors blob (absent when the blob is not on disk).
    blob_sizes: Mapping[str, int] = field(default_factory=dict)


def load_records(store: Store, blob_size: Callable[[str], int | None]) -> RunRecords:
    """Return the run's rows from ``store``; ``blob_size(model_id)`` gives a global blob's bytes."""
    global_models = store.global_models()
    sizes: dict[str, int] = {}
    for model in global_models:
        size = blob_size(model.model_id)
        if size is not None:
            sizes[model.model_id] = size
    return RunRecords(
        agents=store.agents(),
        local_models=store.local_models(),
        global_models=global_models,
        evaluations=store.evaluations(),
        blob_sizes=sizes,
    )


def agent_names(records: RunRecords) -> dict[str, str]:
    """Return agent id -> name (the id itself for an agent the store does not list)."""
    names = {a.id: a.name for a in records.agents}
    for agent_id in [m.agent_id for m in records.local_models] + [
        e.agent_id for e in records.evaluations
    ]:
        names.setdefault(agent_id, agent_id)
    return names


def _finite(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_keys(metrics: Iterable[Mapping[str, Any]]) -> list[str]:
    """Return the sorted names of the numeric metrics that appear in any of ``metrics``."""
    return sorted({k for m in metrics for k, v in m.items() if _finite(v) is not None})


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def round_rows(records: RunRecords) -> list[Row]:
    """Return one row per global model (round 0 is the initial model), in round order.

    Columns: ``round``, ``agents`` (local models aggregated), ``samples``, ``seconds``
    (wall time from the round's start to its global model), ``created_at``, ``bytes_up``
    (sum of the round's uploaded local models), ``global_model_bytes`` (size of the stored
    global blob),
    ``downloads_est`` and ``bytes_down_est`` — an **estimate**: the store does not log
    downloads, so every agent known to have used this global model (it trained from it or
    reported an evaluation of it) is counted as one download of the whole blob —, in a run
    with differential privacy ``dp_epsilon`` and ``dp_delta`` (the (ε, δ) spent up to and
    including the round; ε is inf without a guarantee, both None for round 0), then
    ``global_<metric>`` (the aggregator's own evaluation on its held-out set),
    ``local_mean_<metric>`` (mean over the round's local models) and
    ``agents_global_mean_<metric>`` (mean of the agents' evaluations of this global model on
    their own data). Missing values are None.
    """
    local_by_round: dict[int, list[LocalModelRow]] = defaultdict(list)
    users: dict[int, set[str]] = defaultdict(set)
    for local in records.local_models:
        local_by_round[local.round].append(local)
        users[local.base_round].add(local.agent_id)
    evals_by_round: dict[int, list[EvaluationRow]] = defaultdict(list)
    for ev in records.evaluations:
        evals_by_round[ev.round].append(ev)
        users[ev.round].add(ev.agent_id)
    global_keys = [
        k for k in metric_keys(g.metrics for g in records.global_models) if k not in PRIVACY_METRICS
    ]
    local_keys = metric_keys(m.metrics for m in records.local_models)
    eval_keys = metric_keys(e.metrics for e in records.evaluations)
    private = any(privacy_spent(g.metrics) is not None for g in records.global_models)
    rows: list[Row] = []
    for model in sorted(records.global_models, key=lambda g: g.round):
        locals_ = local_by_round.get(model.round, [])
        evals = evals_by_round.get(model.round, [])
        size = records.blob_sizes.get(model.model_id)
        downloads = len(users.get(model.round, set()))
        row: Row = {
            "round": model.round,
            "agents": len(model.contributors),
            "samples": model.total_samples,
            "seconds": round(float(model.seconds), 4),
            "created_at": model.created_at,
            "bytes_up": sum(m.nbytes for m in locals_),
            "global_model_bytes": size,
            "downloads_est": downloads,
            "bytes_down_est": None if size is None else size * downloads,
        }
        if private:
            spent = privacy_spent(model.metrics)
            row["dp_epsilon"] = None if spent is None else spent[0]
            row["dp_delta"] = None if spent is None else spent[1]
        for key in global_keys:
            row[f"global_{key}"] = _finite(model.metrics.get(key))
        for key in local_keys:
            values = [v for m in locals_ if (v := _finite(m.metrics.get(key))) is not None]
            row[f"local_mean_{key}"] = _mean(values)
        for key in eval_keys:
            values = [v for e in evals if (v := _finite(e.metrics.get(key))) is not None]
            row[f"agents_global_mean_{key}"] = _mean(values)
        rows.append(row)
    return rows


def local_model_rows(records: RunRecords) -> list[Row]:
    """Return one row per local model, ordered by round then agent name.

    Columns: ``round``, ``agent``, ``agent_id``, ``base_round`` (the global model it started
    from), ``num_samples``, ``nbytes``, ``created_at``, ``local_<metric>`` (the metrics the
    agent reported with its local model) and ``global_<metric>`` (the same agent's evaluation
    of that round's global model on its own data, when it reported one) — side by side, the
    book's local-versus-global picture.
    """
    names = agent_names(records)
    evals = {(e.agent_id, e.round): e.metrics for e in records.evaluations}
    local_keys = metric_keys(m.metrics for m in records.local_models)
    eval_keys = metric_keys(e.metrics for e in records.evaluations)
    rows: list[Row] = []
    ordered = sorted(records.local_models, key=lambda m: (m.round, names[m.agent_id]))
    for model in ordered:
        row: Row = {
            "round": model.round,
            "agent": names[model.agent_id],
            "agent_id": model.agent_id,
            "base_round": model.base_round,
            "num_samples": model.num_samples,
            "nbytes": model.nbytes,
            "created_at": model.created_at,
        }
        for key in local_keys:
            row[f"local_{key}"] = _finite(model.metrics.get(key))
        evaluation = evals.get((model.agent_id, model.round), {})
        for key in eval_keys:
            row[f"global_{key}"] = _finite(evaluation.get(key))
        rows.append(row)
    return rows


def write_csv(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """Write ``rows`` to ``path`` as CSV (header: every column in first-seen order)."""
    columns: list[str] = []
    for row in rows:
        columns.extend(k for k in row if k not in columns)
    target = Path(path)
    with target.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns, restval="")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return target
