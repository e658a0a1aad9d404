"""PNG plots of a run (matplotlib, Agg backend): metrics per round, traffic, time.

``metric_series`` is the pure part (what each line shows); the ``plot_*`` functions draw it.
"""

from __future__ import annotations

import io
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fedloop.errors import FedloopError
from fedloop.report.tables import RunRecords, _finite, agent_names

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = [
    "MetricSeries",
    "metric_series",
    "plot_metric",
    "plot_privacy",
    "plot_rounds",
    "png_bytes",
]

# Above this many agents one line each is unreadable: draw their mean and min-max band instead.
MAX_AGENT_LINES = 10

Points = list[tuple[int, float]]


@dataclass
class MetricSeries:
    """The lines of one metric's figure: x is the round, y the metric."""

    key: str
    global_: Points = field(default_factory=list)  # the aggregator's held-out evaluation
    local: dict[str, Points] = field(default_factory=dict)  # agent -> its local models
    agent_global: dict[str, Points] = field(default_factory=dict)  # agent -> its eval of global

    def empty(self) -> bool:
        return not (self.global_ or self.local or self.agent_global)


def metric_series(records: RunRecords, key: str) -> MetricSeries:
    """Return the per-round values of metric ``key``: global, and per agent local and global."""
    names = agent_names(records)
    series = MetricSeries(key)
    for model in sorted(records.global_models, key=lambda g: g.round):
        if (value := _finite(model.metrics.get(key))) is not None:
            series.global_.append((model.round, value))
    local: dict[str, Points] = defaultdict(list)
    for row in records.local_models:
        if (value := _finite(row.metrics.get(key))) is not None:
            local[names[row.agent_id]].append((row.round, value))
    agent_global: dict[str, Points] = defaultdict(list)
    for ev in records.evaluations:
        if (value := _finite(ev.metrics.get(key))) is not None:
            agent_global[names[ev.agent_id]].append((ev.round, value))
    series.local = {a: sorted(p) for a, p in sorted(local.items())}
    series.agent_global = {a: sorted(p) for a, p in sorted(agent_global.items())}
    return series


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError as exc:
        raise FedloopError(
            "fedloop report draws its plots with matplotlib; install it with "
            "`pip install matplotlib` (or pass --no-plots)"
        ) from exc
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def png_bytes(figure: Figure) -> bytes:
    """Return the figure as PNG bytes and free it."""
    plt = _pyplot()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(figure)
    return buffer.getvalue()


def _band(ax: Any, lines: dict[str, Points], label: str, color: str, style: str) -> None:
    by_round: dict[int, list[float]] = defaultdict(list)
    for points in lines.values():
        for x, y in points:
            by_round[x].append(y)
    xs = sorted(by_round)
    means = [sum(by_round[x]) / len(by_round[x]) for x in xs]
    ax.plot(xs, means, style, color=color, label=f"{label}, mean of {len(lines)} agents")
    ax.fill_between(
        xs,
        [min(by_round[x]) for x in xs],
        [max(by_round[x]) for x in xs],
        color=color,
        alpha=0.2,
        label=f"{label}, min-max",
    )


def plot_metric(series: MetricSeries) -> Figure:
    """Return the local-versus-global figure of one metric.

    Black: the global model on the aggregator's held-out set. Solid coloured: each agent's
    local model after training that round. Dashed, same colour: that agent's evaluation of the
    round's global model on its own data.
    """
    plt = _pyplot()
    figure: Figure
    figure, ax = plt.subplots(figsize=(8, 4.5))
    agents = sorted(set(series.local) | set(series.agent_global))
    if len(agents) > MAX_AGENT_LINES:
        if series.local:
            _band(ax, series.local, "local models", "tab:blue", "-")
        if series.agent_global:
            _band(ax, series.agent_global, "global model on agents' data", "tab:orange", "--")
    else:
        colors = plt.get_cmap("tab10")
        for i, agent in enumerate(agents):
            color = colors(i % 10)
            if agent in series.local:
                xs, ys = zip(*series.local[agent], strict=True)
                ax.plot(xs, ys, "-o", color=color, markersize=3, label=f"{agent} local")
            if agent in series.agent_global:
                xs, ys = zip(*series.agent_global[agent], strict=True)
                ax.plot(xs, ys, "--", color=color, alpha=0.7, label=f"{agent} global (own data)")
    if series.global_:
        xs, ys = zip(*series.global_, strict=True)
        ax.plot(xs, ys, "-s", color="black", linewidth=2.2, markersize=4, label="global model")
    ax.set_xlabel("round")
    ax.set_ylabel(series.key)
    ax.set_title(f"{series.key}: local models vs global model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="best", ncol=2 if len(agents) > 4 else 1)
    return figure


def plot_rounds(rows: Sequence[dict[str, Any]]) -> Figure:
    """Return a three-panel figure: agents and samples, megabytes moved, seconds, per round."""
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    figure: Figure
    figure, (top, middle, bottom) = plt.subplots(3, 1, figsize=(8, 8.5), sharex=True)
    rounds = [r["round"] for r in rows]
    top.bar(rounds, [r["agents"] for r in rows], color="tab:blue", label="agents aggregated")
    top.set_ylabel("agents")
    top.yaxis.set_major_locator(MaxNLocator(integer=True))
    twin = top.twinx()
    twin.plot(rounds, [r["samples"] for r in rows], "-o", color="tab:red", markersize=3)
    twin.set_ylabel("samples", color="tab:red")
    top.set_title("agents and samples per round")
    width = 0.4
    up = [r["bytes_up"] / 1e6 for r in rows]
    down = [(r["bytes_down_est"] or 0) / 1e6 for r in rows]
    middle.bar([x - width / 2 for x in rounds], up, width, label="uploads (local models)")
    middle.bar(
        [x + width / 2 for x in rounds],
        down,
        width,
        label="downloads of the round's global model (estimate)",
    )
    middle.set_ylim(0, 1.35 * max([*up, *down, 1e-6]))
    middle.set_ylabel("MB")
    middle.set_title("bytes moved per round")
    middle.legend(fontsize=8, loc="upper left")
    bottom.plot(rounds, [r["seconds"] for r in rows], "-o", markersize=3)
    bottom.set_ylabel("seconds")
    bottom.set_xlabel("round")
    bottom.set_title("seconds per round (round opened to global model stored)")
    for ax in (top, middle, bottom):
        ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure


def plot_privacy(rows: Sequence[dict[str, Any]]) -> Figure:
    """Return ε spent up to and including each round (the ``dp_epsilon`` of ``round_rows``).

    Rounds without a guarantee (ε infinite) or without accounting are left out.
    """
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    points = [(r["round"], v) for r in rows if (v := _finite(r.get("dp_epsilon"))) is not None]
    deltas = sorted({r["dp_delta"] for r in rows if r.get("dp_delta") is not None})
    figure: Figure
    figure, ax = plt.subplots(figsize=(8, 3.5))
    if points:
        xs, ys = zip(*points, strict=True)
        ax.plot(xs, ys, "-o", color="tab:purple", markersize=3)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("round")
    ax.set_ylabel("ε")
    delta = f" at δ = {deltas[0]:.3g}" if len(deltas) == 1 else ""
    ax.set_title(f"privacy spent: ε{delta} up to and including each round")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    figure.tight_layout()
    return figure
