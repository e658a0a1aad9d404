"""`fedloop report`: a run's records as CSV tables, PNG plots and one self-contained HTML page."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fedloop.errors import FedloopError, path_error
from fedloop.history import PRIVACY_METRICS
from fedloop.report.tables import (
    RunRecords,
    load_records,
    local_model_rows,
    metric_keys,
    round_rows,
    write_csv,
)
from fedloop.store.db import Store, database_url

__all__ = [
    "ReportFiles",
    "RunRecords",
    "load_records",
    "local_model_rows",
    "open_records",
    "round_rows",
    "write_report",
]

# Metrics that describe the local training (its steps, its momentum) rather than measure its
# quality: tabled, not plotted.
_NOT_PLOTTED = {"local_steps", "local_momentum"}
# One figure per metric up to this many; the CSV files hold the rest.
_MAX_METRIC_PLOTS = 6


@dataclass
class ReportFiles:
    """What ``write_report`` wrote."""

    html: Path
    csv: list[Path]
    png: list[Path] = field(default_factory=list)


def open_records(data_dir: str | Path, url: str | None = None) -> RunRecords:
    """Return the records of the run whose database is in ``data_dir`` (or at ``url``).

    Raises ``FedloopError`` when there is no database, or one without any global model.
    """
    directory = Path(data_dir)
    if url is None and not (directory / "fedloop.db").is_file():
        raise FedloopError(
            f"no fedloop database at {directory / 'fedloop.db'}; pass the --data-dir of an "
            "aggregator's run (or --database-url)"
        )
    blobs = directory / "blobs"
    store = Store(database_url(directory, url))
    try:
        records = load_records(store, lambda m: _blob_size(blobs, m))
    finally:
        store.close()
    if not records.global_models:
        raise FedloopError(
            f"the database at {url or directory / 'fedloop.db'} has no rounds yet; run the "
            "aggregator and agents first"
        )
    return records


def _blob_size(root: Path, model_id: str) -> int | None:
    if len(model_id) != 64:
        return None
    path = root / model_id[:2] / model_id[2:4] / f"{model_id}.safetensors"
    try:
        return path.stat().st_size
    except OSError:
        return None


def write_report(
    records: RunRecords, out: str | Path, source: str = "", plots: bool = True
) -> ReportFiles:
    """Write rounds.csv, local_models.csv, the PNG plots and report.html into ``out``."""
    try:
        return _write_report(records, Path(out), source, plots)
    except OSError as exc:
        raise path_error(
            exc, out, "write the report to", "pass --out a directory you can write"
        ) from exc


def _write_report(records: RunRecords, directory: Path, source: str, plots: bool) -> ReportFiles:
    from fedloop.report.html import render_html

    directory.mkdir(parents=True, exist_ok=True)
    rounds = round_rows(records)
    local = local_model_rows(records)
    files = ReportFiles(
        html=directory / "report.html",
        csv=[
            write_csv(rounds, directory / "rounds.csv"),
            write_csv(local, directory / "local_models.csv"),
        ],
    )
    images: dict[str, bytes] = {}
    if plots:
        from fedloop.report.plots import (
            metric_series,
            plot_metric,
            plot_privacy,
            plot_rounds,
            png_bytes,
        )

        keys = metric_keys(
            [
                *(g.metrics for g in records.global_models),
                *(m.metrics for m in records.local_models),
                *(e.metrics for e in records.evaluations),
            ]
        )
        # Accuracy first: it is the figure people look for.
        keys = sorted(
            (k for k in keys if k not in _NOT_PLOTTED | PRIVACY_METRICS),
            key=lambda k: (k != "accuracy", k),
        )
        for key in keys[:_MAX_METRIC_PLOTS]:
            series = metric_series(records, key)
            if not series.empty():
                images[f"metric_{key}.png"] = png_bytes(plot_metric(series))
        images["rounds.png"] = png_bytes(plot_rounds(rounds))
        if any(isinstance(r.get("dp_epsilon"), float) for r in rounds):
            images["privacy.png"] = png_bytes(plot_privacy(rounds))
        for name, png in images.items():
            path = directory / name
            path.write_bytes(png)
            files.png.append(path)
    last = rounds[-1]
    summary: dict[str, object] = {
        "rounds": last["round"],
        "agents": len(records.agents),
        "local models": len(records.local_models),
        "uploaded MB": round(sum(r["bytes_up"] for r in rounds) / 1e6, 3),
        "downloaded MB (estimate)": round(sum(r["bytes_down_est"] or 0 for r in rounds) / 1e6, 3),
        "seconds (sum of rounds)": round(sum(r["seconds"] for r in rounds), 2),
    }
    spent = [r for r in rounds if r.get("dp_delta") is not None]
    if spent:
        eps, delta = spent[-1]["dp_epsilon"], spent[-1]["dp_delta"]
        summary["privacy spent (ε, δ)"] = f"ε = {eps:.4g}, δ = {delta:.3g}"
    for key in metric_keys(g.metrics for g in records.global_models):
        if key not in PRIVACY_METRICS:
            summary[f"final global {key}"] = last.get(f"global_{key}")
    page = render_html("fedloop report", source, summary, rounds, local, images)
    files.html.write_text(page, encoding="utf-8")
    return files
