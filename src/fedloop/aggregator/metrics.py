"""The aggregator's Prometheus `/metrics` page, in text exposition format 0.0.4.

Written by hand rather than with ``prometheus_client``: everything it reports is already
counted by the aggregator, so a registry would only be a second copy of the same numbers.
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from fedloop.aggregator.service import Aggregator

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Upper bounds in seconds. A round waits for people's training (seconds to hours); an
# aggregation is arithmetic on arrays (milliseconds to a minute).
ROUND_BUCKETS = (0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0)
AGGREGATION_BUCKETS = (0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)

# Round durations only change when a global model is committed: read them from the store once
# per global model, not once per scrape.
_round_seconds: weakref.WeakKeyDictionary[Aggregator, tuple[int, list[float]]] = (
    weakref.WeakKeyDictionary()
)


def _number(value: float) -> str:
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    if not labels:
        return ""
    inner = ",".join(f'{key}="{_escape(value)}"' for key, value in labels.items())
    return "{" + inner + "}"


class _Page:
    """Collects metric families; each one's HELP and TYPE lines come once, before its samples."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {_escape(help_text)}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, labels: Mapping[str, str] | None = None) -> None:
        self.lines.append(f"{name}{_labels(labels or {})} {_number(value)}")

    def single(self, name: str, kind: str, help_text: str, value: float) -> None:
        self.family(name, kind, help_text)
        self.sample(name, value)

    def histogram(
        self, name: str, help_text: str, values: Iterable[float], buckets: Sequence[float]
    ) -> None:
        observed = [float(v) for v in values if math.isfinite(v)]
        self.family(name, "histogram", help_text)
        for bound in buckets:
            count = sum(1 for v in observed if v <= bound)
            self.sample(f"{name}_bucket", count, {"le": _number(bound)})
        self.sample(f"{name}_bucket", len(observed), {"le": "+Inf"})
        self.sample(f"{name}_sum", sum(observed))
        self.sample(f"{name}_count", len(observed))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"


def round_seconds(aggregator: Aggregator) -> list[float]:
    """Return how long each aggregated round took, from its opening to its global model."""
    cached = _round_seconds.get(aggregator)
    if cached is not None and cached[0] == aggregator.global_round:
        return cached[1]
    # Round 0 is the initial model: it is registered, not aggregated, and took no time.
    seconds = [row.seconds for row in aggregator.store.global_models() if row.round > 0]
    _round_seconds[aggregator] = (aggregator.global_round, seconds)
    return seconds


def render(aggregator: Aggregator) -> str:
    """Return the aggregator's metrics as a Prometheus text exposition (format 0.0.4).

    Reads the store (round durations) when a new global model exists since the last call:
    call it from a worker thread in async code.
    """
    status = aggregator.status()
    stats = dict(aggregator.stats)  # copies: the event loop may change them meanwhile
    page = _Page()

    page.single(
        "fedloop_round",
        "gauge",
        "Round now collecting local models (the number its global model will get); 0 before "
        "the first agent registers.",
        status.round,
    )
    page.single(
        "fedloop_global_round",
        "gauge",
        "Round of the latest global model; -1 before there is one, 0 for the initial model.",
        status.global_round,
    )
    page.single(
        "fedloop_rounds_completed_total",
        "counter",
        "Rounds aggregated into a global model.",
        max(0, status.global_round),
    )
    page.single(
        "fedloop_round_uploads",
        "gauge",
        "Local models received for the current round.",
        status.uploads,
    )
    page.single(
        "fedloop_round_uploads_needed",
        "gauge",
        "Local models that close the current round.",
        status.needed,
    )
    if status.deadline_in is not None:
        page.single(
            "fedloop_round_deadline_seconds",
            "gauge",
            "Seconds left until the current round's deadline.",
            status.deadline_in,
        )
    page.single(
        "fedloop_finished",
        "gauge",
        "1 once the configured number of rounds is done, else 0.",
        1 if status.finished else 0,
    )
    page.single(
        "fedloop_agents_registered",
        "gauge",
        "Agents registered with the aggregator.",
        status.registered_agents,
    )
    page.single(
        "fedloop_agents_connected",
        "gauge",
        "Agents with an open push connection (WebSocket).",
        len(aggregator.connected),
    )
    page.single(
        "fedloop_uploads_total",
        "counter",
        "Local models accepted.",
        stats.get("uploads", 0),
    )

    page.family("fedloop_rejected_requests_total", "counter", "Requests refused, by reason.")
    by_reason: dict[str, int] = dict(getattr(aggregator, "rejected_by_reason", None) or {})
    for reason in sorted(by_reason):
        page.sample("fedloop_rejected_requests_total", by_reason[reason], {"reason": reason})
    # Refusals counted before reasons were (or by code that does not name one).
    unclassified = stats.get("rejected", 0) - sum(by_reason.values())
    if unclassified > 0 or not by_reason:
        page.sample(
            "fedloop_rejected_requests_total", max(0, unclassified), {"reason": "unclassified"}
        )

    page.single(
        "fedloop_received_bytes_total",
        "counter",
        "Bytes of local models received.",
        stats.get("bytes_in", 0),
    )
    page.single(
        "fedloop_sent_bytes_total",
        "counter",
        "Bytes of global models sent.",
        stats.get("bytes_out", 0),
    )

    page.histogram(
        "fedloop_round_duration_seconds",
        "Seconds from a round's opening to its global model.",
        round_seconds(aggregator),
        ROUND_BUCKETS,
    )
    page.histogram(
        "fedloop_aggregation_duration_seconds",
        "Seconds spent aggregating local models into a global model.",
        list(getattr(aggregator, "aggregation_seconds", None) or []),
        AGGREGATION_BUCKETS,
    )

    model = aggregator.global_model
    if model is not None and model.metrics:
        page.family(
            "fedloop_global_model_metric",
            "gauge",
            "The latest global model's metrics, as the aggregator's evaluator measured them.",
        )
        for name in sorted(model.metrics):
            page.sample("fedloop_global_model_metric", float(model.metrics[name]), {"metric": name})
    return page.text()


def route(aggregator: Aggregator, path: str = "/metrics") -> Route:
    """Return a Starlette route serving `render(aggregator)` at `path`."""

    async def metrics(request: Request) -> Response:
        text = await asyncio.to_thread(render, aggregator)
        return Response(text, media_type=CONTENT_TYPE)

    return Route(path, metrics)
